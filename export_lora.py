"""Export a LoRA checkpoint: a PEFT adapter directory and/or a merged model.

    python export_lora.py --LORA_CKPT=checkpoints/grpo/lora_epoch1_step100.pt --PEFT_DIR=exports/grpo-adapter
    python export_lora.py --LORA_CKPT=... --MERGED_DIR=exports/grpo-merged
    python export_lora.py --LORA_CKPT=... --PEFT_DIR=... --BASE_MODEL_ID=google/gemma-2-2b-it

The PEFT adapter (adapter_config.json + adapter_model.safetensors) loads with
``peft.PeftModel.from_pretrained(base, PEFT_DIR)``, with
``peft.AutoPeftModelForCausalLM.from_pretrained(PEFT_DIR)`` and in LoRA-serving tools: its
base_model_name_or_path is the base's Hub id (BASE_MODEL_ID, else the download record
download_model.py writes, else config.json's _name_or_path), or, failing those, the base's
absolute local path, with a warning (it then loads on this machine only).

The merged model has W + (alpha/r)·B·A folded into the base weights, in the dtype the base is
stored in (a bf16 base stays bf16), and is saved with ``save_pretrained`` (safetensors) beside
the base's tokenizer as the base has it (its own padding side and pad token, not the left
padding this repository sets for generation): it loads like any model, with --MODEL_PATH in this
repository's scripts too.  LORA_CKPT may also be a PEFT adapter directory.

A QLoRA checkpoint (trained with QUANT=nf4) exports like any other: the adapter does not depend on how
the base was stored, and PEFT loads it onto a 4-bit base as well. QUANT=nf4 here loads the base in
4 bits for the PEFT export (less memory); a merged model needs the base in full precision (QUANT=none,
the default), since W + B·A cannot be stored back in 4 bits.
"""

from pathlib import Path

from common.config import configure
from common.quant import Quant

# ---------------------------------------------------------------- constants
LORA_CKPT: Path | None = None  # the checkpoint to export: a .pt, a run directory or a PEFT adapter directory (required)
MODEL_PATH: str | None = None  # base model directory or Hub id (None = the one stored in the checkpoint)
BASE_MODEL_ID: str | None = None  # the adapter's base_model_name_or_path (None = found from the base, see above)
PEFT_DIR: Path | None = None  # write a PEFT adapter here (None = skip)
MERGED_DIR: Path | None = None  # write the merged model here (None = skip)
DEVICE = "cpu"  # device for merging (the CPU is enough and keeps GPU memory free)
DTYPE = "auto"  # dtype of the merged model (auto = the dtype the base's weights are stored in)
QUANT: Quant = "none"  # none, or nf4: the base's linear layers in 4 bits (PEFT export only: a merge needs none)
OVERWRITE = False  # replace existing outputs (else an existing one is refused, before any work)

config = configure(globals())
# ---------------------------------------------------------------------------

if LORA_CKPT is None:
    raise SystemExit("error: --LORA_CKPT=path/to/checkpoint.pt is required")
if PEFT_DIR is None and MERGED_DIR is None:
    raise SystemExit("error: nothing to do: give --PEFT_DIR=... and/or --MERGED_DIR=...")
if MERGED_DIR is not None and QUANT != "none":
    raise SystemExit(f"error: MERGED_DIR with QUANT={QUANT}: the update cannot be merged into 4-bit weights; "
                     f"merge with QUANT=none (the base in full precision)")

from transformers import AutoTokenizer  # noqa: E402

from common.checkpoint import load_checkpoint, restore_lora  # noqa: E402
from common.lora import merge_and_unload  # noqa: E402
from common.model import base_model_name, get_device, get_dtype, load_model, resolve_model_path, saved_dtype  # noqa: E402
from common.peft_io import give_usual_mode, save_peft_adapter  # noqa: E402
from common.run import check_output  # noqa: E402

for name, folder in (("PEFT_DIR", PEFT_DIR), ("MERGED_DIR", MERGED_DIR)):
    if folder is not None:  # before the model loads: an export it cannot write would be lost
        check_output(folder, name, OVERWRITE, folder=True)
checkpoint = load_checkpoint(LORA_CKPT)
base_path = resolve_model_path(MODEL_PATH or checkpoint["base_model"]["path"])
device = get_device(DEVICE)
dtype = saved_dtype(base_path) if DTYPE == "auto" else get_dtype(DTYPE, device)
model = load_model(base_path, device, dtype, QUANT)
restore_lora(model, checkpoint, where=str(LORA_CKPT))
print(f"loaded {LORA_CKPT} (step {checkpoint['step']}, LoRA {checkpoint['lora_config']}) on {base_path} ({dtype})")

if PEFT_DIR is not None:
    base_name, source = base_model_name(base_path, BASE_MODEL_ID)
    if source == "the local path":
        print(f"warning: no Hub id known for {base_path}: the adapter names its base by the local path {base_name}, "
              f"which loads on this machine only; give --BASE_MODEL_ID=owner/name")
    save_peft_adapter(model, PEFT_DIR, base_name)
    print(f"PEFT adapter written to {PEFT_DIR} (base_model_name_or_path {base_name}, from {source})")
if MERGED_DIR is not None:
    merged_layers = merge_and_unload(model)
    model.save_pretrained(MERGED_DIR)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(MERGED_DIR)
    give_usual_mode(Path(MERGED_DIR).glob("*.safetensors"))
    print(f"merged model ({len(merged_layers)} layers merged, {dtype}) written to {MERGED_DIR}")

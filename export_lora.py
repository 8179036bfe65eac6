"""Export a LoRA checkpoint: a PEFT adapter directory and/or a merged model.

    python export_lora.py --LORA_CKPT=checkpoints/grpo/lora_epoch1_step100.pt --PEFT_DIR=exports/grpo-adapter
    python export_lora.py --LORA_CKPT=... --MERGED_DIR=exports/grpo-merged

The PEFT adapter (adapter_config.json + adapter_model.safetensors) loads with
``peft.PeftModel.from_pretrained(base, PEFT_DIR)`` and in LoRA-serving tools.  The
merged model has W + (alpha/r)·B·A folded into the base weights and is saved with
``save_pretrained`` (safetensors) with its tokenizer: it loads like any model,
with --MODEL_PATH in this repository's scripts too.
"""

from pathlib import Path

from common.config import configure

# ---------------------------------------------------------------- constants
LORA_CKPT: Path | None = None  # the checkpoint (.pt) to export (required)
MODEL_PATH: Path | None = None  # base model directory (None = the one stored in the checkpoint)
PEFT_DIR: Path | None = None  # write a PEFT adapter here (None = skip)
MERGED_DIR: Path | None = None  # write the merged model here (None = skip)
DEVICE = "cpu"  # device for merging (the CPU is enough and keeps GPU memory free)
DTYPE = "auto"  # dtype of the merged model (auto = the base model's own: fp32 on CPU)

config = configure(globals())
# ---------------------------------------------------------------------------

if LORA_CKPT is None:
    raise SystemExit("error: --LORA_CKPT=path/to/checkpoint.pt is required")
if PEFT_DIR is None and MERGED_DIR is None:
    raise SystemExit("error: nothing to do: give --PEFT_DIR=... and/or --MERGED_DIR=...")

from common.checkpoint import load_checkpoint, restore_lora  # noqa: E402
from common.lora import merge_and_unload, save_peft_adapter  # noqa: E402
from common.model import load_model_and_tokenizer  # noqa: E402

checkpoint = load_checkpoint(LORA_CKPT)
base_path = MODEL_PATH or Path(checkpoint["base_model"]["path"])
model, tokenizer, _ = load_model_and_tokenizer(base_path, DEVICE, DTYPE)
restore_lora(model, checkpoint, where=str(LORA_CKPT))
print(f"loaded {LORA_CKPT} (step {checkpoint['step']}, LoRA {checkpoint['lora_config']}) on {base_path}")

if PEFT_DIR is not None:
    save_peft_adapter(model, PEFT_DIR, base_path)
    print(f"PEFT adapter written to {PEFT_DIR}")
if MERGED_DIR is not None:
    merged_layers = merge_and_unload(model)
    model.save_pretrained(MERGED_DIR)
    tokenizer.save_pretrained(MERGED_DIR)
    print(f"merged model ({len(merged_layers)} layers merged) written to {MERGED_DIR}")

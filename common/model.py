"""Device, dtype and loading of a Hugging Face causal LM from a local directory or a Hub id.

The same code loads Gemma 2 2B Instruct (downloaded under models/) and the
built-in tiny model (built by make_tiny_model.py).  A MODEL_PATH that is a Hub
id ("Qwen/Qwen2.5-1.5B-Instruct") is downloaded once into models/<name>, with a
record of where it came from; nothing else is fetched at run time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from common.config import REPO_FOLDERS, REPO_ROOT
from common.errors import UserError

TINY_MODEL_PATH = "models/tiny-gemma2-math"
DEFAULT_HUB_ID = "google/gemma-2-2b-it"


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model directory that does not exist, with the commands that create it."""


class DeviceUnavailableError(UserError, RuntimeError):
    """A DEVICE asked for that this machine does not have."""


def get_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu when ``name`` is "auto"; otherwise the device asked for.

    Under torchrun each rank takes the GPU of its LOCAL_RANK (for "auto" and for "cuda" without an
    index), one GPU per process.
    """
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError("DEVICE=cuda asked for, but torch.cuda.is_available() is False: "
                                         "give --DEVICE=auto or cpu")
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceUnavailableError("DEVICE=mps asked for, but torch.backends.mps.is_available() is False: "
                                         "give --DEVICE=auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _has_native_bf16(device: torch.device) -> bool:
    """Whether ``device``'s card computes in bf16 natively (Ampere, compute capability 8.0, and later;
    every ROCm card). torch.cuda.is_bf16_supported() alone also says yes where bf16 is only emulated
    (T4, V100, RTX 20xx: a bf16 tensor can be made, the matmuls run without tensor cores), which is why
    including_emulation=False (torch >= 2.4; torch 2.11 and 2.13 have it) is asked; the capability
    check is the fallback where the keyword is missing."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.get_device_capability(device) >= (8, 0)


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why) of DTYPE=auto on ``device``, ``why`` for the start-up line:

    * bf16 on a CUDA card that has it natively;
    * fp16 on an older card with fp16 tensor cores (compute capability 7.x: V100, T4, RTX 20xx), the
      LoRA masters in fp32 and the loss scaled (common.run.LossScaler): fp16's 5 exponent bits
      underflow small gradients, which dynamic loss scaling lifts back into range;
    * fp32 elsewhere: older CUDA cards (fp16 there has no tensor cores, and on Pascal runs at 1/64
      rate), mps (bf16 matmuls are incomplete on older macOS) and the CPU."""
    if device.type != "cuda":
        return torch.float32, f"float32 on {device.type}"
    name = torch.cuda.get_device_name(device)
    if _has_native_bf16(device):
        return torch.bfloat16, f"bfloat16 on {name} (native bf16)"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 7:
        return torch.float16, (f"float16 on {name} (compute capability {major}.{minor}: bf16 only emulated), "
                               f"fp32 LoRA masters, dynamic loss scaling")
    return torch.float32, f"float32 on {name} (compute capability {major}.{minor}: no bf16, no fp16 tensor cores)"


def get_dtype(name: str, device: torch.device) -> torch.dtype:
    """DTYPE resolved: ``auto`` as auto_dtype decides, else the dtype named."""
    if name == "auto":
        return auto_dtype(device)[0]
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown DTYPE {name!r}; use auto or one of {sorted(dtypes)}")
    return dtypes[name]


def dtype_line(name: str, device: torch.device) -> str:
    """The start-up line that says which dtype DTYPE gave, and why for auto."""
    if name == "auto":
        return f"DTYPE=auto: {auto_dtype(device)[1]}"
    return f"DTYPE={name}"


def missing_model_message(path: str | Path) -> str:
    in_repo = REPO_ROOT / path
    where = (f" (a relative path is taken from the current folder, {Path.cwd()}; the repository has "
             f"{in_repo})") if not Path(path).is_absolute() and in_repo.is_dir() else ""
    return (
        f"model directory {str(path)!r} not found{where}.\n"
        f"  Gemma 2 2B Instruct: accept the licence at https://huggingface.co/{DEFAULT_HUB_ID}, then\n"
        f"      hf download {DEFAULT_HUB_ID} --local-dir models/gemma-2-2b-it\n"
        f"  (or: python download_model.py --REPO_ID={DEFAULT_HUB_ID} --LOCAL_DIR=models/gemma-2-2b-it)\n"
        f"  No download: use the built-in tiny model, --MODEL_PATH={TINY_MODEL_PATH}\n"
        f"      (python make_tiny_model.py builds it if it is absent)"
    )


class IncompleteModelError(UserError, FileNotFoundError):
    """A model directory with a file missing or cut short; the message names it."""


# One of these is the tokenizer: tokenizer.json (fast tokenizers), tokenizer.model (SentencePiece), vocab files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unreadable (cut short, a bad header), or None. A safetensors file is
    an 8-byte little-endian header length, a JSON header giving each tensor's byte range, then the
    data: its size must be 8 + header + the end of the last range. Reads the header only."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 + header_length:
                return f"cut short: {size} bytes, its header alone needs {8 + header_length}"
            header = json.loads(file.read(header_length))
    except (OSError, ValueError) as error:
        return f"not a readable safetensors file ({error})"
    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                   default=0)
    if size != 8 + header_length + data_end:
        return f"cut short: {size} bytes, its header promises {8 + header_length + data_end}"
    return None


def check_model_dir(path: str | Path) -> None:
    """Refuse a model directory that cannot give a working model, naming what is missing or broken:
    config.json, the weights (every shard a *.index.json lists, each complete) and the tokenizer files.
    Without them transformers fails deep inside loading, or worse, builds a 5-token placeholder
    tokenizer and runs on unknown-token prompts."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(missing_model_message(path))
    if not (path / "config.json").is_file():
        raise IncompleteModelError(f"model directory {path} has no config.json")
    index_files = sorted(path.glob("*.safetensors.index.json"))
    if index_files:
        shards = sorted(set(json.loads(index_files[0].read_text())["weight_map"].values()))
        weight_files = [path / shard for shard in shards]
        missing = [file.name for file in weight_files if not file.is_file()]
        if missing:
            raise IncompleteModelError(f"model directory {path} lacks the weight file(s) {', '.join(missing)} "
                                       f"listed in {index_files[0].name}")
    else:
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files and not list(path.glob("pytorch_model*.bin")):
            raise IncompleteModelError(f"model directory {path} has no weights (model.safetensors, or shards "
                                       f"with their model.safetensors.index.json)")
    for file in weight_files:
        problem = safetensors_problem(file)
        if problem:
            raise IncompleteModelError(f"{file}: {problem}; download it again")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise IncompleteModelError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                   f"copy the tokenizer files of the model beside its weights")


def load_tokenizer(path: str | Path):
    """The tokenizer of ``path``, with a pad token and left padding (for generation)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(missing_model_message(path))
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        # Masks are built from lengths, never from pad ids, so pad == eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Gemma 2 soft-caps its attention logits, which only the eager attention implements exactly (Gemma 3
# is given it too); other models get transformers' default, sdpa.
EAGER_ATTENTION_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")
# Gemma 3's activations are reported to pass fp16's range (inf and NaN in float16 on T4s, in Unsloth's
# Gemma 3 notes); Gemma 2 has the same design,
# the embeddings scaled by sqrt(hidden) and large residuals between its post-norms, so on an fp16 card
# (a T4) both are warned of (issue 29, finding 10).
FP16_OVERFLOW_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, quant: str = "none"):
    """The causal LM of ``path`` on ``device`` in ``dtype``, in eval mode.

    ``quant`` "nf4": the linear layers of the body in 4-bit NF4, quantized as they load, straight
    onto ``device`` (common/quant.py); the embeddings, norms and output head stay in ``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.quant import check_quant, keep_trainable_layout, quantization_config

    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(missing_model_message(path))
    check_quant(quant, device)
    config = AutoConfig.from_pretrained(path)
    if dtype is torch.float16 and config.model_type in FP16_OVERFLOW_MODEL_TYPES:
        print(f"warning: {config.model_type} in float16 may overflow (activations past fp16's 65504): an update "
              f"whose loss or gradients are not finite is skipped; DTYPE=float32 avoids it (twice the weights' memory)")
    kwargs = {"dtype": dtype}
    if config.model_type in EAGER_ATTENTION_MODEL_TYPES:
        kwargs["attn_implementation"] = "eager"
    if quant != "none":
        # Placed by from_pretrained: a quantized model cannot be moved with .to() afterwards.
        kwargs.update(quantization_config=quantization_config(quant, dtype), device_map={"": str(device)})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant == "none":
        model.to(device)
    else:
        keep_trainable_layout(model)
    model.eval()
    return model


def meta_model(path: str | Path):
    """The causal LM of ``path`` built from its config.json on the meta device: its modules and shapes
    without weights or memory (checking LORA_TARGETS before the weights load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def context_length(model) -> int:
    """The longest sequence the model (or its config) takes: its language model's max_position_embeddings
    (a Gemma 3 multimodal config keeps it in its text_config)."""
    return getattr(model, "config", model).get_text_config().max_position_embeddings


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: EOS, plus the chat template's end-of-turn.

    Gemma 2 Instruct ends its turn with <end_of_turn> (id 107) and lists both in
    its generation_config; a model without one stops at EOS alone.
    """
    ids: list[int] = []
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id not in ids:
                ids.append(int(token_id))
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>") if "<end_of_turn>" in tokenizer.get_vocab() else None
    if end_of_turn is not None and end_of_turn not in ids:
        ids.append(int(end_of_turn))
    # The template's own end of turn: Qwen 2.5 base lists only <|endoftext|>, its template closes with <|im_end|>.
    answer_end = answer_end_token_id(tokenizer, model)
    if answer_end not in ids:
        ids.append(answer_end)
    return ids


# Stands for an answer in a rendered conversation; what the template writes after it closes the turn.
_ANSWER_PROBE = "ANSWER_END_PROBE"


def answer_end_token_id(tokenizer, model=None) -> int:
    """The token that ends an answer in training data (SFT targets, DPO answers; ``model``: the model or
    its config, for its EOS when the tokenizer has none): the first special
    token the chat template writes after an assistant message's content, i.e. the token that closes
    an assistant turn (<end_of_turn> for Gemma, <|im_end|> for Qwen, <|eot_id|> for Llama 3, <|end|>
    for Phi-3, </s> for Mistral); EOS without a template (raw-text prompts end their answers there).

    Not a position in the stop-token list: Qwen 2.5 Instruct's generation_config lists
    [<|im_end|>, <|endoftext|>], and the last of those is not what its template ends a turn with.
    """
    from jinja2.exceptions import TemplateError

    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _ANSWER_PROBE}]
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except TemplateError:
            text = ""
        if _ANSWER_PROBE in text:
            special = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
            special |= set(tokenizer.all_special_ids)
            tail = tokenizer(text.rsplit(_ANSWER_PROBE, 1)[1], add_special_tokens=False)["input_ids"]
            closing = next((token_id for token_id in tail if token_id in special), None)
            if closing is not None:
                return int(closing)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    # A model's generation_config, or a config read before the weights load (its eos_token_id is where
    # transformers builds a missing generation_config from).
    generation_eos = getattr(getattr(model, "generation_config", model), "eos_token_id", None)
    if isinstance(generation_eos, (list, tuple)) and generation_eos:
        return int(generation_eos[0])
    if generation_eos is not None:
        return int(generation_eos)
    raise ValueError("no answer-end token: the tokenizer has no chat template closing an assistant turn with a "
                     "special token, no EOS token, and the model's generation_config no eos_token_id")


MODELS_DIR = Path("models")  # where a Hub id given as MODEL_PATH is downloaded to
# Written beside a download's files: which Hub repository they are (the PEFT export names it as the base).
DOWNLOAD_RECORD = "download_record.json"
# Weights as safetensors only: skip the duplicate .bin / .gguf copies some repositories carry.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(name: str | Path) -> bool:
    """Whether ``name`` reads as a Hub repository id ("Qwen/Qwen2.5-1.5B-Instruct") rather than a local
    path: owner/name, and the owner is neither a local directory nor one of the repository's folders
    ("models/gemma-2-2b-it" is a path, from any folder: never sent to the Hub)."""
    text = str(name)
    owner = text.split("/")[0]
    return bool(_HUB_ID.fullmatch(text)) and not Path(owner).exists() and owner not in REPO_FOLDERS


def download_model(repo_id: str, local_dir: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """Download a Hub model repository into ``local_dir`` (safetensors weights, config, tokenizer) and
    write DOWNLOAD_RECORD there.  ModelNotFoundError, saying what to do, when it cannot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        snapshot_download(repo_id=repo_id, local_dir=local_dir, revision=revision, token=token,
                          allow_patterns=DOWNLOAD_PATTERNS)
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} "
                                 f"while logged in, then run `hf auth login` (or pass a token)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model repository {repo_id!r} on the Hugging Face Hub (or it is private "
                                 f"and you are not logged in)") from None
    except Exception as exc:  # no network, a proxy, a full disk: each HTTP backend raises its own kind
        raise ModelNotFoundError(f"could not download {repo_id} to {local_dir}: {exc}\n"
                                 f"  when online: hf download {repo_id} --local-dir {local_dir}") from None
    record = {"repo_id": repo_id, "revision": revision}
    (Path(local_dir) / DOWNLOAD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(local_dir)


def resolve_model_path(name: str | Path) -> Path:
    """The local directory of MODEL_PATH: the path itself, or for a Hub id ("Qwen/Qwen2.5-1.5B-Instruct")
    models/<name>, downloaded there first when absent (ModelNotFoundError when offline).  A path that
    does not exist is returned as it is: loading it then fails with the missing-model message."""
    path = Path(name)
    if path.is_dir() or not looks_like_hub_id(name):
        return path
    repo_id = str(name)
    local_dir = MODELS_DIR / repo_id.split("/")[1]
    record_file = local_dir / DOWNLOAD_RECORD
    if record_file.is_file():
        recorded = json.loads(record_file.read_text())["repo_id"]
        if recorded != repo_id:
            raise ModelNotFoundError(f"MODEL_PATH {repo_id} would go to {local_dir}, which holds {recorded}; "
                                     f"download it elsewhere (python download_model.py --REPO_ID={repo_id} "
                                     f"--LOCAL_DIR=models/...) and give that directory")
        return local_dir
    if local_dir.is_dir():
        return local_dir  # downloaded by hand (hf download ... --local-dir), without a record
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"MODEL_PATH {repo_id} is not a local directory, and as a Hub id it cannot be downloaded: "
            f"HF_HUB_OFFLINE is set.\n  Online, download it once with\n"
            f"      hf download {repo_id} --local-dir {local_dir}\n"
            f"  then use --MODEL_PATH={local_dir} (or the Hub id again: {local_dir} is where it looks)")
    print(f"MODEL_PATH {repo_id} is a Hub id: downloading it to {local_dir}")
    return download_model(repo_id, local_dir)


def base_model_name(model_path: str | Path, base_model_id: str | None = None) -> tuple[str, str]:
    """(what a PEFT adapter's base_model_name_or_path should say, where it came from): BASE_MODEL_ID
    when given, else the Hub id of the download record, else config.json's _name_or_path when it is
    a Hub id, else the absolute local path (works on this machine only; the caller warns).

    transformers' from_pretrained overwrites _name_or_path with the directory it loaded from, so the
    saved config.json is read rather than model.config."""
    if base_model_id:
        return base_model_id, "BASE_MODEL_ID"
    model_path = Path(model_path)
    record_file = model_path / DOWNLOAD_RECORD
    if record_file.is_file():
        return json.loads(record_file.read_text())["repo_id"], f"{record_file}"
    config_file = model_path / "config.json"
    if config_file.is_file():
        name = json.loads(config_file.read_text()).get("_name_or_path")
        if name and looks_like_hub_id(name):
            return name, f"_name_or_path of {config_file}"
    return str(model_path.resolve()), "the local path"


def saved_dtype(path: str | Path) -> torch.dtype:
    """The dtype a model directory's weights are stored in (config.json's dtype; fp32 if unset): a
    merged export is written in it, so a bf16 base stays bf16 rather than doubling in size."""
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(path).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_model_and_tokenizer(path: str | Path, device_name: str = "auto", dtype_name: str = "auto",
                             quant: str = "none"):
    """(model, tokenizer, device) for a local model directory or a Hub id (see resolve_model_path);
    ``quant`` as in load_model."""
    path = resolve_model_path(path)
    device = get_device(device_name)
    dtype = get_dtype(dtype_name, device)
    print(dtype_line(dtype_name, device))
    tokenizer = load_tokenizer(path)
    model = load_model(path, device, dtype, quant)
    return model, tokenizer, device

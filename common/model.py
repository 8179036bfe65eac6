"""Device, dtype and loading of a Hugging Face causal LM from a local directory.

The same code loads Gemma 2 2B Instruct (downloaded under models/) and the
built-in tiny model (built by make_tiny_model.py); nothing is fetched at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_MODEL_PATH = "models/tiny-gemma2-math"
DEFAULT_HUB_ID = "google/gemma-2-2b-it"


class ModelNotFoundError(FileNotFoundError):
    """A model directory that does not exist, with the commands that create it."""


def get_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu when ``name`` is "auto"; otherwise the device asked for.

    Under torchrun each rank takes the GPU of its LOCAL_RANK (for "auto" and for "cuda" without an
    index), one GPU per process.
    """
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda asked for, but torch.cuda.is_available() is False")
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("DEVICE=mps asked for, but torch.backends.mps.is_available() is False")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on a CUDA GPU that supports it, fp32 elsewhere (mps bf16 matmuls are
    incomplete on older macOS, and fp16 training needs loss scaling we do not do)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown DTYPE {name!r}; use auto or one of {sorted(dtypes)}")
    return dtypes[name]


def missing_model_message(path: str | Path) -> str:
    return (
        f"model directory {str(path)!r} not found.\n"
        f"  Gemma 2 2B Instruct: accept the licence at https://huggingface.co/{DEFAULT_HUB_ID}, then\n"
        f"      hf download {DEFAULT_HUB_ID} --local-dir models/gemma-2-2b-it\n"
        f"  (or: python download_model.py --REPO_ID={DEFAULT_HUB_ID} --LOCAL_DIR=models/gemma-2-2b-it)\n"
        f"  No download: use the built-in tiny model, --MODEL_PATH={TINY_MODEL_PATH}\n"
        f"      (python make_tiny_model.py builds it if it is absent)"
    )


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


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype):
    """The causal LM of ``path`` on ``device`` in ``dtype``, in eval mode.

    Gemma 2 soft-caps its attention logits, which only the eager attention
    implements exactly, so it gets attn_implementation="eager".
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(missing_model_message(path))
    config = AutoConfig.from_pretrained(path)
    kwargs = {"dtype": dtype}
    if config.model_type in ("gemma2", "gemma3", "gemma3_text"):
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    return model


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
    return ids


def load_model_and_tokenizer(path: str | Path, device_name: str = "auto", dtype_name: str = "auto"):
    """(model, tokenizer, device) for a local model directory."""
    device = get_device(device_name)
    dtype = get_dtype(dtype_name, device)
    tokenizer = load_tokenizer(path)
    model = load_model(path, device, dtype)
    return model, tokenizer, device

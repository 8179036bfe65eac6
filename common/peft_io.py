"""PEFT adapter directories in and out: our LoRA <-> adapter_config.json + adapter_model.safetensors.

The layouts agree up to names.  PEFT's PeftModel wraps the transformers model as base_model (a
LoraModel), which holds it as .model, and saves the weights without the adapter name, so a layer
our state calls ``<module path>.lora_A`` is PEFT's ``base_model.model.<module path>.lora_A.weight``,
with the same [r, in] / [out, r] shapes and the same update (lora_alpha / r) · B · A (alpha /
sqrt(r) with use_rslora), PEFT's LoRA Linear in peft/tuners/lora/layer.py.

``read_peft_adapter`` turns an adapter directory into the dict a ``.pt`` checkpoint holds
(common/checkpoint.py), so LORA_CKPT, INIT_LORA and the soup's ingredients take either.  PEFT
options that change the computation beyond that (DoRA, biases, modules_to_save, per-layer ranks,
...) are refused by name rather than silently dropped.  This module does not import PEFT; the
tests check both directions against it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from common.lora import lora_config, lora_state_dict
from common.model import safetensors_problem

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# adapter_config.json settings our LoRALinear does not implement, with the value that means "off".
_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "lora_bias": False,
                "target_parameters": None}


class PeftAdapterError(UserError, ValueError):
    """An adapter directory that is not a LoRA adapter this project can load; the message says why."""


def give_usual_mode(paths: Iterable[str | Path]) -> None:
    """Give the files ``paths`` the mode a new file gets (0o666 less the umask: 0o644 usually).
    safetensors (0.8) writes through a private temporary file, so the files it writes, transformers'
    model.safetensors included, would stay 0o600: unreadable to a group that serves the model."""
    umask = os.umask(0)  # reading the umask means setting it
    os.umask(umask)
    for path in paths:
        Path(path).chmod(0o666 & ~umask)


def is_peft_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / PEFT_CONFIG_FILE).is_file()


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | Path) -> Path:
    """Write the model's LoRA in PEFT's format (adapter_config.json, adapter_model.safetensors), so that
    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads it, and, when
    ``base_model_name_or_path`` names the base (a Hub id, or a path on this machine),
    ``peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)`` too.  Returns out_dir."""
    config = lora_config(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{PEFT_KEY_PREFIX}{key}.weight": tensor for key, tensor in lora_state_dict(model).items()}
    save_file(tensors, str(out_dir / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": config["r"],
        # A whole alpha is written as an integer, as PEFT writes it: Ollama's adapter import reads lora_alpha
        # into an unsigned integer and refuses 32.0 (the trainers' LORA_ALPHA is a float).
        "lora_alpha": int(config["alpha"]) if float(config["alpha"]).is_integer() else config["alpha"],
        "lora_dropout": config["dropout"],
        "target_modules": config["target_modules"],
        "use_rslora": config["use_rslora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    (out_dir / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    give_usual_mode([out_dir / PEFT_WEIGHTS_FILE])
    return out_dir


def _check_config(config: dict, where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise PeftAdapterError(f"{where}: peft_type {config.get('peft_type')!r}; only LoRA adapters load here")
    used = [f"{name}={config[name]!r}" for name, off in _UNSUPPORTED.items()
            if config.get(name) not in (off, None, [], {})]
    if used:
        raise PeftAdapterError(f"{where}: uses {', '.join(used)}, which this project's LoRA does not implement "
                               f"(plain LoRA on linear layers only)")


def read_peft_adapter(path: str | Path) -> dict:
    """A PEFT LoRA adapter directory as a checkpoint dict (the keys of common.checkpoint.CHECKPOINT_KEYS):
    the factors in fp32 under our names, lora_config from adapter_config.json and the weights
    (target_modules: the layers the weights are for), base_model {"path": base_model_name_or_path,
    "fingerprint": None} (PEFT records no shape: the strict shape check of load_lora_state_dict is
    what then refuses another base), step 0 and no optimizer or random state (it cannot be resumed)."""
    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG_FILE, path / PEFT_WEIGHTS_FILE
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise PeftAdapterError(f"{config_file}: bad JSON ({exc.msg} at line {exc.lineno})") from None
    _check_config(config, config_file)
    if not weights_file.is_file():
        raise PeftAdapterError(f"{path}: no {PEFT_WEIGHTS_FILE} (an adapter saved with safe_serialization=False "
                               f"loads in PEFT and saves again as safetensors)")
    problem = safetensors_problem(weights_file)
    if problem:  # safetensors' own SafetensorError is a traceback ("incomplete metadata")
        raise PeftAdapterError(f"{weights_file}: {problem}; export or copy the adapter again")
    state = {}
    for key, tensor in load_file(str(weights_file)).items():
        if not (key.startswith(PEFT_KEY_PREFIX) and key.endswith(_FACTOR_SUFFIXES)):
            raise PeftAdapterError(f"{weights_file}: tensor {key} is not a LoRA factor of a linear layer "
                                   f"({PEFT_KEY_PREFIX}<module>.lora_A/lora_B.weight)")
        state[key[len(PEFT_KEY_PREFIX):-len(".weight")]] = tensor.float()
    if not state:
        raise PeftAdapterError(f"{weights_file}: no LoRA factors")
    ranks = {tensor.shape[0] for key, tensor in state.items() if key.endswith(".lora_A")}
    if ranks != {config["r"]}:
        raise PeftAdapterError(f"{path}: r is {config['r']} in {PEFT_CONFIG_FILE}, the weights have rank(s) {sorted(ranks)}")
    layers = {key.rsplit(".", 1)[0] for key in state}
    lora = {"r": config["r"], "alpha": config["lora_alpha"], "dropout": config.get("lora_dropout", 0.0),
            "target_modules": sorted({layer.rsplit(".", 1)[-1] for layer in layers}),
            "use_rslora": bool(config.get("use_rslora", False))}
    return {"lora": state, "lora_config": lora,
            "base_model": {"path": config.get("base_model_name_or_path"), "fingerprint": None},
            "optimizer": None, "scheduler": None, "epoch": 0, "step": 0, "rng": None, "config": {},
            "extra": {"peft_adapter": str(path)}}

"""LoRA training checkpoints: one ``.pt`` dict, written atomically, read without pickled code.

A checkpoint holds

    lora            the lora_state_dict (adapter weights only: a few MB even for Gemma 2B)
    lora_config     r, alpha, target_modules, dropout, use_rslora
    base_model      the MODEL_PATH it was trained on, and a fingerprint of that model's shape and weights
    optimizer       optimizer state (and ``scheduler``), for an exact resume
    epoch, step     where training was
    rng             python, numpy and torch generator states (and named extra generators)
    config          the run's resolved config
    extra           anything a trainer adds (a critic's weights, say)

It is written to a temporary file in the same directory, flushed, fsync'ed and
renamed into place, so a crash mid-write leaves the previous checkpoint intact.
It is read with ``torch.load(weights_only=True)``: a file that would run code
when unpickled is refused. A save and a load both check the weights (exploded_weights): an adapter
or critic with a NaN, an inf or an entry over WEIGHT_BOUND is never written, and is refused when read.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.lora import apply_lora, load_lora_state_dict, lora_config, lora_modules, lora_state_dict
from common.peft_io import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, is_peft_adapter_dir, read_peft_adapter

CHECKPOINT_KEYS = ("lora", "lora_config", "base_model", "optimizer", "scheduler", "epoch", "step", "rng",
                   "config", "extra")
_NAME = re.compile(r"lora_epoch(\d+)_step(\d+)\.pt$")
# The largest |entry| a saved or loaded adapter (or critic) may hold. A healthy run's stay far below it: the
# demo checkpoints (GRPO, PPO, DPO; r=16, LR 1e-4 to 2e-4, up to 150 steps) hold at most 0.15 in LoRA A, 0.075 in
# LoRA B and 0.16 in PPO's critic, A starts below 1/sqrt(in_features), and AdamW moves an entry by about LR a
# step, so 1e4 is ~5e7 steps away at LR=2e-4. An exploded run is far above: LR=1e30 puts 4e29 in LoRA B in one
# update, and the model's logits are then not finite (eval, resume and soup end there).
WEIGHT_BOUND = 1e4


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A checkpoint path that does not exist, or a run folder without checkpoints."""


def weights_to_check(lora: dict, extra: dict) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds, by the names exploded_weights reports: each LoRA factor
    (``<module>.lora_B`` as "LoRA B of <module>") and the tensors of each state a trainer adds in
    ``extra`` (PPO's ``critic``, as "critic's <name>")."""
    tensors = {}
    for name, tensor in lora.items():
        module, _, kind = name.rpartition(".")
        tensors[f"LoRA {kind.removeprefix('lora_')} of {module}"] = tensor
    for key, state in extra.items():
        if isinstance(state, dict):
            tensors.update({f"{key}'s {name}": tensor for name, tensor in state.items()
                            if isinstance(tensor, torch.Tensor)})
    return tensors


def exploded_weights(tensors: dict[str, torch.Tensor], bound: float = WEIGHT_BOUND) -> str | None:
    """What is wrong with ``tensors`` (name -> tensor; the floating-point ones are read), or None: the worst
    tensor's NaN, inf or largest |entry| over ``bound``, as "an entry of size 4e+29 in LoRA B of <module>".
    One pass: each tensor's max |entry| where it lies, stacked, and one copy to the host (NaN propagates
    through amax, and fails ``<= bound``)."""
    named = [(name, tensor) for name, tensor in tensors.items()
             if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel()]
    if not named:
        return None
    device = named[0][1].device
    peaks = torch.stack([tensor.detach().abs().amax().float().to(device) for _, tensor in named]).tolist()
    bad = [(name, peak) for (name, _), peak in zip(named, peaks) if not peak <= bound]
    if not bad:
        return None
    name, peak = next(((name, peak) for name, peak in bad if math.isnan(peak)), max(bad, key=lambda item: item[1]))
    found = ("a NaN" if math.isnan(peak) else "an inf" if math.isinf(peak) else f"an entry of size {peak:.2g}")
    more = f" (and {len(bad) - 1} more tensor(s) likewise)" if len(bad) > 1 else ""
    return f"{found} in {name}{more}"


def checkpoint_path(run_dir: str | Path, epoch: int, step: int) -> Path:
    return Path(run_dir) / f"lora_epoch{epoch}_step{step}.pt"


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporary_files(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files a killed save left in ``run_dir`` (``.<name>.<pid>.tmp``: a full
    checkpoint each, 36 MB at r=256). Call it holding the run's lock: no live save is then writing."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's name (lora_epoch0_step40.pt: 40)."""
    return int(_NAME.search(Path(path).name)[2])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first (by step, then epoch): those in ``run_dir`` itself, never in a
    folder below it (the abandoned-* folders where a resume with OVERWRITE=true moves later steps aside)."""
    found = [(int(m[2]), int(m[1]), p) for p in Path(run_dir).glob("lora_epoch*_step*.pt")
             if (m := _NAME.search(p.name))]
    return [p for _, _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself (a file, or a PEFT adapter directory), or for a run directory its newest checkpoint."""
    path = Path(path)
    if path.is_dir() and not is_peft_adapter_dir(path):
        found = list_checkpoints(path)
        if not found and (path / PEFT_WEIGHTS_FILE).is_file():
            raise CheckpointNotFoundError(f"{path} holds {PEFT_WEIGHTS_FILE} but no {PEFT_CONFIG_FILE}: a PEFT "
                                          f"adapter folder needs both; copy the adapter's {PEFT_CONFIG_FILE} beside it")
        if not found:
            raise CheckpointNotFoundError(f"no lora_epoch*_step*.pt checkpoint in {path}, and it is no PEFT adapter "
                                          f"folder (those hold {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE})")
        return found[-1]
    return path


def _fingerprinted_tensors(model) -> list[torch.Tensor]:
    """The input embedding and every norm weight: two bases of the same shape (another seed, another
    fine-tune) differ there, and these tensors stay in the model's dtype under 4-bit quantization."""
    return [model.get_input_embeddings().weight] + [
        parameter for name, parameter in model.named_parameters() if "norm" in name.rsplit(".", 2)[-2]]


def weights_hash(model, values_per_tensor: int = 4096) -> str:
    """A hash of the first values of the fingerprinted tensors, as bf16: what checkpoints written
    before weights_sample recorded, compared only with those (the same in fp32 and bf16 runs, not in
    fp16 ones, whose rounding of the same weights differs from bf16's)."""
    digest = hashlib.sha256()
    for tensor in _fingerprinted_tensors(model):
        values = tensor.detach().reshape(-1)[:values_per_tensor].to("cpu", torch.bfloat16)
        digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_sample(model, values_per_tensor: int = 256) -> list[float]:
    """Evenly spaced values of each fingerprinted tensor, as floats. Compared to the dtypes' rounding
    (same_weights), not hashed: no hash of a rounding can be the same for a bf16 and an fp16 load of
    one base, since fp16's finer rounding lands some values on the other side of a bf16 rounding
    boundary (issue 29, finding 3: a LoRA trained in bf16 was refused on an fp16 card)."""
    values = []
    for tensor in _fingerprinted_tensors(model):
        flat = tensor.detach().reshape(-1)
        values += flat[::max(1, flat.numel() // values_per_tensor)][:values_per_tensor].float().tolist()
    return values


def same_weights(ours: list[float], theirs: list[float]) -> bool:
    """Whether two weights_samples are one base's loaded in any of fp32, bf16 and fp16: each value of
    either is the weight rounded to at most bf16's half spacing (2^-8 relative) or fp16's (2^-11, and
    2^-25 below fp16's normal range), so the two are within 2^-7 relative plus 2^-24."""
    if len(ours) != len(theirs):
        return False
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    return bool(((a - b).abs() <= 2.0 ** -7 * torch.maximum(a.abs(), b.abs()) + 2.0 ** -24).all())


def model_fingerprint(model) -> dict:
    """What must match between the model a checkpoint was made for and the one it is loaded into:
    the shape, and some of the weights (a different base of the same shape is refused); see
    fingerprint_differences."""
    config = model.config
    fingerprint = {key: getattr(config, key, None)
                   for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                               "num_attention_heads", "num_key_value_heads")}
    fingerprint["weights_hash"] = weights_hash(model)
    fingerprint["weights_sample"] = weights_sample(model)
    return fingerprint


def fingerprint_differences(saved: dict, current: dict, saved_is: str = "in the checkpoint",
                            current_is: str = "in the model") -> list[str]:
    """What differs between two model_fingerprints: the shape, then the weights, by their samples where
    both have one (any dtype), else by the hash (a checkpoint written before the sample: the same in
    fp32 and bf16 only), else not at all (one written before the hash)."""
    differences = [f"{key}: {saved.get(key)!r} {saved_is}, {current.get(key)!r} {current_is}"
                   for key in current if key not in ("weights_hash", "weights_sample")
                   and saved.get(key) != current.get(key)]
    if "weights_sample" in saved and "weights_sample" in current:
        if not same_weights(saved["weights_sample"], current["weights_sample"]):
            differences.append("weights_sample: the embedding and norm weights differ beyond dtype rounding")
    elif "weights_hash" in saved and saved["weights_hash"] != current.get("weights_hash"):
        differences.append(f"weights_hash: {saved['weights_hash']!r} {saved_is}, {current.get('weights_hash')!r} "
                           f"{current_is} (a checkpoint written before weights_sample matches its base only "
                           f"in an fp32 or bf16 DTYPE)")
    return differences


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state a run draws from, as plain types and tensors (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # A resume on a machine with fewer visible GPUs restores the ones present: set_rng_state_all
        # would index past them (issue 29, finding 11).
        present = torch.cuda.device_count()
        for device, device_state in enumerate(state["cuda"][:present]):
            torch.cuda.set_rng_state(device_state, device)
        if len(state["cuda"]) > present:
            print(f"checkpoint: random states of {len(state['cuda'])} GPUs, {present} visible here: "
                  f"the first {present}'s restored")
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for the random generator {name!r}")
        generator.set_state(state["generators"][name])


def _tensor_bytes(obj) -> int:
    """The bytes of every tensor in ``obj`` (dicts, lists, tuples): nearly all of a checkpoint's size."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def _no_space(path: Path, free: int, needed: int) -> OSError:
    return OSError(errno.ENOSPC, f"No space left on device: {path} ({free / 2**20:.1f} MB free, the checkpoint "
                                 f"needs about {needed / 2**20:.1f} MB; not written, the earlier checkpoints are "
                                 f"intact)")


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file beside ``path``, fsync, then rename over ``path``. The free space is
    compared with the size first (its tensors' bytes, plus 64 KB and 1% for the rest and the zip
    layout); a write that fails for want of space (an OSError ENOSPC, or the RuntimeError torch's zip
    writer raises on a short write: "[enforce fail at inline_container.cc] unexpected pos") is
    reported as such, naming the file, the free space and the size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = int(_tensor_bytes(obj) * 1.01) + 2**16
    if shutil.disk_usage(path.parent).free < needed:
        raise _no_space(path, shutil.disk_usage(path.parent).free, needed)
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        temporary.unlink(missing_ok=True)
        short_write = isinstance(error, RuntimeError) and "inline_container" in str(error)
        if getattr(error, "errno", None) == errno.ENOSPC or (
                short_write and shutil.disk_usage(path.parent).free < 2 * needed):
            raise _no_space(path, shutil.disk_usage(path.parent).free, needed) from None
        raise
    finally:
        if temporary.exists():
            temporary.unlink()
    # Make the rename itself durable: fsync the directory entry.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def save_checkpoint(path: str | Path, model, base_model_path: str | Path, config: dict, optimizer=None,
                    scheduler=None, epoch: int = 0, step: int = 0,
                    generators: dict[str, torch.Generator] | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint of the model's LoRA and the training state to ``path``, atomically."""
    checkpoint = {
        "lora": lora_state_dict(model),
        "lora_config": lora_config(model),
        "base_model": {"path": str(base_model_path), "fingerprint": model_fingerprint(model)},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_state(generators),
        "config": config,
        "extra": extra or {},
    }
    return atomic_torch_save(checkpoint, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint (a file, or a run directory's newest) on the CPU, refusing anything but
    tensors and plain data; a PEFT adapter directory is read as one (common.peft_io.read_peft_adapter)."""
    path = resolve_checkpoint(path)
    if is_peft_adapter_dir(path):
        checkpoint = read_peft_adapter(path)
        _refuse_exploded(path / PEFT_WEIGHTS_FILE, checkpoint)
        return checkpoint
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive: anything else is some other file
        raise CheckpointError(f"{path}: not a checkpoint (a .pt from this repository, or a PEFT adapter folder)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                              f"(loading it would run code). Details: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(checkpoint, dict) or "lora" not in checkpoint or "lora_config" not in checkpoint:
        raise CheckpointError(f"{path}: not a LoRA checkpoint of this project (expected keys {CHECKPOINT_KEYS})")
    _refuse_exploded(path, checkpoint)
    return checkpoint


def _refuse_exploded(path: Path, checkpoint: dict) -> None:
    """Refuse a checkpoint whose adapter (or critic) holds a NaN, an inf or an entry over WEIGHT_BOUND: the
    model's logits would not be finite, and every script reading it would end there."""
    problem = exploded_weights(weights_to_check(checkpoint["lora"], checkpoint.get("extra") or {}))
    if problem:
        raise CheckpointError(f"{path}: refused: its weights exploded in training ({problem}; a healthy "
                              f"adapter's entries stay far below {WEIGHT_BOUND:.0e}): use an earlier checkpoint "
                              f"of its run, or train again with a lower LR")


def check_base_model(checkpoint: dict, model, where: str = "checkpoint") -> None:
    """Refuse a checkpoint made for a model of another shape, naming what differs."""
    saved = checkpoint["base_model"]["fingerprint"]
    if saved is None:
        return  # a PEFT adapter records no shape: load_lora_state_dict's strict shape check guards it
    differences = fingerprint_differences(saved, model_fingerprint(model))
    if differences:
        raise CheckpointError(
            f"{where} was made for another base model ({checkpoint['base_model']['path']}):\n  "
            + "\n  ".join(differences))


def restore_lora(model, checkpoint: dict, where: str = "checkpoint") -> list[str]:
    """Put the checkpoint's LoRA on ``model``: apply_lora with its settings when the model has
    no adapters yet, else check the layout matches; then load the weights strictly."""
    check_base_model(checkpoint, model, where)
    settings = checkpoint["lora_config"]
    if lora_modules(model):
        current = lora_config(model)
        differences = [f"{key}: {settings[key]!r} in the checkpoint, {current[key]!r} in the model"
                       for key in ("r", "alpha", "target_modules", "use_rslora") if settings[key] != current[key]]
        if differences:
            raise CheckpointError(f"{where} has another LoRA layout:\n  " + "\n  ".join(differences))
        wrapped = sorted(lora_modules(model))
    else:
        wrapped = apply_lora(model, r=settings["r"], alpha=settings["alpha"],
                             target_modules=settings["target_modules"], dropout=settings["dropout"],
                             use_rslora=settings["use_rslora"])
    load_lora_state_dict(model, checkpoint["lora"])
    return wrapped


def init_lora_settings(init_lora: str | Path, r: int, alpha: float, target_modules, dropout: float, *,
                       say: bool = True) -> tuple[int, float, tuple[str, ...], float]:
    """The LoRA settings (r, alpha, target modules, dropout) of a run started from ``init_lora``: the checkpoint's,
    which start_lora applies (its weights have its shape), in place of the LORA_* settings given; one line says
    which differed (``say``), so that the script can plan and record the values it trains with."""
    saved = load_checkpoint(init_lora)["lora_config"]
    targets = tuple(target_modules) if sorted(target_modules) == sorted(saved["target_modules"]) else tuple(
        saved["target_modules"])
    used = (saved["r"], saved["alpha"], targets, saved["dropout"])
    differ = [f"{name}={given!r} -> {value!r}" for name, given, value in zip(
        ("LORA_R", "LORA_ALPHA", "LORA_TARGETS", "LORA_DROPOUT"), (r, alpha, tuple(target_modules), dropout), used)
        if given != value]
    if differ and say:
        print(f"INIT_LORA={init_lora}: the LoRA's own layout replaces {', '.join(differ)} (its weights have that "
              f"shape; the run's checkpoints record it)")
    return used


def start_lora(model, resume_checkpoint: dict | None, resume_path, init_lora, r: int, alpha: float,
               target_modules, dropout: float) -> None:
    """The LoRA a trainer starts from: a resumed run's (RESUME wins), else the one of INIT_LORA (a
    checkpoint whose layout replaces the LORA_* settings: an SFT warm-up, a model_soup.py soup), else
    a fresh apply_lora with the LORA_* settings."""
    if resume_checkpoint is not None:
        restore_lora(model, resume_checkpoint, where=str(resume_path))
    elif init_lora is not None:
        restore_lora(model, load_checkpoint(init_lora), where=str(init_lora))
    else:
        apply_lora(model, r, alpha, target_modules, dropout)


def load_lora_checkpoint(model, path: str | Path) -> dict:
    """Load a checkpoint's adapter into ``model`` (for evaluation or export); returns the checkpoint."""
    checkpoint = load_checkpoint(path)
    restore_lora(model, checkpoint, where=str(path))
    return checkpoint


def restore_training_state(checkpoint: dict, optimizer=None, scheduler=None,
                           generators: dict[str, torch.Generator] | None = None) -> None:
    """Optimizer, scheduler and random states, so that a resumed run continues exactly."""
    if optimizer is not None:
        if checkpoint["optimizer"] is None:
            raise CheckpointError("checkpoint has no optimizer state to resume from")
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint["scheduler"] is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    restore_rng_state(checkpoint["rng"], generators)

"""Model soups of LoRA checkpoints: the maths, on plain state dicts, and the compatibility checks.

A LoRA layer adds ΔW = s · B · A to its base weight (s = alpha / r, or alpha / sqrt(r)
with rsLoRA).  A soup of ingredients i with weights w_i (w_i >= 0, Σ w_i = 1) can
average two different things:

* ``delta_soup``: the updates themselves, ΔW_soup = Σ_i w_i · s_i · B_i · A_i.  This is
  exactly a LoRA of rank Σ_i r_i: stack the A_i along the rank (rows) and the B_i along
  the rank (columns), each B_i multiplied by c_i = w_i · s_i / s_soup, because

      s_soup · [c_1 B_1 | ... | c_n B_n] · [A_1; ...; A_n] = s_soup · Σ_i c_i B_i A_i
                                                          = Σ_i w_i · s_i · B_i · A_i.

  The merged weights W + ΔW_soup are then the weighted mean of the ingredients' merged
  weights W + ΔW_i (the base W is shared).  Ranks and scalings may differ.

* ``factor_soup``: A and B separately, Ā = Σ_i w_i A_i and B̄ = Σ_i w_i B_i, as the
  original project did.  Its update s · B̄ · Ā is not the mean of the updates: the
  difference is a weighted covariance of the factors,

      Σ_i w_i B_i A_i - B̄ Ā = Σ_i w_i (B_i - B̄)(A_i - Ā),

  zero only when the ingredients' factors agree (for two ingredients at 1/2 each it is
  (B_1 - B_2)(A_1 - A_2) / 4).  Independent runs, whose A's start from different random
  directions, average to little under it.  It needs one rank and one scaling throughout.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from common.checkpoint import CheckpointError, fingerprint_differences

AVERAGES = ("delta", "factors")


def lora_scaling(lora_config: dict) -> float:
    """s in ΔW = s · B · A for a checkpoint's ``lora_config`` (as LoRALinear computes it)."""
    r, alpha = lora_config["r"], lora_config["alpha"]
    return alpha / math.sqrt(r) if lora_config["use_rslora"] else alpha / r


def normalise_weights(weights: list[float], count: int) -> list[float]:
    """One non-negative weight per ingredient, divided by their sum so that they sum to 1."""
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} checkpoints: give one weight per checkpoint")
    negative = [w for w in weights if w < 0]
    if negative:
        # A negative weight extrapolates away from an ingredient: that is task arithmetic, not a soup.
        raise ValueError(f"weights must be >= 0, got {negative}")
    total = sum(weights)
    if not total > 0:
        raise ValueError("the weights sum to 0: at least one must be positive")
    return [w / total for w in weights]


def delta_soup(states: list[dict[str, torch.Tensor]], weights: list[float], scalings: list[float],
               scaling_out: float) -> dict[str, torch.Tensor]:
    """A LoRA state of rank Σ r_i whose update, at scaling ``scaling_out``, is Σ_i w_i · s_i · B_i · A_i.

    ``states`` are ``lora_state_dict``s with the same keys; A's are stacked along dim 0 and
    B's, multiplied by w_i · s_i / scaling_out, along dim 1 (in float64, stored as float32).
    """
    soup = {}
    for key in states[0]:
        if key.endswith(".lora_A"):
            soup[key] = torch.cat([state[key].double() for state in states], dim=0)
        else:
            soup[key] = torch.cat([state[key].double() * (w * s / scaling_out)
                                   for state, w, s in zip(states, weights, scalings)], dim=1)
    return {key: tensor.float() for key, tensor in soup.items()}


def factor_soup(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted means of the A's and of the B's, each on its own (same rank throughout)."""
    return {key: sum(state[key].double() * w for state, w in zip(states, weights)).float() for key in states[0]}


def check_ingredients(checkpoints: dict[str, dict], average: str) -> None:
    """Refuse checkpoints that cannot be souped together, naming the file and what differs.

    All must share the base model (its path and the shape fingerprint of
    ``model_fingerprint``), the LoRA targets and the set of LoRA layers; ``factors``
    also needs one rank, alpha and rsLoRA convention, since it averages the factors
    entry by entry under a single scaling.  A PEFT adapter directory records no
    fingerprint and names its base by Hub id or path: two adapters are compared on
    that name, an adapter and a ``.pt`` checkpoint on the layers alone (loading it
    onto the base then checks every shape).
    """
    if average not in AVERAGES:
        raise ValueError(f"AVERAGE must be one of {', '.join(AVERAGES)}, got {average!r}")
    (first_path, first), *others = checkpoints.items()
    layout_keys = ["target_modules"] + (["r", "alpha", "use_rslora"] if average == "factors" else [])
    for path, checkpoint in others:
        differences = []
        fingerprints = first["base_model"]["fingerprint"], checkpoint["base_model"]["fingerprint"]
        base_checks = []
        if None not in fingerprints:
            base_checks = [("base model path", Path(first["base_model"]["path"]).resolve(),
                            Path(checkpoint["base_model"]["path"]).resolve())]
            # Their weights compared to the dtypes' rounding: ingredients trained in bf16 and in fp16 soup.
            differences += [f"base model {difference}" for difference in
                            fingerprint_differences(fingerprints[1], fingerprints[0], "here", f"in {first_path}")]
        elif fingerprints == (None, None):
            base_checks = [("base model", first["base_model"]["path"], checkpoint["base_model"]["path"])]
        for name, ours, theirs in (
                *base_checks,
                *((f"LoRA {key}", first["lora_config"][key], checkpoint["lora_config"][key])
                  for key in layout_keys)):
            if ours != theirs:
                differences.append(f"{name}: {theirs} here, {ours} in {first_path}")
        first_layers, layers = _layer_names(first), _layer_names(checkpoint)
        if layers != first_layers:
            differences += [f"missing layer: {name} (present in {first_path})"
                            for name in sorted(first_layers - layers)]
            differences += [f"extra layer: {name} (absent from {first_path})" for name in sorted(layers - first_layers)]
        if differences:
            raise CheckpointError(f"{path} cannot be souped with {first_path}"
                                  f"{' (AVERAGE=factors)' if average == 'factors' else ''}:\n  "
                                  + "\n  ".join(differences))


def _layer_names(checkpoint: dict) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in checkpoint["lora"]}


def soup_lora(checkpoints: list[dict], weights: list[float], average: str) -> tuple[dict, dict]:
    """(lora state, lora_config) of the soup of ``checkpoints`` (already checked) with these weights.

    Ingredients of weight 0 are left out.  The soup keeps the first ingredient's alpha,
    rsLoRA convention and dropout; with ``delta`` its rank is the sum of the ranks (any
    scaling would do: the weights are folded into B relative to it).
    """
    kept = [(checkpoint, w) for checkpoint, w in zip(checkpoints, weights) if w > 0]
    states = [checkpoint["lora"] for checkpoint, _ in kept]
    kept_weights = [w for _, w in kept]
    config = dict(kept[0][0]["lora_config"])
    if average == "factors":
        return factor_soup(states, kept_weights), config
    config["r"] = sum(checkpoint["lora_config"]["r"] for checkpoint, _ in kept)
    scalings = [lora_scaling(checkpoint["lora_config"]) for checkpoint, _ in kept]
    return delta_soup(states, kept_weights, scalings, lora_scaling(config)), config

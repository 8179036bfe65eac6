"""LoRA (low-rank adaptation) on the linear layers of a causal LM, written by hand.

A wrapped linear layer with frozen weight W [out, in] (and bias b) computes

    output = base(x) + (alpha / r) · B · A · x        = x Wᵀ + b + (alpha / r) · (x Aᵀ) Bᵀ

with A [r, in] and B [out, r] the only trained parameters (rsLoRA scales by
alpha / sqrt(r) instead, so the update's size does not shrink as r grows).
A starts Kaiming-uniform, exactly as PEFT initialises it, and B starts at zero,
so B·A = 0: training starts from exactly the base model, and the first steps
move B along the random directions of A.

The adapter parameters are fp32 even when the base runs in bf16: AdamW's updates
are often smaller than bf16's resolution (8 bits of mantissa) relative to the
weights, so bf16 adapter weights would round many updates away.  The adapter
path runs in the activations' dtype: it casts the small A and B (r x in and
out x r) to bf16, not the activations [tokens, in] to fp32, so each of its
two matmuls is a bf16 one (fp32 accumulation) on the tensor cores, and no
fp32 copy of the activations is made; autograd takes the gradients back
through the casts to the fp32 masters, which the optimizer updates.  In fp32
the casts are no-ops.  (With the activations cast to fp32 instead, our eager
bf16 decode of Gemma 2 2B on an H200 took 2.5x as long with the adapters as
without them.)

``disable_lora`` switches every adapter off, which turns the policy into the
base model: the KL reference policy costs no second copy of the weights.
``merge_lora`` folds the update into the base weights for fast inference;
common/peft_io.py writes and reads the adapter in PEFT's format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.quant import is_quantized


class LoRAStateError(UserError, ValueError):
    """A LoRA state dict that does not fit the model's LoRA layers."""


class LoRATargetError(UserError, ValueError):
    """LORA_TARGETS naming no linear layer of the model; the message lists the names it has."""


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (frozen, kept as ``self.base``) plus a low-rank update.

    ``merged``: the update is folded into ``base.weight`` and the adapter path
    is skipped.  ``enabled`` False: the layer computes the base layer alone; it
    cannot be set while merged, since the base weight then holds the update.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.dropout_p = float(dropout)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # On the base weight's device, in fp32 whatever the base dtype (see the module docstring).
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        # PEFT's initialisation, so that a given seed gives the same adapter in both.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._enabled = True
        # A new module is in training mode; follow the layer it replaces, else an
        # adapter put into an eval-mode model would apply dropout.
        self.train(base.training)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not value and self.merged:
            raise RuntimeError("cannot disable a merged LoRA layer: its base weight contains the "
                               "LoRA update; unmerge_lora(model) first")
        self._enabled = bool(value)

    def delta_weight(self) -> torch.Tensor:
        """The update scaling · B · A that the adapter adds to the base weight, [out, in], fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or not self._enabled:
            return result
        # The factors come to the activations' dtype, not the activations to fp32 (see the module docstring).
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        update = F.linear(F.linear(self.dropout(x), lora_A), lora_B) * self.scaling
        return result + update

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the base weight (summed in fp32, stored in the base dtype)."""
        if self.merged:
            raise RuntimeError("LoRA layer is already merged")
        if not self._enabled:
            raise RuntimeError("cannot merge a disabled LoRA layer (inside disable_lora?)")
        if is_quantized(self.base):
            raise RuntimeError("cannot merge LoRA into a 4-bit base layer (QUANT=nf4): W + B·A rounded back to "
                               "4 bits would lose most of the update; export the adapter, or merge into a base "
                               "loaded with QUANT=none")
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight: exact up to the base dtype's rounding."""
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged")
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}, enabled={self._enabled}")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Full module name -> LoRALinear, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters: lora_A and lora_B of every LoRA layer."""
    return [parameter for module in lora_modules(model).values()
            for parameter in (module.lora_A, module.lora_B)]


def _require_lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers; call apply_lora(model, ...) first")
    return modules


def _attribute_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


ALL_LINEAR = "all-linear"


def all_linear_targets(model: nn.Module) -> list[str]:
    """The attribute names of every nn.Linear but the output head: what PEFT's target_modules="all-linear"
    selects (peft/tuners/tuners_utils.py, _maybe_include_all_linear_layers: every linear layer, minus
    get_output_embeddings()).  Phi-3 gives qkv_proj, o_proj, gate_up_proj, down_proj."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({_attribute_name(name) for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and module is not head})


def lora_targets(model: nn.Module, target_modules: Iterable[str]) -> list[str]:
    """The sorted full names of the ``nn.Linear`` layers of ``model`` that ``target_modules`` names (see
    apply_lora); LoRATargetError, listing the model's linear layer names, for a name that matches none.
    A model built on the meta device (from its config.json, no weights) answers the same, in a moment:
    LORA_TARGETS is checked before the weights load."""
    if target_modules == ALL_LINEAR or list(target_modules) == [ALL_LINEAR]:
        target_modules = all_linear_targets(model)
    if isinstance(target_modules, str):
        raise TypeError(f"target_modules must be a list of attribute names, got the string {target_modules!r}")
    targets = set(target_modules)
    if not targets:
        raise LoRATargetError("LORA_TARGETS is empty: name the linear layers that get an adapter")
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    to_wrap = sorted(name for name in linear_names if _attribute_name(name) in targets)
    unmatched = targets - {_attribute_name(name) for name in to_wrap}
    if unmatched:
        available = ", ".join(dict.fromkeys(_attribute_name(name) for name in linear_names))
        raise LoRATargetError(f"LORA_TARGETS: no nn.Linear layer named {', '.join(sorted(unmatched))} in "
                              f"{type(model).__name__}; its linear layers are: {available}")
    return to_wrap


def apply_lora(model: nn.Module, r: int, alpha: float, target_modules: Iterable[str], dropout: float = 0.0,
               use_rslora: bool = False) -> list[str]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``target_modules`` in a LoRALinear.

    Names are matched against the last part of the module path ("q_proj" matches
    "model.layers.3.self_attn.q_proj"), as PEFT does with a list of names, so
    ``lm_head`` gets an adapter only when named.  Every other parameter of the
    model is frozen.  A name that matches no linear layer is an error (a typo
    would otherwise silently leave layers untrained).  "all-linear" (alone, or as
    the string) is PEFT's shorthand: every linear layer except the output head.
    Returns the sorted full names of the wrapped layers.
    """
    existing = lora_modules(model)
    if existing:
        raise RuntimeError(f"apply_lora: the model already has {len(existing)} LoRA layers "
                           f"(e.g. {next(iter(existing))}); apply LoRA once per model")
    to_wrap = lora_targets(model, target_modules)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in to_wrap:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, LoRALinear(getattr(parent, attribute), r, alpha, dropout, use_rslora))
    return to_wrap


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base model (the KL reference
    policy); on exit, even by an exception, each layer's previous state returns."""
    modules = _require_lora_modules(model)
    merged = [name for name, module in modules.items() if module.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged LoRA layers ({merged[0]}, ...): their base weights "
                           f"contain the LoRA update; unmerge_lora(model) first")
    previous = {name: module.enabled for name, module in modules.items()}
    try:
        for module in modules.values():
            module.enabled = False
        yield model
    finally:
        for name, module in modules.items():
            module.enabled = previous[name]


class LoRAWeights(nn.Module):
    """A second set of LoRA factors for the LoRA layers of a model: for each layer an A [r, in]
    and a B [out, r] of the same shapes, initialised as a new LoRALinear is (A Kaiming-uniform,
    B zero, so it starts as the base model). ``use_lora_weights`` switches them in place of the
    layers' own factors: two adapters over one copy of the frozen base (PPO's critic adapter).
    ``layer_names`` ties entry i of ``lora_A`` / ``lora_B`` to its layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        modules = _require_lora_modules(model)
        self.layer_names = list(modules)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for module in modules.values():
            lora_A = nn.Parameter(torch.empty_like(module.lora_A))
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            self.lora_A.append(lora_A)
            self.lora_B.append(nn.Parameter(torch.zeros_like(module.lora_B)))


@contextmanager
def use_lora_weights(model: nn.Module, weights: LoRAWeights) -> Iterator[nn.Module]:
    """Inside the block every LoRA layer computes with the factors of ``weights`` (same scaling,
    dropout and base); gradients of what is computed there go to ``weights``. On exit, even by
    an exception, the layers' own factors return. Refused on merged layers (their base weight
    holds their own update) and on weights made for other layers."""
    modules = _require_lora_modules(model)
    if list(modules) != weights.layer_names:
        differ = sorted(set(modules) ^ set(weights.layer_names)) or ["(the same layers in another order)"]
        raise LoRAStateError(f"LoRA weights made for other layers: {', '.join(differ[:5])}")
    merged = [name for name, module in modules.items() if module.merged]
    if merged:
        raise RuntimeError(f"cannot switch the factors of merged LoRA layers ({merged[0]}, ...); unmerge_lora first")
    own_factors = [(module.lora_A, module.lora_B) for module in modules.values()]
    try:
        for module, lora_A, lora_B in zip(modules.values(), weights.lora_A, weights.lora_B):
            module.lora_A, module.lora_B = lora_A, lora_B
        yield model
    finally:
        for module, (lora_A, lora_B) in zip(modules.values(), own_factors):
            module.lora_A, module.lora_B = lora_A, lora_B


def _shared_weight_names(model: nn.Module, modules: dict[str, LoRALinear]) -> list[str]:
    """LoRA layers whose base weight is also used elsewhere (lm_head tied to the embeddings)."""
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    return [name for name, module in modules.items() if uses[id(module.base.weight)] > 1]


def merge_lora(model: nn.Module) -> None:
    """Fold each layer's update into its base weight; the adapter path is then skipped."""
    modules = _require_lora_modules(model)
    merged = [name for name, module in modules.items() if module.merged]
    if merged:
        raise RuntimeError(f"LoRA layers already merged: {', '.join(merged)}")
    shared = _shared_weight_names(model, modules)
    if shared:
        # Merging into a tied weight would also change the layer it is tied to
        # (the input embeddings, for a tied lm_head).
        raise RuntimeError(f"cannot merge LoRA into weights shared with other layers: {', '.join(shared)}")
    for module in modules.values():
        module.merge()


def merge_and_unload(model: nn.Module) -> list[str]:
    """Merge every adapter and put the plain ``nn.Linear`` layers back: the model is then an
    ordinary transformers model whose ``save_pretrained`` writes the merged weights.
    Returns the names of the merged layers."""
    merge_lora(model)
    names = list(lora_modules(model))
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, getattr(parent, attribute).base)
    return names


def unmerge_lora(model: nn.Module) -> None:
    """Take each layer's update back out of its base weight."""
    modules = _require_lora_modules(model)
    unmerged = [name for name, module in modules.items() if not module.merged]
    if unmerged:
        raise RuntimeError(f"LoRA layers not merged: {', '.join(unmerged)}")
    for module in modules.values():
        module.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module name>.lora_A`` / ``.lora_B`` -> detached contiguous CPU tensor.

    The tensors are copies, so the state is a snapshot: on a CPU model ``.cpu()``
    alone would alias the parameters, and later training steps would change it.
    """
    state = {}
    for name, module in _require_lora_modules(model).items():
        for kind in ("lora_A", "lora_B"):
            state[f"{name}.{kind}"] = getattr(module, kind).detach().to("cpu", copy=True).contiguous()
    return state


def lora_config(model: nn.Module) -> dict:
    """The settings apply_lora was called with, read off the LoRA layers."""
    modules = _require_lora_modules(model)
    settings = {(module.r, module.alpha, module.dropout_p, module.use_rslora) for module in modules.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers have different settings (r, alpha, dropout, use_rslora): {sorted(settings)}")
    r, alpha, dropout, use_rslora = settings.pop()
    return {"r": r, "alpha": alpha, "target_modules": sorted({_attribute_name(name) for name in modules}),
            "dropout": dropout, "use_rslora": use_rslora}


def _shape_difference(key: str, expected: torch.Size, got: torch.Size) -> str:
    message = f"{key}: expected shape {list(expected)}, got {list(got)}"
    # The rank is dim 0 of lora_A [r, in] and dim 1 of lora_B [out, r].
    rank_dim = 0 if key.endswith(".lora_A") else 1
    other_dim = 1 - rank_dim
    if len(got) == 2 and got[other_dim] == expected[other_dim]:
        message += f" (rank {got[rank_dim]} in the checkpoint, {expected[rank_dim]} in the model)"
    return message


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy a ``lora_state_dict`` into the model's LoRA layers, in place.

    The state must fit exactly: otherwise LoRAStateError lists the missing
    names, the unexpected names and the shape differences, and nothing is
    loaded.  ``strict`` is there only so that a non-strict load fails loudly:
    a partial load would leave some layers silently at their old values.
    """
    if strict is not True:
        raise ValueError("partial loads are refused; a LoRA state must match the model's LoRA layers exactly")
    modules = _require_lora_modules(model)
    merged = [name for name, module in modules.items() if module.merged]
    if merged:
        # The base weights hold the current update; unmerging after a load would subtract the new one.
        raise RuntimeError(f"cannot load into merged LoRA layers ({merged[0]}, ...); unmerge_lora(model) first")
    parameters = {f"{name}.{kind}": getattr(module, kind)
                  for name, module in modules.items() for kind in ("lora_A", "lora_B")}

    differences = [f"missing: {key}" for key in parameters if key not in state]
    differences += [f"unexpected: {key}" for key in state if key not in parameters]
    for key, parameter in parameters.items():
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor):
            differences.append(f"{key}: expected a tensor, got {type(value).__name__}")
        elif value.shape != parameter.shape:
            differences.append(_shape_difference(key, parameter.shape, value.shape))
    if differences:
        raise LoRAStateError("LoRA state does not fit the model:\n  " + "\n  ".join(differences))

    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(state[key])


class LoRAMotion:
    """The adapter's size and its last step, as step metrics for the health monitor (common/health.py):
    ``lora_norm``, the L2 norm of every A and B; ``lora_b_norm``, of the Bs alone (0 for a fresh adapter
    until its first update moves it); ``lora_update_norm``, of the change since the previous call (the
    step's update). Holds a copy of the factors (the adapter's size once more) and reads the three
    numbers in one host sync per call. The factors are the model's own (a PPO critic's, switched in by
    use_lora_weights, are not)."""

    def __init__(self, model: nn.Module):
        modules = _require_lora_modules(model).values()
        self.factors = [module.lora_A for module in modules] + [module.lora_B for module in modules]
        self.first_b = len(modules)  # self.factors[first_b:] are the Bs
        self.previous = [factor.detach().clone() for factor in self.factors]

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        squares = torch.stack([factor.detach().float().square().sum() for factor in self.factors])
        moved = torch.stack([(factor.detach() - previous).float().square().sum()
                             for factor, previous in zip(self.factors, self.previous)])
        norm, b_norm, update = torch.stack([squares.sum(), squares[self.first_b:].sum(), moved.sum()]).sqrt().tolist()
        for factor, previous in zip(self.factors, self.previous):
            previous.copy_(factor.detach())
        return {"lora_norm": norm, "lora_b_norm": b_norm, "lora_update_norm": update}

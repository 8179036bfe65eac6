"""Policy-gradient pieces that GRPO (grpo/loss.py) and PPO (ppo/loss.py) share.

Log-ratios are clamped to [-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT] (common.kl's, the one limit of the
project) before the exponential, as in verl: a ratio of e^20 means the policy has long left the
trust region, and without the clamp exp overflows to inf beyond 88, where inf * 0 (a zero
advantage) would make the loss NaN.
"""

from __future__ import annotations

import torch

from common.kl import LOG_RATIO_LIMIT


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: losses over bf16 log-probs are summed in fp32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def answer_tokens_only(tensor: torch.Tensor, is_answer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on the answer tokens, exactly 0 elsewhere. torch.where, unlike multiplying by the mask,
    gives padding exactly 0 (and exactly 0 gradient) even where it holds inf or NaN."""
    return torch.where(is_answer, tensor.to(dtype), 0.0)


def importance_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(log_ratio), the log-ratio clamped to +-LOG_RATIO_LIMIT first (see the module docstring)."""
    return torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """PPO's per-token loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (Schulman et al. 2017).

    The min is a pessimistic bound: a token whose ratio has moved past the clip range in the direction
    its advantage pushes contributes a constant and no gradient; moved the other way it stays
    unclipped, so a step that went wrong can always be undone."""
    return -torch.minimum(ratio * advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)


def check_completion_mask(mask: torch.Tensor) -> None:
    """Refuse a mask holding anything but 0 and 1. It reads the values (a host sync on a GPU), so it
    runs once per step where the mask is built (common.rollout.rollout_batch), not in every loss."""
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("completion_mask must contain only 0 and 1")


def logprob_mismatch(sampler_logp: torch.Tensor, train_logp: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) of |sampler log-prob - training log-prob| over the completion tokens (``mask`` 1),
    as 0-dim tensors, without a host sync: the training-inference mismatch. The sampler's log-probs
    come from its own decode (KV cache, batch shapes, a compiled kernel, bf16), the training ones from
    the policy pass over the same tokens; in fp32 on the CPU they agree to ~1e-6, and on a GPU in bf16
    the gap shows what the fast paths cost (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"). Detached; 0 and 0 for an empty mask."""
    is_completion = mask.bool()
    gap = torch.where(is_completion, (sampler_logp.detach() - train_logp.detach()).abs(), 0.0)
    return gap.sum() / is_completion.sum().clamp(min=1), gap.amax()


def truncated_importance_weights(train_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token truncated importance sampling (TIS) weights w = min(exp(train_logp - sampler_logp), cap),
    detached: the tokens were drawn by the sampler's distribution, the objective is the trainer's, and
    w corrects one towards the other, truncated at ``cap`` to bound the variance (Yao et al. 2025; TRL's
    and verl's vLLM importance-sampling correction, cap 2 by default there). ``train_logp`` is the
    training side's log-prob of the policy that sampled (the old log-probs); the policy-gradient loss
    of each token is multiplied by its w. Log-ratios are clamped to +-LOG_RATIO_LIMIT before exp, so
    padding (where the log-probs mean nothing) cannot overflow; mask it in the loss."""
    if not cap > 0:
        raise ValueError(f"the TIS cap must be positive, got {cap}")
    return importance_ratio(train_logp.detach() - sampler_logp.detach()).clamp(max=cap)

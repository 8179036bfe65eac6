"""The GRPO loss: PPO's clipped surrogate per token, an optional KL penalty to a reference policy,
and a choice of how the per-token losses of a batch are averaged.

Completion i (of B, padded to T tokens), token t, mask m_{i,t} (1 on the completion, EOS included),
advantage A_i (grpo.advantage); logp, old_logp, ref_logp the policy's, the sampler's, the reference's.

    ratio      "token":    r_{i,t} = exp(logp_{i,t} - old_logp_{i,t})               (GRPO, Shao et al. 2024)
               "sequence": r_{i,t} = exp(sum_t m (logp - old_logp) / |y_i|)          (GSPO, Zheng et al. 2025)
    loss       L_{i,t} = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_{i,t}
    aggregate  "token_mean":    sum L m / sum m                 (DAPO: every token weighs the same)
               "seq_mean":      (1/B) sum_i (sum_t L m / sum_t m) (DeepSeekMath's GRPO, GSPO)
               "seq_sum_const": sum L m / (B * max_tokens)      (Dr. GRPO: no length bias)

eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025); KL_{i,t} is common.kl's estimator, added to
the loss as DeepSeekMath does. ``normalizer`` replaces the denominator with the whole step's, so that
micro-batch losses (and gradients) add up to the step's. Why each choice, and GSPO's gradient:
docs/algorithms.md, "GRPO". The ratio, the surrogate and the log-ratio clamp are common.policy_gradient's.
"""

from __future__ import annotations

import torch

from common.kl import KL_ESTIMATORS, kl_estimate, kl_k3
from common.policy_gradient import answer_tokens_only, clipped_surrogate, compute_dtype, importance_ratio

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_const")
IMPORTANCE_LEVELS = ("token", "sequence")


def _check_arguments(logp, old_logp, advantages, completion_mask, ref_logp, beta, eps_low, eps_high,
                     loss_agg, importance_level, normalizer, max_tokens, kl_estimator) -> None:
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {list(LOSS_AGGREGATIONS)}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance_level {importance_level!r}; valid: {list(IMPORTANCE_LEVELS)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; valid: {sorted(KL_ESTIMATORS)}")

    if logp.dim() != 2 or logp.shape[0] < 1 or logp.shape[1] < 1:
        raise ValueError(f"logp must have shape [B, T] with B, T >= 1, got {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"logp must be floating point, got {logp.dtype}")
    named_tensors = {"old_logp": old_logp, "completion_mask": completion_mask}
    if ref_logp is not None:
        named_tensors["ref_logp"] = ref_logp
    for name, tensor in named_tensors.items():
        if tensor.shape != logp.shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must have shape [B] = [{logp.shape[0]}] (one per completion), "
                         f"got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta = {beta} > 0 needs ref_logp, the reference policy's log-probs")
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if loss_agg == "seq_sum_const" and normalizer is None and max_tokens is None:
        raise ValueError("loss_agg 'seq_sum_const' needs max_tokens (the generation limit) or a normalizer")
    if max_tokens is not None and not 0 < logp.shape[1] <= max_tokens:
        raise ValueError(f"max_tokens = {max_tokens} is less than the completions' padded length {logp.shape[1]}")


def _aggregate(per_token_loss: torch.Tensor, completion_mask: torch.Tensor, loss_agg: str,
               normalizer: float | None, max_tokens: int | None) -> torch.Tensor:
    """The batch loss from per-token losses [B, T] (see the module docstring). A completion with an
    empty mask contributes 0; so does a batch with no tokens at all."""
    sum_per_completion = (per_token_loss * completion_mask).sum(dim=1)
    num_completions = completion_mask.shape[0]
    if loss_agg == "token_mean":
        denominator = completion_mask.sum().clamp_min(1.0) if normalizer is None else normalizer
        return sum_per_completion.sum() / denominator
    if loss_agg == "seq_mean":
        mean_per_completion = sum_per_completion / completion_mask.sum(dim=1).clamp_min(1.0)
        return mean_per_completion.sum() / (num_completions if normalizer is None else normalizer)
    denominator = num_completions * max_tokens if normalizer is None else normalizer
    return sum_per_completion.sum() / denominator


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              completion_mask: torch.Tensor, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float = 0.2, loss_agg: str = "token_mean",
              importance_level: str = "token", normalizer: float | None = None,
              max_tokens: int | None = None, kl_estimator: str = "k3",
              sampler_correction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a batch (or micro-batch) of completions, and statistics for logging.

    logp, old_logp, ref_logp [B, T]: per-token log-probs of the completions' tokens under the
    policy being trained, the sampling policy and the reference; completion_mask [B, T]: 1 on the
    completion's tokens (EOS included), 0 on padding (bool or 0/1 numbers); advantages [B]: one per
    completion. Only logp receives gradients; the others are detached.

    beta > 0 adds beta * kl_estimate(logp, ref_logp, kl_estimator) per token and needs ref_logp.
    eps_low, eps_high: the clip range [1 - eps_low, 1 + eps_high]. loss_agg: "token_mean",
    "seq_mean" or "seq_sum_const" (needs max_tokens, the generation limit, unless normalizer is
    given). importance_level: "token" or "sequence" (GSPO). normalizer, when given, replaces the
    aggregation's denominator computed from this batch: the step's token count ("token_mean"), its
    number of completions ("seq_mean") or that number times max_tokens ("seq_sum_const"), so that
    micro-batch losses add up to the step's loss. sampler_correction [B, T], when given, multiplies
    each token's policy-gradient term (not the KL term): the truncated importance weight of the
    sampler -> trainer mismatch (common.policy_gradient). Formulas and sources: the module docstring.

    Padding positions may hold anything (even inf or NaN): they are zeroed before use and
    contribute nothing to the loss, the gradient or the statistics. Computed in at least fp32.

    Returns (loss, stats). loss is a scalar; stats are detached 0-dim tensors over this batch's masked
    tokens (read them once per step: each read is a host sync on a GPU):
      clip_frac       fraction of tokens whose clipped term is the active min (no gradient):
                      (r < 1 - eps_low and A < 0) or (r > 1 + eps_high and A > 0)
      clip_frac_low   the first kind alone;  clip_frac_high  the second kind alone
      ratio_mean      mean of r
      approx_kl       mean of (r - 1) - log r with the token ratio r, the k3 estimate of KL(pi_old || pi_theta)
                      (common.kl.kl_k3), the same estimator as PPO's approx_kl
      kl              mean of the KL estimate to the reference; only when ref_logp is given
      policy_loss     the clipped-surrogate part of the loss alone, aggregated like the loss
      tokens          number of masked tokens
    """
    _check_arguments(logp, old_logp, advantages, completion_mask, ref_logp, beta, eps_low, eps_high,
                     loss_agg, importance_level, normalizer, max_tokens, kl_estimator)
    dtype = compute_dtype(logp)
    is_completion_token = completion_mask.bool()
    completion_mask = is_completion_token.to(dtype)
    logp = answer_tokens_only(logp, is_completion_token, dtype)
    old_logp = answer_tokens_only(old_logp.detach(), is_completion_token, dtype)
    advantages = advantages.detach().to(dtype).unsqueeze(1)

    token_log_ratio = logp - old_logp
    if importance_level == "token":
        log_ratio = token_log_ratio
    else:
        tokens_per_completion = completion_mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        sequence_log_ratio = token_log_ratio.sum(dim=1, keepdim=True) / tokens_per_completion
        log_ratio = sequence_log_ratio.expand_as(token_log_ratio)
    ratio = importance_ratio(log_ratio)
    policy_loss_per_token = clipped_surrogate(ratio, advantages, eps_low, eps_high)
    if sampler_correction is not None:  # truncated importance sampling: common.policy_gradient.tis_weights
        policy_loss_per_token = policy_loss_per_token * answer_tokens_only(sampler_correction.detach(),
                                                                           is_completion_token, dtype)

    per_token_loss = policy_loss_per_token
    kl_per_token = None
    if ref_logp is not None:
        kl_per_token = kl_estimate(logp, answer_tokens_only(ref_logp.detach(), is_completion_token, dtype),
                                   kl_estimator)
        if beta > 0:
            per_token_loss = per_token_loss + beta * kl_per_token
    loss = _aggregate(per_token_loss, completion_mask, loss_agg, normalizer, max_tokens)

    # Statistics as 0-dim tensors, so that a trainer reads them once per step (no host sync here).
    with torch.no_grad():
        num_tokens = completion_mask.sum()

        def masked_mean(per_token: torch.Tensor) -> torch.Tensor:
            return (per_token * completion_mask).sum() / num_tokens.clamp_min(1.0)

        clipped_low = (ratio < 1.0 - eps_low) & (advantages < 0)
        clipped_high = (ratio > 1.0 + eps_high) & (advantages > 0)
        stats = {
            "clip_frac": masked_mean((clipped_low | clipped_high).to(dtype)),
            "clip_frac_low": masked_mean(clipped_low.to(dtype)),
            "clip_frac_high": masked_mean(clipped_high.to(dtype)),
            "ratio_mean": masked_mean(ratio),
            "approx_kl": masked_mean(kl_k3(old_logp, logp)),
            "policy_loss": _aggregate(policy_loss_per_token, completion_mask, loss_agg, normalizer, max_tokens),
            "tokens": num_tokens,
        }
        if kl_per_token is not None:
            stats["kl"] = masked_mean(kl_per_token)
    return loss, stats

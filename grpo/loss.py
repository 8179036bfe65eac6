"""The GRPO loss: PPO's clipped surrogate per token, an optional KL penalty to a reference policy,
and a choice of how the per-token losses of a batch are averaged.

Completion i (of B, padded to T tokens), token t, mask m_{i,t} (1 on the completion, EOS included),
advantage A_i (grpo.advantage); logp, old_logp, ref_logp the policy's, the sampler's, the reference's.

    ratio      "token":    r_{i,t} = exp(logp_{i,t} - old_logp_{i,t})               (GRPO, Shao et al. 2024)
               "sequence": r_{i,t} = exp(sum_t m (logp - old_logp) / |y_i|)          (GSPO, Zheng et al. 2025)
    loss       L_{i,t} = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_{i,t}
    aggregate  "token_mean":    sum L m / sum m                 (DAPO: every token weighs the same)
               "seq_mean":      (1/B) sum_i (sum_t L m / sum_t m) (DeepSeekMath's GRPO, GSPO)
               "seq_sum_const": sum L m / (B * max_new_tokens)  (Dr. GRPO: no length bias)

eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025); KL_{i,t} is common.kl's estimator, added to
the loss as DeepSeekMath does. The settings travel as one value, GRPOObjective; its ``normalizer``
is the aggregation's denominator, and a trainer passes the whole step's (rows and tokens over every
micro-batch and rank), so that micro-batch losses (and gradients) add up to the step's. Why each
choice, and GSPO's gradient: docs/algorithms.md, "GRPO". The ratio, the surrogate and the log-ratio
clamp are common.policy_gradient's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.kl import KL_ESTIMATORS, kl_estimate, kl_k3
from common.policy_gradient import answer_tokens_only, clipped_surrogate, compute_dtype, importance_ratio

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_const")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class GRPOObjective:
    """What the GRPO loss optimises, as one value (run_train_grpo.py's "objective" constants):
    the clip range [1 - clip_eps_low, 1 + clip_eps_high], the KL penalty's weight (beta) and
    estimator, the aggregation, the importance level, and the generation limit that seq_sum_const
    divides by. Checked once, when it is made."""
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "token_mean"
    importance_level: str = "token"
    max_new_tokens: int | None = None

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"unknown loss_agg {self.loss_agg!r}; valid: {list(LOSS_AGGREGATIONS)}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"unknown importance_level {self.importance_level!r}; valid: {list(IMPORTANCE_LEVELS)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef (beta) must be >= 0, got {self.kl_coef}")
        if not 0 <= self.clip_eps_low < 1 or self.clip_eps_high < 0:
            raise ValueError(f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got clip_eps_low="
                             f"{self.clip_eps_low}, clip_eps_high={self.clip_eps_high}")
        if self.loss_agg == "seq_sum_const" and not (self.max_new_tokens or 0) >= 1:
            raise ValueError("loss_agg 'seq_sum_const' needs max_new_tokens (the generation limit) >= 1")

    def normalizer(self, completions: float, tokens: float) -> float:
        """The aggregation's denominator for ``completions`` completions holding ``tokens`` answer
        tokens: tokens (token_mean), completions (seq_mean) or completions x max_new_tokens
        (seq_sum_const). Given the step's counts, micro-batch losses add up to the step's."""
        return {"token_mean": tokens, "seq_mean": completions,
                "seq_sum_const": completions * (self.max_new_tokens or 0)}[self.loss_agg]


def _check_tensors(logp, old_logp, advantages, completion_mask, ref_logp, objective: GRPOObjective,
                   normalizer) -> None:
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
    if objective.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef = {objective.kl_coef} > 0 needs ref_logp, the reference policy's log-probs")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if objective.max_new_tokens is not None and not 0 < logp.shape[1] <= objective.max_new_tokens:
        raise ValueError(f"max_new_tokens = {objective.max_new_tokens} is less than the completions' padded "
                         f"length {logp.shape[1]}")


def _aggregate(per_token_loss: torch.Tensor, completion_mask: torch.Tensor, loss_agg: str,
               normalizer: float | torch.Tensor) -> torch.Tensor:
    """The batch loss from per-token losses [B, T] over ``normalizer`` (see the module docstring).
    A completion with an empty mask contributes 0."""
    sum_per_completion = (per_token_loss * completion_mask).sum(dim=1)
    if loss_agg == "seq_mean":
        sum_per_completion = sum_per_completion / completion_mask.sum(dim=1).clamp_min(1.0)
    return sum_per_completion.sum() / normalizer


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor,
              objective: GRPOObjective, normalizer: float | None = None, ref_logp: torch.Tensor | None = None,
              sampler_correction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a batch (or micro-batch) of completions, and statistics for logging.

    logp, old_logp, ref_logp [B, T]: per-token log-probs of the completions' tokens under the
    policy being trained, the sampling policy and the reference; completion_mask [B, T]: 1 on the
    completion's tokens (EOS included), 0 on padding (bool or 0/1 numbers); advantages [B]: one per
    completion. Only logp receives gradients; the others are detached.

    objective: the clip range, KL weight and estimator (kl_coef > 0 needs ref_logp), aggregation and
    importance level. normalizer: the aggregation's denominator, the whole step's
    (objective.normalizer(step's completions, step's tokens)) so that micro-batch losses add up to
    the step's; None: this batch's own. sampler_correction [B, T], when given, multiplies each
    token's policy-gradient term (not the KL term): the truncated importance weight of the sampler ->
    trainer mismatch (common.policy_gradient). Formulas and sources: the module docstring.

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
    _check_tensors(logp, old_logp, advantages, completion_mask, ref_logp, objective, normalizer)
    dtype = compute_dtype(logp)
    is_completion_token = completion_mask.bool()
    completion_mask = is_completion_token.to(dtype)
    if normalizer is None:  # this batch's own denominator
        normalizer = objective.normalizer(completion_mask.shape[0], completion_mask.sum().clamp_min(1.0))
    logp = answer_tokens_only(logp, is_completion_token, dtype)
    old_logp = answer_tokens_only(old_logp.detach(), is_completion_token, dtype)
    advantages = advantages.detach().to(dtype).unsqueeze(1)

    token_log_ratio = logp - old_logp
    if objective.importance_level == "token":
        log_ratio = token_log_ratio
    else:
        tokens_per_completion = completion_mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        sequence_log_ratio = token_log_ratio.sum(dim=1, keepdim=True) / tokens_per_completion
        log_ratio = sequence_log_ratio.expand_as(token_log_ratio)
    ratio = importance_ratio(log_ratio)
    eps_low, eps_high = objective.clip_eps_low, objective.clip_eps_high
    policy_loss_per_token = clipped_surrogate(ratio, advantages, eps_low, eps_high)
    if sampler_correction is not None:  # truncated importance sampling: common.policy_gradient.tis_weights
        policy_loss_per_token = policy_loss_per_token * answer_tokens_only(sampler_correction.detach(),
                                                                           is_completion_token, dtype)

    per_token_loss = policy_loss_per_token
    kl_per_token = None
    if ref_logp is not None:
        kl_per_token = kl_estimate(logp, answer_tokens_only(ref_logp.detach(), is_completion_token, dtype),
                                   objective.kl_estimator)
        if objective.kl_coef > 0:
            per_token_loss = per_token_loss + objective.kl_coef * kl_per_token
    loss = _aggregate(per_token_loss, completion_mask, objective.loss_agg, normalizer)

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
            "policy_loss": _aggregate(policy_loss_per_token, completion_mask, objective.loss_agg, normalizer),
            "tokens": num_tokens,
        }
        if kl_per_token is not None:
            stats["kl"] = masked_mean(kl_per_token)
    return loss, stats

"""The PPO losses for answer tokens: clipped policy surrogate, clipped value loss, entropy bonus, and
the per-token reward that GAE (ppo.gae) turns into advantages.

Notation: answer b of a batch (B answers padded to T tokens), token t, completion_mask m_{b,t} (1 on
the answer's tokens up to and including EOS, 0 after), logp = log pi_theta (the policy being
trained), old_logp = log pi_old (the policy that sampled the answers), ref_logp = log pi_ref (the
frozen reference), A_{b,t} per-token advantages (GAE, whitened), V the value head's predictions,
V_old its predictions at sampling time, R the GAE returns. Every "mean" below is over the masked
tokens: sum_{b,t} m x / N with N = sum_{b,t} m, or N = normalizer when given (see below).

Policy loss (PPO's clipped surrogate, Schulman et al. 2017, "Proximal Policy Optimization
Algorithms", eq. 7), minimised:

    ratio_t = exp(logp_t - old_logp_t)
    L^CLIP  = mean[ -min(ratio_t A_t, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) A_t) ]

The ratio (log-ratio clamped), the surrogate and why its min: common.policy_gradient, shared with GRPO.

Value loss (clipped as in OpenAI baselines' ppo2 and CleanRL's `clip_vloss`; Huang et al. 2022,
"The 37 Implementation Details of Proximal Policy Optimization"):

    V_clipped = V_old + clip(V - V_old, -value_clip, +value_clip)
    L^VF      = mean[ 0.5 * max((V - R)^2, (V_clipped - R)^2) ]

The max is pessimistic like the policy's min: when V has moved more than value_clip from V_old
and the clipped prediction is the worse one, the token contributes a constant and no gradient.
value_clip None or 0 gives the plain 0.5 * (V - R)^2.

Total loss, minimised (PPO eq. 9, with the signs of a loss):

    L = L^CLIP + vf_coef * L^VF - ent_coef * mean[entropy]

the entropy bonus rewarding a spread-out policy (CleanRL's `ent_coef`, usually 0 for LLMs).

Per-token reward (InstructGPT, Ouyang et al. 2022, eq. 2; Ziegler et al. 2019; TRL's PPOTrainer):
every answer token pays the KL penalty, and the last answer token also gets the task reward:

    r_{b,t} = -kl_coef * KL_{b,t} + [t = last answer token of b] * task_reward_b

KL_{b,t} = kl_estimate(logp, ref_logp, kl_estimator) (common.kl); k1 = logp - ref_logp by
default, as in InstructGPT and TRL. Putting the penalty in the reward (not in the loss, as GRPO
does) lets GAE credit it to earlier tokens like any other reward.

Gradient accumulation: ``normalizer`` replaces N, the masked-token count of the given batch.
Passing, for every micro-batch, the token count of the whole step makes the micro-batches' losses,
and their gradients, add up to those of the whole step computed at once. A batch with no masked
tokens (and no normalizer) gives a loss of 0.

Computed in at least fp32. Padding may hold anything, inf and NaN included: torch.where replaces it
before use, so it contributes nothing to a loss, a gradient or a statistic.
"""

from __future__ import annotations

import torch

from common.kl import KL_ESTIMATORS, kl_estimate, kl_k3
from common.policy_gradient import answer_tokens_only, clipped_surrogate, compute_dtype, importance_ratio


def _check_token_tensors(completion_mask: torch.Tensor, normalizer: float | None, **named_tensors) -> None:
    """Every named tensor [B, T] floating point with the mask's shape; normalizer > 0. (Whether the mask
    holds only 0 and 1 is checked once per step, where it is built: common.rollout.rollout_batch.)"""
    if completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must have shape [B, T], got {tuple(completion_mask.shape)}")
    for name, tensor in named_tensors.items():
        if tensor.shape != completion_mask.shape:
            raise ValueError(f"{name} must have the shape of completion_mask {tuple(completion_mask.shape)}, "
                             f"got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")


def _token_mean(per_token: torch.Tensor, is_answer: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    """Sum over the answer tokens divided by their count (at least 1) or by normalizer."""
    denominator = is_answer.sum().clamp_min(1) if normalizer is None else normalizer
    return torch.where(is_answer, per_token, 0.0).sum() / denominator


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    completion_mask: torch.Tensor, clip_eps: float = 0.2, normalizer: float | None = None,
                    sampler_correction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped-surrogate loss L^CLIP over the answer tokens, and statistics for logging.

    logp, old_logp, advantages, completion_mask [B, T]; advantages per token (GAE, whitened).
    Only logp receives gradients; old_logp and advantages are detached. clip_eps: the clip range
    [1 - clip_eps, 1 + clip_eps]. normalizer replaces the masked-token count (gradient
    accumulation). sampler_correction [B, T], when given, multiplies each token's term: the truncated
    importance weight of the sampler -> trainer mismatch (common.policy_gradient). Formulas and
    sources: the module docstring.

    Returns (loss, stats); stats are detached 0-dim tensors over the masked tokens:
      policy_loss  the loss
      clip_frac    fraction of tokens with |ratio - 1| > clip_eps (CleanRL's clipfracs). It counts
                   tokens outside the range whichever way the advantage points, so it is larger than
                   the fraction of tokens whose gradient the clipping actually removed
      approx_kl    mean of (ratio - 1) - log ratio, CleanRL's approx_kl: the k3 estimate of
                   KL(pi_old || pi_theta) from tokens sampled by pi_old
      ratio_mean   mean of ratio
    """
    _check_token_tensors(completion_mask, normalizer, logp=logp, old_logp=old_logp, advantages=advantages)
    if not 0 <= clip_eps < 1:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
    dtype = compute_dtype(logp, old_logp, advantages)
    is_answer = completion_mask.bool()
    logp = answer_tokens_only(logp, is_answer, dtype)
    old_logp = answer_tokens_only(old_logp.detach(), is_answer, dtype)
    advantages = answer_tokens_only(advantages.detach(), is_answer, dtype)

    ratio = importance_ratio(logp - old_logp)
    per_token_loss = clipped_surrogate(ratio, advantages, clip_eps, clip_eps)
    if sampler_correction is not None:
        per_token_loss = per_token_loss * answer_tokens_only(sampler_correction.detach(), is_answer, dtype)
    loss = _token_mean(per_token_loss, is_answer, normalizer)

    with torch.no_grad():
        def mean(per_token: torch.Tensor) -> torch.Tensor:
            return _token_mean(per_token.to(dtype), is_answer, None)

        stats = {
            "policy_loss": loss.detach(),
            "clip_frac": mean((ratio - 1.0).abs() > clip_eps),
            "approx_kl": mean(kl_k3(old_logp, logp)),
            "ratio_mean": mean(ratio),
        }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   completion_mask: torch.Tensor, value_clip: float | None = 0.2,
                   normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The (clipped) value loss L^VF over the answer tokens, and statistics for logging.

    values (the value head's current predictions), old_values (its predictions when the answers
    were sampled), returns (GAE returns), completion_mask: [B, T]. Only values receives gradients.
    value_clip None or 0: the unclipped 0.5 * (V - R)^2. normalizer replaces the masked-token count
    (gradient accumulation). Formulas and sources: the module docstring.

    Returns (loss, stats); stats are detached 0-dim tensors over the masked tokens:
      value_loss       the loss
      value_clip_frac  fraction of tokens whose clipped term is strictly the larger (no gradient);
                       0 when unclipped
      value_mean       mean of values
    """
    _check_token_tensors(completion_mask, normalizer, values=values, old_values=old_values, returns=returns)
    if value_clip is not None and value_clip < 0:
        raise ValueError(f"value_clip must be None or >= 0, got {value_clip}")
    dtype = compute_dtype(values, old_values, returns)
    is_answer = completion_mask.bool()
    values = answer_tokens_only(values, is_answer, dtype)
    old_values = answer_tokens_only(old_values.detach(), is_answer, dtype)
    returns = answer_tokens_only(returns.detach(), is_answer, dtype)

    unclipped_error = (values - returns).square()
    if value_clip:
        clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
        clipped_error = (clipped_values - returns).square()
        per_token_loss = 0.5 * torch.maximum(unclipped_error, clipped_error)
        clipped_is_larger = clipped_error > unclipped_error
    else:
        per_token_loss = 0.5 * unclipped_error
        clipped_is_larger = torch.zeros_like(is_answer)
    loss = _token_mean(per_token_loss, is_answer, normalizer)

    with torch.no_grad():
        def mean(per_token: torch.Tensor) -> torch.Tensor:
            return _token_mean(per_token.to(dtype), is_answer, None)

        stats = {
            "value_loss": loss.detach(),
            "value_clip_frac": mean(clipped_is_larger),
            "value_mean": mean(values),
        }
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, completion_mask: torch.Tensor,
                  normalizer: float | None = None) -> torch.Tensor:
    """Mean per-token policy entropy over the answer tokens (a scalar with gradient).

    entropy, completion_mask [B, T]; normalizer replaces the masked-token count. It enters the
    total loss with a minus sign (ppo_total_loss): maximising entropy keeps the policy exploring."""
    _check_token_tensors(completion_mask, normalizer, entropy=entropy)
    is_answer = completion_mask.bool()
    entropy = answer_tokens_only(entropy, is_answer, compute_dtype(entropy))
    return _token_mean(entropy, is_answer, normalizer)


def ppo_total_loss(policy_loss: torch.Tensor, value_loss: torch.Tensor, entropy: torch.Tensor,
                   vf_coef: float, ent_coef: float) -> torch.Tensor:
    """policy_loss + vf_coef * value_loss - ent_coef * entropy (PPO eq. 9 as a loss to minimise).

    policy_loss from ppo_policy_loss, value_loss from ppo_value_loss, entropy from entropy_bonus.
    vf_coef weighs the value head's regression against the policy (CleanRL: 0.5); ent_coef the
    entropy bonus (CleanRL: 0.01 on Atari; usually 0 for language models)."""
    if vf_coef < 0 or ent_coef < 0:
        raise ValueError(f"need vf_coef >= 0 and ent_coef >= 0, got vf_coef={vf_coef}, ent_coef={ent_coef}")
    return policy_loss + vf_coef * value_loss - ent_coef * entropy


def token_rewards(task_rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                  completion_mask: torch.Tensor, kl_coef: float, kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards [B, T] for GAE: -kl_coef * KL on every answer token, plus task_rewards[b]
    on the last answer token of row b (the last position where completion_mask is 1).

    task_rewards [B]; logp (the sampling policy's log-probs), ref_logp, completion_mask [B, T].
    kl_estimator "k1" (default, InstructGPT / TRL), "k2" or "k3" (common.kl). Every row needs at
    least one answer token to carry its task reward. Returns at least fp32, detached (rewards are
    constants for the losses), 0 outside the mask. Formula and sources: the module docstring."""
    _check_token_tensors(completion_mask, None, logp=logp, ref_logp=ref_logp)
    if task_rewards.shape != completion_mask.shape[:1]:
        raise ValueError(f"task_rewards must have shape [B] = [{completion_mask.shape[0]}], "
                         f"got {tuple(task_rewards.shape)}")
    if not task_rewards.isfinite().all():
        raise ValueError("task_rewards must be finite")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    is_answer = completion_mask.bool()
    empty_rows = ~is_answer.any(dim=1)
    if empty_rows.any():
        raise ValueError(f"rows {empty_rows.nonzero().flatten().tolist()} have no answer token to carry "
                         "their task reward")

    with torch.no_grad():
        dtype = compute_dtype(task_rewards, logp, ref_logp)
        kl = kl_estimate(answer_tokens_only(logp, is_answer, dtype),
                         answer_tokens_only(ref_logp, is_answer, dtype), kl_estimator)
        rewards = answer_tokens_only(-kl_coef * kl, is_answer, dtype)
        # argmax returns the first maximum; on the reversed mask that is the last answer token.
        num_tokens = is_answer.shape[1]
        last_answer_token = num_tokens - 1 - is_answer.flip(dims=[1]).to(torch.uint8).argmax(dim=1)
        rows = torch.arange(is_answer.shape[0], device=is_answer.device)
        rewards[rows, last_answer_token] += task_rewards.to(dtype)
    return rewards

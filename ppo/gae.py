"""Per-token advantages for PPO: generalised advantage estimation, whitening, explained variance.

Notation: answer b of a rollout buffer (B answers, padded to T tokens), token t; rewards r_{b,t}
(token_rewards in ppo.loss: a KL penalty on every answer token, the task reward added on the last
one), values V_{b,t} from the value head, completion_mask m_{b,t} (1 on the answer's tokens up to
and including EOS, then 0). The answer of row b occupies the prefix t < L_b of the row.

Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", section 3), backwards over the answer tokens t < L_b:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}          with A_{L_b} = 0
    R_t     = A_t + V_t                                the value head's regression target

V_{L_b}, the value of the state after the answer's last token, is 0 when the answer ended with
EOS (the episode is over) and the bootstrapped value of the state after the cut-off when the
answer was truncated at the generation limit (the episode would have gone on); the caller passes
it as last_values[b] (0 for EOS-ended rows). Treating a cut-off as the end of the episode would
teach the value head that stopping mid-answer is worth nothing more (Pardo et al. 2018, "Time
Limits in Reinforcement Learning": bootstrap at time-outs, not at terminal states). lam = 1 gives
the Monte-Carlo return minus V_t (high variance, no bias from V); lam = 0 the one-step TD error
(low variance, biased by V).

Whitening: PPO implementations normalise advantages to mean 0 and variance 1 before the policy
loss (CleanRL's `norm_adv`, per minibatch; TRL's PPOTrainer whitens over all answer tokens of
the rollout buffer with masked_whiten, as here): (x - mean) / sqrt(var + eps) over the masked
positions of the whole tensor, var the unbiased sample variance (as TRL's masked_var).

Explained variance (CleanRL's diagnostic): 1 - Var[R - V] / Var[R] over the masked positions. 1:
the value head predicts the returns perfectly; 0: no better than predicting their mean; negative:
worse than that. NaN when the returns do not vary (Var[R] = 0), as in CleanRL.

Everything is computed in at least fp32. compute_gae's advantages and returns carry no gradient
history: they are targets, not functions of the parameters being trained. Padding may hold
anything, inf and NaN included: it is replaced with torch.where before use and never leaks into a
result.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must contain only 0 and 1")


def _masked_count(mask: torch.Tensor, needed: int) -> int:
    count = int(mask.bool().sum())
    if count < needed:
        raise ValueError(f"need at least {needed} masked position(s), got {count}")
    return count


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1, over the whole tensor (a 0-d tensor, at least fp32).

    Raises ValueError when the mask selects nothing (the mean of no values is undefined)."""
    _check_mask(x, mask)
    count = _masked_count(mask, needed=1)
    return torch.where(mask.bool(), x.to(_compute_dtype(x)), 0.0).sum() / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the positions where mask is 1, over the whole tensor (0-d, at least fp32).

    unbiased: divide the sum of squared deviations by n - 1 (Bessel's correction, as TRL's
    masked_var), which needs n >= 2 masked positions; otherwise by n."""
    _check_mask(x, mask)
    count = _masked_count(mask, needed=2 if unbiased else 1)
    deviations = torch.where(mask.bool(), x.to(_compute_dtype(x)) - masked_mean(x, mask), 0.0)
    return deviations.square().sum() / (count - 1 if unbiased else count)


def masked_sums(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """{"count", "sum", "sum_sq"} of x over the positions where mask is 1, in float64: the
    statistics that add up across processes (common.distributed.all_reduce_sum sums such a dict),
    from which mean and variance follow."""
    _check_mask(x, mask)
    selected = x.detach().to(torch.float64)[mask.bool()]
    return {"count": float(selected.numel()), "sum": float(selected.sum()), "sum_sq": float(selected.square().sum())}


def _mean_and_variance(sums: dict[str, float], unbiased: bool) -> tuple[float, float]:
    """Mean and variance from masked_sums: var = (sum_sq - n mean^2) / (n - 1 or n), in float64."""
    count = sums["count"]
    needed = 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"need at least {needed} masked position(s), got {int(count)}")
    mean = sums["sum"] / count
    squared_deviations = max(0.0, sums["sum_sq"] - count * mean * mean)
    return mean, squared_deviations / (count - 1 if unbiased else count)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  combine: Callable[[dict], dict] | None = None) -> torch.Tensor:
    """x normalised to mean 0 and (unbiased) variance 1 over the positions where mask is 1.

    (x - mean) / sqrt(var + eps) with the masked mean and unbiased variance of the whole tensor;
    shift_mean=False adds the mean back (only rescales), as TRL's masked_whiten. Positions outside
    the mask are 0 in the result and take no part in the statistics. eps keeps a constant x from
    dividing by 0. Needs at least 2 masked positions. ``combine`` sums the masked_sums dict over
    processes (common.distributed.all_reduce_sum), so that several processes whiten their parts of
    one buffer with the statistics of the whole; None: this tensor is the whole buffer."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    sums = masked_sums(x, mask)
    mean, variance = _mean_and_variance(combine(sums) if combine else sums, unbiased=True)
    whitened = (x.to(_compute_dtype(x)) - mean) / math.sqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       combine: Callable[[dict], dict] | None = None) -> float:
    """1 - Var[returns - values] / Var[returns] over the positions where mask is 1 (CleanRL's definition).

    Population variances (divisor n, numpy's default as in CleanRL; the divisor cancels in the
    ratio anyway). Returns NaN when Var[returns] == 0: the returns are constant, so no prediction
    explains any of their variance, and CleanRL reports NaN too. ``combine``: as in masked_whiten,
    for a buffer split between processes."""
    if values.shape != returns.shape:
        raise ValueError(f"values must have the shape of returns {tuple(returns.shape)}, got {tuple(values.shape)}")
    residual = returns.detach().to(torch.float64) - values.detach().to(torch.float64)
    sums = {**{f"returns_{k}": v for k, v in masked_sums(returns, mask).items()},
            **{f"residual_{k}": v for k, v in masked_sums(residual, mask).items()}}
    if combine is not None:
        sums = combine(sums)
    _, returns_variance = _mean_and_variance({k: sums[f"returns_{k}"] for k in ("count", "sum", "sum_sq")},
                                             unbiased=False)
    if returns_variance == 0:
        return float("nan")
    _, residual_variance = _mean_and_variance({k: sums[f"residual_{k}"] for k in ("count", "sum", "sum_sq")},
                                              unbiased=False)
    return 1.0 - residual_variance / returns_variance


def _check_gae_arguments(rewards, values, completion_mask, gamma, lam, last_values) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, T], got {tuple(rewards.shape)}")
    for name, tensor in {"values": values, "completion_mask": completion_mask}.items():
        if tensor.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(tensor.shape)}")
    if last_values is not None and last_values.shape != rewards.shape[:1]:
        raise ValueError(f"last_values must have shape [B] = [{rewards.shape[0]}], got {tuple(last_values.shape)}")
    if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
        raise ValueError(f"need 0 <= gamma <= 1 and 0 <= lam <= 1, got gamma={gamma}, lam={lam}")
    if not ((completion_mask == 0) | (completion_mask == 1)).all():
        raise ValueError("completion_mask must contain only 0 and 1")

    is_answer = completion_mask.bool()
    # A 0 followed by a 1 is a hole (or left padding): the recursion would run across a gap.
    rows_with_hole = (~is_answer[:, :-1] & is_answer[:, 1:]).any(dim=1)
    if rows_with_hole.any():
        raise ValueError("completion_mask must be 1 on a prefix of each row and 0 after it; rows "
                         f"{rows_with_hole.nonzero().flatten().tolist()} have a 0 before a 1")
    # A NaN reward or value would poison the advantages of every earlier token of its row.
    for name, tensor in {"rewards": rewards, "values": values}.items():
        if not torch.where(is_answer, tensor, 0.0).isfinite().all():
            raise ValueError(f"{name} must be finite on the answer tokens")
    if last_values is not None and not last_values.isfinite().all():
        raise ValueError("last_values must be finite")


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, completion_mask: torch.Tensor, gamma: float,
                lam: float, last_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns [B, T] of the answer tokens (see the module docstring).

    rewards, values, completion_mask [B, T]; completion_mask must be 1 on a prefix of every row
    and 0 after it (a row may be empty). last_values [B]: the value of the state after each row's
    last answer token, the bootstrap for rows truncated at the generation limit and 0 for rows
    that ended with EOS; None means 0 for every row (all rows ended with EOS). This function
    cannot tell the two kinds of rows apart: the caller decides by what it puts in last_values.

    Returns (advantages, returns), at least fp32, detached; both are 0 outside the mask."""
    _check_gae_arguments(rewards, values, completion_mask, gamma, lam, last_values)
    compute_dtype = _compute_dtype(rewards, values, *(() if last_values is None else (last_values,)))
    num_rows, num_tokens = rewards.shape
    is_answer = completion_mask.bool()
    rewards = torch.where(is_answer, rewards.detach().to(compute_dtype), 0.0)
    values = torch.where(is_answer, values.detach().to(compute_dtype), 0.0)
    if last_values is None:
        last_values = torch.zeros(num_rows, dtype=compute_dtype, device=rewards.device)
    last_values = last_values.detach().to(compute_dtype)

    # V_{t+1}: the next token's value while the answer goes on; after its last token (the next
    # position is padding or past the end), the row's last_values.
    next_is_answer = torch.cat([is_answer[:, 1:], is_answer.new_zeros(num_rows, 1)], dim=1)
    following_values = torch.cat([values[:, 1:], values.new_zeros(num_rows, 1)], dim=1)
    next_values = torch.where(next_is_answer, following_values, last_values.unsqueeze(1))
    deltas = rewards + gamma * next_values - values

    advantages_reversed = []
    next_advantage = torch.zeros(num_rows, dtype=compute_dtype, device=rewards.device)
    for t in reversed(range(num_tokens)):
        # Padding gets 0, which is also what ends the recursion at each row's last answer token.
        next_advantage = torch.where(is_answer[:, t], deltas[:, t] + gamma * lam * next_advantage, 0.0)
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(is_answer, advantages + values, 0.0)
    return advantages, returns

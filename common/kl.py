"""Per-token estimators of KL(policy || reference) from tokens sampled from the policy.

J. Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html).
With x ~ q (the policy), p the reference and the log-ratio

    log r = log p(x) - log q(x) = ref_logp - logp,

KL(q || p) = E_q[-log r], and each function below returns one sample of an estimator, per token:

    k1 = -log r              = logp - ref_logp       unbiased, high variance, can be negative
    k2 = (log r)^2 / 2                                biased (exact to second order), low variance, >= 0
    k3 = (r - 1) - log r                              unbiased (E_q[r - 1] = 0), low variance, >= 0

k3 adds the zero-mean control variate r - 1 to k1; r - 1 - log r >= 0 because log r <= r - 1.
k3 is the KL penalty of GRPO (DeepSeekMath, Shao et al. 2024), k1 the one of classic RLHF PPO
(Ziegler et al. 2019).

All three are computed and returned in at least fp32: bf16/fp16 log-probs are upcast before the
subtraction, since the difference of two bf16 numbers generally needs more bits than bf16 has,
and fp16's range (up to 65504 ~ e^11) cannot hold k3 for log-ratios beyond ~11.
"""

from __future__ import annotations

import torch

# |log r| beyond this only happens for tokens where policy and reference disagree by a factor of
# e^20 ~ 5e8; see kl_k3.
LOG_RATIO_LIMIT = 20.0


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log r = ref_logp - logp, in at least fp32."""
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    return ref_logp.to(dtype) - logp.to(dtype)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp = -log r: unbiased estimate of KL(policy || reference), elementwise."""
    return -_log_ratio(logp, ref_logp)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (logp - ref_logp)^2 / 2 = (log r)^2 / 2: biased, low-variance, non-negative, elementwise.

    Its expectation is the f-divergence with f(r) = (log r)^2 / 2, which agrees with KL to second
    order as p -> q."""
    return 0.5 * _log_ratio(logp, ref_logp).square()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = r - 1 - log r with log r = ref_logp - logp: unbiased, low-variance, non-negative, elementwise.

    The log-ratio is clamped to [-20, 20] first (as verl's low_var_kl does): exp(log r) overflows
    to inf for log r > 88 in fp32, and one such token would make the loss and every gradient NaN.
    Tokens outside the range get the saturated value k3(+-20) and no gradient from this term.

    Computed as expm1(c) - c, c the clamped log-ratio: accurate near c = 0, where exp(c) - 1 - c
    cancels catastrophically. expm1 implementations promise ~1 ulp, not expm1(c) >= c, so for
    tiny |c| the difference could round to -1 ulp; the final clamp at 0 keeps k3 non-negative."""
    log_ratio = _log_ratio(logp, ref_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return (torch.expm1(log_ratio) - log_ratio).clamp_min(0.0)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token KL estimate named ``estimator`` ("k1", "k2" or "k3")."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)

"""The DPO family of preference losses, their logging statistics, and the SFT term of RPO.

Notation: pair b of a batch has a chosen answer y_c and a rejected answer y_r to the same prompt;
pi_c = log pi_theta(y_c | x) and pi_r = log pi_theta(y_r | x) are the policy's sequence log-probs
(sums of the answer tokens' log-probs), ref_c and ref_r the frozen reference's. The implicit
reward of an answer is beta * (pi - ref), and the losses depend on the pair through

    h = (pi_c - ref_c) - (pi_r - ref_r)

the margin by which the policy prefers the chosen answer more than the reference does. With
sigma the logistic function and eps = label_smoothing, per pair, by loss_type:

    "sigmoid"  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
               DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7); eps > 0 is
               conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the label
               is assumed flipped with probability eps
    "robust"   ((1 - eps) (-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps)
               robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased estimate of
               the clean-label loss under label-flip rate eps; needs eps < 1/2
    "hinge"    relu(1 - beta h)
               SLiC (Zhao et al. 2023, "SLiC-HF"), with margin 1 / beta in terms of h
    "ipo"      (h - 1 / (2 beta))^2
               IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
               Human Preferences"): regresses h to 1 / (2 beta) instead of pushing it to
               infinity, so it does not overfit deterministic preferences

For "ipo" the CALLER passes length-normalised log-probs: each answer's sum of token log-probs
divided by its number of answer tokens, for the policy and the reference alike (as TRL's
DPOTrainer does for ipo). With sums, h grows with answer length while the target 1 / (2 beta)
does not. The other losses take sums.

Label smoothing applies to "sigmoid" and "robust" only; "hinge" and "ipo" refuse it.

log sigma is F.logsigmoid, which is exact for large |beta h|, where log(sigmoid(x)) would underflow
to log 0 = -inf. The rewards returned for logging are beta * (pi - ref), detached.

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization") adds to the DPO loss the
negative log-likelihood of the chosen answers, sft_loss below (here per answer token), weighted
by a coefficient chosen by the training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def _check_dpo_arguments(named_logps: dict[str, torch.Tensor], beta: float, loss_type: str,
                         label_smoothing: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {list(DPO_LOSS_TYPES)}")
    shape = named_logps["policy_chosen_logps"].shape
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must have shape [B], got {tuple(shape)}")
    for name, tensor in named_logps.items():
        if tensor.shape != shape:
            raise ValueError(f"{name} must have the shape of policy_chosen_logps {tuple(shape)}, "
                             f"got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "sigmoid" and not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for 'sigmoid', got {label_smoothing}")
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust' (it divides by 1 - 2 eps), "
                         f"got {label_smoothing}")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0:
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'robust' only, got {label_smoothing} "
                         f"with {loss_type!r}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards (see the module docstring).

    All four inputs [B]: sequence log-probs (sums over the answer tokens; per-token means for
    "ipo"). Gradients flow to the policy log-probs; the reference's are detached. beta > 0.
    loss_type "sigmoid", "robust", "hinge" or "ipo"; label_smoothing for "sigmoid" (in [0, 0.5])
    and "robust" (in [0, 0.5)).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]), at least fp32; the rewards
    beta * (pi - ref) are detached. The batch loss is usually losses.mean()."""
    named_logps = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                   "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    _check_dpo_arguments(named_logps, beta, loss_type, label_smoothing)
    compute_dtype = torch.float32
    for tensor in named_logps.values():
        compute_dtype = torch.promote_types(compute_dtype, tensor.dtype)

    chosen_log_ratio = policy_chosen_logps.to(compute_dtype) - ref_chosen_logps.detach().to(compute_dtype)
    rejected_log_ratio = policy_rejected_logps.to(compute_dtype) - ref_rejected_logps.detach().to(compute_dtype)
    margin = chosen_log_ratio - rejected_log_ratio

    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  - label_smoothing * F.logsigmoid(-beta * margin))
    elif loss_type == "robust":
        losses = ((1 - label_smoothing) * -F.logsigmoid(beta * margin)
                  + label_smoothing * F.logsigmoid(-beta * margin)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        losses = (margin - 1 / (2 * beta)).square()

    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_stats(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Logging statistics of a batch, from dpo_loss's outputs (all [B]), as floats:

      loss             mean of losses
      reward_accuracy  fraction of pairs with chosen_reward > rejected_reward (a tie counts as wrong)
      reward_margin    mean of chosen_reward - rejected_reward
      chosen_reward    mean of chosen_rewards;  rejected_reward  mean of rejected_rewards
    """
    if losses.dim() != 1 or losses.shape[0] < 1:
        raise ValueError(f"losses must have shape [B] with B >= 1, got {tuple(losses.shape)}")
    for name, tensor in {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}.items():
        if tensor.shape != losses.shape:
            raise ValueError(f"{name} must have the shape of losses {tuple(losses.shape)}, got {tuple(tensor.shape)}")
    with torch.no_grad():
        chosen_rewards = chosen_rewards.float()
        rejected_rewards = rejected_rewards.float()
        return {
            "loss": float(losses.float().mean()),
            "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
            "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
            "chosen_reward": float(chosen_rewards.mean()),
            "rejected_reward": float(rejected_rewards.mean()),
        }


def sft_loss(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """Negative mean log-likelihood per answer token of the chosen answers: RPO's SFT term.

    chosen_token_logps, chosen_mask [B, T]: per-token log-probs of the chosen answers under the
    policy, and 1 on their answer tokens (EOS included), 0 on padding. The mean is over all masked
    tokens of the batch; no masked token gives 0. Padding may hold inf or NaN: torch.where drops it."""
    if chosen_token_logps.dim() != 2 or chosen_mask.shape != chosen_token_logps.shape:
        raise ValueError(f"chosen_token_logps and chosen_mask must both have shape [B, T], got "
                         f"{tuple(chosen_token_logps.shape)} and {tuple(chosen_mask.shape)}")
    if not ((chosen_mask == 0) | (chosen_mask == 1)).all():
        raise ValueError("chosen_mask must contain only 0 and 1")
    is_answer = chosen_mask.bool()
    compute_dtype = torch.promote_types(chosen_token_logps.dtype, torch.float32)
    token_logps = torch.where(is_answer, chosen_token_logps.to(compute_dtype), 0.0)
    return -token_logps.sum() / is_answer.sum().clamp_min(1)

"""Group-relative advantages: each completion is scored against the other completions of its prompt.

GRPO samples G completions per prompt and replaces PPO's learned value baseline by the group's
own rewards. For a group with rewards r_1 .. r_G, every token of completion i gets the advantage

    "std"   A_i = (r_i - mean(r)) / (std(r) + 1e-4)     GRPO, DeepSeekMath (Shao et al. 2024, §4.1.2)
    "mean"  A_i = r_i - mean(r)                          Dr. GRPO (Liu et al. 2025)
    "rank"  A_i = (rank_i - (G - 1) / 2) / ((G - 1) / 2)

"std": std is the unbiased sample standard deviation (divisor G - 1, torch's default), as in TRL's
GRPOTrainer, which also adds the 1e-4; DeepSeekMath writes std(r) without naming the divisor.
Dividing by the std scales up groups whose rewards barely differ (prompts that are almost always or
almost never solved); Dr. GRPO shows this is a question-level difficulty bias and drops the
division ("mean").

"rank": rank_i is the 0-based rank of r_i within its group (0 = lowest), ties sharing the average
of the ranks they span; centring and dividing by (G - 1) / 2 puts the advantages in [-1, 1]. Only
the order of the rewards matters, so the scale and outliers of a reward function cannot change the
size of an update (the centred-rank fitness shaping of evolution strategies, Salimans et al. 2017,
here scaled to [-1, 1]).

A group whose rewards are all equal (every completion right, or every one wrong) carries no
learning signal; it gets exactly zero advantage in every mode. Computing r - mean(r) alone would not
guarantee that: the float32 mean of three 0.9s is 0.9 - 6e-8, which "std" mode then divides by
1e-4. With G = 1 every group is such a group.
"""

from __future__ import annotations

import torch

ADVANTAGE_MODES = ("mean", "std", "rank")

# Added to the group's std before dividing, as in TRL: a group whose rewards differ only by
# rounding would otherwise get huge advantages.
STD_EPS = 1e-4


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must have shape [num_prompts, G] with G >= 1, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite; a NaN or inf reward would poison its whole group")


def zero_advantage_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[num_prompts] bool: True for the groups whose rewards are all equal (no learning signal).

    Its mean is the fraction of prompts that contribute nothing to the step, worth logging: it is
    the fraction of the generation budget spent on prompts too easy or too hard for the policy."""
    _check_rewards(rewards)
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def _average_ranks(rewards: torch.Tensor) -> torch.Tensor:
    """0-based rank of every reward within its row, ties sharing the average of their ranks.

    A reward with `below` smaller and `equal` equal rewards in its row (itself included) spans the
    ranks below .. below + equal - 1, whose average is below + (equal - 1) / 2. Pairwise
    comparison is O(G^2) per group, trivial for GRPO's group sizes."""
    other = rewards.unsqueeze(1)  # [P, 1, G]: other[p, 0, j] = r_j
    this = rewards.unsqueeze(2)  # [P, G, 1]: this[p, i, 0] = r_i
    below = (other < this).sum(dim=2)
    equal = (other == this).sum(dim=2)
    return below.to(rewards.dtype) + (equal - 1).to(rewards.dtype) / 2


def group_advantages(rewards: torch.Tensor, mode: str) -> torch.Tensor:
    """Advantages [num_prompts, G] of the completions whose rewards are ``rewards`` [num_prompts, G].

    ``mode`` is "mean", "std" or "rank" (see the module docstring). Computed in at least fp32;
    groups with all-equal rewards, and every group when G = 1, get exactly 0."""
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; valid: {list(ADVANTAGE_MODES)}")
    _check_rewards(rewards)
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    group_size = rewards.shape[1]
    if group_size == 1:
        # No other completion to compare with; the std of one value is undefined (0 / 0).
        return torch.zeros_like(rewards)

    if mode == "rank":
        half_range = (group_size - 1) / 2
        advantages = (_average_ranks(rewards) - half_range) / half_range
    else:
        advantages = rewards - rewards.mean(dim=1, keepdim=True)
        if mode == "std":
            advantages = advantages / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    return advantages.masked_fill(zero_advantage_groups(rewards).unsqueeze(1), 0.0)

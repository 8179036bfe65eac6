"""Learning-rate schedules shared by every trainer: linear warm-up, then constant or cosine."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant",
              min_factor: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up: (step + 1) / warmup_steps, so the first update already moves.  Then
    "constant" stays at 1; "cosine" follows min + (1 - min) * (1 + cos(pi * progress)) / 2
    down to ``min_factor`` at the last step (Loshchilov & Hutter, SGDR, 2017).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps + 1:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps - 1))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_then_schedule(optimizer, warmup_steps: int, total_steps: int, schedule: str = "constant"):
    """A LambdaLR scaling every parameter group's peak learning rate by lr_factor, stepped once per
    training step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule))

"""Policy-gradient pieces that GRPO (grpo/loss.py) and PPO (ppo/loss.py) share.

Log-ratios are clamped to [-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT] before the exponential, as in verl:
a ratio of e^20 means the policy has long left the trust region, and without the clamp exp
overflows to inf beyond 88, where inf * 0 (a zero advantage) would make the loss NaN.
"""

from __future__ import annotations

import torch

LOG_RATIO_LIMIT = 20.0

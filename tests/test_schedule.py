"""Learning-rate schedule: warm-up, constant, cosine, against hand-worked values."""

import math

import pytest

from common.schedule import lr_factor


def test_warmup_then_constant():
    assert [lr_factor(s, 4, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_from_one_to_min_factor():
    # warm-up 2, total 12: decay over steps 2..11, progress (s - 2) / 9
    assert lr_factor(2, 2, 12, "cosine") == pytest.approx(1.0)
    assert lr_factor(11, 2, 12, "cosine") == pytest.approx(0.1)
    halfway = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4.5 / 9))  # = 0.55
    assert lr_factor(6.5, 2, 12, "cosine") == pytest.approx(halfway)
    assert halfway == pytest.approx(0.55)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="constant, cosine"):
        lr_factor(0, 0, 10, "linear")

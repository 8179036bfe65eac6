"""Training-inference mismatch statistics and truncated importance sampling weights
(common/policy_gradient.py), against hand-worked numbers."""

import math

import pytest
import torch

from common.policy_gradient import logprob_mismatch, truncated_importance_weights

# Two rows of three tokens; row 1's last token is padding, holding values that must not count.
TRAIN_LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, -3.0, float("nan")]])
SAMPLER_LOGP = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -3.5, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_logprob_mismatch_hand_worked():
    # |sampler - train| on the five completion tokens: 0.5, 1.0, 0.0, 0.25, 0.5
    mean, largest = logprob_mismatch(SAMPLER_LOGP, TRAIN_LOGP, MASK)
    assert mean.dim() == 0 and largest.dim() == 0
    assert mean.item() == pytest.approx(2.25 / 5) and largest.item() == pytest.approx(1.0)


def test_logprob_mismatch_of_identical_logprobs_and_of_an_empty_mask_is_zero():
    mean, largest = logprob_mismatch(TRAIN_LOGP, TRAIN_LOGP, MASK)
    assert mean.item() == 0.0 and largest.item() == 0.0
    mean, largest = logprob_mismatch(SAMPLER_LOGP, TRAIN_LOGP, torch.zeros_like(MASK))
    assert mean.item() == 0.0 and largest.item() == 0.0


def test_truncated_importance_weights_hand_worked():
    # exp(train - sampler): exp(0.5) = 1.6487 -> capped at 1.5, exp(-1) = 0.3679, exp(0) = 1,
    # exp(0.25) = 1.2840, exp(0.5) -> 1.5; the padding's NaN log-ratio gives NaN, masked by the loss.
    train_logp = TRAIN_LOGP.clone().requires_grad_()
    weights = truncated_importance_weights(train_logp, SAMPLER_LOGP, cap=1.5)
    assert not weights.requires_grad
    expected = torch.tensor([1.5, math.exp(-1.0), 1.0, math.exp(0.25), 1.5])
    torch.testing.assert_close(weights[MASK.bool()], expected)


def test_truncated_importance_weights_never_overflow_and_refuse_a_bad_cap():
    weights = truncated_importance_weights(torch.tensor([0.0, -200.0]), torch.tensor([-200.0, 0.0]), cap=2.0)
    assert weights.tolist() == [2.0, pytest.approx(math.exp(-20.0))]
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(TRAIN_LOGP, SAMPLER_LOGP, cap=0.0)

"""KL(policy || reference) estimators k1, k2, k3: hand-worked values, signs, numerical safety, and
(un)biasedness by Monte Carlo on small categorical distributions."""

import math

import pytest
import torch

from common.kl import kl_estimate, kl_k1, kl_k2, kl_k3

ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def test_hand_worked_values():
    # Policy gives the token 1/2, reference 1/4: log r = log(1/4) - log(1/2) = -log 2, r = 1/2.
    logp, ref_logp = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_k1(logp, ref_logp), torch.tensor([0.693147]))  # -log r = log 2
    torch.testing.assert_close(kl_k2(logp, ref_logp), torch.tensor([0.240227]))  # (log 2)^2 / 2
    torch.testing.assert_close(kl_k3(logp, ref_logp), torch.tensor([0.193147]))  # 1/2 - 1 + log 2


@pytest.mark.parametrize("name", ESTIMATORS)
def test_zero_when_policy_equals_reference(name):
    logp = torch.log(torch.tensor([1e-6, 0.1, 0.5, 1.0]))
    assert torch.equal(kl_estimate(logp, logp.clone(), name), torch.zeros(4))


def test_k1_can_be_negative_k2_k3_cannot():
    logp, ref_logp = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    assert kl_k1(logp, ref_logp).item() == pytest.approx(-math.log(2), abs=1e-6)
    assert kl_k2(logp, ref_logp).item() > 0 and kl_k3(logp, ref_logp).item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k3_finite_and_non_negative_with_gradients_on_extreme_log_ratios(dtype):
    generator = torch.Generator().manual_seed(0)
    moderate = torch.randn(10_000, generator=generator) * 5
    tiny = torch.randn(10_000, generator=generator) * 1e-6
    extreme = torch.tensor([-1e4, -500.0, -89.0, -21.0, 21.0, 89.0, 500.0, 1e4, 0.0])
    log_ratio = torch.cat([moderate, tiny, extreme])
    logp = torch.full_like(log_ratio, -3.0).to(dtype).requires_grad_()
    ref_logp = (-3.0 + log_ratio).to(dtype)
    k3 = kl_k3(logp, ref_logp)
    assert k3.dtype is torch.float32 and torch.isfinite(k3).all() and (k3 >= 0).all()
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert (kl_k2(logp, ref_logp) >= 0).all()


def test_half_precision_inputs_are_upcast():
    # k3 at log r = 15 is 3.3e6, beyond fp16's largest value (65504).
    logp, ref_logp = torch.tensor([-16.0], dtype=torch.float16), torch.tensor([-1.0], dtype=torch.float16)
    for name in ESTIMATORS:
        assert kl_estimate(logp, ref_logp, name).dtype is torch.float32
    torch.testing.assert_close(kl_k3(logp, ref_logp), torch.tensor([math.exp(15) - 16]))


def test_k3_is_accurate_for_tiny_log_ratios():
    # Where exp(x) - 1 - x would cancel to 0 or worse in fp32, k3 ~ (log r)^2 / 2 must survive.
    log_ratio = torch.tensor([1e-2, 1e-3, 1e-4, -1e-4, -1e-3], dtype=torch.float64)
    exact = torch.expm1(log_ratio) - log_ratio
    k3 = kl_k3(torch.zeros(5), log_ratio.float())
    torch.testing.assert_close(k3.double(), exact, rtol=1e-3, atol=0)


def test_k3_saturates_beyond_the_clamp():
    # Log-ratios beyond +-20 give k3(+-20); inside, the exact value.
    logp = torch.zeros(4)
    k3 = kl_k3(logp, torch.tensor([-30.0, -20.0, 20.0, 30.0]))
    expected = torch.tensor([math.exp(-20) + 19, math.exp(-20) + 19, math.exp(20) - 21, math.exp(20) - 21])
    torch.testing.assert_close(k3, expected)


def test_k1_and_k3_are_unbiased_k2_is_not():
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)  # the policy, which samples
    p = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)  # the reference
    exact_kl = (q * (q / p).log()).sum().item()  # 0.1064
    samples = torch.multinomial(q, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref_logp = q.log()[samples], p.log()[samples]
    for name in ("k1", "k3"):
        estimates = kl_estimate(logp, ref_logp, name)
        standard_error = estimates.std().item() / math.sqrt(len(estimates))  # ~1e-3 for k1, less for k3
        assert abs(estimates.mean().item() - exact_kl) < 4 * standard_error, name
    # k2's expectation is E_q[(log r)^2] / 2 = 0.0960, 0.0104 below the KL: >20 standard errors.
    k2_mean = kl_estimate(logp, ref_logp, "k2").mean().item()
    assert exact_kl - k2_mean == pytest.approx(0.0104, abs=1e-3)
    assert kl_estimate(logp, ref_logp, "k3").std() < kl_estimate(logp, ref_logp, "k1").std()


def test_dispatcher_names_and_error():
    logp, ref_logp = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    for name, estimator in ESTIMATORS.items():
        assert torch.equal(kl_estimate(logp, ref_logp, name), estimator(logp, ref_logp))
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; valid: \['k1', 'k2', 'k3'\]"):
        kl_estimate(logp, ref_logp, "k4")

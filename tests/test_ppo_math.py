"""PPO maths on hand-made tensors: GAE (against a plain per-row loop, and by hand), masked
statistics and whitening, explained variance, the clipped policy and value losses with their
gradients, the entropy bonus, and the per-token KL-penalised reward. Every expected value is worked
out by hand in the comments or computed by a plain Python loop written here."""

import math

import pytest
import torch

from ppo.gae import compute_gae, explained_variance, masked_mean, masked_sums, masked_var, masked_whiten
from common.policy_gradient import check_completion_mask
from ppo import loss as ppo_loss_module
from ppo.loss import entropy_bonus, ppo_total_loss, token_rewards


def _float_stats(loss_function):
    """A loss function with its statistics read as floats (it returns 0-dim tensors: no host sync there)."""
    def with_float_stats(*args, **kwargs):
        loss, stats = loss_function(*args, **kwargs)
        return loss, {key: float(value) for key, value in stats.items()}
    return with_float_stats


ppo_policy_loss = _float_stats(ppo_loss_module.ppo_policy_loss)
ppo_value_loss = _float_stats(ppo_loss_module.ppo_value_loss)


def prefix_mask(lengths: list[int], num_tokens: int) -> torch.Tensor:
    """[B, T] float mask with 1 on the first lengths[b] positions of row b."""
    return torch.tensor([[1.0] * length + [0.0] * (num_tokens - length) for length in lengths])


def reference_gae(rewards, values, lengths, last_values, gamma, lam):
    """GAE row by row on Python floats, straight from the recursion (nested lists [B][T])."""
    advantages, returns = [], []
    for row_rewards, row_values, length, last_value in zip(rewards, values, lengths, last_values):
        row_advantages = [0.0] * len(row_rewards)
        running = 0.0
        for t in reversed(range(length)):
            next_value = row_values[t + 1] if t + 1 < length else last_value
            delta = row_rewards[t] + gamma * next_value - row_values[t]
            running = delta + gamma * lam * running
            row_advantages[t] = running
        advantages.append(row_advantages)
        returns.append([a + v if t < length else 0.0 for t, (a, v) in enumerate(zip(row_advantages, row_values))])
    return advantages, returns


# ---------------------------------------------------------------------------- GAE


def test_gae_matches_a_per_row_loop_on_mixed_lengths_and_endings():
    generator = torch.Generator().manual_seed(0)
    num_tokens = 7
    # Rows 0, 2, 4 ended with EOS (last value 0); rows 1 and 3 were cut off at the generation limit
    # and bootstrap; row 5 is empty.
    lengths = [3, 7, 1, 7, 5, 0]
    last_values = [0.0, 0.8, 0.0, -0.4, 0.0, 0.0]
    rewards = torch.randn(len(lengths), num_tokens, generator=generator, dtype=torch.float64)
    values = torch.randn(len(lengths), num_tokens, generator=generator, dtype=torch.float64)
    gamma, lam = 0.97, 0.9

    advantages, returns = compute_gae(rewards, values, prefix_mask(lengths, num_tokens), gamma, lam,
                                      last_values=torch.tensor(last_values, dtype=torch.float64))

    expected_advantages, expected_returns = reference_gae(rewards.tolist(), values.tolist(), lengths,
                                                          last_values, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_advantages, dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor(expected_returns, dtype=torch.float64))


def test_gae_hand_worked_eos_row_and_truncated_row():
    # By hand: gamma = 0.9, lam = 0.8, gamma * lam = 0.72.
    # Row 0 ended with EOS at t = 1: r = [0, 1], V = [0.5, 0.6], V after the end 0.
    #   delta_1 = 1 + 0.9 * 0 - 0.6 = 0.4            A_1 = 0.4
    #   delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04         A_0 = 0.04 + 0.72 * 0.4 = 0.328
    # By hand: returns = A + V = [0.828, 1.0]
    # Row 1 was cut off after t = 2: r = [0.1, 0, -0.1], V = [0.5, 0.6, 0.7], bootstrap 0.5.
    #   delta_2 = -0.1 + 0.9 * 0.5 - 0.7 = -0.35     A_2 = -0.35
    #   delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03         A_1 = 0.03 + 0.72 * -0.35 = -0.222
    #   delta_0 = 0.1 + 0.9 * 0.6 - 0.5 = 0.14       A_0 = 0.14 + 0.72 * -0.222 = -0.01984
    # By hand: returns = [0.48016, 0.378, 0.35]
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.0, -0.1]])
    values = torch.tensor([[0.5, 0.6, 0.0], [0.5, 0.6, 0.7]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8,
                                      last_values=torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(advantages, torch.tensor([[0.328, 0.4, 0.0], [-0.01984, -0.222, -0.35]]))
    torch.testing.assert_close(returns, torch.tensor([[0.828, 1.0, 0.0], [0.48016, 0.378, 0.35]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    generator = torch.Generator().manual_seed(1)
    lengths, num_tokens = [4, 2, 5], 5
    rewards = torch.randn(3, num_tokens, generator=generator, dtype=torch.float64)
    values = torch.randn(3, num_tokens, generator=generator, dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, prefix_mask(lengths, num_tokens), gamma=1.0, lam=1.0)

    # Every row ended with EOS: the deltas telescope to sum_{k >= t} r_k - V_t, and the return is
    # the plain reward-to-go.
    for row, length in enumerate(lengths):
        for t in range(num_tokens):
            reward_to_go = sum(rewards[row, k].item() for k in range(t, length)) if t < length else 0.0
            value = values[row, t].item() if t < length else 0.0
            assert advantages[row, t].item() == pytest.approx(reward_to_go - value, abs=1e-12)
            assert returns[row, t].item() == pytest.approx(reward_to_go, abs=1e-12)


def test_bootstrap_value_changes_only_the_truncated_row():
    # Row 0 ended with EOS (last value 0 in both calls), row 1 was cut off; its bootstrap value
    # goes from 0.5 to 1.5. gamma = 0.9, lam = 0.8: the extra 1.0 enters delta_2 as gamma * 1.0 =
    # 0.9 and is discounted by gamma * lam = 0.72 per step back: A_2 +0.9, A_1 +0.648,
    # A_0 +0.46656. The returns move by the same amounts (V is unchanged).
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.0, -0.1]])
    values = torch.tensor([[0.5, 0.6, 0.0], [0.5, 0.6, 0.7]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    low = compute_gae(rewards, values, mask, 0.9, 0.8, last_values=torch.tensor([0.0, 0.5]))
    high = compute_gae(rewards, values, mask, 0.9, 0.8, last_values=torch.tensor([0.0, 1.5]))
    for low_result, high_result in zip(low, high):
        assert torch.equal(low_result[0], high_result[0])
        torch.testing.assert_close(high_result[1] - low_result[1], torch.tensor([0.46656, 0.648, 0.9]))


def test_last_values_none_means_every_row_ended_with_eos():
    rewards = torch.tensor([[0.3, -0.2, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.4], [0.7, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    without = compute_gae(rewards, values, mask, 0.95, 0.9)
    with_zeros = compute_gae(rewards, values, mask, 0.95, 0.9, last_values=torch.zeros(2))
    assert torch.equal(without[0], with_zeros[0]) and torch.equal(without[1], with_zeros[1])


@pytest.mark.parametrize("garbage", [1e30, float("inf"), float("nan")])
def test_gae_outside_the_mask_is_zero_and_padding_does_not_leak(garbage):
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    padding = mask == 0
    clean = compute_gae(rewards, values, mask, 0.9, 0.8)
    dirty = compute_gae(rewards.masked_fill(padding, garbage), values.masked_fill(padding, garbage), mask, 0.9, 0.8)
    for clean_result, dirty_result in zip(clean, dirty):
        assert torch.equal(dirty_result, clean_result)
        assert torch.equal(dirty_result[padding], torch.zeros(int(padding.sum())))
    # Row 1, one EOS-ended token: A = 0.2 + 0.9 * 0 - 0.3 = -0.1, return = -0.1 + 0.3 = 0.2.
    assert clean[0][1, 0].item() == pytest.approx(-0.1) and clean[1][1, 0].item() == pytest.approx(0.2)


def test_gae_returns_fp32_without_gradient_for_bf16_inputs_with_gradient():
    values = torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16, requires_grad=True)
    advantages, returns = compute_gae(torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16), values,
                                      torch.ones(1, 2), 1.0, 1.0)
    assert advantages.dtype is torch.float32 and returns.dtype is torch.float32
    assert not advantages.requires_grad and not returns.requires_grad
    # By hand: gamma = lam = 1, EOS end: A = reward-to-go - V = [1 - 0.5, 1 - 0.25].
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.75]]))


@pytest.mark.parametrize("mask", [
    [[1.0, 0.0, 1.0]],  # a hole inside the answer
    [[0.0, 1.0, 1.0]],  # left padding
])
def test_gae_refuses_a_mask_that_is_not_a_prefix(mask):
    with pytest.raises(ValueError, match=r"prefix.*rows \[0\]"):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor(mask), 0.9, 0.8)


@pytest.mark.parametrize("overrides, message", [
    (dict(values=torch.zeros(2, 4)), "values"),
    (dict(completion_mask=torch.full((2, 3), 0.5)), "0 and 1"),
    (dict(last_values=torch.zeros(3)), "last_values"),
    (dict(last_values=torch.tensor([0.0, float("nan")])), "last_values"),
    (dict(gamma=1.1), "gamma"),
    (dict(lam=-0.1), "lam"),
    (dict(rewards=torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])), "rewards must be finite"),
])
def test_gae_invalid_arguments_raise_clear_errors(overrides, message):
    arguments = dict(rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), completion_mask=torch.ones(2, 3),
                     gamma=0.9, lam=0.8, last_values=None)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        compute_gae(**arguments)


# ---------------------------------------------------------------------------- masked statistics

HUGE = 1e30


def test_masked_mean_and_var_hand_worked_ignoring_padding():
    # Masked values 1, 2, 3, 4: mean 2.5; deviations -1.5, -0.5, 0.5, 1.5, squares sum
    # 2.25 + 0.25 + 0.25 + 2.25 = 5; unbiased variance 5 / 3, population variance 5 / 4.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, HUGE, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)


def test_masked_whiten_gives_mean_zero_variance_one_and_zero_padding():
    generator = torch.Generator().manual_seed(2)
    x = 3.0 + 2.0 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    mask = prefix_mask([6, 2, 4, 1], 6).double()
    x = x.masked_fill(mask == 0, HUGE)  # padding must influence nothing
    whitened = masked_whiten(x, mask)

    kept = [x[b, t].item() for b in range(4) for t in range(6) if mask[b, t] == 1]
    mean = sum(kept) / len(kept)
    variance = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    expected = [[(x[b, t].item() - mean) / math.sqrt(variance + 1e-8) if mask[b, t] == 1 else 0.0
                 for t in range(6)] for b in range(4)]
    torch.testing.assert_close(whitened, torch.tensor(expected, dtype=torch.float64))

    whitened_kept = [whitened[b, t].item() for b in range(4) for t in range(6) if mask[b, t] == 1]
    assert sum(whitened_kept) / len(whitened_kept) == pytest.approx(0.0, abs=1e-12)
    assert sum(w ** 2 for w in whitened_kept) / (len(whitened_kept) - 1) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(whitened[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=torch.float64))


def test_masked_whiten_without_shifting_the_mean_only_rescales():
    # Masked values 1, 3 (padding 1e30): mean 2, unbiased variance ((-1)^2 + 1^2) / 1 = 2,
    # (x - 2) / sqrt(2) + 2 = [2 - 1/sqrt(2), 2 + 1/sqrt(2)] = [1.292893, 2.707107].
    x = torch.tensor([[1.0, 3.0, HUGE]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False, eps=0.0),
                               torch.tensor([[1.292893, 2.707107, 0.0]]))


def test_masked_statistics_refuse_too_few_positions():
    with pytest.raises(ValueError, match="at least 1"):
        masked_mean(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(torch.ones(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


# ---------------------------------------------------------------------------- explained variance


def test_explained_variance_of_perfect_values_is_one():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, HUGE, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)


def test_explained_variance_of_the_mean_of_the_returns_is_zero():
    # Masked returns 1, 2, 3, 4 have mean 2.5; predicting 2.5 everywhere leaves all the variance.
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, HUGE, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert explained_variance(torch.full((2, 3), 2.5), returns, mask) == pytest.approx(0.0, abs=1e-7)


def test_explained_variance_hand_worked():
    # returns [1, 2, 3], values [1, 2, 2]: residuals [0, 0, 1], mean 1/3, population variance
    # ((1/3)^2 + (1/3)^2 + (2/3)^2) / 3 = (6/9) / 3 = 2/9. Var[returns] = (1 + 0 + 1) / 3 = 2/3.
    # 1 - (2/9) / (2/3) = 1 - 1/3 = 2/3.
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0, 7.0]]), torch.tensor([[1.0, 2.0, 3.0, -5.0]]),
                            torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert ev == pytest.approx(2 / 3)


def test_explained_variance_is_nan_for_constant_returns():
    assert math.isnan(explained_variance(torch.tensor([[0.1, 0.2]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)))


# ---------------------------------------------------------------------------- policy loss


def policy_loss_and_grad(logp, old_logp, advantages, completion_mask, **kwargs):
    """ppo_policy_loss with logp as a fresh leaf: (loss, stats, d loss / d logp)."""
    logp = logp.detach().clone().requires_grad_()
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, completion_mask, **kwargs)
    loss.backward()
    return loss.detach(), stats, logp.grad


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.8], [0.6, 0.1, 0.1]]))
    advantages = torch.tensor([[1.0, -0.5, 2.0], [-1.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, stats, grad = policy_loss_and_grad(logp, logp.clone(), advantages, mask)
    # By hand: ratio = 1 on every token: loss = -(1 - 0.5 + 2 - 1) / 4 = -1.5 / 4 = -0.375, and
    # d/dlogp (-ratio A / N) = -A / 4 on the answer tokens.
    assert loss.item() == pytest.approx(-0.375)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.125, -0.5], [0.25, 0.0, 0.0]]))
    assert stats == {"policy_loss": pytest.approx(-0.375), "clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0}


def test_policy_loss_clipping_on_both_signs_of_the_advantage():
    # Four tokens, old probability 0.4; new 0.6 -> ratio 1.5, new 0.2 -> ratio 0.5. clip range [0.8, 1.2].
    old_logp = torch.log(torch.full((1, 4), 0.4))
    logp = torch.log(torch.tensor([[0.6, 0.2, 0.2, 0.6]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats, grad = policy_loss_and_grad(logp, old_logp, advantages, torch.ones(1, 4))
    # Per-token loss -min(r A, clip(r) A):
    #   A=+1, r=1.5: min(1.5, 1.2)   = 1.2  clipped   -> -1.2, no gradient
    #   A=-1, r=0.5: min(-0.5, -0.8) = -0.8 clipped   -> +0.8, no gradient
    #   A=+1, r=0.5: min(0.5, 0.8)   = 0.5  unclipped -> -0.5, d/dlogp = -A r / N = -0.5 / 4 = -0.125
    #   A=-1, r=1.5: min(-1.5, -1.2) = -1.5 unclipped -> +1.5, d/dlogp = -A r / N = +1.5 / 4 = 0.375
    # By hand: loss = (-1.2 + 0.8 - 0.5 + 1.5) / 4 = 0.15.
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -0.125, 0.375]]))
    # CleanRL's clip_frac counts |r - 1| > 0.2 whatever the sign of A: all four tokens.
    assert stats["clip_frac"] == 1.0
    # By hand: approx_kl = mean of (r - 1) - log r: r = 1.5 -> 0.5 - 0.405465 = 0.094535; r = 0.5 ->
    # -0.5 + 0.693147 = 0.193147; (2 * 0.094535 + 2 * 0.193147) / 4 = 0.143841.
    assert stats["approx_kl"] == pytest.approx(0.143841, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # (1.5 + 0.5 + 0.5 + 1.5) / 4


def test_policy_loss_inside_the_clip_range_is_unclipped_on_both_signs():
    # Ratios 1.1 and 0.9 (inside [0.8, 1.2]), A = +2 and -2: losses -2.2 and +1.8, mean -0.2;
    # d/dlogp = -A r / N: -2 * 1.1 / 2 = -1.1 and +2 * 0.9 / 2 = 0.9.
    old_logp = torch.log(torch.full((1, 2), 0.5))
    logp = old_logp + torch.log(torch.tensor([[1.1, 0.9]]))
    loss, stats, grad = policy_loss_and_grad(logp, old_logp, torch.tensor([[2.0, -2.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1.1, 0.9]]))
    assert stats["clip_frac"] == 0.0


@pytest.mark.parametrize("garbage", [1e4, float("-inf"), float("nan")])
def test_policy_loss_padding_contributes_nothing(garbage):
    old_logp = torch.log(torch.full((2, 2), 0.4))
    logp = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.4]]))
    advantages = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    padding = mask == 0
    clean = policy_loss_and_grad(logp, old_logp, advantages, mask)
    dirty = policy_loss_and_grad(logp.masked_fill(padding, garbage), old_logp.masked_fill(padding, garbage),
                                 advantages.masked_fill(padding, garbage), mask)
    assert dirty[0].item() == clean[0].item() and dirty[1] == clean[1]
    assert torch.equal(dirty[2], clean[2]) and dirty[2][1, 1] == 0


def test_policy_loss_normalizer_replaces_the_token_count():
    # Ratio 1, A = [1, 3]: sum of -A = -4; / 2 tokens = -2, / 8 (the step's token count) = -0.5.
    logp = torch.zeros(1, 2)
    advantages = torch.tensor([[1.0, 3.0]])
    assert ppo_policy_loss(logp, logp, advantages, torch.ones(1, 2))[0].item() == -2.0
    assert ppo_policy_loss(logp, logp, advantages, torch.ones(1, 2), normalizer=8.0)[0].item() == -0.5


def test_policy_loss_gradient_flows_only_through_logp():
    logp = torch.log(torch.tensor([[0.5, 0.3]])).requires_grad_()
    old_logp = torch.log(torch.tensor([[0.4, 0.4]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(logp, old_logp, advantages, torch.ones(1, 2))
    loss.backward()
    assert logp.grad is not None and old_logp.grad is None and advantages.grad is None


def test_policy_loss_extreme_log_ratios_stay_finite():
    # Log-ratios of +-100 would overflow exp (e^100 = inf in fp32; inf * 0 = NaN for A = 0).
    old_logp = torch.full((1, 3), -50.0)
    logp = old_logp + torch.tensor([[100.0, 100.0, -100.0]])
    loss, stats, grad = policy_loss_and_grad(logp, old_logp, torch.tensor([[0.0, -1.0, -1.0]]), torch.ones(1, 3))
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and math.isfinite(stats["approx_kl"])


# ---------------------------------------------------------------------------- value loss

# Three tokens, value_clip 0.2, N = 3:
#   token 0: V_old 1.0, V 1.5, R 2.0: clipped V = 1.0 + clip(0.5) = 1.2; unclipped (1.5 - 2)^2 = 0.25,
#            clipped (1.2 - 2)^2 = 0.64 -> clipped is larger: 0.5 * 0.64 = 0.32, no gradient
#   token 1: V_old 1.0, V 1.5, R 1.0: unclipped (0.5)^2 = 0.25, clipped (1.2 - 1)^2 = 0.04 ->
#            unclipped is larger: 0.5 * 0.25 = 0.125, d/dV = (V - R) / N = 0.5 / 3
#   token 2: V_old 1.0, V 1.1, R 2.0: inside the range, both (1.1 - 2)^2 = 0.81 -> 0.405,
#            d/dV = (V - R) / N = -0.9 / 3 = -0.3
VALUES = torch.tensor([[1.5, 1.5, 1.1]])
OLD_VALUES = torch.tensor([[1.0, 1.0, 1.0]])
RETURNS = torch.tensor([[2.0, 1.0, 2.0]])


def value_loss_and_grad(values, old_values, returns, completion_mask, **kwargs):
    """ppo_value_loss with values as a fresh leaf: (loss, stats, d loss / d values)."""
    values = values.detach().clone().requires_grad_()
    loss, stats = ppo_value_loss(values, old_values, returns, completion_mask, **kwargs)
    loss.backward()
    return loss.detach(), stats, values.grad


def test_value_loss_clipped_hand_worked():
    loss, stats, grad = value_loss_and_grad(VALUES, OLD_VALUES, RETURNS, torch.ones(1, 3), value_clip=0.2)
    # (0.32 + 0.125 + 0.405) / 3 = 0.85 / 3 = 0.283333
    assert loss.item() == pytest.approx(0.85 / 3, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5 / 3, -0.3]]))
    assert stats["value_loss"] == pytest.approx(0.85 / 3, abs=1e-6)
    assert stats["value_clip_frac"] == pytest.approx(1 / 3)  # token 0 only
    assert stats["value_mean"] == pytest.approx(4.1 / 3, abs=1e-6)  # (1.5 + 1.5 + 1.1) / 3


@pytest.mark.parametrize("value_clip", [None, 0.0])
def test_value_loss_unclipped(value_clip):
    loss, stats, grad = value_loss_and_grad(VALUES, OLD_VALUES, RETURNS, torch.ones(1, 3), value_clip=value_clip)
    # 0.5 * ((1.5 - 2)^2 + (1.5 - 1)^2 + (1.1 - 2)^2) / 3 = 0.5 * (0.25 + 0.25 + 0.81) / 3 = 0.655 / 3;
    # d/dV = (V - R) / 3 = [-0.5, 0.5, -0.9] / 3.
    assert loss.item() == pytest.approx(0.655 / 3, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.5, -0.9]]) / 3)
    assert stats["value_clip_frac"] == 0.0


@pytest.mark.parametrize("garbage", [1e4, float("inf"), float("nan")])
def test_value_loss_padding_contributes_nothing_and_only_values_get_gradient(garbage):
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.cat([VALUES, torch.tensor([[garbage]])], dim=1).requires_grad_()
    old_values = torch.cat([OLD_VALUES, torch.tensor([[garbage]])], dim=1).requires_grad_()
    returns = torch.cat([RETURNS, torch.tensor([[garbage]])], dim=1).requires_grad_()
    loss, stats = ppo_value_loss(values, old_values, returns, mask)
    loss.backward()
    assert loss.item() == pytest.approx(0.85 / 3, abs=1e-6)  # as the clipped hand-worked case
    assert stats["value_mean"] == pytest.approx(4.1 / 3, abs=1e-6)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5 / 3, -0.3, 0.0]]))
    assert old_values.grad is None and returns.grad is None


def test_value_loss_normalizer():
    # Unclipped sum 0.5 * 1.31 = 0.655, divided by the step's 5 tokens: 0.131.
    loss, _ = ppo_value_loss(VALUES, OLD_VALUES, RETURNS, torch.ones(1, 3), value_clip=None, normalizer=5.0)
    assert loss.item() == pytest.approx(0.131, abs=1e-6)


# ---------------------------------------------------------------------------- entropy, total loss


def test_entropy_bonus_is_the_masked_token_mean():
    # (0.5 + 1.5 + 1.0) / 3 = 1.0; the padding's NaN is dropped; d/d entropy = 1/3 on answer tokens.
    entropy = torch.tensor([[0.5, 1.5], [1.0, float("nan")]], requires_grad=True)
    bonus = entropy_bonus(entropy, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    bonus.backward()
    assert bonus.item() == pytest.approx(1.0)
    torch.testing.assert_close(entropy.grad, torch.tensor([[1 / 3, 1 / 3], [1 / 3, 0.0]]))
    # With the step's 6 tokens as normalizer: 3.0 / 6 = 0.5.
    assert entropy_bonus(entropy, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), normalizer=6.0).item() == 0.5


def test_total_loss_adds_the_value_loss_and_subtracts_the_entropy_bonus():
    # 0.5 + 0.5 * 2.0 - 0.01 * 3.0 = 1.47
    total = ppo_total_loss(torch.tensor(0.5), torch.tensor(2.0), torch.tensor(3.0), vf_coef=0.5, ent_coef=0.01)
    assert total.item() == pytest.approx(1.47)


# ---------------------------------------------------------------------------- token rewards


def test_token_rewards_kl_on_every_answer_token_task_reward_on_the_last():
    # T = 4. Row 0 ended with EOS at t = 1; row 1 with EOS on the very last column; row 2 was cut
    # off at the generation limit (all four tokens, no EOS); row 3 is a lone EOS token.
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    log_ratio = torch.tensor([[0.2, -0.4, 0.0, 0.0], [0.1, 0.3, -0.2, 0.5], [1.0, 0.0, 2.0, -1.0],
                              [0.6, 0.0, 0.0, 0.0]])
    ref_logp = torch.full((4, 4), -2.0)
    logp = (ref_logp + log_ratio).masked_fill(mask == 0, float("nan"))  # padding must not leak
    task_rewards = torch.tensor([1.0, 0.0, -1.0, 0.5])
    rewards = token_rewards(task_rewards, logp, ref_logp, mask, kl_coef=0.1)
    # k1 = logp - ref_logp, so each answer token gets -0.1 * log_ratio, and the last one also the
    # task reward:
    #   row 0: [-0.02, 0.04 + 1.0, 0, 0]
    #   row 1: [-0.01, -0.03, 0.02, -0.05 + 0.0]
    #   row 2: [-0.1, 0.0, -0.2, 0.1 - 1.0]
    #   row 3: [-0.06 + 0.5, 0, 0, 0]
    expected = torch.tensor([[-0.02, 1.04, 0.0, 0.0], [-0.01, -0.03, 0.02, -0.05], [-0.1, 0.0, -0.2, -0.9],
                             [0.44, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    assert torch.equal(rewards[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_token_rewards_with_the_k3_estimator_and_no_gradient():
    # Policy 1/2, reference 1/4: log r = ref - logp = -log 2, r = 1/2, k3 = r - 1 - log r
    # = 0.5 - 1 + 0.693147 = 0.193147; -0.5 * k3 = -0.096574 on both tokens, + 2.0 on the last.
    logp = torch.log(torch.full((1, 2), 0.5)).requires_grad_()
    rewards = token_rewards(torch.tensor([2.0]), logp, torch.log(torch.full((1, 2), 0.25)), torch.ones(1, 2),
                            kl_coef=0.5, kl_estimator="k3")
    torch.testing.assert_close(rewards, torch.tensor([[-0.096574, 1.903426]]))
    assert not rewards.requires_grad


@pytest.mark.parametrize("overrides, message", [
    (dict(completion_mask=torch.tensor([[1.0, 1.0], [0.0, 0.0]])), r"rows \[1\]"),
    (dict(task_rewards=torch.zeros(3)), "task_rewards"),
    (dict(task_rewards=torch.tensor([0.0, float("inf")])), "finite"),
    (dict(ref_logp=torch.zeros(2, 3)), "ref_logp"),
    (dict(kl_estimator="k4"), "'k1', 'k2', 'k3'"),
    (dict(kl_coef=-0.1), "kl_coef"),
])
def test_token_rewards_invalid_arguments_raise_clear_errors(overrides, message):
    arguments = dict(task_rewards=torch.zeros(2), logp=torch.zeros(2, 2), ref_logp=torch.zeros(2, 2),
                     completion_mask=torch.ones(2, 2), kl_coef=0.1)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        token_rewards(**arguments)


@pytest.mark.parametrize("call, message", [
    (lambda: ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 2)), "old_logp"),
    (lambda: ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                             clip_eps=1.0), "clip_eps"),
    (lambda: ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                             normalizer=0.0), "normalizer"),
    (lambda: ppo_value_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2), torch.ones(1, 2)), "returns"),
    (lambda: ppo_value_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                            value_clip=-0.1), "value_clip"),
    (lambda: check_completion_mask(torch.full((1, 2), 2.0)), "0 and 1"),
])
def test_losses_invalid_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_whitening_and_explained_variance_of_a_split_buffer_use_the_whole_buffers_statistics():
    """Two halves of a buffer (as two processes hold it), each with `combine` adding the other half's
    masked sums, give exactly what the whole buffer gives; without it, each half's own statistics."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 3 + 1
    returns = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    values = returns + 0.5 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([5, 3, 4, 1, 2, 5]).unsqueeze(1)).double()
    halves = [slice(0, 2), slice(2, 6)]

    def adding(other_sums: dict):
        """A stand-in for all_reduce_sum over two processes: this half's sums plus the other half's."""
        return lambda sums: {key: value + other_sums[key] for key, value in sums.items()}

    whole = masked_whiten(x, mask)
    whole_ev = explained_variance(values, returns, mask)
    for part, other in (halves, halves[::-1]):
        whiten_sums = masked_sums(x[other], mask[other])
        torch.testing.assert_close(masked_whiten(x[part], mask[part], combine=adding(whiten_sums)), whole[part])
        ev_sums = {**{f"returns_{k}": v for k, v in masked_sums(returns[other], mask[other]).items()},
                   **{f"residual_{k}": v for k, v in masked_sums((returns - values)[other], mask[other]).items()}}
        split_ev = explained_variance(values[part], returns[part], mask[part], combine=adding(ev_sums))
        assert split_ev == pytest.approx(whole_ev, rel=1e-12)
    assert not torch.allclose(masked_whiten(x[halves[0]], mask[halves[0]]), whole[halves[0]])


def test_masked_sums_hand_worked():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_sums(x, mask) == {"count": 3.0, "sum": 6.0, "sum_sq": 14.0}


def test_policy_loss_sampler_correction_by_hand():
    """ratio = 1, A = [1, -1], w = [0.5, 2]: loss = mean(-A w) = (-0.5 + 2) / 2 = 0.75, gradient -A w / 2."""
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
                              sampler_correction=torch.tensor([[0.5, 2.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(0.75)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, 1.0]]))

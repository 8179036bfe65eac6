"""GRPO maths on hand-made tensors: group advantages, and the clipped-surrogate loss with its
clipping, padding, aggregations, micro-batch invariance, KL term and sequence-level ratios. Every
expected value is worked out by hand in the comments."""

import math
import warnings

import pytest
import torch

from grpo.advantage import group_advantages, zero_advantage_groups
from grpo.loss import GRPOObjective, grpo_loss as grpo_loss_with_tensor_stats


def grpo_loss(logp, old_logp, advantages, completion_mask, normalizer=None, ref_logp=None, sampler_correction=None,
              **objective):
    """grpo_loss with the objective's settings as keywords (GRPOObjective's fields) and its statistics
    read as floats (it returns 0-dim tensors: no host sync there)."""
    loss, stats = grpo_loss_with_tensor_stats(logp, old_logp, advantages, completion_mask, GRPOObjective(**objective),
                                              normalizer, ref_logp, sampler_correction)
    return loss, {key: float(value) for key, value in stats.items()}

ADVANTAGE_MODES = ("mean", "std", "rank")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_const")

# Two groups of G = 4: one with two right and two wrong completions, one with no signal.
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])


def loss_and_logp_grad(logp, old_logp, advantages, completion_mask, **kwargs):
    """grpo_loss with logp as a fresh leaf: (loss, stats, d loss / d logp)."""
    logp = logp.detach().clone().requires_grad_()
    loss, stats = grpo_loss(logp, old_logp, advantages, completion_mask, **kwargs)
    loss.backward()
    return loss.detach(), stats, logp.grad


# ---------------------------------------------------------------------------- advantages


def test_mean_mode_subtracts_the_group_mean():
    # Group 0: mean 0.5, so 1 -> 0.5 and 0 -> -0.5. Group 1: all equal -> 0.
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(REWARDS, "mean"), expected)


def test_std_mode_divides_by_the_unbiased_group_std():
    # Group 0: deviations +-0.5, squares sum to 4 * 0.25 = 1, unbiased variance 1 / (4 - 1) = 1/3,
    # std sqrt(1/3) = 0.57735; advantage 0.5 / (0.57735 + 1e-4) = 0.86588.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(REWARDS, "std"), expected)


def test_rank_mode_averages_tied_ranks():
    # [1, 0, 0, 1]: the two 0s share ranks 0 and 1 -> 0.5 each, the two 1s share 2 and 3 -> 2.5;
    # minus (4 - 1) / 2 = 1.5 -> [1, -1, -1, 1]; divided by 1.5 -> [2/3, -2/3, -2/3, 2/3].
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(REWARDS, "rank"), expected)


def test_rank_mode_uses_only_the_order_and_spans_minus_one_to_one():
    # [3, 1, 2, 10]: ranks [2, 0, 1, 3]; minus 1.5 -> [0.5, -1.5, -0.5, 1.5]; / 1.5 -> [1/3, -1, -1/3, 1].
    # The outlier 10 gets the same advantage as any highest reward would.
    expected = torch.tensor([[1 / 3, -1.0, -1 / 3, 1.0]])
    torch.testing.assert_close(group_advantages(torch.tensor([[3.0, 1.0, 2.0, 10.0]]), "rank"), expected)


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_all_equal_group_gets_exactly_zero(mode):
    rewards = torch.tensor([[0.9, 0.9, 0.9], [1.0, 0.0, 1.0]])
    # The premise: in float32 the mean of three 0.9s is not 0.9 (it is 0.9 - 6e-8), so r - mean
    # alone is not zero, and "std" mode would divide that by 1e-4.
    assert (rewards[0] - rewards[0].mean()).abs().max() > 0
    assert torch.equal(group_advantages(rewards, mode)[0], torch.zeros(3))


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_group_of_one_gets_zero_without_nan_or_warning(mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about the std of one value (0 / 0)
        advantages = group_advantages(torch.tensor([[1.0], [0.0], [0.3]]), mode)
    assert torch.equal(advantages, torch.zeros(3, 1))


def test_unknown_advantage_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'mean', 'std', 'rank'"):
        group_advantages(REWARDS, "minmax")


def test_non_finite_rewards_are_refused():
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]), "mean")


def test_zero_advantage_groups_flags_groups_with_all_equal_rewards():
    flags = zero_advantage_groups(REWARDS)
    assert torch.equal(flags, torch.tensor([False, True]))
    assert flags.float().mean().item() == 0.5  # the fraction one would log


# ---------------------------------------------------------------------------- loss

# Two completions padded to T = 3: the first has 3 tokens (the last is its EOS), the second 1.
LOGP = torch.log(torch.tensor([[0.5, 0.25, 0.8], [0.6, 0.1, 0.1]]))
COMPLETION_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])


def test_first_step_ratio_is_one_and_loss_is_minus_token_weighted_mean_advantage():
    loss, stats, grad = loss_and_logp_grad(LOGP, LOGP.clone(), ADVANTAGES, COMPLETION_MASK)
    # By hand: ratio = exp(0) = 1 inside the clip range, so every token's loss is -A:
    # (3 tokens * -1 + 1 token * +2) / 4 tokens = -1/4.
    assert loss.item() == pytest.approx(-0.25, abs=1e-7)
    # d/dlogp (-ratio * A * m / N) = -A * m / N: -1/4 on the first completion's tokens, +2/4 on the
    # second's single token, 0 on padding.
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]]))
    assert stats["ratio_mean"] == 1.0
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == 0.0
    assert stats["tokens"] == 4.0
    assert stats["policy_loss"] == pytest.approx(-0.25, abs=1e-7)
    assert "kl" not in stats


def test_clipping_on_both_sides_and_the_unclipped_cases():
    # Four one-token completions, old probability 0.4; new 0.6 -> ratio 1.5, new 0.2 -> ratio 0.5.
    old_logp = torch.log(torch.full((4, 1), 0.4))
    logp = torch.log(torch.tensor([[0.6], [0.2], [0.2], [0.6]]))
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats, grad = loss_and_logp_grad(logp, old_logp, advantages, torch.ones(4, 1))
    # eps 0.2, clip range [0.8, 1.2]; per-token loss -min(r A, clip(r) A):
    #   A=+1, r=1.5: min(1.5, 1.2)   = 1.2  clipped   -> -1.2, no gradient
    #   A=-1, r=0.5: min(-0.5, -0.8) = -0.8 clipped   -> +0.8, no gradient
    #   A=+1, r=0.5: min(0.5, 0.8)   = 0.5  unclipped -> -0.5, d/dlogp = -A r / N = -0.5 / 4 = -0.125
    #   A=-1, r=1.5: min(-1.5, -1.2) = -1.5 unclipped -> +1.5, d/dlogp = -A r / N = 1.5 / 4 = 0.375
    # By hand: loss = (-1.2 + 0.8 - 0.5 + 1.5) / 4 = 0.6 / 4 = 0.15.
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [0.0], [-0.125], [0.375]]))
    assert stats["clip_frac"] == 0.5  # tokens 1 and 2 of 4
    assert stats["clip_frac_high"] == 0.25 and stats["clip_frac_low"] == 0.25
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # (1.5 + 0.5 + 0.5 + 1.5) / 4


@pytest.mark.parametrize("eps_high, expected_loss, expected_grad, expected_clip_frac_high", [
    (0.2, -1.2, 0.0, 1.0),  # 1.25 > 1.2: clipped at 1.2, no gradient
    (0.28, -1.25, -1.25, 0.0),  # 1.25 < 1.28: unclipped, d/dlogp = -A r / N = -1.25
])
def test_clip_higher(eps_high, expected_loss, expected_grad, expected_clip_frac_high):
    # Old probability 0.4, new 0.5: ratio 1.25, advantage +1, one token.
    logp, old_logp = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.4]]))
    loss, stats, grad = loss_and_logp_grad(logp, old_logp, torch.tensor([1.0]), torch.ones(1, 1),
                                           clip_eps_low=0.2, clip_eps_high=eps_high)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert grad.item() == pytest.approx(expected_grad, abs=1e-6)
    assert stats["clip_frac_high"] == expected_clip_frac_high


@pytest.mark.parametrize("garbage", [1e4, float("-inf"), float("nan")])
def test_padding_contributes_nothing_and_eos_does(garbage):
    old_logp = LOGP - torch.tensor([[0.1, -0.1, 0.05], [0.3, 0.0, 0.0]])  # ratios away from 1
    ref_logp = LOGP - 0.2
    kwargs = dict(ref_logp=ref_logp, kl_coef=0.1)
    loss, stats, grad = loss_and_logp_grad(LOGP, old_logp, ADVANTAGES, COMPLETION_MASK, **kwargs)

    padding = COMPLETION_MASK == 0
    garbage_logp = LOGP.masked_fill(padding, garbage)
    kwargs["ref_logp"] = ref_logp.masked_fill(padding, garbage)
    garbage_loss, garbage_stats, garbage_grad = loss_and_logp_grad(
        garbage_logp, old_logp.masked_fill(padding, garbage), ADVANTAGES, COMPLETION_MASK, **kwargs)

    assert garbage_loss.item() == loss.item()
    assert garbage_stats == stats
    assert torch.equal(garbage_grad, grad)
    assert torch.equal(grad[padding], torch.zeros(2))
    # The EOS tokens (last masked token of each completion) are trained like any other token.
    assert grad[0, 2] != 0 and grad[1, 0] != 0


# Three completions, old probability 0.5 everywhere, advantages [+1, -2, 5]:
#   completion 0, 3 tokens, ratios [1.0, 1.1, 0.9] -> losses -A r = [-1.0, -1.1, -0.9], sum -3.0
#   completion 1, 1 token,  ratio 1.1              -> loss -A r = +2.2 (inside [0.8, 1.2]: unclipped)
#   completion 2, no tokens (empty mask)           -> contributes nothing
AGG_OLD_LOGP = torch.full((3, 3), math.log(0.5))
AGG_LOGP = AGG_OLD_LOGP + torch.log(torch.tensor([[1.0, 1.1, 0.9], [1.1, 1.0, 1.0], [1.3, 1.0, 1.0]]))
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
AGG_ADVANTAGES = torch.tensor([1.0, -2.0, 5.0])


@pytest.mark.parametrize("loss_agg, normalizer, expected", [
    ("token_mean", None, -0.2),  # (-3.0 + 2.2) / 4 tokens
    ("seq_mean", None, 0.4),  # (-3.0 / 3 + 2.2 / 1 + 0) / 3 completions = 1.2 / 3
    ("seq_sum_const", None, -0.8 / 15),  # (-3.0 + 2.2) / (3 completions * max_tokens 5)
    ("token_mean", 8.0, -0.1),  # -0.8 / 8
    ("seq_mean", 6.0, 0.2),  # 1.2 / 6
    ("seq_sum_const", 20.0, -0.04),  # -0.8 / 20
])
def test_aggregations_on_completions_of_different_lengths(loss_agg, normalizer, expected):
    loss, stats, grad = loss_and_logp_grad(AGG_LOGP, AGG_OLD_LOGP, AGG_ADVANTAGES, AGG_MASK, loss_agg=loss_agg,
                                           normalizer=normalizer, max_new_tokens=5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(grad).all() and torch.equal(grad[2], torch.zeros(3))


@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_micro_batches_with_the_step_normalizer_add_up_to_the_full_batch(loss_agg, importance_level):
    generator = torch.Generator().manual_seed(0)
    num_completions, padded_length, max_tokens = 6, 5, 8
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])
    completion_mask = (torch.arange(padded_length) < lengths.unsqueeze(1)).float()
    old_logp = torch.rand(num_completions, padded_length, generator=generator).clamp_min(0.05).log()
    logp = old_logp + 0.5 * torch.randn(num_completions, padded_length, generator=generator)
    ref_logp = old_logp + 0.2 * torch.randn(num_completions, padded_length, generator=generator)
    advantages = torch.randn(num_completions, generator=generator)
    kwargs = dict(ref_logp=ref_logp, kl_coef=0.04, loss_agg=loss_agg, importance_level=importance_level,
                  max_new_tokens=max_tokens)

    full_loss, full_stats, full_grad = loss_and_logp_grad(logp, old_logp, advantages, completion_mask, **kwargs)
    assert full_stats["clip_frac"] > 0  # the data exercises clipping too

    step_normalizer = {"token_mean": completion_mask.sum().item(), "seq_mean": num_completions,
                       "seq_sum_const": num_completions * max_tokens}[loss_agg]
    logp_leaf = logp.clone().requires_grad_()
    total_loss = 0.0
    for start in range(0, num_completions, 2):
        rows = slice(start, start + 2)
        micro_loss, _ = grpo_loss(logp_leaf[rows], old_logp[rows], advantages[rows], completion_mask[rows],
                                  **{**kwargs, "ref_logp": ref_logp[rows]}, normalizer=step_normalizer)
        micro_loss.backward()  # gradients accumulate in logp_leaf.grad, as over a training step
        total_loss += micro_loss.item()

    assert total_loss == pytest.approx(full_loss.item(), abs=1e-6)
    torch.testing.assert_close(logp_leaf.grad, full_grad, atol=1e-6, rtol=0)


def test_kl_term_adds_beta_times_mean_k3():
    # Policy 1/2, reference 1/4 on both tokens: r = 0.25 / 0.5 = 1/2, k3 = r - 1 - log r
    # = 0.5 - 1 + log 2 = 0.193147. Ratio to old = 1, so the surrogate is -A = -1 per token.
    logp = torch.log(torch.full((1, 2), 0.5))
    loss, stats, grad = loss_and_logp_grad(logp, logp.clone(), torch.tensor([1.0]), torch.ones(1, 2),
                                           ref_logp=torch.log(torch.full((1, 2), 0.25)), kl_coef=0.1)
    # By hand: loss = -1 + 0.1 * 0.193147 = -0.9806853
    assert loss.item() == pytest.approx(-0.9806853, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.193147, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(-1.0, abs=1e-6)
    # Per token: surrogate -A r / N = -1/2; d k3 / d logp = 1 - r = 1/2, times beta / N = 0.1 / 2:
    # 0.025. Total -0.475.
    torch.testing.assert_close(grad, torch.full((1, 2), -0.475))


def test_ref_logp_without_beta_is_logged_but_not_added():
    logp = torch.log(torch.full((1, 2), 0.5))
    loss, stats = grpo_loss(logp, logp.clone(), torch.tensor([1.0]), torch.ones(1, 2),
                            ref_logp=torch.log(torch.full((1, 2), 0.25)))
    assert loss.item() == pytest.approx(-1.0, abs=1e-7)
    assert stats["kl"] == pytest.approx(0.193147, abs=1e-6)


def test_beta_without_ref_logp_raises():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(LOGP, LOGP.clone(), ADVANTAGES, COMPLETION_MASK, kl_coef=0.04)


def test_sequence_level_ratio_is_exp_of_the_mean_log_ratio():
    old_logp = torch.full((2, 3), math.log(0.5))
    # Log-ratios [0.1, -0.2, 0.4] and [0.3, 0.5, padding]; the padding's 7.0 must not count.
    logp = old_logp + torch.tensor([[0.1, -0.2, 0.4], [0.3, 0.5, 7.0]])
    completion_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, stats, grad = loss_and_logp_grad(logp, old_logp, torch.tensor([1.0, -1.0]), completion_mask,
                                           importance_level="sequence", loss_agg="seq_mean")
    # s_0 = exp((0.1 - 0.2 + 0.4) / 3) = exp(0.1) = 1.1051709, inside [0.8, 1.2], A = +1: loss -s_0 per token.
    # s_1 = exp((0.3 + 0.5) / 2) = exp(0.4) = 1.4918247, above 1.2 but A = -1, so the unclipped
    # -1.4918 is the min: loss +s_1 per token, not clipped.
    # seq_mean: (-1.1051709 + 1.4918247) / 2 = 0.1933269.
    assert loss.item() == pytest.approx(0.1933269, abs=1e-6)
    # ratio_mean over the 5 tokens: (3 * 1.1051709 + 2 * 1.4918247) / 5 = 6.2991621 / 5 = 1.2598324.
    assert stats["ratio_mean"] == pytest.approx(1.2598324, abs=1e-6)
    assert stats["clip_frac"] == 0.0
    # By hand: loss = (-s_0 + s_1) / 2 and d s_i / d logp_{i,t} = s_i / |y_i|: every token of completion 0
    # gets -s_0 / (2 * 3) = -0.1841952, of completion 1 s_1 / (2 * 2) = 0.3729562; padding 0.
    expected_grad = torch.tensor([[-0.1841952, -0.1841952, -0.1841952], [0.3729562, 0.3729562, 0.0]])
    torch.testing.assert_close(grad, expected_grad)


def test_sequence_level_at_the_first_step_matches_token_level():
    token_results = loss_and_logp_grad(LOGP, LOGP.clone(), ADVANTAGES, COMPLETION_MASK)
    loss, stats, grad = loss_and_logp_grad(LOGP, LOGP.clone(), ADVANTAGES, COMPLETION_MASK,
                                           importance_level="sequence")
    # By hand: s = exp(mean of zeros) = 1 exactly; each token's gradient (1/|y|) * sum over the completion's
    # |y| tokens of -A / N is -A / N, as at token level.
    assert stats["ratio_mean"] == 1.0
    assert loss.item() == pytest.approx(-0.25, abs=1e-7)
    torch.testing.assert_close(grad, token_results[2])


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_zero_advantage_group_adds_no_gradient(mode):
    # Group 0 has a signal, group 1 (0.3, 0.3) none; one completion per row, groups flattened.
    advantages = group_advantages(torch.tensor([[1.0, 0.0], [0.3, 0.3]]), mode).flatten()
    old_logp = torch.full((4, 2), math.log(0.4))
    # Log-ratios of +-0.3 to +-0.6: ratios 0.55 .. 1.82, clipped and unclipped ones.
    logp = old_logp + torch.tensor([[0.3, -0.3], [0.5, -0.5], [0.3, 0.6], [-0.5, 0.2]])
    _, _, grad = loss_and_logp_grad(logp, old_logp, advantages, torch.ones(4, 2))
    assert torch.equal(grad[2:], torch.zeros(2, 2))
    assert (grad[:2] != 0).any()


def test_gradients_flow_only_through_logp():
    # Callers may hand in tensors still attached to a graph (e.g. advantages from a learned
    # reward); the loss must treat old_logp, ref_logp and advantages as constants.
    logp = LOGP.clone().requires_grad_()
    old_logp = (LOGP - 0.1).requires_grad_()
    ref_logp = (LOGP - 0.2).requires_grad_()
    advantages = ADVANTAGES.clone().requires_grad_()
    loss, _ = grpo_loss(logp, old_logp, advantages, COMPLETION_MASK, ref_logp=ref_logp, kl_coef=0.1)
    loss.backward()
    assert logp.grad is not None
    assert old_logp.grad is None and ref_logp.grad is None and advantages.grad is None


def test_extreme_log_ratios_give_finite_loss_and_gradients():
    # Log-ratios of +-100 would overflow exp (e^100 = inf in float32; inf * 0 = NaN for A = 0).
    old_logp = torch.full((3, 1), -50.0)
    logp = old_logp + torch.tensor([[100.0], [100.0], [-100.0]])
    loss, _, grad = loss_and_logp_grad(logp, old_logp, torch.tensor([0.0, -1.0, -1.0]), torch.ones(3, 1))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_bf16_log_probs_are_computed_in_fp32():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).bfloat16()
    loss, _, grad = loss_and_logp_grad(logp, logp.clone(), torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.dtype is torch.float32 and grad.dtype is torch.bfloat16
    assert loss.item() == -1.0  # ratio exactly 1: -A


@pytest.mark.parametrize("overrides, message", [
    (dict(loss_agg="sum"), "'token_mean', 'seq_mean', 'seq_sum_const'"),
    (dict(importance_level="seq"), "'token', 'sequence'"),
    (dict(kl_estimator="k4"), "'k1', 'k2', 'k3'"),
    (dict(advantages=torch.zeros(2, 1)), "advantages"),
    (dict(old_logp=torch.zeros(2, 4)), "old_logp"),
    (dict(ref_logp=torch.zeros(3, 3)), "ref_logp"),
    (dict(loss_agg="seq_sum_const"), "max_new_tokens"),
    (dict(max_new_tokens=2), "max_new_tokens"),
    (dict(normalizer=0.0), "normalizer"),
    (dict(clip_eps_low=1.5), "clip_eps_low"),
])
def test_invalid_arguments_raise_clear_errors(overrides, message):
    arguments = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2),
                     completion_mask=torch.ones(2, 3))
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        grpo_loss(**arguments)


def test_sampler_correction_weights_each_tokens_policy_term_by_hand():
    """Truncated importance sampling: the per-token policy term times w (detached), the KL term not.
    ratio = 1, A = 1, w = [0.5, 2]: loss = mean(-A w) = (-0.5 - 2) / 2 = -1.25; d loss / d logp_t =
    -A w_t / 2 = [-0.25, -1.0]; the KL term (k1, logp - ref = 0.5 on each token, beta 0.1) adds 0.05
    to the loss and 0.1 / 2 = 0.05 to each gradient, unweighted."""
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach().clone(), torch.tensor([1.0]), torch.ones(1, 2),
                        sampler_correction=torch.tensor([[0.5, 2.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.25)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -1.0]]))

    logp.grad = None
    loss, _ = grpo_loss(logp, logp.detach().clone(), torch.tensor([1.0]), torch.ones(1, 2),
                        ref_logp=torch.full((1, 2), -0.5), kl_coef=0.1, kl_estimator="k1",
                        sampler_correction=torch.tensor([[0.5, 2.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.25 + 0.05)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25 + 0.05, -1.0 + 0.05]]))


def test_clip_statistics_count_each_side_by_its_bound_and_the_advantages_sign():
    """Ratios below, inside and above the clip range [0.8, 1.28] under advantages of both signs: a
    token counts as clipped low only when r < 0.8 and A < 0, clipped high only when r > 1.28 and A > 0
    (the other two corners keep their gradient: the min picks the unclipped term). Each row has
    ratios on both sides of both bounds, in different numbers, so a condition with the wrong sign
    or the wrong bound gives other fractions. A naive loop over the tokens gives the expected ones."""
    ratios = torch.tensor([[0.5, 1.5, 2.0, 1.0, 1.3, 0.9],     # A > 0: one below 0.8, three above 1.28
                           [0.7, 1.1, 1.6, 0.6, 0.75, 1.0]])   # A < 0: three below 0.8, one above 1.28
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 6)
    mask[1, 5] = 0.0  # one padded token: not counted in the denominator either
    _, stats = grpo_loss(torch.log(ratios), torch.zeros(2, 6), advantages, mask, clip_eps_low=0.2,
                         clip_eps_high=0.28)  # old_logp 0, so r = exp(logp)
    low = high = tokens = 0
    for row in range(2):
        for column in range(6):
            if not mask[row, column]:
                continue
            tokens += 1
            r, a = ratios[row, column].item(), advantages[row].item()
            low += r < 0.8 and a < 0
            high += r > 1.28 and a > 0
    assert (low, high, tokens) == (3, 3, 11)  # by hand: row 1's 0.7, 0.6, 0.75; row 0's 1.5, 2.0, 1.3
    assert stats["clip_frac_low"] == pytest.approx(low / tokens)
    assert stats["clip_frac_high"] == pytest.approx(high / tokens)
    assert stats["clip_frac"] == pytest.approx((low + high) / tokens)

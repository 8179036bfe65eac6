"""DPO-family losses on hand-made log-probs: every loss type at a concrete margin, label smoothing,
the gradients at policy == reference, the implicit rewards, the logging statistics and RPO's SFT
term. Every expected value is worked out by hand in the comments."""

import math

import pytest
import torch

from dpo.loss import dpo_loss, dpo_stats, sft_loss

BETA = 0.1
# pi_c - ref_c = -10 - (-11) = +1, pi_r - ref_r = -12 - (-11) = -1, so h = 1 - (-1) = 2 and
# beta * h = 0.2. Two identical pairs, to check the shapes.
POLICY_CHOSEN = torch.tensor([-10.0, -10.0])
POLICY_REJECTED = torch.tensor([-12.0, -12.0])
REF_CHOSEN = torch.tensor([-11.0, -11.0])
REF_REJECTED = torch.tensor([-11.0, -11.0])
# -log sigma(0.2) = log(1 + e^-0.2) = log(1.818730753) = 0.598138869
# -log sigma(-0.2) = log(1 + e^0.2) = log(2.221402758) = 0.798138869 (= 0.598138869 + 0.2)


@pytest.mark.parametrize("loss_type, label_smoothing, expected", [
    # -log sigma(0.2)
    ("sigmoid", 0.0, 0.598139),
    # 0.9 * 0.598138869 + 0.1 * 0.798138869 = 0.538324982 + 0.079813887 = 0.618138869
    ("sigmoid", 0.1, 0.618139),
    # with eps 0: (1 * 0.598138869 + 0) / 1, plain DPO
    ("robust", 0.0, 0.598139),
    # (0.9 * 0.598138869 - 0.1 * 0.798138869) / (1 - 0.2) = (0.538324982 - 0.079813887) / 0.8
    # = 0.458511095 / 0.8 = 0.573138869
    ("robust", 0.1, 0.573139),
    # relu(1 - 0.2) = 0.8
    ("hinge", 0.0, 0.8),
    # (h - 1 / (2 beta))^2 = (2 - 5)^2 = 9
    ("ipo", 0.0, 9.0),
])
def test_each_loss_type_hand_worked_at_margin_two(loss_type, label_smoothing, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED,
                                                        beta=BETA, loss_type=loss_type,
                                                        label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, torch.tensor([expected, expected]))
    # beta * (pi - ref): 0.1 * 1 and 0.1 * -1.
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, -0.1]))


def test_hinge_is_zero_past_the_margin():
    # For h 20: beta * h = 2 > 1, relu(1 - 2) = 0. For h 8: relu(1 - 0.8) = 0.2.
    losses, _, _ = dpo_loss(torch.tensor([0.0, 0.0]), torch.tensor([-20.0, -8.0]), torch.zeros(2), torch.zeros(2),
                            beta=BETA, loss_type="hinge")
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.2]))


def test_ipo_hand_worked_on_per_token_log_probs():
    # The caller passes sequence sums divided by answer length: chosen 3 tokens summing to -3.0 under
    # the policy and -4.5 under the reference -> -1.0 and -1.5; rejected 2 tokens, -4.0 and -3.0 ->
    # -2.0 and -1.5. h = (-1.0 + 1.5) - (-2.0 + 1.5) = 0.5 + 0.5 = 1.0.
    # With beta 0.25: target 1 / (2 * 0.25) = 2; loss (1 - 2)^2 = 1; d loss / d pi_c = 2 (h - 2) = -2.
    policy_chosen = torch.tensor([-3.0 / 3], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, torch.tensor([-4.0 / 2]),
                                                        torch.tensor([-4.5 / 3]), torch.tensor([-3.0 / 2]),
                                                        beta=0.25, loss_type="ipo")
    losses.sum().backward()
    torch.testing.assert_close(losses, torch.tensor([1.0]))
    torch.testing.assert_close(policy_chosen.grad, torch.tensor([-2.0]))
    # 0.25 * 0.5 = 0.125 and 0.25 * -0.5 = -0.125
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.125]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.125]))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_sigmoid_at_policy_equal_to_reference_is_log_two_and_pushes_chosen_up_rejected_down(label_smoothing):
    # By hand: h = 0: -(1 - eps) log(1/2) - eps log(1/2) = log 2 = 0.693147 for every eps.
    # d/d pi_c [-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)]
    #   = -(1 - eps) beta sigma(-beta h) + eps beta sigma(beta h) = beta (-(1 - eps) / 2 + eps / 2)
    # at h = 0; for eps = 0 that is -beta / 2 = -0.05, and d/d pi_r is its opposite, +0.05.
    policy_chosen = torch.tensor([-7.0, -3.0], requires_grad=True)
    policy_rejected = torch.tensor([-5.0, -9.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, policy_chosen.detach().clone(),
                                                        policy_rejected.detach().clone(), beta=BETA,
                                                        label_smoothing=label_smoothing)
    losses.sum().backward()
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    expected_chosen_grad = BETA * (-(1 - label_smoothing) / 2 + label_smoothing / 2)
    torch.testing.assert_close(policy_chosen.grad, torch.full((2,), expected_chosen_grad))
    torch.testing.assert_close(policy_rejected.grad, torch.full((2,), -expected_chosen_grad))
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()
    if label_smoothing == 0.0:
        torch.testing.assert_close(policy_chosen.grad, torch.full((2,), -0.05))
        torch.testing.assert_close(policy_rejected.grad, torch.full((2,), 0.05))
    assert torch.equal(chosen_rewards, torch.zeros(2)) and torch.equal(rejected_rewards, torch.zeros(2))


def test_rewards_are_detached_and_reference_gets_no_gradient():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    policy_rejected = POLICY_REJECTED.clone().requires_grad_()
    ref_chosen = REF_CHOSEN.clone().requires_grad_()
    ref_rejected = REF_REJECTED.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert policy_chosen.grad is not None and policy_rejected.grad is not None
    assert ref_chosen.grad is None and ref_rejected.grad is None


def test_sigmoid_is_finite_for_huge_margins():
    # beta * h = +-1000: log(sigmoid(x)) would be log 0 = -inf at -1000; logsigmoid gives -1000.
    losses, _, _ = dpo_loss(torch.tensor([0.0, -10000.0]), torch.tensor([-10000.0, 0.0]), torch.zeros(2),
                            torch.zeros(2), beta=BETA)
    torch.testing.assert_close(losses, torch.tensor([0.0, 1000.0]))


def test_bf16_log_probs_are_computed_in_fp32():
    losses, _, _ = dpo_loss(*(tensor.bfloat16() for tensor in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN,
                                                                REF_REJECTED)))
    assert losses.dtype is torch.float32
    torch.testing.assert_close(losses, torch.full((2,), 0.598139))  # -log sigma(0.2), exact inputs in bf16


@pytest.mark.parametrize("overrides, message", [
    (dict(loss_type="kto"), "'sigmoid', 'robust', 'hinge', 'ipo'"),
    (dict(loss_type="robust", label_smoothing=0.5), "0.5"),
    (dict(loss_type="robust", label_smoothing=0.7), "0.5"),
    (dict(label_smoothing=0.6), "label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "'sigmoid' and 'robust' only"),
    (dict(loss_type="ipo", label_smoothing=0.1), "'sigmoid' and 'robust' only"),
    (dict(beta=0.0), "beta"),
    (dict(ref_rejected_logps=torch.zeros(3)), "ref_rejected_logps"),
    (dict(policy_chosen_logps=torch.zeros(2, 1)), r"shape \[B\]"),
])
def test_invalid_arguments_raise_clear_errors(overrides, message):
    arguments = dict(policy_chosen_logps=POLICY_CHOSEN, policy_rejected_logps=POLICY_REJECTED,
                     ref_chosen_logps=REF_CHOSEN, ref_rejected_logps=REF_REJECTED)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        dpo_loss(**arguments)


def test_dpo_stats_hand_made_batch():
    losses = torch.tensor([0.5, 0.9, 0.7, 0.3])
    chosen_rewards = torch.tensor([0.3, -0.1, 0.2, 0.0])
    rejected_rewards = torch.tensor([0.1, 0.2, 0.2, -0.4])
    stats = dpo_stats(losses, chosen_rewards, rejected_rewards)
    # loss: (0.5 + 0.9 + 0.7 + 0.3) / 4 = 0.6
    # accuracy: 0.3 > 0.1 yes, -0.1 > 0.2 no, 0.2 > 0.2 no (a tie), 0.0 > -0.4 yes -> 2 / 4 = 0.5
    # margins 0.2, -0.3, 0.0, 0.4 -> 0.3 / 4 = 0.075
    # chosen (0.3 - 0.1 + 0.2 + 0.0) / 4 = 0.1; rejected (0.1 + 0.2 + 0.2 - 0.4) / 4 = 0.025
    assert stats == {"loss": pytest.approx(0.6), "reward_accuracy": 0.5, "reward_margin": pytest.approx(0.075),
                     "chosen_reward": pytest.approx(0.1), "rejected_reward": pytest.approx(0.025)}


def test_sft_loss_is_the_negative_mean_log_likelihood_per_answer_token():
    # Answer tokens' log-probs -1, -2 (row 0) and -0.5 (row 1): -(-1 - 2 - 0.5) / 3 = 3.5 / 3;
    # d/d logp = -1/3 on each answer token, 0 on padding (which holds NaN and -inf).
    token_logps = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("-inf"), float("nan")]],
                               requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = sft_loss(token_logps, mask)
    loss.backward()
    assert loss.item() == pytest.approx(3.5 / 3)
    torch.testing.assert_close(token_logps.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))


def test_sft_loss_refuses_mismatched_shapes_and_non_binary_masks():
    with pytest.raises(ValueError, match="shape"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="0 and 1"):
        sft_loss(torch.zeros(1, 2), torch.full((1, 2), 0.5))

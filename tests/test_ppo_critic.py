"""ppo/critic.py: the value head's shape, where each kind of critic's gradient goes, and the positions values
are read at."""

import contextlib

import pytest
import torch

from common.logprobs import layout_logprobs
from common.lora import apply_lora, lora_parameters, use_lora_weights
from common.rollout import RolloutBatch
from ppo.critic import Critic, ValueHead, completion_logprobs_and_values
from ppo.loss import ppo_value_loss
from tests.conftest import micro_model
from tests.test_packing import one_layout

PROMPTS = [[2, 5, 6, 7], [2, 9, 3]]  # the second is shorter: left-padded
COMPLETIONS = [[10, 11, 12, 13, 1], [14, 15, 1]]  # lengths 5 and 3 (the first fills the width)


def handmade_batch(pad_id: int = 0) -> RolloutBatch:
    """[pads | prompt | completion | pads] rows, laid out as common.rollout does."""
    prompt_width = max(map(len, PROMPTS))
    completion_width = max(map(len, COMPLETIONS))
    input_ids, attention_mask, completion_mask = [], [], []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        left, right = prompt_width - len(prompt), completion_width - len(completion)
        input_ids.append([pad_id] * left + prompt + completion + [pad_id] * right)
        attention_mask.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        completion_mask.append([1.0] * len(completion) + [0.0] * right)
    return RolloutBatch(torch.tensor(input_ids), torch.tensor(attention_mask), torch.tensor(completion_mask),
                        prompt_width, torch.arange(len(PROMPTS)))


def lora_micro_model():
    model = micro_model("gemma2")
    apply_lora(model, r=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
    for parameter in lora_parameters(model):  # nonzero adapters, so the LoRA changes the hidden states
        torch.nn.init.normal_(parameter, std=0.1)
    return model


def test_value_head_shape_and_dtype():
    head = ValueHead(hidden_size=16, mlp_hidden=8)
    values = head(torch.randn(3, 7, 16, dtype=torch.bfloat16))
    assert values.shape == (3, 7) and values.dtype == torch.float32


def critic_for(model, features: str) -> Critic:
    critic = Critic(model, features, mlp_hidden=8)
    if critic.adapter is not None:  # a nonzero critic adapter, unlike the actor's
        for parameter in critic.adapter.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
    return critic


@pytest.mark.parametrize("features", ["detached", "adapter", "shared"])
def test_where_the_value_loss_gradient_goes(features):
    """detached: the value head only; adapter: the head and the critic's own LoRA, never the actor's;
    shared: the head and the actor's LoRA. The policy's log-probs never depend on the critic."""
    torch.manual_seed(0)
    model = lora_micro_model().train()
    critic = critic_for(model, features)
    batch = handmade_batch()
    layout = one_layout(batch, batch.rows, packing=True, pack_length=None)
    logp, _, values, _ = completion_logprobs_and_values(model, critic, layout, 1.0, 4)
    loss, _ = ppo_value_loss(values, torch.zeros_like(values), torch.ones_like(values), batch.completion_mask)
    loss.backward()
    actor_grads = [parameter.grad for parameter in lora_parameters(model)]
    if features == "shared":
        assert all(grad is not None and grad.abs().sum() > 0 for grad in actor_grads[1::2])  # every lora_B
    else:
        assert all(grad is None for grad in actor_grads)
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for parameter in critic.value_head.parameters())
    if features == "adapter":
        assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0
                   for parameter in critic.adapter.lora_B)
    with torch.no_grad():
        torch.testing.assert_close(logp, layout_logprobs(model, layout, 1.0, 4)[0])


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("features", ["detached", "adapter"])
def test_values_are_read_before_each_token_and_after_the_last(features, packing):
    """Against each row run alone, packed into one row (pack_length 9: the rows split) or padded."""
    torch.manual_seed(0)
    model = lora_micro_model().eval()
    critic = critic_for(model, features)
    batch = handmade_batch()
    with torch.no_grad():
        layout = one_layout(batch, batch.rows, packing, pack_length=9)
        logp, entropy, values, bootstrap = completion_logprobs_and_values(model, critic, layout, 1.0, 4,
                                                                          with_entropy=True)
        expected_logp, expected_entropy, _ = layout_logprobs(model, layout, 1.0, 4, with_entropy=True)
        torch.testing.assert_close(logp, expected_logp)
        torch.testing.assert_close(entropy, expected_entropy)
        for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            # The row alone, unpadded: its hidden state at p + j - 1 precedes completion token j. The adapter
            # critic's states are those of the model with the critic's factors in place of the actor's.
            ids = torch.tensor([prompt + completion])
            critic_factors = use_lora_weights(model, critic.adapter) if critic.adapter else contextlib.nullcontext()
            with critic_factors:
                hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             use_cache=False).last_hidden_state[0]
            state_values = critic.value_head(hidden)
            length = len(completion)
            before_tokens = state_values[len(prompt) - 1:len(prompt) - 1 + length]
            torch.testing.assert_close(values[row, :length], before_tokens, atol=1e-5, rtol=1e-5)
            assert torch.all(values[row, length:] == 0)
            torch.testing.assert_close(bootstrap[row], state_values[len(prompt) + length - 1], atol=1e-5, rtol=1e-5)
        # A micro-batch of one row (other column trimming) reads the same values.
        _, _, alone, alone_bootstrap = completion_logprobs_and_values(
            model, critic, one_layout(batch, torch.tensor([1]), packing, pack_length=9), 1.0, 4)
        torch.testing.assert_close(alone, values[1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone_bootstrap, bootstrap[1:], atol=1e-5, rtol=1e-5)

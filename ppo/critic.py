"""PPO's critic: a value head on hidden states, and one call that gives the actor's log-probs
together with the critic's values for a micro-batch of rollouts.

Where the value head's features come from (CRITIC_FEATURES of run_train_ppo.py):

  "detached"  the actor's last hidden states with a stop-gradient: the value loss trains the head
              only and cannot reshape the features the policy uses. One body pass gives both the
              log-probs and the values. The critic is limited to what the policy's features
              already encode.
  "adapter"   a second LoRA on the same frozen base (common.lora.LoRAWeights, switched in for
              the critic's pass): a critic with features of its own, still one copy of the base
              in memory. Costs a second body pass, with its backward, per micro-batch.
  "shared"    the actor's hidden states without a stop-gradient: one pass, the value loss
              back-propagates into the actor's LoRA (VF_COEF then balances the two losses).

docs/algorithms.md's PPO section gives the measurement that chose the default.

Positions, in a micro-batch's PassLayout (common/packing.py, packed or padded): the value of the
state before completion token j is read at the hidden state whose logits predict token j
(layout.predicting); the state after a row's last token is its sequence's last position
(layout.last_position): its value is the bootstrap GAE needs for a row cut off at the generation
limit. The value head runs on those positions alone, as the output head does.
"""

from __future__ import annotations

import torch
from torch import nn

from common.logprobs import body_hidden_states, layout_logprobs
from common.lora import LoRAWeights, use_lora_weights
from common.packing import PassLayout

CRITIC_FEATURES = ("detached", "adapter", "shared")


class ValueHead(nn.Module):
    """V(state) = Linear(1)(tanh(Linear(hidden state))), in fp32 whatever the model's dtype."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., hidden_size] -> values [...] (fp32)."""
        return self.mlp(hidden_states.float()).squeeze(-1)


class Critic(nn.Module):
    """The value head and, for features "adapter", the critic's own LoRA factors: everything the
    critic trains, in one state dict for the checkpoint."""

    def __init__(self, model: nn.Module, features: str, mlp_hidden: int):
        super().__init__()
        if features not in CRITIC_FEATURES:
            raise ValueError(f"critic features must be one of {CRITIC_FEATURES}, got {features!r}")
        self.features = features
        self.value_head = ValueHead(model.config.get_text_config().hidden_size, mlp_hidden)
        self.adapter = LoRAWeights(model) if features == "adapter" else None


def completion_logprobs_and_values(model, critic: Critic, layout: PassLayout, temperature: float, chunk_size: int,
                                   with_entropy: bool = False):
    """The actor's log-probs (and entropies) of the answer tokens of ``layout`` (a micro-batch's, on the
    model's device), as common.logprobs.layout_logprobs gives them, with the critic's values read from
    the same body pass (or, for features "adapter", from a pass of the critic's own LoRA).

    Returns (logp, entropy or None, values, bootstrap_values): logp, entropy and values
    [n, completion_width], 0 past each completion's end; values[:, j] is the value of the state
    before completion token j; bootstrap_values [n] the value of the state after each row's last
    token. logp and entropy are differentiable w.r.t. the actor's LoRA; values w.r.t. the critic
    (and, for features "shared", the actor's LoRA too).
    """
    logp, entropy, hidden_states = layout_logprobs(model, layout, temperature, chunk_size, with_entropy)
    if critic.features == "adapter":
        with use_lora_weights(model, critic.adapter):
            critic_states = body_hidden_states(model, layout.input_ids, layout.attention_mask, layout.position_ids)
    elif critic.features == "detached":
        critic_states = hidden_states.detach()
    else:
        critic_states = hidden_states
    values = layout.per_token(critic.value_head(layout.gather(critic_states, layout.predicting)))
    bootstrap_values = critic.value_head(layout.gather(critic_states, layout.last_position))
    return logp, entropy, values, bootstrap_values

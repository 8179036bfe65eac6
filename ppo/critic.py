"""PPO's critic: a value head on the actor's hidden states, and one call that gives the actor's
log-probs together with the critic's values for a micro-batch of rollouts.

Design (choice (a) of the critic design discussion): the value head is a small fp32 MLP reading
the LoRA actor's last hidden states with a stop-gradient, so the value loss trains the head only
and cannot reshape the features the policy uses (a value loss whose scale differs wildly from the
policy loss's would otherwise pull the shared LoRA towards predicting returns). The price is a
critic limited to what the policy's features already encode. Not implemented:

  (b) a second LoRA on the same frozen base for the critic (its own features; a second body
      pass per micro-batch, the adapters switched between the two);
  (c) a shared trunk, the value loss back-propagating into the actor's LoRA (one pass, features
      shaped by both losses, VF_COEF then balancing the two).

Positions, in RolloutBatch's layout ([pads | prompt | completion | pads], the completion's
token j at column prompt_width + j): the value of the state before completion token j is read at
the hidden state of column prompt_width + j - 1, the same position whose logits predict token j.
The state after a row's last token (L tokens) is column prompt_width + L - 1: its value is the
bootstrap GAE needs for a row cut off at the generation limit.

Cost: common/logprobs.py exposes token_logprobs(model, input_ids, ...), which runs the body
itself, and no function taking hidden states, so the values come from a second body pass (under
no_grad: the stop-gradient makes its activations useless to keep). One pass would do once the
chunked head is exposed for hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.rollout import RolloutBatch


class ValueHead(nn.Module):
    """V(state) = Linear(1)(tanh(Linear(hidden state))), in fp32 whatever the model's dtype."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., hidden_size] -> values [...] (fp32)."""
        return self.mlp(hidden_states.float()).squeeze(-1)


def completion_logprobs_and_values(model, value_head: ValueHead, batch: RolloutBatch, rows: torch.Tensor,
                                   temperature: float, chunk_size: int, with_entropy: bool = False):
    """The actor's log-probs (and entropies) of the completion tokens of ``rows``, as
    RolloutBatch.completion_logprobs_for gives them, with the critic's values.

    Returns (logp, entropy or None, values, bootstrap_values): logp, entropy and values
    [n, completion_width], 0 past each completion's end; values[:, j] is the value of the state
    before completion token j; bootstrap_values [n] the value of the state after each row's last
    token. logp and entropy are differentiable w.r.t. the LoRA, values w.r.t. the value head only.
    """
    result = batch.completion_logprobs_for(model, rows, temperature, chunk_size, with_entropy=with_entropy)
    logp, entropy = result if with_entropy else (result, None)

    # The same column trimming as completion_logprobs_for, so that positions (counted from each
    # row's first real token) and hence hidden states are those of its pass.
    device = next(model.parameters()).device
    attention_mask = batch.attention_mask[rows]
    completion_mask = batch.completion_mask[rows].to(device)
    lengths = completion_mask.sum(dim=1).long()
    first_column = int(attention_mask.float().argmax(dim=1).min())
    last_column = batch.prompt_width + int(lengths.max())
    input_ids = batch.input_ids[rows, first_column:last_column].to(device)
    attention_mask = attention_mask[:, first_column:last_column].to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():  # the stop-gradient of design (a)
        hidden_states = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=position_ids, use_cache=False).last_hidden_state
    # Columns prompt_width - 1 .. last_column - 1: the state before each completion token, and
    # (at index L of a row) the state after its last one.
    start = batch.prompt_width - first_column - 1
    state_values = value_head(hidden_states[:, start:])
    bootstrap_values = state_values.gather(1, lengths.unsqueeze(1)).squeeze(1)
    missing = batch.completion_width - (last_column - batch.prompt_width)
    values = F.pad(state_values[:, :-1], (0, missing))
    values = torch.where(completion_mask.bool(), values, 0.0)
    return logp, entropy, values, bootstrap_values

"""Batched sampling with a KV cache: K completions for each of B prompts at once.

One hand-written loop instead of ``model.generate`` so every step is visible and
the log-prob of each sampled token comes out of the same softmax that sampled
it.  Rows are the B prompts each repeated K times (row = prompt * K + k), left
padded so every row's next token sits in the last column; position ids are
counted from each row's first real token (left padding would otherwise shift
them), and a row stops at its first stop token (EOS or the chat template's
end-of-turn).  The loop ends when every row has stopped.

Two things make it faster than ``generate`` on the same rows without changing
what is sampled: the K rows of a prompt share its prefix, so each distinct
prompt is run through the model once and its KV cache copied to its rows; and
a row that has stopped leaves the batch (its cache and mask rows are dropped),
so later steps compute only the rows still going.  Sampling draws, like
``torch.multinomial``, an Exp(1) variable per row and token and keeps the
argmax of p / E (the exponential race: the winner is token j with probability
p_j), for every row of the batch, stopped ones included, so a seed gives the
same tokens as sampling all rows to the end would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleOutput:
    prompt_ids: list[list[int]]      # [N] each row's prompt tokens, unpadded
    completion_ids: torch.Tensor     # [N, T] sampled tokens; pad after a row's stop token
    completion_mask: torch.Tensor    # [N, T] 1.0 on every sampled token up to and including the stop token
    logprobs: torch.Tensor           # [N, T] log-prob of each sampled token under the distribution it was drawn from; 0 outside the mask
    truncated: torch.Tensor          # [N] True where the row hit max_new_tokens without a stop token
    texts: list[str]                 # [N] decoded completions, special tokens removed
    prompt_index: torch.Tensor       # [N] which of the B prompts each row answers

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1).long()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    Top-p keeps the smallest set of most likely tokens whose probability reaches
    top_p (Holtzman et al. 2019); the most likely token is always kept.
    """
    if top_k and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [N, max_len], sequences aligned to the right."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


# inference_mode, not just no_grad: no autograd bookkeeping at all on the many small ops of a decode step
# (about 8% faster on the CPU). Its tensors cannot enter autograd later; sample() passes every one of them
# through torch.cat, whose results are ordinary tensors.
@torch.inference_mode()
def _sample_rows(model, prompt_rows, max_new_tokens, temperature, top_p, top_k, stop_ids, pad_id, generator):
    device = next(model.parameters()).device
    num_rows = len(prompt_rows)
    # Prefill: each distinct prompt once, then its cache, mask and positions copied to each of its rows.
    distinct_prompts: dict[tuple[int, ...], int] = {}
    row_prompt = torch.tensor([distinct_prompts.setdefault(tuple(row), len(distinct_prompts)) for row in prompt_rows],
                              device=device)
    prompt_ids, prompt_mask = left_pad([list(prompt) for prompt in distinct_prompts], pad_id, device)
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    outputs = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True,
                    logits_to_keep=1)  # only the last position is needed: no [N, L, vocab] tensor at prefill
    cache = outputs.past_key_values
    cache.batch_select_indices(row_prompt)
    logits = outputs.logits[row_prompt, -1]
    attention_mask = prompt_mask[row_prompt]
    positions = prompt_positions[row_prompt, -1:]
    stop_ids_tensor = torch.tensor(stop_ids, device=device)

    completion_ids = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((num_rows, max_new_tokens), device=device)
    logprobs = torch.zeros((num_rows, max_new_tokens), device=device)
    truncated = torch.ones(num_rows, dtype=torch.bool, device=device)
    batch_rows = torch.arange(num_rows, device=device)  # the rows still in the batch, in batch order
    steps_taken = 0
    for step in range(max_new_tokens):
        if step:
            positions = positions + 1
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            logits = model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).logits[:, -1]
        logits = logits.float()  # soft-capping (Gemma 2) is already applied inside the model
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
            token_logprob = logits.log_softmax(dim=-1).gather(-1, next_token[:, None]).squeeze(-1)
        else:
            log_dist = filter_logits(logits / temperature, top_k, top_p).log_softmax(dim=-1)
            # torch.multinomial(p, 1) is argmax(p / E), E ~ Exp(1) drawn for all its rows; drawn here for every
            # row, stopped ones too, the random stream (and so each seed's tokens) is what multinomial's was.
            race = torch.empty((num_rows, log_dist.size(-1)), dtype=log_dist.dtype, device=device)
            race.exponential_(generator=generator)
            next_token = (log_dist.exp() / race[batch_rows]).argmax(dim=-1)
            token_logprob = log_dist.gather(-1, next_token[:, None]).squeeze(-1)
        completion_ids[batch_rows, step] = next_token
        logprobs[batch_rows, step] = token_logprob
        completion_mask[batch_rows, step] = 1.0
        steps_taken = step + 1
        finished = torch.isin(next_token, stop_ids_tensor)
        num_finished = int(finished.sum())
        if num_finished:
            truncated[batch_rows[finished]] = False
            if num_finished == len(batch_rows):
                break
            going = (~finished).nonzero().squeeze(-1)
            batch_rows, next_token, positions = batch_rows[going], next_token[going], positions[going]
            attention_mask = attention_mask[going]
            cache.batch_select_indices(going)
    # A token drawn from NaN or +inf logits has a NaN log-prob; torch.multinomial refused such distributions, and
    # so does this, once at the end rather than with a host sync at every step.
    if torch.isnan(logprobs).any():
        raise ValueError("the model's logits are not finite (NaN or inf) at some sampled position")
    return (completion_ids[:, :steps_taken], completion_mask[:, :steps_taken], logprobs[:, :steps_taken],
            truncated)


def sample(
    model,
    prompt_ids: list[list[int]],
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: list[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer=None,
    max_rows_per_chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Sample ``num_samples`` completions for each prompt (temperature 0 = greedy).

    ``prompt_ids`` are formatted, tokenized prompts (common.prompts.encode_prompts).
    ``eos_token_ids`` lists the stop tokens (common.model.stop_token_ids); a
    ``tokenizer`` supplies the defaults for them and for the pad id, and decodes
    ``texts``.  ``max_rows_per_chunk`` bounds memory: the B * K rows are sampled
    in chunks of at most that many rows.
    """
    if eos_token_ids is None:
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("sample() needs eos_token_ids, or a tokenizer with an eos token")
        eos_token_ids = [tokenizer.eos_token_id]
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None else eos_token_ids[0]
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")

    rows = [list(p) for p in prompt_ids for _ in range(num_samples)]
    prompt_index = torch.arange(len(prompt_ids)).repeat_interleave(num_samples)
    chunk = max_rows_per_chunk or len(rows)
    parts = [
        _sample_rows(model, rows[start:start + chunk], max_new_tokens, temperature, top_p, top_k,
                     eos_token_ids, pad_token_id, generator)
        for start in range(0, len(rows), chunk)
    ]
    width = max(p[0].size(1) for p in parts)

    def pad_right(tensor, value):
        return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)

    completion_ids = torch.cat([pad_right(p[0], pad_token_id) for p in parts])
    completion_mask = torch.cat([pad_right(p[1], 0.0) for p in parts])
    logprobs = torch.cat([pad_right(p[2], 0.0) for p in parts])
    truncated = torch.cat([p[3] for p in parts])
    texts = []
    if tokenizer is not None:
        lengths = completion_mask.sum(dim=1).long().tolist()
        texts = [tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
                 for ids, n in zip(completion_ids, lengths)]
    return SampleOutput(
        prompt_ids=rows,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        truncated=truncated,
        texts=texts,
        prompt_index=prompt_index,
    )

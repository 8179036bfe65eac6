"""Batched sampling with a KV cache: K completions for each of B prompts at once.

One hand-written loop instead of ``model.generate`` so every step is visible and
the log-prob of each sampled token comes out of the same softmax that sampled
it.  Rows are the B prompts each repeated K times (row = prompt * K + k), left
padded so every row's next token sits in the last column; position ids are
counted from each row's first real token (left padding would otherwise shift
them), and a row stops at its first stop token (EOS or the chat template's
end-of-turn).  The loop ends when every row has stopped.
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


@torch.no_grad()
def _sample_rows(model, prompt_rows, max_new_tokens, temperature, top_p, top_k, stop_ids, pad_id, generator):
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompt_rows, pad_id, device)
    num_rows = input_ids.size(0)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    stop_ids_tensor = torch.tensor(stop_ids, device=device)

    tokens, logprobs, alive_masks = [], [], []
    alive = torch.ones(num_rows, dtype=torch.bool, device=device)
    past_key_values = None
    next_positions = position_ids[:, -1:]
    step_input, step_positions = input_ids, position_ids
    for _ in range(max_new_tokens):
        outputs = model(
            input_ids=step_input,
            attention_mask=attention_mask,
            position_ids=step_positions,
            past_key_values=past_key_values,
            use_cache=True,
            logits_to_keep=1,  # only the last position is needed: no [N, L, vocab] tensor at prefill
        )
        past_key_values = outputs.past_key_values
        logits = outputs.logits[:, -1, :].float()  # soft-capping (Gemma 2) is already applied inside the model
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
            token_logprob = logits.log_softmax(dim=-1).gather(-1, next_token[:, None]).squeeze(-1)
        else:
            log_dist = filter_logits(logits / temperature, top_k, top_p).log_softmax(dim=-1)
            next_token = torch.multinomial(log_dist.exp(), 1, generator=generator).squeeze(-1)
            token_logprob = log_dist.gather(-1, next_token[:, None]).squeeze(-1)
        next_token = torch.where(alive, next_token, torch.full_like(next_token, pad_id))
        tokens.append(next_token)
        logprobs.append(torch.where(alive, token_logprob, torch.zeros_like(token_logprob)))
        alive_masks.append(alive.clone())
        alive = alive & ~torch.isin(next_token, stop_ids_tensor)
        if not alive.any():
            break
        step_input = next_token[:, None]
        next_positions = next_positions + 1
        step_positions = next_positions
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)

    completion_ids = torch.stack(tokens, dim=1)
    completion_mask = torch.stack(alive_masks, dim=1).float()
    return completion_ids, completion_mask, torch.stack(logprobs, dim=1), alive


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

"""Sampled completions laid out for training: prompt + completion rows and their log-probs.

Each row is its left-padded prompt followed by its completion (right-padded), the layout the
sampler generated it in, so position ids (counted from each row's first real token) are the
same in training as in sampling:

    [pad pad p p p p | c c c EOS pad pad]
     <- prompt_width -> <- completion_width ->

The completion token j of a row sits at column prompt_width + j. For the policy pass a
step's rows are laid out again (common.packing): each row's prompt and completion, without pads,
packed into rows of at most PACK_LENGTH tokens with position ids restarting per sequence, the
micro-batches cut from the rows sorted by length (``in_pass_order`` reorders the step's rows to
match), or right-padded rectangles with an attention mask (PACKING=false). Position ids count each
sequence's tokens from 0 either way, as in sampling. Per-token results come back as
[rows, completion_width], entry j that of completion token j.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common.logprobs import body_hidden_states, head_token_logprobs
from common.policy_gradient import check_completion_mask
from common.model import stop_token_ids
from common.packing import PassLayout, micro_batch_layouts
from common.prompts import encode_prompts
from common.sampler import SampleOutput, SamplingParams, left_pad, sample


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor        # [N, prompt_width + completion_width], on the CPU
    attention_mask: torch.Tensor   # [N, prompt_width + completion_width]
    completion_mask: torch.Tensor  # [N, completion_width] float, 1 up to and including the stop token
    prompt_width: int
    rows: torch.Tensor             # [N] the rows of the SampleOutput these came from
    pad_token_id: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.size(0))

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def completion_width(self) -> int:
        return int(self.completion_mask.size(1))

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """[N] real tokens of each row: its prompt and its completion."""
        return self.attention_mask.sum(dim=1)

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The rows ``rows`` of this batch, in that order."""
        return RolloutBatch(self.input_ids[rows], self.attention_mask[rows], self.completion_mask[rows],
                            self.prompt_width, self.rows[rows], self.pad_token_id)

    def sequences(self, rows: slice | torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        """The token ids of ``rows`` without pads (prompt then completion) and their completions' lengths."""
        attention_mask, input_ids = self.attention_mask[rows], self.input_ids[rows]
        completion_lengths = self.completion_mask[rows].sum(dim=1).long().tolist()
        prompt_lengths = attention_mask[:, :self.prompt_width].sum(dim=1).tolist()
        return ([ids[self.prompt_width - prompt:self.prompt_width + completion]
                 for ids, prompt, completion in zip(input_ids, prompt_lengths, completion_lengths)], completion_lengths)

    def pass_plan(self, rows: torch.Tensor, size: int, tokens: int, packing: bool, pack_length: int | None
                  ) -> list[tuple[torch.Tensor, PassLayout]]:
        """The micro-batches of ``rows`` (indices into this batch; common.packing.micro_batch_rows):
        per micro-batch its rows, in the order of its layout's results, and that layout."""
        sequences, completion_lengths = self.sequences(rows)
        return [(rows[members], layout) for members, layout in micro_batch_layouts(
            sequences, completion_lengths, self.completion_width, size, tokens, packing, pack_length,
            self.pad_token_id)]

    def in_pass_order(self, size: int, tokens: int, packing: bool, pack_length: int | None
                      ) -> tuple[RolloutBatch, list[slice], list[PassLayout]]:
        """The step's micro-batches: this batch with its rows reordered so that each micro-batch of
        ``pass_plan`` is a slice of it (padded, the order is kept), the slices and their layouts."""
        plan = self.pass_plan(torch.arange(self.num_rows), size, tokens, packing, pack_length)
        if not plan:
            return self, [], []
        slices, start = [], 0
        for micro_rows, _ in plan:
            slices.append(slice(start, start + len(micro_rows)))
            start += len(micro_rows)
        return self.select(torch.cat([micro_rows for micro_rows, _ in plan])), slices, [layout for _, layout in plan]

    def completion_logprobs_for(self, model, layout: PassLayout, temperature: float, chunk_size: int,
                                with_entropy: bool = False):
        """Log-probs [n, completion_width] of the completion tokens of ``layout`` (on the model's
        device) under ``model`` at ``temperature`` (and their entropies), 0 past each completion's
        end. Differentiable. The output head runs on the positions that predict completion tokens
        alone (from_position as a set), not on the prompts' or the pads'."""
        hidden_states = body_hidden_states(model, layout.input_ids, layout.attention_mask, layout.position_ids)
        result = head_token_logprobs(model, hidden_states, layout.input_ids, temperature, chunk_size,
                                     with_entropy, from_position=layout.predicting)
        if with_entropy:
            return layout.per_token(result[0]), layout.per_token(result[1])
        return layout.per_token(result)

    def completion_logprobs(self, model, temperature: float, layouts: list[PassLayout], chunk_size: int) -> torch.Tensor:
        """Log-probs of every row's completion, micro-batch by micro-batch (``layouts`` of consecutive
        micro-batches, on the model's device), on that device (call under no_grad)."""
        return torch.cat([self.completion_logprobs_for(model, layout, temperature, chunk_size) for layout in layouts])


def rollout_batch(samples: SampleOutput, keep: torch.Tensor | None, pad_token_id: int) -> RolloutBatch:
    """The rows of ``samples`` selected by the bool mask ``keep`` (all when None), laid out for training."""
    rows = torch.arange(len(samples.prompt_ids)) if keep is None else keep.nonzero().flatten()
    completion_mask = samples.completion_mask[rows].cpu()
    check_completion_mask(completion_mask)  # once per step, on the CPU: the losses do not check it again
    completion_ids = samples.completion_ids[rows].cpu()
    if len(rows) == 0:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return RolloutBatch(empty, empty, completion_mask, 0, rows, pad_token_id)
    prompt_ids, prompt_mask = left_pad([samples.prompt_ids[i] for i in rows.tolist()], pad_token_id,
                                       torch.device("cpu"))
    # Past a completion's stop token the ids are padding: masked out, never attended to.
    completion_ids = torch.where(completion_mask.bool(), completion_ids, torch.full_like(completion_ids, pad_token_id))
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask.long()], dim=1),
        completion_mask=completion_mask.float(),
        prompt_width=prompt_ids.size(1),
        rows=rows,
        pad_token_id=pad_token_id,
    )


def rollout_sums(scores: list, samples: SampleOutput) -> dict:
    """Sums over this rank's completions of what every RL trainer logs about its rollouts; add them
    over the ranks (all_reduce_sum), then rollout_means gives the step's numbers."""
    rewards = torch.tensor([score.total for score in scores], dtype=torch.float64)
    return {"completions": len(scores), "reward": rewards.sum(), "reward_sq": rewards.square().sum(),
            "correct": sum(score.correct for score in scores), "format_ok": sum(score.format_ok for score in scores),
            "length": samples.completion_lengths.sum(), "truncated": samples.truncated.sum()}


def rollout_means(totals: dict, generate_seconds: float) -> dict:
    """The step's rollout metrics from the summed rollout_sums: reward mean and (unbiased, as
    torch.std) standard deviation, accuracy, format rate, mean completion length, truncated share and
    sampling throughput."""
    completions = totals["completions"]
    reward_mean = totals["reward"] / completions
    reward_variance = max(0.0, totals["reward_sq"] - completions * reward_mean ** 2) / max(1.0, completions - 1)
    return {"reward": reward_mean, "reward_std": math.sqrt(reward_variance),
            "accuracy": totals["correct"] / completions, "format_rate": totals["format_ok"] / completions,
            "completion_len": totals["length"] / completions, "truncated": totals["truncated"] / completions,
            "tokens_per_s": totals["length"] / generate_seconds}


def sample_rollouts(model, tokenizer, prompt_format, batch: list[dict], settings: SamplingParams
                    ) -> tuple[SampleOutput, list[dict], float]:
    """An RL step's rollouts: ``settings.num_samples`` completions of each question of ``batch`` in one
    batch (common.sampler.sample), each stopping at EOS or the chat template's end of turn. Returns
    (samples, each sample's question row, seconds of sampling); the seconds leave out a compilation of
    the decode step, which is reported once here instead."""
    start = time.perf_counter()
    model.eval()
    samples = sample(model, encode_prompts(tokenizer, batch, prompt_format), settings, tokenizer=tokenizer,
                     eos_token_ids=stop_token_ids(model, tokenizer))
    seconds = time.perf_counter() - start - samples.compile_seconds
    if samples.compile_seconds:  # the first call, a recompilation, or a CUDA graph recorded for a new shape
        tqdm.write(f"compiled the decode step in {samples.compile_seconds:.1f}s (not counted in generate_s, step_s)")
    return samples, [batch[i] for i in samples.prompt_index.tolist()], seconds


def rollout_summary(metrics: dict) -> str:
    """The end of an RL step's line: the sampler/trainer mismatch, the time split, sampling speed."""
    return (f"mismatch {metrics['logprob_mismatch_mean']:.1e} | gen {metrics['generate_s']:.1f}s "
            f"ref {metrics['reference_s']:.1f}s policy {metrics['policy_s']:.1f}s | {metrics['tokens_per_s']:.0f} tok/s")

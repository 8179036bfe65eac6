"""Sampled completions laid out for training: prompt + completion rows and their log-probs.

Each row is its left-padded prompt followed by its completion (right-padded), the layout the
sampler generated it in, so position ids (counted from each row's first real token) are the
same in training as in sampling:

    [pad pad p p p p | c c c EOS pad pad]
     <- prompt_width -> <- completion_width ->

The completion token j of a row sits at column prompt_width + j. For the policy pass a
step's rows are laid out again (common.packing): each row's prompt and completion, without pads,
packed into rows of at most PACK_LENGTH tokens with position ids restarting per sequence, the
micro-batches cut from the rows sorted by length, or right-padded rectangles with an attention mask
(PACKING=false). Position ids count each sequence's tokens from 0 either way, as in sampling.
Per-token results come back as [rows, completion_width], entry j that of completion token j.

One data model for a step: the RolloutBatch carries, beside its tokens, everything the update reads
of each row (advantages, the sampler's log-probs, and the old and reference log-probs, values and
returns once computed), always in the rollouts' order: row i is the SampleOutput's row rows[i]. Its
micro-batches (``plan_passes``) are index sets into that order, and ``micro_batch`` hands out one
micro-batch's layout with its part of every per-row tensor in one call (``MicroBatch``); results of
the passes come back to the rollouts' order with ``in_row_order``. ``to`` moves it all to the device
at once; the tokens stay on the CPU, where the packing reads them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from common.logprobs import layout_logprobs
from common.policy_gradient import check_completion_mask
from common.model import stop_token_ids
from common.packing import PassLayout, micro_batch_layouts, to_device
from common.prompts import encode_prompts
from common.reward import repetition_penalty
from common.sampler import SampleOutput, SamplingParams, left_pad, sample


# The per-row tensors the update reads, beside the tokens: [N] or [N, completion_width], rollouts' order.
UPDATE_FIELDS = ("completion_mask", "advantages", "sampler_logp", "old_logp", "ref_logp", "values", "returns")


@dataclass
class MicroBatch:
    """One micro-batch of a step: its layout (on the device) and its rows' part of every per-row tensor
    the RolloutBatch carries (None where the batch has none), in the layout's result order."""
    layout: PassLayout
    rows: torch.Tensor             # [n] indices into the RolloutBatch
    completion_mask: torch.Tensor  # [n, completion_width]
    advantages: torch.Tensor | None = None
    sampler_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor        # [N, prompt_width + completion_width], on the CPU
    attention_mask: torch.Tensor   # [N, prompt_width + completion_width]
    completion_mask: torch.Tensor  # [N, completion_width] float, 1 up to and including the stop token
    prompt_width: int
    rows: torch.Tensor             # [N] the rows of the SampleOutput these came from
    pad_token_id: int = 0
    # What the update reads of each row, set by the trainer as it computes them (UPDATE_FIELDS):
    advantages: torch.Tensor | None = None    # GRPO: [N], one per completion; PPO: [N, T], GAE's per token
    sampler_logp: torch.Tensor | None = None  # [N, T] what the sampler drew each token with
    old_logp: torch.Tensor | None = None      # [N, T] the sampling policy's, by the trainer's pass
    ref_logp: torch.Tensor | None = None      # [N, T] the reference's: the adapters off
    values: torch.Tensor | None = None        # [N, T] PPO: the critic's values of the states before each token
    returns: torch.Tensor | None = None       # [N, T] PPO: GAE's returns
    # The step's micro-batches (plan_passes): each its rows (indices into this batch) and its layout.
    passes: list[tuple[torch.Tensor, PassLayout]] = field(default_factory=list)

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
        per micro-batch its rows, in the order of its layout's results, and that layout (on the CPU)."""
        sequences, completion_lengths = self.sequences(rows)
        return [(rows[members], layout) for members, layout in micro_batch_layouts(
            sequences, completion_lengths, self.completion_width, size, tokens, packing, pack_length,
            self.pad_token_id)]

    def plan_passes(self, size: int, tokens: int, packing: bool, pack_length: int | None) -> None:
        """The step's micro-batches over all its rows (pass_plan), kept as ``passes``."""
        self.passes = self.pass_plan(torch.arange(self.num_rows), size, tokens, packing, pack_length)

    def to(self, device: torch.device) -> RolloutBatch:
        """This batch with its per-row update tensors and its passes on ``device``, in one host-to-device
        copy per dtype (common.packing.to_device): the micro-batch loops then copy nothing. The tokens
        stay on the CPU."""
        moved = to_device({"passes": self.passes, **{name: getattr(self, name) for name in UPDATE_FIELDS}}, device)
        return replace(self, **moved)

    def micro_batch(self, rows: torch.Tensor, layout: PassLayout) -> MicroBatch:
        """The micro-batch of ``rows`` (on the per-row tensors' device) laid out as ``layout``: its part of
        every per-row tensor, in one call."""
        return MicroBatch(layout, rows, **{name: None if getattr(self, name) is None else getattr(self, name)[rows]
                                           for name in UPDATE_FIELDS})

    def micro_batches(self) -> list[MicroBatch]:
        """The step's micro-batches (``passes``), each with its part of every per-row tensor."""
        return [self.micro_batch(rows, layout) for rows, layout in self.passes]

    def in_row_order(self, per_pass: list[torch.Tensor]) -> torch.Tensor:
        """Results of the passes (one tensor per micro-batch of ``passes``, rows in the layouts' order)
        as one tensor in the rollouts' order."""
        values = torch.cat(per_pass)
        order = torch.cat([rows for rows, _ in self.passes])  # on the values' device once the batch is (to)
        return torch.empty_like(values).index_copy_(0, order, values)

    def logprobs(self, model, temperature: float, chunk_size: int) -> torch.Tensor:
        """Every row's completion log-probs under ``model`` at ``temperature``, pass by pass
        (common.logprobs.layout_logprobs), in the rollouts' order (call under no_grad)."""
        return self.in_row_order([layout_logprobs(model, layout, temperature, chunk_size)[0]
                                  for _, layout in self.passes])


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
    over the ranks (all_reduce_sum), then rollout_means gives the step's numbers. ``repetition``: each
    completion's share of lines that repeat an earlier line (common.reward.repetition_penalty, whatever
    REWARD is), which the health monitor watches for reward hacking."""
    rewards = torch.tensor([score.total for score in scores], dtype=torch.float64)
    return {"completions": len(scores), "reward": rewards.sum(), "reward_sq": rewards.square().sum(),
            "correct": sum(score.correct for score in scores), "format_ok": sum(score.format_ok for score in scores),
            "length": samples.completion_lengths.sum(), "truncated": samples.truncated.sum(),
            "repetition": sum(repetition_penalty(text) for text in samples.texts)}


def rollout_means(totals: dict, generate_seconds: float) -> dict:
    """The step's rollout metrics from the summed rollout_sums: reward mean and (unbiased, as
    torch.std) standard deviation, accuracy, format rate, mean completion length, truncated share, share
    of repeated lines and sampling throughput."""
    completions = totals["completions"]
    reward_mean = totals["reward"] / completions
    reward_variance = max(0.0, totals["reward_sq"] - completions * reward_mean ** 2) / max(1.0, completions - 1)
    return {"reward": reward_mean, "reward_std": math.sqrt(reward_variance),
            "accuracy": totals["correct"] / completions, "format_rate": totals["format_ok"] / completions,
            "completion_len": totals["length"] / completions, "truncated": totals["truncated"] / completions,
            "repetition": totals["repetition"] / completions, "tokens_per_s": totals["length"] / generate_seconds}


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

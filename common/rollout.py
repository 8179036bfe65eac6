"""Sampled completions laid out for training: prompt + completion rows and their log-probs.

Each row is its left-padded prompt followed by its completion (right-padded), the layout the
sampler generated it in, so position ids (counted from each row's first real token) are the
same in training as in sampling:

    [pad pad p p p p | c c c EOS pad pad]
     <- prompt_width -> <- completion_width ->

The completion token j of a row sits at column prompt_width + j and is predicted by the logits
at column prompt_width + j - 1: its log-prob is entry prompt_width - 1 + j of token_logprobs.
A micro-batch is cut down to the columns its rows use (drop columns that are padding in every
row), which changes no value: masked positions get exactly zero attention weight.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.logprobs import token_logprobs
from common.policy_gradient import check_completion_mask
from common.model import stop_token_ids
from common.prompts import encode_prompts
from common.reward import score_batch
from common.sampler import SampleOutput, SamplingParams, left_pad, sample


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor        # [N, prompt_width + completion_width], on the CPU
    attention_mask: torch.Tensor   # [N, prompt_width + completion_width]
    completion_mask: torch.Tensor  # [N, completion_width] float, 1 up to and including the stop token
    prompt_width: int
    rows: torch.Tensor             # [N] the rows of the SampleOutput these came from

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.size(0))

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def completion_width(self) -> int:
        return int(self.completion_mask.size(1))

    def micro_batches(self, size: int) -> list[torch.Tensor]:
        """Row indices of consecutive micro-batches of at most ``size`` rows."""
        return [torch.arange(start, min(start + size, self.num_rows)) for start in range(0, self.num_rows, size)]

    def model_inputs(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """input_ids and attention_mask of ``rows`` on ``device``, cut to the columns they use (from
        the first real token of any row to the end of the longest completion), and the first
        column kept. Per-position results of these inputs go back through ``completion_part``."""
        attention_mask = self.attention_mask[rows]
        first_column = int(attention_mask.float().argmax(dim=1).min())
        last_column = self.prompt_width + int(self.completion_mask[rows].sum(dim=1).max())
        return (self.input_ids[rows, first_column:last_column].to(device),
                attention_mask[:, first_column:last_column].to(device), first_column)

    def completion_start(self, first_column: int) -> int:
        """The position (of inputs cut at ``first_column``) whose prediction is completion token 0."""
        return self.prompt_width - first_column - 1

    def pad_completion(self, part: torch.Tensor) -> torch.Tensor:
        """[n, completion_width]: ``part`` (entry j of completion token j) zero-padded on the right."""
        return F.pad(part, (0, self.completion_width - part.size(1)))

    def completion_part(self, per_position: torch.Tensor, first_column: int) -> torch.Tensor:
        """[n, completion_width]: entry j is ``per_position[:, completion_start + j]``, i.e. of the
        position that predicts completion token j (for log-probs, whose index t is the prediction of
        column first_column + t + 1; for hidden states, the state before token j), zero-padded."""
        return self.pad_completion(per_position[:, self.completion_start(first_column):])

    def completion_logprobs_for(self, model, rows: torch.Tensor, temperature: float, chunk_size: int,
                                with_entropy: bool = False):
        """Log-probs [n, completion_width] of the completion tokens of ``rows`` under ``model`` at
        ``temperature`` (and their entropies), 0 past each completion's end.  Differentiable. The
        output head runs on the completion's predictions only (from_position), not the prompt's."""
        input_ids, attention_mask, first_column = self.model_inputs(rows, next(model.parameters()).device)
        result = token_logprobs(model, input_ids, attention_mask, temperature=temperature, chunk_size=chunk_size,
                                return_entropy=with_entropy, from_position=self.completion_start(first_column))
        if with_entropy:
            logp, entropy = result
            return self.pad_completion(logp), self.pad_completion(entropy)
        return self.pad_completion(result)

    def completion_logprobs(self, model, temperature: float, micro_batch_size: int, chunk_size: int) -> torch.Tensor:
        """Log-probs of every row's completion, computed micro-batch by micro-batch (call under no_grad)."""
        return torch.cat([self.completion_logprobs_for(model, rows, temperature, chunk_size).cpu()
                          for rows in self.micro_batches(micro_batch_size)])


def rollout_batch(samples: SampleOutput, keep: torch.Tensor | None, pad_token_id: int) -> RolloutBatch:
    """The rows of ``samples`` selected by the bool mask ``keep`` (all when None), laid out for training."""
    rows = torch.arange(len(samples.prompt_ids)) if keep is None else keep.nonzero().flatten()
    completion_mask = samples.completion_mask[rows].cpu()
    check_completion_mask(completion_mask)  # once per step, on the CPU: the losses do not check it again
    completion_ids = samples.completion_ids[rows].cpu()
    if len(rows) == 0:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return RolloutBatch(empty, empty, completion_mask, 0, rows)
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


def sample_and_score(model, tokenizer, prompt_format, batch: list[dict], reward, settings: SamplingParams
                     ) -> tuple[SampleOutput, list[dict], list, float]:
    """An RL step's rollouts: ``settings.num_samples`` completions of each question of ``batch`` in one
    batch (common.sampler.sample), each stopping at EOS or the chat template's end of turn, then each
    scored by ``reward`` with its row. Returns (samples, each sample's row, scores, seconds of
    sampling); the seconds leave out a compilation of the decode step, which is reported once here
    instead."""
    start = time.perf_counter()
    model.eval()
    samples = sample(model, encode_prompts(tokenizer, batch, prompt_format), settings, tokenizer=tokenizer,
                     eos_token_ids=stop_token_ids(model, tokenizer))
    seconds = time.perf_counter() - start - samples.compile_seconds
    if samples.compile_seconds:  # the first call, a recompilation, or a CUDA graph recorded for a new shape
        tqdm.write(f"compiled the decode step in {samples.compile_seconds:.1f}s (not counted in generate_s, step_s)")
    rows = [batch[i] for i in samples.prompt_index.tolist()]
    return samples, rows, score_batch(reward, samples.texts, rows, samples.truncated), seconds


def rollout_summary(metrics: dict) -> str:
    """The end of an RL step's line: the sampler/trainer mismatch, the time split, sampling speed."""
    return (f"mismatch {metrics['logprob_mismatch_mean']:.1e} | gen {metrics['generate_s']:.1f}s "
            f"ref {metrics['reference_s']:.1f}s policy {metrics['policy_s']:.1f}s | {metrics['tokens_per_s']:.0f} tok/s")

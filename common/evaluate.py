"""Greedy math evaluation: the code eval_math.py and every trainer's periodic eval share.

Under torchrun the problems are sharded across the ranks (each greedy-decodes its contiguous
share) and the per-problem records gathered, in order, on every rank: the result is the one
process's, N times faster. Greedy decoding does not depend on which problems share a batch
(left padding is masked and position ids count from each row's first token), so the accuracy
and the records are those of a single process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from common.distributed import all_gather_objects, is_main_process, shard
from common.model import stop_token_ids
from common.prompts import PromptFormat, encode_prompts
from common.reward import answers_match, extract_answer
from common.sampler import SamplingParams, sample


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (better than p ± z·se near 0 or 1)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass
class EvalResult:
    total: int
    correct: int
    seconds: float
    generated_tokens: int
    records: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def confidence_interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        low, high = self.confidence_interval
        return (f"Total: {self.total}  Correct: {self.correct}  Accuracy: {100 * self.accuracy:.2f}%  "
                f"(95% CI {100 * low:.1f}-{100 * high:.1f}%)  {self.tokens_per_second:.0f} tokens/s")

    def metrics(self, prefix: str = "eval") -> dict:
        low, high = self.confidence_interval
        return {f"{prefix}/accuracy": self.accuracy, f"{prefix}/ci_low": low, f"{prefix}/ci_high": high,
                f"{prefix}/total": self.total, f"{prefix}/correct": self.correct,
                f"{prefix}/tokens_per_s": self.tokens_per_second}


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], settings: SamplingParams, progress: bool = True,
             desc: str = "eval", reward=None, prompt_format: PromptFormat | None = None) -> EvalResult:
    """Greedy-decode every problem (prompts from common.prompts with ``prompt_format``) and score it:
    the extracted number against the gold answer, or, given a ``reward`` (common.reward.load_reward),
    the reward's ``correct``, which is how a non-numeric task is evaluated.

    ``settings``: greedy SamplingParams (temperature 0, one sample); its ``chunk_rows`` problems are
    decoded together (0 = all), the static path padding the last batch to as many rows.

    Under torchrun every rank must call it (it shards ``problems`` and gathers the records); each
    gets the whole result.
    """
    if settings.temperature != 0 or settings.num_samples != 1:
        raise ValueError("evaluate() decodes greedily: settings need temperature 0 and num_samples 1 "
                         "(SamplingParams.greedy())")
    was_training = model.training
    model.eval()
    stop_ids = stop_token_ids(model, tokenizer)
    own_problems = shard(problems)
    records, generated = [], 0
    start = time.perf_counter()
    batch_size = settings.chunk_rows or max(1, len(own_problems))
    batches = range(0, len(own_problems), batch_size)
    for first in tqdm(batches, desc=desc, disable=not (progress and is_main_process()), unit="batch"):
        batch = own_problems[first:first + batch_size]
        out = sample(model, encode_prompts(tokenizer, batch, prompt_format), settings, tokenizer=tokenizer,
                     eos_token_ids=stop_ids)
        generated += int(out.completion_mask.sum())
        for problem, text, cut_off in zip(batch, out.texts, out.truncated.tolist()):
            prediction = extract_answer(text)
            correct = (reward(text, problem, cut_off).correct if reward is not None
                       else answers_match(prediction, problem["gold_answer"]))
            records.append({"question": problem["question"], "gold": problem["gold_answer"], "output": text,
                            "prediction": prediction, "correct": correct, "truncated": cut_off})
    model.train(was_training)
    every_rank = all_gather_objects((records, generated))
    records = [record for rank_records, _ in every_rank for record in rank_records]
    return EvalResult(total=len(problems), correct=sum(record["correct"] for record in records),
                      seconds=time.perf_counter() - start,
                      generated_tokens=sum(rank_generated for _, rank_generated in every_rank), records=records)

"""Math evaluation, greedy and sampled: the code eval_math.py and every trainer's periodic eval share.

Greedy (evaluate): one completion per problem at temperature 0, scored; accuracy with a Wilson interval,
lenient (the reward's reading of the answer, wherever it is) and strict (only an answer given in the
requested format: common.reward.strict_answer), side by side.
Sampled (evaluate_sampled, or evaluate's temperature > 0 beside the greedy pass): k completions per
problem at a temperature, through the same sampler as training's rollouts in batches of prompts x k
rows, scored one by one; mean@k, pass@j and maj@k with bootstrap intervals (common/sampled_metrics.py).

Under torchrun the problems are sharded across the ranks (each decodes its contiguous share) and the
per-problem records gathered, in order, on every rank: the result is the one process's, N times
faster. Greedy decoding does not depend on which problems share a batch (left padding is masked and
position ids count from each row's first token); a sampled completion draws from a generator of its
own, seeded by the eval's seed, the problem's index and the sample's (sample_seed), so it does not
depend on the rank or the batch either: the records and every number are those of a single process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from common.distributed import all_gather_objects, is_main_process, shard
from common.model import stop_token_ids
from common.oom import BatchSizes
from common.prompts import PromptFormat, encode_prompts
from common.reward import answers_match, extract_answer, strict_correct
from common.sampled_metrics import bootstrap_intervals, interval_method, majority_vote, question_scores
from common.sampler import SamplingParams, row_generators, sample


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (better than p ± z·se near 0 or 1)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def sampled_per_question(records: list[dict], num_samples: int) -> dict[str, list[float]]:
    """{metric: [its value on each problem]} of sampled records: mean@k, pass@j for j = 1, 2, 4, ..., k,
    maj@k, and mean@k_strict (the share of the samples right in the requested format) when every gold is
    a number."""
    scores = [question_scores([s["correct"] for s in r["samples"]], [s["prediction"] for s in r["samples"]])
              for r in records]
    per_question = {name: [score[name] for score in scores] for name in scores[0]} if scores else {}
    strict = [[s["strict_correct"] for s in r["samples"]] for r in records]
    if scores and all(None not in samples for samples in strict):
        per_question[f"mean@{num_samples}_strict"] = [sum(samples) / len(samples) for samples in strict]
    return per_question


@dataclass
class SampledEvalResult:
    """k sampled completions per problem. A record per problem: question, gold, its samples (output,
    prediction, correct, strict_correct, truncated each), num_correct, and the majority vote's prediction
    and correctness (majority, majority_correct)."""
    num_samples: int
    temperature: float
    top_p: float
    top_k: int
    seed: int  # of the samples (sample_seed) and of the bootstrap's resamples
    seconds: float
    generated_tokens: int
    records: list[dict] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.records)

    @functools.cached_property
    def per_question(self) -> dict[str, list[float]]:
        return sampled_per_question(self.records, self.num_samples)

    @property
    def values(self) -> dict[str, float]:
        return {name: math.fsum(values) / len(values) for name, values in self.per_question.items()}

    @functools.cached_property
    def intervals(self) -> dict[str, tuple[float, float]]:
        return bootstrap_intervals(self.per_question, seed=self.seed)

    @property
    def interval_method(self) -> str:
        return interval_method(self.total, seed=self.seed)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def settings(self) -> str:
        return (f"{self.num_samples} sample(s) per question at temperature {self.temperature:g} (top_p "
                f"{self.top_p:g}, top_k {self.top_k}, seed {self.seed})")

    def summary(self) -> str:
        """One line: mean@k, the largest pass@j and maj@k."""
        k = self.num_samples
        shown = [f"mean@{k}", f"pass@{k}", f"maj@{k}"] if k > 1 else [f"mean@{k}"]
        return (f"{k} samples at T={self.temperature:g}: "
                + "  ".join(f"{name} {100 * self.values[name]:.2f}%" for name in shown))

    def table(self) -> str:
        """Every metric with its interval, one per line, after the settings and before the method."""
        lines = [f"Sampled: {self.settings}, {self.total} questions, {self.tokens_per_second:.0f} tokens/s"]
        for name, value in self.values.items():
            low, high = self.intervals[name]
            lines.append(f"  {name:<9} {100 * value:6.2f}%  (95% CI {100 * low:.1f}-{100 * high:.1f}%)")
        lines.append(f"intervals: {self.interval_method}")
        return "\n".join(lines)

    def metrics(self, prefix: str = "eval") -> dict:
        metrics = {f"{prefix}/total": self.total, f"{prefix}/num_samples": self.num_samples,
                   f"{prefix}/temperature": self.temperature}
        for name, value in self.values.items():
            low, high = self.intervals[name]
            metrics.update({f"{prefix}/{name}": value, f"{prefix}/{name}_ci_low": low, f"{prefix}/{name}_ci_high": high})
        metrics[f"{prefix}/sampled_tokens_per_s"] = self.tokens_per_second
        return metrics


@dataclass
class EvalResult:
    total: int
    correct: int
    seconds: float
    generated_tokens: int
    records: list[dict] = field(default_factory=list)
    sampled: SampledEvalResult | None = None  # the sampled pass beside the greedy one (evaluate's temperature > 0)
    correct_strict: int | None = None  # right in the requested format (strict); None: a gold that is not a number

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def confidence_interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    @property
    def accuracy_strict(self) -> float | None:
        if self.correct_strict is None:
            return None
        return self.correct_strict / self.total if self.total else 0.0

    @property
    def confidence_interval_strict(self) -> tuple[float, float] | None:
        return None if self.correct_strict is None else wilson_interval(self.correct_strict, self.total)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        low, high = self.confidence_interval
        strict = ""
        if self.correct_strict is not None:
            strict_low, strict_high = self.confidence_interval_strict
            strict = (f"Strict: {100 * self.accuracy_strict:.2f}%  "
                      f"(95% CI {100 * strict_low:.1f}-{100 * strict_high:.1f}%)  ")
        greedy = (f"Total: {self.total}  Correct: {self.correct}  Accuracy: {100 * self.accuracy:.2f}%  "
                  f"(95% CI {100 * low:.1f}-{100 * high:.1f}%)  {strict}{self.tokens_per_second:.0f} tokens/s")
        return greedy if self.sampled is None else f"{greedy} | {self.sampled.summary()}"

    def metrics(self, prefix: str = "eval") -> dict:
        low, high = self.confidence_interval
        metrics = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/ci_low": low, f"{prefix}/ci_high": high,
                   f"{prefix}/total": self.total, f"{prefix}/correct": self.correct,
                   f"{prefix}/tokens_per_s": self.tokens_per_second}
        if self.correct_strict is not None:
            strict_low, strict_high = self.confidence_interval_strict
            metrics.update({f"{prefix}/accuracy_strict": self.accuracy_strict,
                            f"{prefix}/accuracy_strict_ci_low": strict_low,
                            f"{prefix}/accuracy_strict_ci_high": strict_high,
                            f"{prefix}/correct_strict": self.correct_strict})
        return metrics if self.sampled is None else {**metrics, **self.sampled.metrics(prefix)}


def sample_seed(seed: int, question: int, sample: int) -> int:
    """The seed of sample ``sample`` of problem ``question`` (its index in the eval's problems): a
    function of the three alone, so the rank or batch that draws it changes nothing, and the first k
    samples of a run with more are this run's k. numpy's SeedSequence mixes them into 64 bits (nearby
    triples give unrelated streams)."""
    return int(np.random.SeedSequence([seed % 2**64, question, sample]).generate_state(1, np.uint64)[0])


def sampled_settings(greedy: SamplingParams, num_samples: int, temperature: float) -> SamplingParams | None:
    """A trainer's sampled eval beside its greedy one (EVAL_NUM_SAMPLES, EVAL_TEMPERATURE): ``num_samples``
    per problem at ``temperature``, as many problems per batch as the greedy eval (so k times the rows);
    None at temperature 0, the greedy eval alone."""
    if temperature == 0:
        return None
    return dataclasses.replace(greedy, num_samples=num_samples, temperature=temperature,
                               chunk_rows=greedy.chunk_rows * num_samples)


def check_sampling(num_samples: int, temperature: float, names: tuple[str, str]) -> None:
    """Refuse, in one line naming the constants ``names`` (samples, temperature), k > 1 samples at
    temperature 0: they would be k copies of the greedy completion."""
    if num_samples > 1 and temperature == 0:
        raise SystemExit(f"error: {names[0]}={num_samples} at {names[1]}=0 would be {num_samples} copies of the "
                         f"greedy completion; set {names[1]} > 0 (e.g. 1.0) to sample, or {names[0]}=1")


def _score_samples(model, tokenizer, problems, settings: SamplingParams, progress, desc, reward, prompt_format,
                   seed=0, sizes: BatchSizes | None = None):
    """([for each problem, its ``settings.num_samples`` completions scored: {output, prediction, correct,
    strict_correct, truncated}], generated tokens, seconds): this rank's share of the problems sampled in batches of
    ``sizes["EVAL_BATCH_SIZE"]`` problems (without ``sizes``, ``settings.chunk_rows`` rows; 0: all at
    once), every rank's gathered in order. At a temperature > 0 each row draws from its own stream, seeded
    by (``seed``, problem index, sample index). A batch that runs out of memory is sampled again at half
    the size (common.oom), kept for the rest of the run (``sizes``) or of this pass: neither a greedy
    completion nor a seeded row depends on its batch (the module docstring), so the records are the same."""
    was_training = model.training
    model.eval()
    stop_ids = stop_token_ids(model, tokenizer)
    num_samples, device = settings.num_samples, next(model.parameters()).device
    own_problems = shard(list(enumerate(problems)))  # (index, problem): the index seeds its samples
    samples, generated = [], 0
    start = time.perf_counter()
    if sizes is None:
        sizes = BatchSizes(model, EVAL_BATCH_SIZE=max(1, settings.chunk_rows // num_samples) if settings.chunk_rows
                           else max(1, len(own_problems)))
    first = 0
    # A context: a batch that fails (a reward that returns no number, say) closes the bar before its error line.
    with tqdm(total=len(own_problems), desc=desc, disable=not (progress and is_main_process()),
              unit="question") as bar:
        while first < len(own_problems):
            for attempt in sizes.attempts("EVAL_BATCH_SIZE", "an eval batch"):
                with attempt:
                    batch = own_problems[first:first + attempt.size]
                    # The static path pads every batch, the last one too, to this many rows: one shape per eval.
                    batch_settings = dataclasses.replace(settings, chunk_rows=attempt.size * num_samples)
                    if settings.temperature > 0:  # each row its own stream: (seed, the problem's index, the sample's)
                        seeds = [sample_seed(seed, index, k) for index, _ in batch for k in range(num_samples)]
                        batch_settings = dataclasses.replace(batch_settings, generator=row_generators(seeds, device))
                    out = sample(model, encode_prompts(tokenizer, [problem for _, problem in batch], prompt_format),
                                 batch_settings, tokenizer=tokenizer, eos_token_ids=stop_ids)
            first += len(batch)
            bar.update(len(batch))
            generated += int(out.completion_mask.sum())
            for row, (text, cut_off) in enumerate(zip(out.texts, out.truncated.tolist())):
                problem = batch[row // num_samples][1]
                prediction = extract_answer(text)
                correct = (reward(text, problem, cut_off).correct if reward is not None
                           else answers_match(prediction, problem["gold_answer"]))
                samples.append({"output": text, "prediction": prediction, "correct": correct,
                                "strict_correct": strict_correct(text, problem["gold_answer"]), "truncated": cut_off})
    model.train(was_training)
    every_rank = all_gather_objects((samples, generated))
    samples = [scored for rank_samples, _ in every_rank for scored in rank_samples]
    per_problem = [samples[first:first + num_samples] for first in range(0, len(samples), num_samples)]
    return per_problem, sum(rank_generated for _, rank_generated in every_rank), time.perf_counter() - start


@torch.no_grad()
def evaluate_sampled(model, tokenizer, problems: list[dict], settings: SamplingParams, seed: int = 0,
                     progress: bool = True, desc: str = "eval (sampled)", reward=None,
                     prompt_format: PromptFormat | None = None, sizes: BatchSizes | None = None) -> SampledEvalResult:
    """``settings.num_samples`` completions per problem at ``settings.temperature`` (> 0), each scored as
    evaluate scores one; ``settings.chunk_rows`` rows (chunk_rows / num_samples prompts) per sampler call,
    or a run's ``sizes["EVAL_BATCH_SIZE"]`` prompts (see evaluate). ``seed`` seeds the samples
    (sample_seed) and the bootstrap. Under torchrun every rank must call it; each gets the whole result."""
    if settings.temperature <= 0:
        raise ValueError(f"evaluate_sampled samples at a temperature > 0, got {settings.temperature}")
    if settings.generator is not None:
        raise ValueError("evaluate_sampled seeds every row itself (sample_seed): settings need no generator")
    per_problem, generated, seconds = _score_samples(model, tokenizer, problems, settings, progress, desc, reward,
                                                     prompt_format, seed, sizes)
    records = []
    for problem, samples in zip(problems, per_problem):
        winner = majority_vote([scored["prediction"] for scored in samples])
        records.append({"question": problem["question"], "gold": problem["gold_answer"], "samples": samples,
                        "num_correct": sum(scored["correct"] for scored in samples),
                        "majority": None if winner is None else samples[winner]["prediction"],
                        "majority_correct": winner is not None and samples[winner]["correct"]})
    return SampledEvalResult(num_samples=settings.num_samples, temperature=settings.temperature,
                             top_p=settings.top_p, top_k=settings.top_k, seed=seed, seconds=seconds,
                             generated_tokens=generated, records=records)


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], settings: SamplingParams, progress: bool = True,
             desc: str = "eval", reward=None, prompt_format: PromptFormat | None = None,
             sampled: SamplingParams | None = None, seed: int = 0, sizes: BatchSizes | None = None) -> EvalResult:
    """Greedy-decode every problem (prompts from common.prompts with ``prompt_format``) and score it:
    the extracted number against the gold answer, or, given a ``reward`` (common.reward.load_reward),
    the reward's ``correct``, which is how a non-numeric task is evaluated (lenient), and whether the
    answer was given in the requested format and is right (strict: common.reward.strict_correct; the
    result's ``correct_strict`` is None when a gold answer is not a number).

    ``settings``: greedy SamplingParams (temperature 0, one sample); its ``chunk_rows`` problems are
    decoded together (0 = all), the static path padding the last batch to as many rows. ``sampled``
    (SamplingParams at a temperature > 0) adds a sampled pass (evaluate_sampled, seeded by ``seed``)
    as the result's ``sampled``, whose metrics join the greedy ones.

    An out-of-memory error in a batch halves it and samples it again (common.oom). A trainer's
    ``sizes`` (BatchSizes) set the prompts per batch of both passes (their EVAL_BATCH_SIZE, in place of
    the settings' chunk_rows) and keep a halving for the rest of the run; without them it lasts the pass.

    Under torchrun every rank must call it (it shards ``problems`` and gathers the records); each
    gets the whole result.
    """
    if settings.temperature != 0 or settings.num_samples != 1:
        raise ValueError("evaluate() decodes greedily: settings need temperature 0 and num_samples 1 "
                         "(SamplingParams.greedy())")
    per_problem, generated, seconds = _score_samples(model, tokenizer, problems, settings, progress, desc, reward,
                                                     prompt_format, sizes=sizes)
    records = [{"question": problem["question"], "gold": problem["gold_answer"], **samples[0]}
               for problem, samples in zip(problems, per_problem)]
    strict = [record["strict_correct"] for record in records]
    result = EvalResult(total=len(problems), correct=sum(record["correct"] for record in records),
                        seconds=seconds, generated_tokens=generated, records=records,
                        correct_strict=None if None in strict else sum(strict))
    if sampled is not None:
        result.sampled = evaluate_sampled(model, tokenizer, problems, sampled, seed=seed, progress=progress,
                                          desc=f"{desc} (sampled)", reward=reward, prompt_format=prompt_format,
                                          sizes=sizes)
    return result

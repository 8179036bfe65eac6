"""Metrics of k sampled answers per question, and their intervals: small pure functions.

For each question, n = k completions are sampled at a temperature and c of them are correct.

* mean@k: c / n averaged over the questions: the expected accuracy of one sample, i.e. pass@1 at
  that temperature, estimated from k samples per question instead of one.
* pass@j (j <= k): the chance that at least one of j samples drawn for the question is correct,
  averaged over the questions, by the unbiased estimator of Chen et al. 2021 ("Evaluating Large
  Language Models Trained on Code", eq. 1): per question 1 - C(n - c, j) / C(n, j), the share of
  the j-subsets of the n samples that hold a correct one (pass_at_k).
* maj@k: the accuracy of the majority vote of the k extracted answers (self-consistency, Wang et
  al. 2022), answers compared as the reward compares them (majority_vote).

Each comes with a 95% interval from a percentile bootstrap over the questions (bootstrap_intervals):
the questions are resampled with replacement, every metric is recomputed on each resample, and
the interval is the 2.5th and 97.5th percentiles of those means. It says how much the number
would move with another draw of questions and samples, not how far a model is from the truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.reward import answers_match

BOOTSTRAP_RESAMPLES = 1000


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one question with ``c`` correct among ``n`` samples (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k).

    Written as their product, C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i), so no
    huge binomial is ever formed (C(256, 128) is about 6e75): c factors in [0, 1].
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def pass_at_ks(k: int) -> list[int]:
    """The j of pass@j reported for k samples: 1, 2, 4, ... up to k, and k itself."""
    js = [2 ** power for power in range(k.bit_length()) if 2 ** power <= k]
    return js if js[-1] == k else js + [k]


def majority_vote(answers: Sequence[float | None]) -> int | None:
    """The index of the sample whose answer wins the vote among ``answers`` (extracted numbers, None
    where a completion had none), or None when no sample has an answer.

    Answers are grouped as the reward compares them (common.reward.answers_match: equal within 1e-6,
    so "1,000" and "1000", both read as 1000.0, are one answer), each group counted from its first
    member; a None casts no vote. The most votes win; a tie goes to the answer sampled first. The
    winner is the first sample of its group, whose correctness is the vote's.
    """
    groups: list[list[int]] = []  # [index of the group's first sample, votes]
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if answers_match(answer, answers[group[0]]):
                group[1] += 1
                break
        else:
            groups.append([index, 1])
    if not groups:
        return None
    return max(groups, key=lambda group: (group[1], -group[0]))[0]


def question_scores(correct: Sequence[bool], answers: Sequence[float | None]) -> dict[str, float]:
    """One question's mean@k, pass@j for every j of pass_at_ks(k), and maj@k (1 or 0), from its k
    samples' correctness and extracted answers."""
    k, c = len(correct), sum(bool(value) for value in correct)
    winner = majority_vote(answers)
    scores = {f"mean@{k}": c / k}
    scores.update({f"pass@{j}": pass_at_k(k, c, j) for j in pass_at_ks(k)})
    scores[f"maj@{k}"] = float(winner is not None and bool(correct[winner]))
    return scores


def bootstrap_intervals(per_question: dict[str, Sequence[float]], resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0, confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: the percentile bootstrap interval of the mean of each metric's
    per-question values. Every metric is recomputed on the same ``resamples`` resamples of the
    questions (drawn with replacement from a generator seeded with ``seed``), so the intervals of
    one call are of one set of resamples. (0, 0) for no questions."""
    columns = {name: torch.tensor(list(values), dtype=torch.float64) for name, values in per_question.items()}
    counts = {len(values) for values in columns.values()}
    if len(counts) > 1:
        raise ValueError(f"every metric needs one value per question; got {sorted(counts)} values")
    questions = counts.pop() if counts else 0
    if questions == 0:
        return {name: (0.0, 0.0) for name in columns}
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(questions, (resamples, questions), generator=generator)
    tail = (1 - confidence) / 2
    levels = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    intervals = {}
    for name, values in columns.items():
        low, high = torch.quantile(values[picks].mean(dim=1), levels).tolist()
        intervals[name] = (low, high)
    return intervals


def interval_method(questions: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                    confidence: float = 0.95) -> str:
    """How bootstrap_intervals' intervals were made, in words, for the printout and the summary."""
    return (f"{100 * confidence:g}% percentile bootstrap over the {questions} questions "
            f"({resamples} resamples, seed {seed})")

"""mean@k, pass@j, maj@k and the bootstrap interval (common/sampled_metrics.py), against brute force,
hand-worked values and exact rational arithmetic."""

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from common.reward import extract_answer
from common.sampled_metrics import (bootstrap_intervals, interval_method, majority_vote, pass_at_k, pass_at_ks,
                                    question_scores)


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """The share of the k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_every_subset_enumerated_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 10)
        correct = [rng.random() < rng.random() for _ in range(n)]
        k = rng.randint(1, n)
        assert pass_at_k(n, sum(correct), k) == pytest.approx(brute_force_pass_at_k(correct, k), abs=1e-12)


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 1 / 4),     # one right in four: a single draw finds it a quarter of the time
    (4, 1, 2, 1 / 2),     # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),     # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (5, 2, 2, 7 / 10),    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 4, 5 / 6),    # 1 - C(7,4)/C(10,4) = 1 - 35/210
    (8, 1, 4, 1 / 2),     # 1 - C(7,4)/C(8,4) = 1 - 35/70
    (4, 0, 4, 0.0),       # none right: never
    (3, 1, 3, 1.0),       # n - c = 2 < k = 3: every 3-subset holds the right one
    (6, 6, 1, 1.0),
])
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_1_is_the_share_correct_and_pass_at_n_any_correct():
    for n in range(1, 20):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)
            assert pass_at_k(n, c, n) == (1.0 if c else 0.0)


@pytest.mark.parametrize("n, k", [(256, 128), (2048, 1024)])
def test_pass_at_k_is_stable_where_the_binomials_are_huge(n, k):
    """Against exact rational arithmetic, for every c. C(2048, 1024) is about 10^615, far past a float:
    the product form never forms it."""
    values = []
    for c in range(n + 1):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        value = pass_at_k(n, c, k)
        assert value == pytest.approx(float(exact), rel=1e-12, abs=1e-15), c
        values.append(value)
    assert values[0] == 0.0 and values[-1] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:]))  # more correct samples never lower it


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_pass_at_ks_are_powers_of_two_then_k():
    assert pass_at_ks(1) == [1]
    assert pass_at_ks(2) == [1, 2]
    assert pass_at_ks(16) == [1, 2, 4, 8, 16]
    assert pass_at_ks(12) == [1, 2, 4, 8, 12]


def test_majority_vote_hand_worked():
    assert majority_vote([3.0, 5.0, 5.0]) == 1           # 5 wins 2-1: its first sample
    assert majority_vote([5.0, 3.0, 3.0, 5.0]) == 0      # 2-2: the answer sampled first (5)
    assert majority_vote([3.0, 5.0, 5.0, 3.0, 7.0]) == 0  # 2-2-1: 3 came first
    assert majority_vote([None, 7.0, 8.0]) == 1          # 1-1: 7 came first; None is no answer
    assert majority_vote([None, None, None, 4.0]) == 3   # the unextractable cast no vote, however many
    assert majority_vote([None, None]) is None           # no answer at all: no winner
    assert majority_vote([]) is None
    assert majority_vote([2.0, 1000.0000001, 1000.0]) == 1  # equal within the reward's tolerance: one answer


def test_majority_vote_groups_answers_written_differently():
    """The completions' answers as the reward reads them: "1,000", "1000" and "$1,000.00" are one answer."""
    texts = ["Answer: 999", "Answer: 1,000", "So 1000 apples.\nAnswer: 1000", "Answer: $1,000.00", "no idea"]
    answers = [extract_answer(text) for text in texts]
    assert answers == [999.0, 1000.0, 1000.0, 1000.0, None]
    assert majority_vote(answers) == 1
    # 2-2 between "12" and "1,000"/"1000": 12 was sampled first.
    tied = [extract_answer(text) for text in ["Answer: 12", "Answer: 1,000", "Answer: 12.0", "Answer: 1000"]]
    assert majority_vote(tied) == 0
    halves = [extract_answer(text) for text in ["Answer: 1/2", "Answer: 3", "Answer: 0.5"]]
    assert majority_vote(halves) == 0


def test_question_scores_hand_worked():
    scores = question_scores([False, True, True, False], [3.0, 5.0, 5.0, None])
    assert scores == pytest.approx({"mean@4": 0.5, "pass@1": 0.5, "pass@2": 5 / 6, "pass@4": 1.0, "maj@4": 1.0})
    # The vote picks a wrong answer (3, three votes) although two samples are right.
    scores = question_scores([False, False, True, False, True], [3.0, 3.0, 8.0, 3.0, 8.0])
    assert scores["maj@5"] == 0.0 and scores["mean@5"] == pytest.approx(0.4)
    assert scores["pass@4"] == pytest.approx(1.0)  # 3 wrong < 4 draws: a right one is always among them
    assert question_scores([False, False], [None, None]) == {"mean@2": 0.0, "pass@1": 0.0, "pass@2": 0.0,
                                                             "maj@2": 0.0}


def naive_percentile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between the sorted values (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def test_bootstrap_equals_a_naive_resampling_with_the_same_draws():
    rng = random.Random(1)
    values = [float(rng.random() < 0.4) for _ in range(37)]
    low, high = bootstrap_intervals({"m": values}, resamples=200, seed=5)["m"]
    picks = torch.randint(37, (200, 37), generator=torch.Generator().manual_seed(5)).tolist()
    means = [sum(values[i] for i in pick) / 37 for pick in picks]
    assert low == pytest.approx(naive_percentile(means, 0.025), abs=1e-12)
    assert high == pytest.approx(naive_percentile(means, 0.975), abs=1e-12)


def test_bootstrap_width_is_the_binomial_one_and_metrics_share_resamples():
    values = [1.0] * 200 + [0.0] * 200  # p = 0.5 over 400 questions: the normal interval is +-1.96 * 0.025
    intervals = bootstrap_intervals({"a": values, "b": [1 - v for v in values], "same": values}, seed=0)
    low, high = intervals["a"]
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * 0.025, rel=0.15)
    assert intervals["same"] == intervals["a"]
    # The complement of a, resampled alike, has a's interval mirrored about one half.
    assert intervals["b"] == pytest.approx((1 - high, 1 - low), abs=1e-12)
    assert bootstrap_intervals({"a": values}, seed=0) == bootstrap_intervals({"a": values}, seed=0)
    assert bootstrap_intervals({"a": values}, seed=1) != bootstrap_intervals({"a": values}, seed=0)


def test_bootstrap_edge_cases():
    assert bootstrap_intervals({"a": [0.25] * 9})["a"] == pytest.approx((0.25, 0.25))
    assert bootstrap_intervals({"a": []}) == {"a": (0.0, 0.0)}
    with pytest.raises(ValueError, match="one value per question"):
        bootstrap_intervals({"a": [1.0, 0.0], "b": [1.0]})
    assert interval_method(500, seed=3) == "95% percentile bootstrap over the 500 questions (1000 resamples, seed 3)"

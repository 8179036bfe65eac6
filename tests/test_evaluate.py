"""Wilson interval against hand-worked values; the summary line's format."""

import pytest

from common.evaluate import EvalResult, wilson_interval


@pytest.mark.parametrize("correct, total, low, high", [
    # By hand: p = 0.5, n = 100: centre 0.5, half-width 1.96*sqrt(0.0025 + 1.96^2/40000)/(1 + 1.96^2/100) = 0.0962
    (50, 100, 0.4038, 0.5962),
    # By hand: p = 0: low 0, high = z^2/(n + z^2) = 3.8416/13.8416
    (0, 10, 0.0, 0.2775),
    # By hand: p = 1: symmetric to p = 0
    (10, 10, 0.7225, 1.0),
    (0, 0, 0.0, 0.0),
])
def test_wilson_interval(correct, total, low, high):
    got_low, got_high = wilson_interval(correct, total)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)


def test_summary_line():
    result = EvalResult(total=200, correct=122, seconds=2.0, generated_tokens=5000)
    assert result.accuracy == 0.61
    assert result.summary().startswith("Total: 200  Correct: 122  Accuracy: 61.00%  (95% CI ")
    assert "2500 tokens/s" in result.summary()


def test_strict_accuracy_beside_the_lenient_one():
    result = EvalResult(total=100, correct=60, seconds=2.0, generated_tokens=5000, correct_strict=50)
    # The Wilson interval of 50/100, worked by hand in test_wilson_interval: 40.38-59.62%.
    assert "Accuracy: 60.00%  (95% CI " in result.summary()
    assert "Strict: 50.00%  (95% CI 40.4-59.6%)  2500 tokens/s" in result.summary()
    metrics = result.metrics()
    assert metrics["eval/accuracy"] == 0.6 and metrics["eval/accuracy_strict"] == 0.5
    assert metrics["eval/correct_strict"] == 50
    assert metrics["eval/accuracy_strict_ci_low"] == pytest.approx(0.4038, abs=1e-4)
    assert metrics["eval/accuracy_strict_ci_high"] == pytest.approx(0.5962, abs=1e-4)


def test_no_strict_accuracy_without_numeric_gold_answers():
    result = EvalResult(total=4, correct=2, seconds=1.0, generated_tokens=10)  # correct_strict None
    assert "Strict" not in result.summary()
    assert not any("strict" in key for key in result.metrics())

"""Strict beside lenient accuracy in eval_math.py's output, and COMPARE_TO on different evaluations
(issue 30, item 4; issue 31, item 4): the scripts run as subprocesses on the tiny model against
earlier summaries crafted by hand, whose expected numbers are counted by hand below."""

import json
import re
from pathlib import Path

import pytest

from common.compare import comparison_lines
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR, run_script

TEST_FILE = REPO_ROOT / "data" / "synth_test.jsonl"
FIRST = [json.loads(line) for line in TEST_FILE.read_text().splitlines()[:4]]  # the problems EVAL_LIMIT=4 takes

# What an eval of the run below records in its summary's config (only the settings COMPARE_TO compares).
SETTINGS = {"MODEL_PATH": "models/tiny-gemma2-math", "LORA_CKPT": None, "EVAL_FILE": "data/synth_test.jsonl",
            "GOLD_FIELD": None, "INSTRUCTION": "Solve step by step. End with the line 'Answer: <number>'.",
            "SYSTEM_PROMPT": "", "CHAT_TEMPLATE": "auto", "REWARD": "correctness", "MAX_NEW_TOKENS": 20,
            "NUM_SAMPLES": 1, "TEMPERATURE": 0.0, "TOP_P": 1.0, "TOP_K": 0, "SEED": 0, "QUANT": "none"}


def naive_strict(output: str, gold: str) -> bool:
    """The strict rule written out plainly: one line starting "Answer:", the last non-empty one, its number the gold."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    answers = [line for line in lines if line.lower().startswith("answer:")]
    if len(answers) != 1 or lines[-1] != answers[0]:
        return False
    number = re.search(r"-?\d+(?:\.\d+)?", answers[0])
    return number is not None and float(number[0]) == float(gold)


def write_before(folder: Path, settings: dict, records: list[dict], total: int) -> Path:
    """An earlier eval as eval_math.py leaves it: x.jsonl and x.summary.json (its numbers are not read
    when the records are there: COMPARE_TO recomputes them on the shared problems)."""
    (folder / "before.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    summary = folder / "before.summary.json"
    summary.write_text(json.dumps({"config": settings, "eval/accuracy": 0.99, "eval/total": total}))
    return summary


def run_eval(script: str, folder: Path, *args: str):
    out_file = folder / "after.jsonl"
    result = run_script([script, f"--MODEL_PATH={TINY_MODEL_DIR}", "--EVAL_FILE=data/synth_test.jsonl",
                         "--EVAL_LIMIT=4", "--MAX_NEW_TOKENS=20", "--DEVICE=cpu", f"--OUT_FILE={out_file}", *args])
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    return result, records, json.loads(out_file.with_suffix(".summary.json").read_text())


def percent(count: int, total: int) -> str:
    return f"{100 * count / total:.2f}%"


def test_strict_accuracy_and_compare_to_different_evaluations(tmp_path):
    # An older eval (no strict_correct in its records) of another file, prompt and length, 5 problems: the first
    # three of this run's, and two that it does not hold. On those three, by hand: lenient 2/3 (the first two
    # are read right), strict 1/3 (the second has its number but no Answer: line, the third the wrong one).
    before_records = [
        {"question": FIRST[0]["question"], "gold": FIRST[0]["gold_answer"], "output": f"Answer: {FIRST[0]['gold_answer']}",
         "prediction": float(FIRST[0]["gold_answer"]), "correct": True, "truncated": False},
        {"question": FIRST[1]["question"], "gold": FIRST[1]["gold_answer"], "output": f"so {FIRST[1]['gold_answer']}",
         "prediction": float(FIRST[1]["gold_answer"]), "correct": True, "truncated": False},
        {"question": FIRST[2]["question"], "gold": FIRST[2]["gold_answer"], "output": "Answer: 0",
         "prediction": 0.0, "correct": False, "truncated": False},
        {"question": "A question of another file?", "gold": "1", "output": "Answer: 1", "prediction": 1.0,
         "correct": True, "truncated": False},
        {"question": "Another one?", "gold": "2", "output": "Answer: 2", "prediction": 2.0, "correct": True,
         "truncated": False},
    ]
    settings = {**SETTINGS, "EVAL_FILE": "data/synth_dev.jsonl", "INSTRUCTION": "Think.", "MAX_NEW_TOKENS": 256}
    before = write_before(tmp_path, settings, before_records, total=5)
    result, records, summary = run_eval("eval_math_base.py", tmp_path, f"--COMPARE_TO={before}")

    # Strict beside lenient: each record's strict_correct by the plain rule, the counts in the summary and line.
    assert [r["strict_correct"] for r in records] == [naive_strict(r["output"], r["gold"]) for r in records]
    lenient, strict = sum(r["correct"] for r in records), sum(r["strict_correct"] for r in records)
    assert summary["eval/correct"] == lenient and summary["eval/correct_strict"] == strict
    assert summary["eval/accuracy_strict_ci_low"] <= summary["eval/accuracy_strict"] == strict / 4
    assert f"Accuracy: {percent(lenient, 4)}" in result.stdout and f"Strict: {percent(strict, 4)}  (95% CI" in result.stdout

    # One line naming every difference, then the comparison on the three shared problems only.
    differing = [line for line in result.stdout.splitlines() if line.startswith("COMPARE_TO:")]
    assert len(differing) == 1, result.stdout
    assert differing[0].startswith('COMPARE_TO: the two evaluations differ: problems 5 -> 4, '
                                   'EVAL_FILE "data/synth_dev.jsonl" -> "data/synth_test.jsonl", INSTRUCTION "Think." -> ')
    assert differing[0].endswith(", MAX_NEW_TOKENS 256 -> 20, 3 problems in common; compared on the 3 shared problems")
    shared = records[:3]
    now, now_strict = sum(r["correct"] for r in shared), sum(r["strict_correct"] for r in shared)
    assert (f"before -> after: 66.67% (3 problems, models/tiny-gemma2-math) -> {percent(now, 3)} (3 problems): "
            f"{100 * (now / 3 - 2 / 3):+.2f} points") in result.stdout
    assert (f"before -> after strict: 33.33% (3 problems, models/tiny-gemma2-math) -> {percent(now_strict, 3)} "
            f"(3 problems): {100 * (now_strict / 3 - 1 / 3):+.2f} points") in result.stdout


def test_compare_to_the_same_evaluation_names_no_difference(tmp_path):
    # The same file, prompt and settings, the same 4 problems, records with strict_correct as eval_math.py
    # writes them now: by hand, lenient 3/4 and strict 2/4; no line of differences.
    flags = [(True, True), (True, False), (True, True), (False, False)]
    before_records = [{"question": p["question"], "gold": p["gold_answer"], "output": "", "prediction": None,
                       "correct": correct, "strict_correct": strict, "truncated": False}
                      for p, (correct, strict) in zip(FIRST, flags)]
    before = write_before(tmp_path, SETTINGS, before_records, total=4)
    result, records, _ = run_eval("eval_math.py", tmp_path, f"--COMPARE_TO={before}")
    assert "COMPARE_TO:" not in result.stdout
    now, now_strict = sum(r["correct"] for r in records), sum(r["strict_correct"] for r in records)
    assert f"before -> after: 75.00% (4 problems, models/tiny-gemma2-math) -> {percent(now, 4)} (4 problems)" in result.stdout
    assert f"before -> after strict: 50.00% (4 problems, models/tiny-gemma2-math) -> {percent(now_strict, 4)}" in result.stdout


AFTER = {"config": {**SETTINGS, "MAX_NEW_TOKENS": 40}, "eval/total": 2, "eval/accuracy": 0.5, "eval/accuracy_strict": 0.0,
         "eval/ci_low": 0.1, "eval/tokens_per_s": 100.0}
AFTER_RECORDS = [{"question": "q1", "gold": "1", "output": "1", "correct": True, "strict_correct": False},
                 {"question": "q2", "gold": "2", "output": "3", "correct": False, "strict_correct": False}]


def test_compare_to_without_the_earlier_records_compares_the_totals_and_says_so(tmp_path):
    before = {"config": SETTINGS, "eval/total": 10, "eval/accuracy": 0.4, "eval/ci_low": 0.2}
    lines = comparison_lines(tmp_path / "old.summary.json", before, None, AFTER, AFTER_RECORDS)
    assert lines[0] == (f"COMPARE_TO: {tmp_path / 'old.jsonl'} (its per-question records) is missing: the problems "
                        f"cannot be matched, so the whole of each evaluation is compared")
    assert lines[1] == "COMPARE_TO: the two evaluations differ: problems 10 -> 2, MAX_NEW_TOKENS 20 -> 40"
    # Only the metric both have (the old summary has no strict accuracy); no interval bound, count or speed.
    assert lines[2:] == ["before -> after: 40.00% (10 problems, models/tiny-gemma2-math) -> 50.00% (2 problems): "
                         "+10.00 points"]


def test_compare_to_with_no_problem_in_common_compares_nothing(tmp_path):
    before_records = [{"question": "q9", "gold": "9", "output": "Answer: 9", "correct": True}]
    before = {"config": SETTINGS, "eval/total": 1, "eval/accuracy": 1.0}
    lines = comparison_lines(tmp_path / "old.summary.json", before, before_records, AFTER, AFTER_RECORDS)
    assert lines == ["COMPARE_TO: the two evaluations differ: problems 1 -> 2, MAX_NEW_TOKENS 20 -> 40, "
                     "0 problems in common; compared on the 0 shared problems",
                     f"before -> after: no problem of {tmp_path / 'old.summary.json'} is in this evaluation: "
                     f"nothing to compare"]


@pytest.mark.parametrize("name, was, now", [("SEED", 0, 1), ("TEMPERATURE", 0.0, 1.0)])
def test_compare_to_names_a_sampling_difference(tmp_path, name, was, now):
    """SEED is a difference only where a side samples; TEMPERATURE always is."""
    before = {"config": {**SETTINGS, name: was}, "eval/total": 2}
    after = {**AFTER, "config": {**SETTINGS, name: now}}
    first = comparison_lines(tmp_path / "old.summary.json", before, AFTER_RECORDS, after, AFTER_RECORDS)[0]
    if name == "SEED":
        assert not first.startswith("COMPARE_TO:")  # both greedy: the seed changes nothing
    else:
        assert first == "COMPARE_TO: the two evaluations differ: TEMPERATURE 0.0 -> 1.0; compared on the 2 shared problems"


def test_plot_metrics_draws_strict_beside_lenient_accuracy(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [{"step": 0, "eval/accuracy": 0.5, "eval/accuracy_strict": 0.25, "eval/accuracy_strict_ci_low": 0.1},
             {"step": 1, "reward": 0.1, "accuracy": 0.05},
             {"step": 2, "eval/accuracy": 0.6, "eval/accuracy_strict": 0.5}]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out_file = tmp_path / "metrics.png"
    result = run_script(["plot_metrics.py", f"--RUNS={tmp_path / 'run.jsonl'}", f"--OUT_FILE={out_file}"])
    assert out_file.read_bytes()[:4] == b"\x89PNG"
    assert "run: held-out eval/accuracy, eval/accuracy_strict\n" in result.stdout  # both curves, no interval bound


@pytest.mark.parametrize("text, expected", [
    ("not json", "not a readable summary JSON"),
    ('{"eval/accuracy": 0.5}', "not an eval_math.py summary (no config or eval/total)"),
])
def test_a_compare_to_that_is_no_summary_is_refused_in_one_line_before_the_eval(tmp_path, text, expected):
    summary = tmp_path / "old.summary.json"
    summary.write_text(text)
    result = run_script(["eval_math.py", f"--MODEL_PATH={TINY_MODEL_DIR}", f"--COMPARE_TO={summary}",
                         f"--OUT_FILE={tmp_path / 'x.jsonl'}"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: COMPARE_TO={summary}: {expected}")
    assert not (tmp_path / "x.jsonl").exists()  # refused before any problem was evaluated

"""Tests of common/synth.py and of the shipped synthetic data files."""

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.data import load_problems
from common.synth import (CONTAINERS, OBJECTS, PEOPLE, TEMPLATES, make_problem, make_problems,
                          normalise_question)

REPO_ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def check_solution(problem: dict) -> int:
    """Re-compute every step of a worked solution; returns the number of steps."""
    *steps, last = problem["solution"].split("\n")
    assert 1 <= len(steps) <= 3, problem
    result = None
    for line in steps:
        match = STEP_LINE.fullmatch(line)
        assert match, f"malformed step {line!r} in {problem}"
        a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        if op == "+":
            assert a + b == result, line
        elif op == "-":
            assert a - b == result, line
        elif op == "*":
            assert a * b == result, line
        else:
            assert b != 0 and a == b * result, line  # exact division
        assert result >= 0
    assert last == f"Answer: {problem['gold_answer']}"
    assert problem["gold_answer"] == str(result)
    return len(steps)


def test_every_template_makes_correct_small_problems():
    assert len(TEMPLATES) >= 8
    for template in TEMPLATES:
        rng = random.Random(7)
        for _ in range(300):
            problem = template(rng)
            assert set(problem) == {"question", "solution", "gold_answer"}
            check_solution(problem)
            assert len(problem["question"].split()) <= 40
            numbers = [int(n) for n in re.findall(r"\d+", problem["solution"])]
            assert max(numbers) <= 5000


def test_a_problem_and_its_solution_by_hand():
    problem = {"question": "Mia has 12 apples. She buys 5 bags with 3 apples each. "
                           "How many apples does Mia have now?",
               "solution": "5 * 3 = 15\n12 + 15 = 27\nAnswer: 27", "gold_answer": "27"}
    assert check_solution(problem) == 2
    with pytest.raises(AssertionError):
        check_solution({**problem, "solution": "5 * 3 = 15\n12 + 15 = 28\nAnswer: 28",
                        "gold_answer": "28"})


def test_vocabulary_is_varied():
    assert len({name for name, _ in PEOPLE}) >= 20
    assert len(set(OBJECTS)) >= 20
    assert len(CONTAINERS) >= 5


def test_make_problem_uses_one_to_three_steps_and_all_operations():
    rng = random.Random(0)
    problems = [make_problem(rng) for _ in range(2000)]
    step_counts = {check_solution(p) for p in problems}
    assert step_counts == {1, 2, 3}
    operators = {line.split()[1] for p in problems for line in p["solution"].split("\n")[:-1]}
    assert operators == {"+", "-", "*", "/"}


def test_make_problems_is_deterministic_for_a_seed():
    assert make_problems(100, seed=3) == make_problems(100, seed=3)
    assert make_problems(100, seed=3) != make_problems(100, seed=4)
    assert make_problems(0, seed=3) == []


def test_make_problems_gives_distinct_questions():
    problems = make_problems(3000, seed=1)
    assert len(problems) == 3000
    assert len({normalise_question(p["question"]) for p in problems}) == 3000


def test_exclude_removes_questions_raw_or_normalised():
    first = make_problems(300, seed=5)
    normalised = {normalise_question(p["question"]) for p in first}
    again = make_problems(300, seed=5, exclude=normalised)
    assert not normalised & {normalise_question(p["question"]) for p in again}
    raw = {p["question"].upper() + "  " for p in first}
    assert make_problems(300, seed=5, exclude=raw) == again


def test_normalise_question():
    assert normalise_question("  Mia has 12   apples.\nHow many?  ") == "mia has 12 apples. how many"
    assert normalise_question("...What is 2 + 3?!") == "what is 2 + 3"
    assert normalise_question("HOW many legs") == normalise_question("how many legs?")
    assert normalise_question("") == ""


def test_shipped_data_files_have_the_expected_sizes_and_are_disjoint():
    train = load_problems(REPO_ROOT / "data" / "synth_train.jsonl")
    test = load_problems(REPO_ROOT / "data" / "synth_test.jsonl")
    assert (len(train), len(test)) == (4000, 500)
    train_questions = {normalise_question(p["question"]) for p in train}
    test_questions = {normalise_question(p["question"]) for p in test}
    assert len(train_questions) == 4000 and len(test_questions) == 500
    assert not train_questions & test_questions
    for problem in train[:500] + test:
        assert set(problem) == {"question", "gold_answer", "solution"}
        check_solution(problem)


def test_shipped_data_files_match_the_generator(tmp_path):
    subprocess.run([sys.executable, "make_synth_data.py", f"--OUT_DIR={tmp_path}"],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    for name in ("synth_train.jsonl", "synth_test.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO_ROOT / "data" / name).read_bytes(), (
            f"data/{name} is stale: run `python make_synth_data.py --OVERWRITE=true`")


def test_existing_splits_are_refused_before_any_work_unless_overwrite(tmp_path):
    sizes = ["--TRAIN_SIZE=20", "--TEST_SIZE=5", "--DEV_SIZE=5", f"--OUT_DIR={tmp_path}"]
    (tmp_path / "synth_dev.jsonl").write_text("my own dev split\n")  # the last split written: all are checked first
    result = subprocess.run([sys.executable, "make_synth_data.py", *sizes], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: OUT_DIR={tmp_path / 'synth_dev.jsonl'} exists; give another --OUT_DIR, or replace it with --OVERWRITE=true"]
    assert [path.name for path in tmp_path.iterdir()] == ["synth_dev.jsonl"]
    assert (tmp_path / "synth_dev.jsonl").read_text() == "my own dev split\n"
    result = subprocess.run([sys.executable, "make_synth_data.py", *sizes, "--OVERWRITE=true"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["synth_dev.jsonl", "synth_test.jsonl", "synth_train.jsonl"]


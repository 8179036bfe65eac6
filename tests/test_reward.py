"""Tests of common/reward.py: extraction, matching, each reward term, the named rewards, rewards you bring.

Every expected value is worked out by hand in the tables below (the arithmetic
is in the comments), never computed by calling the code under test.
"""

import sys
import textwrap

import pytest

from common.reward import (
    DEFAULT_REWARD_NAME,
    REWARD_FUNCTIONS,
    RewardResult,
    RewardSpecError,
    answers_match,
    correctness_reward,
    extract_answer,
    format_reward,
    get_reward_fn,
    load_reward,
    math_reward,
    multiple_answers_penalty,
    parse_number,
    repetition_penalty,
    score_batch,
    strict_answer,
    strict_correct,
    truncation_penalty,
)

UNICODE_MINUS = "\u2212"

EXTRACTION_CASES = [
    # Answer: lines
    ("Answer: 12", 12.0),
    ("answer: 12", 12.0),
    ("ANSWER: 12", 12.0),
    ("Answer:12", 12.0),
    ("Final answer: 7", 7.0),
    ("**Answer:** 12", 12.0),
    ("**Final Answer**: 12", 12.0),
    ("Answer: **12**", 12.0),
    ("  - **Answer:** 12 apples", 12.0),
    ("Answer: 12.", 12.0),
    ("Answer: 12 apples", 12.0),
    ("Answer: 12 apples and 3 pears", 12.0),
    ("Answer: 1,234", 1234.0),
    ("Answer: $1,234.50", 1234.5),
    ("Answer: 50%", 50.0),
    ("Answer: -5", -5.0),
    ("Answer: +5", 5.0),
    (f"Answer: {UNICODE_MINUS}5", -5.0),
    ("Answer: -$5", -5.0),
    ("Answer: 3.5", 3.5),
    ("Answer: .5", 0.5),
    ("Answer: 1.2e3", 1200.0),
    ("Answer: 2.5E-2", 0.025),
    ("Answer: 5e", 5.0),  # an "e" with no exponent digits is not part of the number
    ("Answer: 3/4", 0.75),
    ("Answer: -1/2", -0.5),
    ("Answer: 3, 4", 3.0),
    # the last Answer line wins, and beats numbers elsewhere
    ("Answer: 3\nAnswer: 5", 5.0),
    ("First 2 + 3 = 5.\nThen 5 * 4 = 20.\nAnswer: 20", 20.0),
    ("Answer: 8\nCheck: 2 + 2 = 4", 8.0),
    # Answer: beats "The answer is"; a marker without a number falls through
    ("The answer is 6.\nAnswer: 5", 5.0),
    ("Answer: unknown\nThe answer is 9", 9.0),
    # The answer is
    ("The answer is 42.", 42.0),
    ("So the final answer is 42 dollars", 42.0),
    ("The answer is: 1,000", 1000.0),
    # ####: GSM8K's final line wins over every other marker written before it
    ("The answer is 6.\n#### 4", 4.0),
    ("The final answer is 15 gallons, which is 15 * 8 = 120 pints\n#### 120", 120.0),
    ("Answer: 5\n#### 6", 6.0),
    ("####\nAnswer: 7", 7.0),  # a #### with no number falls through
    ("#### 72", 72.0),
    ("Natalia sold 48 clips.\n#### 72", 72.0),
    ("\\boxed{4}\n#### 6", 6.0),
    # \boxed
    ("\\boxed{18}", 18.0),
    ("So $\\boxed{-3.5}$.", -3.5),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("\\boxed{4} and 9 more", 4.0),
    # last-number fallback
    ("She has 3 apples and buys 4 more, so 7.", 7.0),
    ("3, 4", 4.0),
    ("The total is 1,234", 1234.0),
    ("10-3=7", 7.0),  # "-" between digits is subtraction, not a sign
    ("x = -4", -4.0),
    ("The price rose 5%.", 5.0),
    # no number at all
    ("no numbers here", None),
    ("", None),
    ("Answer: unknown", None),
]


@pytest.mark.parametrize("text, expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("75", 75.0),
    (" 42 ", 42.0),
    ("1,234", 1234.0),
    ("$1,234", 1234.0),
    ("1,234,567.5", 1234567.5),
    ("-5", -5.0),
    (f"{UNICODE_MINUS}2", -2.0),
    ("0.5", 0.5),
    (".25", 0.25),
    ("3/4", 0.75),
    ("50%", 50.0),
    ("1.2e3", 1200.0),
    ("-3e2", -300.0),
    ("1e400", None),  # beyond a float: not a usable number
    ("abc", None),
    ("", None),
    ("12 apples", None),  # gold answers must be bare numbers
    ("3, 4", None),
    ("1,23", None),  # not a thousands grouping
    ("1/0", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    (12.0, "12", True),
    (75.0, "75", True),
    (0.5, "0.5", True),
    (1234.0, "1,234", True),
    (1234.0, "$1,234", True),
    (12.0, 12, True),
    (12.0, 12.0, True),
    (0.0, "0", True),
    (-5.0, "-5", True),
    (-5.0, "5", False),
    (None, "12", False),
    (None, 0.0, False),
    (12.0000001, "12", True),  # |diff| 1e-7 is inside both tolerances
    (12.001, "12", False),  # |diff| 1e-3 > 1e-6 and > 1e-6 * 12
    (0.3333333, "1/3", True),  # |diff| ~3.3e-8 < 1e-6
    (0.33, "1/3", False),
    (1e-7, "0", True),  # only abs_tol can match against 0
])
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_answers_match_custom_tolerance():
    # |12.5 - 12| = 0.5 <= 0.1 * 12.5 = 1.25
    assert answers_match(12.5, "12", rel_tol=0.1) is True
    assert answers_match(12.5, "12") is False


def test_answers_match_rejects_non_numeric_gold():
    with pytest.raises(ValueError, match="twelve"):
        answers_match(12.0, "twelve")


@pytest.mark.parametrize("text, gold, expected", [
    ("Answer: 12", "12", 1.0),
    ("Answer: 13", "12", 0.0),
    ("no number", "12", 0.0),
    ("The answer is 1,234.", "1234", 1.0),
    ("Answer: 3\nAnswer: 4\nAnswer: 5", "5", 1.0),  # reads the last line ...
    ("Answer: 5\nAnswer: 4", "5", 0.0),  # ... and only the last line
])
def test_correctness_reward(text, gold, expected):
    assert correctness_reward(text, gold) == expected


@pytest.mark.parametrize("text, expected", [
    ("Reasoning.\nAnswer: 12", 1.0),
    ("Answer: 12", 1.0),
    ("Answer: 12\n\n", 1.0),  # trailing blank lines do not count
    ("**Answer:** 12", 1.0),
    ("Answer: 12 apples", 1.0),
    ("Answer: 12\nBecause 3 * 4 = 12.", 0.0),  # not the last line
    ("The answer is 12", 0.0),
    ("#### 12", 0.0),
    ("\\boxed{12}", 0.0),
    ("Answer: 3\nAnswer: 12", 0.0),  # more than one
    ("Answer: twelve", 0.0),  # no number
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


# (completion, lenient reading, strict reading), by hand: strict takes only the number on the one
# "Answer:" line that ends the completion (the format INSTRUCTION asks for); lenient reads on.
STRICT_CASES = [
    ("4 * 3 = 12\nAnswer: 12", 12.0, 12.0),  # the requested format: both agree
    ("**Answer:** 12\n\n", 12.0, 12.0),  # markdown and trailing blank lines are still the format
    ("Answer: 12 apples", 12.0, 12.0),  # the first number on the line
    ("Answer: \\frac{3}{4}", 0.75, 0.75),
    ("4 * 3 = 12", 12.0, None),  # only a trailing number: lenient's last resort, not an answer line
    ("Answer: 3\nAnswer: 12", 12.0, None),  # two answer lines: lenient takes the last, strict neither
    ("Answer: 12\nAnswer: 12", 12.0, None),  # even the same number twice is not "the line"
    ("Answer: 12\nBecause 3 * 4 = 12.", 12.0, None),  # an answer line that is not the last line
    ("The answer is 12", 12.0, None),
    ("#### 5\nAnswer: 6", 5.0, 6.0),  # lenient: #### first; strict: the last line
    ("Answer: twelve\n3 + 4 = 7", 7.0, None),  # an answer line without a number, then a number
    ("", None, None),
]


@pytest.mark.parametrize("text, lenient, strict", STRICT_CASES)
def test_strict_answer_beside_the_lenient_one(text, lenient, strict):
    assert extract_answer(text) == lenient
    assert strict_answer(text) == strict
    assert format_reward(text) == (0.0 if strict is None else 1.0)  # the format reward pays for exactly this format


@pytest.mark.parametrize("text, gold, expected", [
    ("Answer: 12", "12", True),
    ("Answer: 1,200", "1200", True),
    ("Answer: 13", "12", False),
    ("4 * 3 = 12", "12", False),  # right by the lenient reading, not in the format
    ("Answer: 3\nAnswer: 12", 12, False),
    ("Answer: yes", "yes", None),  # a gold that is not a number: the Answer: <number> format does not apply
    ("Answer: 12", None, None),  # no gold (a reward of your own)
])
def test_strict_correct(text, gold, expected):
    assert strict_correct(text, gold) is expected


@pytest.mark.parametrize("text, expected", [
    ("a\nb\nc", 0.0),
    ("", 0.0),
    ("Answer: 5", 0.0),
    ("Answer: 5\nAnswer: 5", 0.5),  # 1 duplicate / 2 lines
    ("Answer: 5\n" * 4, 0.75),  # 3 duplicates / 4 lines
    ("x\ny\nx\ny", 0.5),  # 2 duplicates / 4 lines
    ("Answer: 5\n\n\nAnswer: 5\n", 0.5),  # blank lines are ignored
    ("  same\nsame  ", 0.5),  # surrounding spaces are ignored
])
def test_repetition_penalty(text, expected):
    assert repetition_penalty(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("no answer", 0.0),
    ("Answer: 5", 0.0),
    ("The answer is 3\nAnswer: 4", 0.0),  # only Answer: lines count
    ("Answer: 3\nAnswer: 4", 0.5),  # (2 - 1) / 2
    ("Answer: 3\nAnswer: 4\nAnswer: 5", 1.0),  # (3 - 1) / 2
    ("Answer: 1\nAnswer: 2\nAnswer: 3\nAnswer: 4\nAnswer: 5", 1.0),  # capped at 1
])
def test_multiple_answers_penalty(text, expected):
    assert multiple_answers_penalty(text) == expected


@pytest.mark.parametrize("truncated, expected", [(True, 1.0), (False, 0.0)])
def test_truncation_penalty(truncated, expected):
    assert truncation_penalty(truncated) == expected


CLEAN_CORRECT = "3 * 4 = 12\nAnswer: 12"

# "math" = correctness + 0.2 format - 0.5 repetition - 0.5 multiple - 0.5 truncation
MATH_REWARD_CASES = [
    # text, truncated, total, correct, format_ok
    (CLEAN_CORRECT, False, 1.2, True, True),  # 1 + 0.2
    ("3 * 4 = 13\nAnswer: 13", False, 0.2, False, True),  # 0 + 0.2
    ("I think 13", False, 0.0, False, False),
    ("The answer is 12", False, 1.0, True, False),
    (CLEAN_CORRECT, True, 0.7, True, True),  # 1 + 0.2 - 0.5
    ("3 * 4 = 12\n3 * 4 = 12\nAnswer: 12", False, 1.2 - 0.5 / 3, True, True),  # rep 1/3
    ("Answer: 12\nAnswer: 12\nAnswer: 12", False, 1 - 0.5 * 2 / 3 - 0.5, True, False),  # rep 2/3, multi 1
    ("Answer: 3\nAnswer: 4\nAnswer: 12", False, 0.5, True, False),  # 1 - 0.5 * 1
    ("Answer: 11\nAnswer: 12", False, 0.75, True, False),  # 1 - 0.5 * 0.5
    ("3 * 4 = 1", True, -0.5, False, False),  # cut off mid-reasoning
]


@pytest.mark.parametrize("text, truncated, total, correct, format_ok", MATH_REWARD_CASES)
def test_math_reward_values(text, truncated, total, correct, format_ok):
    result = math_reward(text, "12", truncated)
    assert result.total == pytest.approx(total)
    assert result.correct is correct
    assert result.format_ok is format_ok


def test_math_reward_logs_every_term():
    result = math_reward("Answer: 11\nAnswer: 12", "12", truncated=True)
    assert result.terms == pytest.approx({
        "correctness": 1.0,
        "format": 0.0,
        "repetition": 0.0,
        "multiple_answers": 0.5,
        "truncation": 1.0,
    })


HACKED_CORRECT_OUTPUTS = [
    # text, truncated: all end on the right answer, 12
    ("Answer: 12\n" * 10, False),  # same line repeated
    ("Answer: 12\nAnswer: 12", False),
    ("Answer: 3\nAnswer: 4\nAnswer: 12", False),  # answer spam
    ("Answer: 11\nAnswer: 12", False),
    ("3 * 4 = 12\n3 * 4 = 12\nAnswer: 12", False),  # repeated reasoning
    (CLEAN_CORRECT, True),  # cut off
    ("Answer: 12\n" * 10, True),
]


@pytest.mark.parametrize("text, truncated", HACKED_CORRECT_OUTPUTS)
def test_math_reward_clean_correct_beats_hacked(text, truncated):
    assert math_reward(CLEAN_CORRECT, "12").total > math_reward(text, "12", truncated).total


@pytest.mark.parametrize("badly_formatted", [
    "I think 13",
    "The answer is 13",
    "#### 13",
    "\\boxed{13}",
    "Answer: 13\nso that is it",
    "Answer: 11\nAnswer: 13",
])
def test_math_reward_wrong_formatted_beats_wrong_unformatted(badly_formatted):
    well_formatted = "3 * 4 = 13\nAnswer: 13"
    assert math_reward(well_formatted, "12").total > math_reward(badly_formatted, "12").total


def test_correctness_reward_fn_ignores_shaping_but_logs_it():
    result = get_reward_fn("correctness")("Answer: 11\nAnswer: 12", "12", truncated=True)
    assert result.total == 1.0
    assert result.terms["multiple_answers"] == 0.5
    assert result.terms["truncation"] == 1.0


def test_registry():
    assert set(REWARD_FUNCTIONS) == {"correctness", "math", "think"}
    assert DEFAULT_REWARD_NAME == "math"
    assert get_reward_fn("math") is math_reward


def test_unknown_reward_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*correctness, math"):
        get_reward_fn("nope")


CUSTOM_REWARDS = textwrap.dedent("""
    from dataclasses import dataclass

    CALLS = []


    def brevity(completion, **row):
        CALLS.append({"completion": completion, **row})
        return -len(completion) / 100


    def exact(completion, answer):
        return {"reward": 1.0 if completion.strip() == answer else 0.0, "correct": completion.strip() == answer}


    def is_haiku(completion):
        return completion.count("\\n") == 2


    @dataclass
    class Scored:
        value: float


    def not_a_number(completion):
        return float("nan")


    def wrong_type(completion):
        return Scored(1.0)


    def no_completion(text):
        return 0.0
""")


@pytest.fixture
def reward_file(tmp_path, monkeypatch):
    """my_rewards.py in the working directory, as a user's file would be."""
    (tmp_path / "my_rewards.py").write_text(CUSTOM_REWARDS)
    monkeypatch.chdir(tmp_path)
    return "my_rewards.py"


def test_a_single_builtin_name_is_that_function():
    assert load_reward("math")(CLEAN_CORRECT, {"gold_answer": "12"}, True) == math_reward(CLEAN_CORRECT, "12", True)
    assert load_reward("correctness").needs_numeric_gold


def test_builtin_and_custom_rewards_weighted(reward_file):
    reward = load_reward(f"math,{reward_file}:brevity", "1,0.2")
    row = {"question": "Q?", "gold_answer": "12", "source": "test", "completion": "a reference answer"}
    result = reward(CLEAN_CORRECT, row, False)
    brevity = -len(CLEAN_CORRECT) / 100  # -0.2: 20 characters
    assert result.total == pytest.approx(1.2 + 0.2 * brevity)  # math 1 + 0.2 format, + 0.2 x brevity
    assert result.correct and result.format_ok  # from math, the first reward that says
    assert result.terms["math"] == pytest.approx(1.2) and result.terms[f"{reward_file}:brevity"] == brevity
    assert result.terms["math/correctness"] == 1.0 and result.terms["math/format"] == 1.0
    # Like a TRL reward function: the completion, and every field of the row but its own "completion".
    calls = sys.modules[next(name for name in sys.modules if name.endswith("my_rewards.py"))].CALLS
    assert calls == [{"completion": CLEAN_CORRECT, "question": "Q?", "gold_answer": "12", "source": "test"}]


def test_a_custom_reward_gets_only_the_fields_it_names_and_can_say_correct(reward_file):
    reward = load_reward(f"{reward_file}:exact")
    assert not reward.needs_numeric_gold
    row = {"question": "Capital of France?", "answer": "Paris", "gold_answer": "Paris", "id": 3}
    assert reward(" Paris ", row) == RewardResult(total=1.0, correct=True, format_ok=False,
                                                  terms={f"{reward_file}:exact": 1.0})
    assert reward("Lyon", row).correct is False
    with pytest.raises(RewardSpecError, match=r"needs the field\(s\) answer.*its fields: gold_answer, id, question"):
        reward("Paris", {"question": "Q", "gold_answer": None, "id": 1})


def test_a_bool_reward_is_its_own_correctness(reward_file):
    reward = load_reward(f"{reward_file}:is_haiku")
    haiku = "an old silent pond\na frog jumps into the pond\nsplash! silence again"
    assert reward(haiku, {"prompt": "Write a haiku."}) == RewardResult(1.0, True, False, {f"{reward_file}:is_haiku": 1.0})
    assert reward("one line", {"prompt": "Write a haiku."}).total == 0.0


def test_a_plain_number_reward_is_judged_correct_by_the_numeric_gold(reward_file):
    reward = load_reward(f"{reward_file}:brevity")
    assert reward("Answer: 12", {"gold_answer": "12"}).correct is True
    assert reward("Answer: 13", {"gold_answer": "12"}).correct is False
    assert reward("Paris", {"gold_answer": "Paris"}).correct is False  # no number to compare: not judged correct
    assert reward("Answer: 12", {"prompt": "p"}).correct is False


@pytest.mark.parametrize("name, problem", [
    ("not_a_number", "returned nan: rewards must be finite"),
    ("wrong_type", "returned Scored\\(value=1.0\\): return a number, a bool, a dict"),
])
def test_an_unusable_return_value_is_an_error(reward_file, name, problem):
    with pytest.raises(RewardSpecError, match=problem):
        load_reward(f"{reward_file}:{name}")("text", {"gold_answer": "1"})


def test_a_module_function_reference(tmp_path, monkeypatch):
    (tmp_path / "task_rewards.py").write_text("def length(completion, **row):\n    return len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("task_rewards:length")("four", {}).total == 4.0


@pytest.mark.parametrize("spec, weights, problem", [
    ("nope", (), "'nope' is neither a built-in reward \\(correctness, math, think\\) nor"),
    ("missing.py:f", (), "reward file missing.py not found"),
    ("my_rewards.py:absent", (), "'absent' is not defined in my_rewards.py"),
    ("my_rewards.py:CALLS", (), "'CALLS' is not callable"),
    ("my_rewards.py:no_completion", (), "must take the keyword argument completion="),
    ("no_such_module:f", (), "cannot import module 'no_such_module'"),
    ("math,", (), "empty reward name"),
    ("math,correctness", (1.0,), "1 weights for the 2 rewards"),
    ("math", "one", "not a comma-separated list of numbers"),
    ("math,math", (), "names a reward twice"),
])
def test_bad_specs_fail_at_load_time(reward_file, spec, weights, problem):
    with pytest.raises(RewardSpecError, match=problem):
        load_reward(spec, weights)


def test_score_batch_reads_the_truncated_flags_of_a_tensor_once():
    """The sampler's truncated flags are a device tensor: one host read for the batch, not one per row
    (issue 29, finding 12); bool() of each row is a scalar read (aten._local_scalar_dense), tolist is not."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    reward = load_reward("correctness")
    rows = [{"gold_answer": "12"}] * 8
    truncated = torch.tensor([False, True] * 4)
    with Reads():
        results = score_batch(reward, [CLEAN_CORRECT] * 8, rows, truncated)
    assert len(reads) <= 1 and [r.total for r in results] == [r.total for r in score_batch(
        reward, [CLEAN_CORRECT] * 8, rows, [False, True] * 4)]


def test_score_batch_scores_each_completion_against_its_row():
    reward = load_reward("math")
    rows = [{"gold_answer": "12"}, {"gold_answer": "12"}, {"gold_answer": "5"}]
    results = score_batch(reward, [CLEAN_CORRECT, CLEAN_CORRECT, "Answer: 5"], rows, [False, True, False])
    assert all(isinstance(result, RewardResult) for result in results)
    assert [result.total for result in results] == pytest.approx([1.2, 0.7, 1.2])  # 1 + 0.2 (- 0.5 cut off)
    assert [result.total for result in score_batch(reward, [CLEAN_CORRECT], rows[:1])] == pytest.approx([1.2])
    with pytest.raises(ValueError, match="lengths differ"):
        score_batch(reward, ["Answer: 1"], rows)

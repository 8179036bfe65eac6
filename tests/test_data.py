"""Tests of common/data.py: the JSONL loaders' formats and validation, and the atomic writer."""

import json
from pathlib import Path

import pytest

from common.data import (DataError, GOLD_FIELDS, epoch_order, iter_jsonl, load_pairs, load_problems,
                         step_items, write_jsonl)
from prepare_gsm8k import convert_gsm8k_record
from tests.conftest import REPO_ROOT

GOOD_PROBLEM = '{"question": "What is 2 + 3?", "gold_answer": "5"}'
GOOD_PAIR = '{"prompt": "2 + 3 =", "chosen": "5", "rejected": "6"}'


def write_lines(tmp_path: Path, lines: list[str], name: str = "set.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_for(loader, path: Path) -> str:
    with pytest.raises(DataError) as caught:
        loader(path)
    return str(caught.value)


def test_problems_load_with_extra_fields_and_answers_as_strings(tmp_path):
    path = write_lines(tmp_path, [
        '{"question": "What is 2 + 3?", "gold_answer": "5", "solution": "2 + 3 = 5\\nAnswer: 5"}',
        '{"question": "What is 10 * 10?", "gold_answer": 100}',
        '{"question": "Half of 1?", "gold_answer": 0.5}',
        '{"question": "Twice 6.0?", "gold_answer": 12.0}',
        '{"question": "A thousand and one?", "gold_answer": " 1,001 "}',
        '{"question": "5 - 12?", "gold_answer": "-7"}',
    ])
    assert load_problems(path) == [
        {"question": "What is 2 + 3?", "gold_answer": "5", "solution": "2 + 3 = 5\nAnswer: 5"},
        {"question": "What is 10 * 10?", "gold_answer": "100"},
        {"question": "Half of 1?", "gold_answer": "0.5"},
        {"question": "Twice 6.0?", "gold_answer": "12"},
        {"question": "A thousand and one?", "gold_answer": "1001"},
        {"question": "5 - 12?", "gold_answer": "-7"},
    ]


def test_blank_lines_are_skipped_and_line_numbers_still_count_them(tmp_path):
    path = write_lines(tmp_path, [GOOD_PROBLEM, "", "   ", GOOD_PROBLEM, '{"question": "x?"}'])
    message = error_for(load_problems, path)
    assert message.startswith(f"{path}:5: no gold answer: none of the fields gold_answer, answer, solution, "
                              f"ground_truth (the line's fields are question; name yours with GOLD_FIELD)")

    path = write_lines(tmp_path, ["", GOOD_PROBLEM, "", GOOD_PROBLEM, ""])
    assert len(load_problems(path)) == 2


def test_limit_stops_early(tmp_path):
    # The broken fourth line is never read when the limit is reached first.
    path = write_lines(tmp_path, [GOOD_PROBLEM] * 3 + ["{broken"])
    assert len(load_problems(path, limit=2)) == 2
    assert len(load_problems(path, limit=3)) == 3
    assert load_problems(path, limit=0) == []
    with pytest.raises(DataError):
        load_problems(path, limit=4)
    with pytest.raises(ValueError):
        load_problems(path, limit=-1)


def test_bad_json_names_file_line_and_the_json_error(tmp_path):
    path = write_lines(tmp_path, [GOOD_PROBLEM, GOOD_PROBLEM, '{"question": "x", "gold_answer": }'])
    message = error_for(load_problems, path)
    assert message.startswith(f"{path}:3: bad JSON (Expecting value")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"text"', "str"), ("7", "int")])
def test_a_line_that_is_not_an_object(tmp_path, line, kind):
    path = write_lines(tmp_path, [GOOD_PROBLEM, line])
    assert error_for(load_problems, path) == f"{path}:2: expected a JSON object, got {kind}"


@pytest.mark.parametrize("line, problem", [
    ('{"gold_answer": "5"}', "no 'question' or 'prompt' field; expected {\"question\", \"gold_answer\"}, "
                             "raw GSM8K {\"question\", \"answer\"}, or TRL's {\"prompt\", ...}"),
    ('{"question": "", "gold_answer": "5"}', "empty question"),
    ('{"question": "  \\n ", "gold_answer": "5"}', "empty question"),
    ('{"question": 12, "gold_answer": "5"}', "field 'question' must be a string, got int"),
    ('{"question": "Q?", "gold_answer": "five"}', "gold_answer 'five' is not a number"),
    ('{"question": "Q?", "gold_answer": ""}', "gold_answer '' is not a number"),
    ('{"question": "Q?", "gold_answer": "nan"}', "gold_answer 'nan' is not a number"),
    ('{"question": "Q?", "gold_answer": "1/0"}', "gold_answer '1/0' is not a number"),
    ('{"question": "Q?", "gold_answer": null}', "gold_answer must be a string or number, got NoneType"),
    ('{"question": "Q?", "gold_answer": true}', "gold_answer must be a string or number, got bool"),
    ('{"question": "Q?", "answer": "12 apples"}', "answer '12 apples' is not a number (raw GSM8K lines are "
                                                  "{\"question\", \"answer\": \"... #### 72\"}; `python prepare_gsm8k.py "
                                                  "--TRAIN_FILE=train.jsonl --TEST_FILE=test.jsonl` converts them)"),
    ('{"question": "Q?", "answer": "So 5.\\n#### five"}', "the final answer after '####' in answer, 'five', "
                                                         "is not a number"),
    ('{"prompt": "Q?", "gold_answer": "5"}', "a standard line, but line 1 is question (one format per file)"),
])
def test_invalid_problems(tmp_path, line, problem):
    path = write_lines(tmp_path, [GOOD_PROBLEM, GOOD_PROBLEM, GOOD_PROBLEM, line])
    assert error_for(load_problems, path) == f"{path}:4: {problem}"


def test_pairs_load(tmp_path):
    path = write_lines(tmp_path, [GOOD_PAIR, "", '{"prompt": "p", "chosen": "a", "rejected": "b", "id": 3}'])
    # A TRL prompt is the user's own: the row says it is (its text is also its "question").
    assert load_pairs(path) == [
        {"prompt": "2 + 3 =", "chosen": "5", "rejected": "6", "question": "2 + 3 ="},
        {"prompt": "p", "chosen": "a", "rejected": "b", "id": 3, "question": "p"},
    ]
    assert load_pairs(path, limit=1) == [{"prompt": "2 + 3 =", "chosen": "5", "rejected": "6", "question": "2 + 3 ="}]


def test_pairs_of_bare_questions_and_trl_conversations(tmp_path):
    own = write_lines(tmp_path, ['{"question": "What is 2 + 3?", "chosen": "5", "rejected": "6", "gold_answer": "5"}'],
                      "own.jsonl")
    assert load_pairs(own) == [{"question": "What is 2 + 3?", "chosen": "5", "rejected": "6", "gold_answer": "5"}]
    conversation = {"prompt": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Write a haiku about autumn."}],
                    "chosen": [{"role": "assistant", "content": "Leaves fall"}],
                    "rejected": [{"role": "assistant", "content": "No."}]}
    path = write_lines(tmp_path, [json.dumps(conversation)], "conversational.jsonl")
    assert load_pairs(path) == [{"prompt": conversation["prompt"], "chosen": "Leaves fall", "rejected": "No.",
                                 "question": "Write a haiku about autumn."}]


@pytest.mark.parametrize("line, problem", [
    ('{"chosen": "a", "rejected": "b"}', "no 'question' or 'prompt' field; expected "
                                         "{\"question\" or \"prompt\", \"chosen\", \"rejected\"}"),
    ('{"prompt": "p", "rejected": "b"}', "missing field 'chosen'"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "empty prompt"),
    ('{"prompt": "p", "chosen": " ", "rejected": "b"}', "empty chosen"),
    ('{"prompt": "p", "chosen": "a", "rejected": 5}', "field 'rejected' must be a string or a conversation, got int"),
    ('{"prompt": "p", "chosen": "a", "rejected": ["b"]}',
     "rejected[0] must be a message {\"role\": str, \"content\": str}, got \"b\""),
    ('{"prompt": "p", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"rejected": "b"}', "chosen must be one assistant message, got the roles ['user', 'assistant']"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "chosen and rejected are the same text"),
    ('{"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}',
     "a conversational line, but line 1 is standard (one format per file)"),
    ('{"prompt": "p", "chosen": "a",', None),
])
def test_invalid_pairs(tmp_path, line, problem):
    path = write_lines(tmp_path, [GOOD_PAIR, line])
    message = error_for(load_pairs, path)
    if problem is None:
        assert message.startswith(f"{path}:2: bad JSON (")
    else:
        assert message == f"{path}:2: {problem}"


def test_problems_load_with_golds_in_any_common_form(tmp_path):
    path = write_lines(tmp_path, [
        '{"question": "Price?", "gold_answer": "$7"}',
        '{"question": "Many?", "gold_answer": "1,000"}',
        '{"question": "Debt?", "gold_answer": "-$5"}',
        '{"question": "Half?", "gold_answer": "1/2"}',
        '{"question": "Big?", "gold_answer": "1.2e3"}',
        '{"question": "Boxed?", "solution": "So the total is \\\\boxed{42}."}',
        '{"question": "Sheep?", "answer": "4 + 5 = 9 sheep.\\n#### 9", "gold_answer": "9"}',
    ])
    assert [problem["gold_answer"] for problem in load_problems(path)] == ["7", "1000", "-5", "1/2", "1.2e3", "42", "9"]


def test_gold_fields_are_read_in_order_or_as_named(tmp_path):
    assert GOLD_FIELDS == ("gold_answer", "answer", "solution", "ground_truth")
    path = write_lines(tmp_path, ['{"question": "Q?", "answer": "3", "solution": "4", "ground_truth": "5", "label": "6"}'])
    assert load_problems(path)[0]["gold_answer"] == "3"
    assert load_problems(path, gold_field="label")[0]["gold_answer"] == "6"
    message = error_for(lambda p: load_problems(p, gold_field="target"), path)
    assert message == (f"{path}:1: missing field 'target' (the GOLD_FIELD); the line's fields are question, answer, "
                       f"solution, ground_truth, label")


def test_raw_gsm8k_loads_with_the_number_after_the_hashes(tmp_path):
    """The gold is what prepare_gsm8k.py's converter (a separate implementation) makes of the same line."""
    raw_file = REPO_ROOT / "tests" / "fixtures" / "gsm8k_train_sample.jsonl"
    problems = load_problems(raw_file)
    expected = [convert_gsm8k_record(record)["gold_answer"] for _, record in iter_jsonl(raw_file)]
    assert [problem["gold_answer"] for problem in problems] == expected and "37500" in expected
    assert problems[0]["answer"].endswith("#### 750")  # the raw fields stay, for a reward that reads them


def test_a_question_without_any_gold_points_at_prepare_gsm8k(tmp_path):
    path = write_lines(tmp_path, ['{"question": "Q?", "steps": "4 + 5 = 9"}'])
    message = error_for(load_problems, path)
    assert "none of the fields gold_answer, answer, solution, ground_truth" in message
    assert "python prepare_gsm8k.py" in message


def test_trl_standard_and_conversational_prompts(tmp_path):
    standard = write_lines(tmp_path, ['{"prompt": "2 + 2 =", "ground_truth": "4", "id": 9}'], "standard.jsonl")
    assert load_problems(standard) == [{"prompt": "2 + 2 =", "ground_truth": "4", "id": 9, "gold_answer": "4",
                                        "question": "2 + 2 ="}]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "3 + 4?"}]
    conversational = write_lines(tmp_path, [json.dumps({"prompt": messages, "solution": "\\boxed{7}"})], "chat.jsonl")
    assert load_problems(conversational) == [{"prompt": messages, "solution": "\\boxed{7}", "gold_answer": "7",
                                              "question": "3 + 4?"}]


def test_a_gold_is_optional_and_may_be_text_for_a_reward_of_your_own(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "Capital of France?", "answer": "Paris"}',
                                  '{"prompt": "Write a haiku."}', '{"prompt": "Price?", "answer": "$7"}'])
    assert [p["gold_answer"] for p in load_problems(path, numeric_gold=False)] == ["Paris", None, "7"]
    assert error_for(load_problems, path).splitlines() == [
        f"{path}:1: answer 'Paris' is not a number",
        f"{path}:2: no gold answer: none of the fields gold_answer, answer, solution, ground_truth (the line's "
        f"fields are prompt; name yours with GOLD_FIELD)"]


@pytest.mark.parametrize("prompt, problem", [
    ([], "prompt is an empty conversation"),
    ([{"role": "user"}], 'prompt[0] must be a message {"role": str, "content": str}, got {"role": "user"}'),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "prompt[0] must be a message"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "prompt ends with an assistant message; the answer to generate must follow a user turn"),
    (7, "field 'prompt' must be a string or a list of messages, got int"),
])
def test_invalid_conversations(tmp_path, prompt, problem):
    good = json.dumps({"prompt": [{"role": "user", "content": "2 + 3?"}], "gold_answer": "5"})
    path = write_lines(tmp_path, [good, json.dumps({"prompt": prompt, "gold_answer": "1"})])
    assert error_for(load_problems, path).startswith(f"{path}:2: {problem}")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_missing_files_name_the_path_and_the_script_that_makes_them(tmp_path):
    data_dir = tmp_path / "data"
    cases = [
        (data_dir / "gsm8k_test.jsonl", "prepare_gsm8k.py"),
        (data_dir / "synth_train.jsonl", "make_synth_data.py"),
        (data_dir / "my_pairs.jsonl", None),
        (tmp_path / "gsm8k_test.jsonl", None),
    ]
    for path, script in cases:
        for loader in (load_problems, load_pairs):
            with pytest.raises(FileNotFoundError) as caught:
                loader(path)
            message = str(caught.value)
            assert str(path) in message
            if script is None:
                assert ".py" not in message
            else:
                assert f"python {script}" in message


def test_write_jsonl_round_trip_creates_directories(tmp_path):
    rows = [
        {"question": "Zoë has 3 café tables. How many?", "gold_answer": "3", "solution": "Answer: 3"},
        {"question": "Line\nbreak?", "gold_answer": "12"},
    ]
    path = tmp_path / "a" / "b" / "rows.jsonl"
    assert write_jsonl(path, rows) == 2
    assert load_problems(path) == rows
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert "Zoë" in path.read_text(encoding="utf-8")
    assert write_jsonl(path, []) == 0
    assert path.read_text() == ""


def test_write_jsonl_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"question": "old?", "gold_answer": "1"}])
    before = path.read_bytes()

    def rows():
        yield {"question": "new?", "gold_answer": "2"}
        raise RuntimeError("generator failed half way")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    with pytest.raises(TypeError):
        write_jsonl(path, [{"question": "new?", "gold_answer": "2"}, {"not json": object()}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_epoch_order_depends_on_seed_and_epoch_only():
    from common.data import epoch_order

    first = epoch_order(50, seed=3, epoch=0)
    assert sorted(first) == list(range(50))  # a permutation: every item once
    assert epoch_order(50, seed=3, epoch=0) == first
    assert epoch_order(50, seed=3, epoch=1) != first
    assert epoch_order(50, seed=4, epoch=0) != first


def test_step_items_are_consecutive_slices_of_each_epochs_order():
    """10 items, 3 per step: 3 steps per epoch (the 10th item of an epoch's order is skipped), and
    step 3 starts epoch 1 with epoch 1's order."""
    assert step_items(10, seed=4, step=0, items_per_step=3) == (0, epoch_order(10, 4, 0)[0:3])
    assert step_items(10, seed=4, step=2, items_per_step=3) == (0, epoch_order(10, 4, 0)[6:9])
    assert step_items(10, seed=4, step=3, items_per_step=3) == (1, epoch_order(10, 4, 1)[0:3])

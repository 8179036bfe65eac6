"""Tests of common/data.py: the JSONL loaders' validation and the atomic writer."""

import json
from pathlib import Path

import pytest

from common.data import DataError, epoch_order, load_pairs, load_problems, open_metrics_log, step_items, write_jsonl

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
    assert message == f"{path} line 5: missing field 'gold_answer'"

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
    assert message.startswith(f"{path} line 3: bad JSON (Expecting value")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"text"', "str"), ("7", "int")])
def test_a_line_that_is_not_an_object(tmp_path, line, kind):
    path = write_lines(tmp_path, [GOOD_PROBLEM, line])
    assert error_for(load_problems, path) == f"{path} line 2: expected a JSON object, got {kind}"


@pytest.mark.parametrize("line, problem", [
    ('{"gold_answer": "5"}', "missing field 'question'"),
    ('{"question": "What is 2 + 3?"}', "missing field 'gold_answer'"),
    ('{"question": "", "gold_answer": "5"}', "empty question"),
    ('{"question": "  \\n ", "gold_answer": "5"}', "empty question"),
    ('{"question": 12, "gold_answer": "5"}', "field 'question' must be a string, got int"),
    ('{"question": "Q?", "gold_answer": "five"}', "gold_answer 'five' is not a number"),
    ('{"question": "Q?", "gold_answer": ""}', "gold_answer '' is not a number"),
    ('{"question": "Q?", "gold_answer": "nan"}', "gold_answer 'nan' is not a number"),
    ('{"question": "Q?", "gold_answer": "1/2"}', "gold_answer '1/2' is not a number"),
    ('{"question": "Q?", "gold_answer": null}', "gold_answer must be a string or number, got NoneType"),
    ('{"question": "Q?", "gold_answer": true}', "gold_answer must be a string or number, got bool"),
])
def test_invalid_problems(tmp_path, line, problem):
    path = write_lines(tmp_path, [GOOD_PROBLEM, GOOD_PROBLEM, GOOD_PROBLEM, line])
    assert error_for(load_problems, path) == f"{path} line 4: {problem}"


def test_pairs_load(tmp_path):
    path = write_lines(tmp_path, [GOOD_PAIR, "", '{"prompt": "p", "chosen": "a", "rejected": "b", "id": 3}'])
    assert load_pairs(path) == [
        {"prompt": "2 + 3 =", "chosen": "5", "rejected": "6"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "id": 3},
    ]
    assert load_pairs(path, limit=1) == [{"prompt": "2 + 3 =", "chosen": "5", "rejected": "6"}]


@pytest.mark.parametrize("line, problem", [
    ('{"chosen": "a", "rejected": "b"}', "missing field 'prompt'"),
    ('{"prompt": "p", "rejected": "b"}', "missing field 'chosen'"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "empty prompt"),
    ('{"prompt": "p", "chosen": " ", "rejected": "b"}', "empty chosen"),
    ('{"prompt": "p", "chosen": "a", "rejected": ["b"]}', "field 'rejected' must be a string, got list"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "chosen and rejected are the same text"),
    ('{"prompt": "p", "chosen": "a",', None),
])
def test_invalid_pairs(tmp_path, line, problem):
    path = write_lines(tmp_path, [GOOD_PAIR, line])
    message = error_for(load_pairs, path)
    if problem is None:
        assert message.startswith(f"{path} line 2: bad JSON (")
    else:
        assert message == f"{path} line 2: {problem}"


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


def test_metrics_log_appends_on_resume_and_writes_nothing_off_rank_zero(tmp_path):
    path = tmp_path / "runs" / "run.jsonl"
    with open_metrics_log(path, append=False, is_main=True) as log:
        log.write("first\n")
    with open_metrics_log(path, append=True, is_main=True) as log:  # a resumed run continues its file
        log.write("second\n")
    assert path.read_text() == "first\nsecond\n"
    with open_metrics_log(path, append=False, is_main=False) as log:  # another rank: nothing written
        log.write("other rank\n")
    assert path.read_text() == "first\nsecond\n"
    with open_metrics_log(path, append=False, is_main=True) as log:  # a new run starts the file anew
        log.write("new\n")
    assert path.read_text() == "new\n"


def test_step_items_are_consecutive_slices_of_each_epochs_order():
    """10 items, 3 per step: 3 steps per epoch (the 10th item of an epoch's order is skipped), and
    step 3 starts epoch 1 with epoch 1's order."""
    assert step_items(10, seed=4, step=0, items_per_step=3) == (0, epoch_order(10, 4, 0)[0:3])
    assert step_items(10, seed=4, step=2, items_per_step=3) == (0, epoch_order(10, 4, 0)[6:9])
    assert step_items(10, seed=4, step=3, items_per_step=3) == (1, epoch_order(10, 4, 1)[0:3])

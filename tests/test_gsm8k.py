"""Tests of prepare_gsm8k.py: record conversion, leakage removal and an offline run on fixtures."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from common.data import load_problems
from prepare_gsm8k import GSM8KFormatError, convert_gsm8k_record, split_without_leakage

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path("tests") / "fixtures"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "prepare_gsm8k.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_convert_removes_annotations_and_commas():
    record = {
        "question": "A school buys 3 buses for $12,500 each. How much does the school spend?",
        "answer": "Each bus costs $12,500.\nThe buses cost 3 * 12,500 = $<<3*12500=37500>>37,500.\n"
                  "#### 37,500",
    }
    assert convert_gsm8k_record(record) == {
        "question": "A school buys 3 buses for $12,500 each. How much does the school spend?",
        "gold_answer": "37500",
        "solution": "Each bus costs $12,500.\nThe buses cost 3 * 12,500 = $37,500.\nAnswer: 37500",
    }


def test_convert_negative_and_several_annotations_on_a_line():
    record = {
        "question": "It was 5 degrees, fell 12 and then fell 3 more. What is the temperature?",
        "answer": "5 - 12 = <<5-12=-7>>-7 and -7 - 3 = <<-7-3=-10>>-10\n\n#### -10  ",
    }
    assert convert_gsm8k_record(record) == {
        "question": "It was 5 degrees, fell 12 and then fell 3 more. What is the temperature?",
        "gold_answer": "-10",
        "solution": "5 - 12 = -7 and -7 - 3 = -10\nAnswer: -10",
    }


def test_convert_a_final_answer_without_reasoning():
    record = {"question": "What is 1,000 + 1?", "answer": "#### 1,001"}
    assert convert_gsm8k_record(record) == {
        "question": "What is 1,000 + 1?", "gold_answer": "1001", "solution": "Answer: 1001"}


def test_missing_final_answer_names_the_record():
    record = {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4"}
    with pytest.raises(GSM8KFormatError, match=r"^train\.jsonl record 7: answer has no '####"):
        convert_gsm8k_record(record, index=7, source="train.jsonl")
    with pytest.raises(ValueError, match=r"^GSM8K record: "):
        convert_gsm8k_record(record)


@pytest.mark.parametrize("record, problem", [
    ({"question": "Q?", "answer": "#### four"}, "final answer 'four' is not a number"),
    ({"question": "Q?", "answer": "####"}, "final answer '' is not a number"),
    ({"question": " ", "answer": "#### 4"}, "missing or empty 'question'"),
    ({"answer": "#### 4"}, "missing or empty 'question'"),
    ({"question": "Q?"}, "missing 'answer' text"),
])
def test_malformed_records(record, problem):
    with pytest.raises(GSM8KFormatError) as caught:
        convert_gsm8k_record(record, index=2)
    assert str(caught.value) == f"GSM8K record 2: {problem}"


def test_split_without_leakage_drops_train_questions_found_in_test():
    train = [
        {"question": "How many legs do 3 spiders have?", "gold_answer": "24"},
        {"question": "  HOW many legs do 3   spiders have ", "gold_answer": "24"},
        {"question": "How many legs do 4 spiders have?", "gold_answer": "32"},
        {"question": "What is 2 + 2?", "gold_answer": "4"},
    ]
    test = [{"question": "How many legs do 3 spiders have?", "gold_answer": "24"}]
    kept, dropped = split_without_leakage(train, test)
    assert dropped == 2
    assert kept == [
        {"question": "How many legs do 4 spiders have?", "gold_answer": "32"},
        {"question": "What is 2 + 2?", "gold_answer": "4"},
    ]
    assert split_without_leakage(train, []) == (train, 0)


def test_script_converts_local_files(tmp_path):
    result = run_script(f"--TRAIN_FILE={FIXTURES / 'gsm8k_train_sample.jsonl'}",
                        f"--TEST_FILE={FIXTURES / 'gsm8k_test_sample.jsonl'}",
                        f"--OUT_DIR={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "dropped 1 train problems" in result.stdout
    assert load_problems(tmp_path / "out" / "gsm8k_train.jsonl") == [
        {"question": "A farm has 1,200 chickens and sells 450 of them. How many chickens are left?",
         "gold_answer": "750",
         "solution": "The farm has 1,200 - 450 = 750 chickens left.\nAnswer: 750"},
        {"question": "Tom has 48 cards and gives half of them to his sister. How many cards does Tom keep?",
         "gold_answer": "24",
         "solution": "Half of 48 is 48/2 = 24.\nTom keeps 24 cards.\nAnswer: 24"},
        {"question": "A school buys 3 buses for $12,500 each. How much does the school spend?",
         "gold_answer": "37500",
         "solution": "The buses cost 3 * 12,500 = $37,500.\nAnswer: 37500"},
    ]
    assert load_problems(tmp_path / "out" / "gsm8k_test.jsonl") == [
        {"question": "How many legs do 3 spiders have if each spider has 8 legs?",
         "gold_answer": "24",
         "solution": "Each spider has 8 legs, so 3 * 8 = 24 legs.\nAnswer: 24"},
        {"question": "The temperature was 5 degrees in the morning and fell by 12 degrees. "
                     "What is the temperature now?",
         "gold_answer": "-7",
         "solution": "5 - 12 = -7\nThe temperature is -7 degrees.\nAnswer: -7"},
    ]


def test_script_names_the_broken_record(tmp_path):
    broken = tmp_path / "train.jsonl"
    broken.write_text('{"question": "Q1?", "answer": "#### 1"}\n{"question": "Q2?", "answer": "2"}\n')
    result = run_script(f"--TRAIN_FILE={broken}", f"--TEST_FILE={FIXTURES / 'gsm8k_test_sample.jsonl'}",
                        f"--OUT_DIR={tmp_path / 'out'}")
    assert result.returncode != 0
    assert f"{broken} record 2: answer has no '####" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # the folder checked, nothing written


def test_existing_outputs_are_refused_before_any_work_unless_overwrite(tmp_path):
    local = [f"--TRAIN_FILE={FIXTURES / 'gsm8k_train_sample.jsonl'}", f"--TEST_FILE={FIXTURES / 'gsm8k_test_sample.jsonl'}"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "gsm8k_test.jsonl").write_text("my own test split\n")  # the second output only: both are checked first
    result = run_script(*local, f"--OUT_DIR={out}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: OUT_DIR={out / 'gsm8k_test.jsonl'} exists; give another --OUT_DIR, or replace it with --OVERWRITE=true"]
    assert sorted(path.name for path in out.iterdir()) == ["gsm8k_test.jsonl"]  # nothing written, nothing replaced
    assert (out / "gsm8k_test.jsonl").read_text() == "my own test split\n"
    result = run_script(*local, f"--OUT_DIR={out}", "--OVERWRITE=true")
    assert result.returncode == 0, result.stderr
    assert len(load_problems(out / "gsm8k_test.jsonl")) == 2


def test_help_works_offline():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for name in ("OUT_DIR", "SOURCE", "CONFIG_NAME", "TRAIN_FILE", "TEST_FILE"):
        assert f"--{name}" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None,
                    reason="with pyarrow the script would try the network")
def test_download_without_pyarrow_says_what_to_do(tmp_path):
    result = run_script(f"--OUT_DIR={tmp_path}")
    assert result.returncode != 0
    assert "pip install pyarrow" in result.stderr
    assert "--TRAIN_FILE" in result.stderr

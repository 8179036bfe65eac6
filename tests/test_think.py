"""Visible reasoning: the INSTRUCTION=think preset and the "think" reward (common/prompts.py,
common/reward.py), on hand-worked completions, then through run_train_grpo.py and eval_math.py."""

import json

import pytest

from common.model import load_tokenizer
from common.prompts import INSTRUCTION, THINK_INSTRUCTION, configure_prompts, format_prompt
from common.reward import load_reward, math_reward, think_answer_part, think_reward
from tests.conftest import TINY_MODEL_DIR, run_script

QUESTION = "Mia has 3 apples. She buys 4 more. How many apples does Mia have?"
GOLD = "7"


# ---------------------------------------------------------------- the preset
def test_think_preset_is_the_think_instruction():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    assert configure_prompts(tokenizer, "think").instruction == THINK_INSTRUCTION
    assert "<think>" in THINK_INSTRUCTION and "</think>" in THINK_INSTRUCTION and "Answer: <number>" in THINK_INSTRUCTION
    text = format_prompt(tokenizer, QUESTION, configure_prompts(tokenizer, "think"))
    assert text == f"<bos><start_of_turn>user\n{THINK_INSTRUCTION}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"


def test_math_preset_is_the_default_and_other_text_is_kept():
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    assert configure_prompts(tokenizer, "math").instruction == INSTRUCTION
    assert configure_prompts(tokenizer).instruction == INSTRUCTION
    assert configure_prompts(tokenizer, "Think hard.").instruction == "Think hard."  # not a preset: the text itself
    assert configure_prompts(tokenizer, "").instruction == ""


# ---------------------------------------------------------------- the reward, worked by hand
# Each case: the completion, then the terms worked out by hand, and the total. Correctness is read after
# </think> only. Format pays the shape with one "Answer: <number>" line, the last, after </think>. Repetition
# is the share of non-empty lines that repeat an earlier one. Multiple answers costs 0.5 per Answer: line
# beyond one. The total weighs them 1, 0.2, -0.5 and -0.5 (and -0.5 more when truncated).
CLEAN = "<think>\nMia has 3 apples and buys 4 more: 3 + 4 = 7.\n</think>\nAnswer: 7"
CASES = {
    # the shape, right: paid 1 + 0.2
    "clean and right": (CLEAN, dict(correctness=1, format=1, repetition=0, multiple_answers=0), 1.2),
    # the shape, wrong: the format bonus alone
    "clean and wrong": (CLEAN.replace("Answer: 7", "Answer: 8"),
                        dict(correctness=0, format=1, repetition=0, multiple_answers=0), 0.2),
    # one line, white space before <think>: the same shape ("Answer:" may follow spaces on its line)
    "inline": ("  <think>3 + 4 = 7</think> Answer: 7", dict(correctness=1, format=1, repetition=0, multiple_answers=0),
               1.2),
    # the hack "answer inside the reasoning only": nothing after </think>, so nothing to read
    "answer inside the block only": ("<think>\n3 + 4 = 7\nAnswer: 7\n</think>",
                                     dict(correctness=0, format=0, repetition=0, multiple_answers=0), 0.0),
    # two blocks: <think> twice, not the shape; and the tag lines repeat: 7 non-empty lines, 5 distinct
    # -> repetition 2/7, total -0.5 * 2/7 = -1/7
    "two blocks": ("<think>\n3 + 4 = 7\n</think>\n<think>\nchecked\n</think>\nAnswer: 7",
                   dict(correctness=0, format=0, repetition=2 / 7, multiple_answers=0), -1 / 7),
    # an empty block (white space only) is no reasoning
    "empty reasoning": ("<think>\n  \n</think>\nAnswer: 7", dict(correctness=0, format=0, repetition=0,
                                                                 multiple_answers=0), 0.0),
    # text after the answer line: the answer is in its place (paid), the format bonus is not
    "text after the answer": (CLEAN + "\nHope this helps!", dict(correctness=1, format=0, repetition=0,
                                                                  multiple_answers=0), 1.0),
    # tags in the wrong order
    "closing tag first": ("</think>\n3 + 4 = 7\n<think>\nAnswer: 7", dict(correctness=0, format=0, repetition=0,
                                                                          multiple_answers=0), 0.0),
    # no block at all: the math reward's shape is not this one
    "no block": ("3 + 4 = 7\nAnswer: 7", dict(correctness=0, format=0, repetition=0, multiple_answers=0), 0.0),
    # words before the block: the reply must open with the reasoning
    "text before the block": ("Sure!\n" + CLEAN, dict(correctness=0, format=0, repetition=0, multiple_answers=0), 0.0),
    # a block never closed (cut off in the reasoning)
    "unclosed block": ("<think>\n3 + 4 = 7\nAnswer: 7", dict(correctness=0, format=0, repetition=0,
                                                             multiple_answers=0), 0.0),
    # a line repeated in the reasoning: 5 non-empty lines, 4 distinct -> 1/5; 1 + 0.2 - 0.5 * 0.2 = 1.1
    "repeated line": ("<think>\n3 + 4 = 7\n3 + 4 = 7\n</think>\nAnswer: 7",
                      dict(correctness=1, format=1, repetition=0.2, multiple_answers=0), 1.1),
    # hedging after the block: two Answer: lines, the last (8) is read; format needs one -> 0 - 0.5 * 0.5 = -0.25
    "two answers after": ("<think>\n3 + 4 = 7\n</think>\nAnswer: 7\nAnswer: 8",
                          dict(correctness=0, format=0, repetition=0, multiple_answers=0.5), -0.25),
}


@pytest.mark.parametrize("name", CASES)
def test_think_reward_on_hand_worked_completions(name):
    text, terms, total = CASES[name]
    result = think_reward(text, GOLD)
    assert {key: result.terms[key] for key in terms} == pytest.approx(terms)
    assert result.terms["truncation"] == 0
    assert result.total == pytest.approx(total)
    assert result.correct == (terms["correctness"] == 1) and result.format_ok == (terms["format"] == 1)


def test_a_cut_off_completion_pays_the_truncation_penalty():
    assert think_reward(CLEAN, GOLD, truncated=True).total == pytest.approx(1.2 - 0.5)


def test_the_answer_part_is_what_follows_the_closing_tag():
    assert think_answer_part(CLEAN) == "\nAnswer: 7"
    assert think_answer_part("<think>x</think>") == ""  # the shape, with nothing after it
    assert think_answer_part("<think></think>Answer: 7") is None


def test_the_math_reward_pays_the_hack_the_think_reward_refuses():
    hack = CASES["answer inside the block only"][0]
    assert math_reward(hack, GOLD).correct and math_reward(hack, GOLD).total == pytest.approx(1.0)
    assert not think_reward(hack, GOLD).correct and think_reward(hack, GOLD).total == 0


def test_think_is_a_named_reward_of_a_spec():
    reward = load_reward("think")
    result = reward(CLEAN, {"question": QUESTION, "gold_answer": GOLD})
    assert result.total == pytest.approx(1.2) and result.correct and result.format_ok
    doubled = load_reward("think", "2")(CLEAN, {"gold_answer": GOLD})
    assert doubled.total == pytest.approx(2.4) and doubled.terms["think"] == pytest.approx(1.2)


# ---------------------------------------------------------------- the scripts
TINY_EVAL = ["eval_math.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=6",
             "--MAX_NEW_TOKENS=24", "--DEVICE=cpu"]


def records_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_with_the_preset_and_the_think_reward(tmp_path):
    """The preset's name reaches the prompts as its text (the same greedy outputs as the text given
    itself), and REWARD=think is what judges them: the tiny model writes no <think> block, so under
    the default instruction its right answers (the records' predictions) are not counted."""
    runs = {"preset": ["--INSTRUCTION=think", "--REWARD=think"], "text": [f"--INSTRUCTION={THINK_INSTRUCTION}"],
            "default": ["--REWARD=think"]}
    records, stdout = {}, {}
    for name, settings in runs.items():
        stdout[name] = run_script([*TINY_EVAL, *settings, f"--OUT_FILE={tmp_path / name}.jsonl"]).stdout
        records[name] = records_of(tmp_path / f"{name}.jsonl")
        assert len(records[name]) == 6
    assert [r["output"] for r in records["preset"]] == [r["output"] for r in records["text"]]
    for name in ("preset", "default"):
        assert "Correct: 0 " in stdout[name] and not any(record["correct"] for record in records[name])
    assert any(record["prediction"] == float(record["gold"]) for record in records["default"])


def test_grpo_runs_with_the_preset_and_the_think_reward(tmp_path):
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                         "--NUM_SAMPLES_PER_PROMPT=2", "--MAX_NEW_TOKENS=16", "--MAX_STEPS=2", "--EVAL_EVERY=2",
                         "--EVAL_LIMIT=2", "--LORA_R=4", "--DEVICE=cpu", "--INSTRUCTION=think", "--REWARD=think",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=think"])
    assert "step 2/2" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "think.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    # The tiny model does not write the tags (a plumbing test, not a learning one): the think reward
    # pays no correctness and no format, only penalties, and the evals count nothing correct.
    for m in metrics[1:]:
        assert m["accuracy"] == 0 and m["format_rate"] == 0 and m["reward"] <= 0
    assert metrics[0]["eval/accuracy"] == 0 and metrics[2]["eval/accuracy"] == 0
    assert (tmp_path / "think" / "lora_epoch0_step2.pt").is_file()

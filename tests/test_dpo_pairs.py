"""dpo/pairs.py's pair building and eval-question exclusion, and make_dpo_pairs.py for real."""

import json

import pytest

from common.data import load_pairs
from common.reward import correctness_reward
from dpo.pairs import build_pairs, exclude_eval_questions
from tests.conftest import TINY_MODEL_DIR, run_script


def test_build_pairs_picks_best_correct_and_worst_incorrect_and_counts_skips():
    problems = [{"question": q, "gold_answer": g} for q, g in [("mixed", "1"), ("all right", "2"), ("all wrong", "3"),
                                                              ("ties", "4")]]
    texts = [["c low", "w high", "c high", "w low"], ["a", "b"], ["x", "y"], ["c1", "c2", "w1", "w2"]]
    correct = [[True, False, True, False], [True, True], [False, False], [True, True, False, False]]
    rewards = [[1.0, 0.2, 1.2, -0.5], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    pairs, counts = build_pairs(problems, texts, correct, rewards)
    assert pairs == [
        {"question": "mixed", "chosen": "c high", "rejected": "w low", "gold_answer": "1"},
        {"question": "ties", "chosen": "c1", "rejected": "w1", "gold_answer": "4"},  # ties: earliest sample
    ]
    assert counts == {"questions": 4, "pairs": 2, "skipped_all_correct": 1, "skipped_all_wrong": 1}


def test_build_pairs_never_picks_a_blank_answer():
    problems = [{"question": "q", "gold_answer": "1"}, {"question": "r", "gold_answer": "2"}]
    pairs, counts = build_pairs(problems, [["right", "  "], ["right", "", "wrong"]],
                                [[True, False], [True, False, False]], [[1.0, -1.0], [1.0, -1.0, 0.0]])
    assert pairs == [{"question": "r", "chosen": "right", "rejected": "wrong", "gold_answer": "2"}]
    assert counts["skipped_all_correct"] == 1


def test_a_problem_with_its_own_prompt_keeps_it_in_its_pair():
    """A bare question is wrapped in the instruction again when trained on; a TRL prompt stays as given."""
    messages = [{"role": "user", "content": "Write a haiku about autumn."}]
    problems = [{"prompt": messages, "question": "Write a haiku about autumn.", "gold_answer": None}]
    pairs, _ = build_pairs(problems, [["good", "bad"]], [[True, False]], [[1.0, 0.0]])
    assert pairs == [{"prompt": messages, "chosen": "good", "rejected": "bad", "gold_answer": None}]


def test_eval_questions_are_excluded_by_normalised_text():
    problems = [{"question": "Tom has 3 apples.  How many?", "gold_answer": "3"},
                {"question": "Ann has 4 pears. How many?", "gold_answer": "4"}]
    eval_problems = [{"question": "tom HAS 3 apples. how\nmany", "gold_answer": "3"}]
    kept, excluded = exclude_eval_questions(problems, eval_problems)
    assert kept == [problems[1]] and excluded == 1


def test_make_dpo_pairs_on_the_tiny_model(tmp_path):
    out_file = tmp_path / "pairs.jsonl"
    result = run_script(["make_dpo_pairs.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--NUM_SAMPLES_PER_PROMPT=4",
                         "--MAX_NEW_TOKENS=48", "--BATCH_SIZE=4", "--TEMPERATURE=1.5", "--DEVICE=cpu",
                         f"--OUT_FILE={out_file}"])
    pairs = load_pairs(out_file)
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert summary["questions"] == 8 and summary["pairs"] == len(pairs) > 0
    assert summary["pairs"] + summary["skipped_all_correct"] + summary["skipped_all_wrong"] == 8
    assert summary["excluded_eval_questions"] >= 0
    assert all(pair["gold_answer"] for pair in pairs)
    assert f"{len(pairs)} pairs from 8 questions" in result.stdout


def test_make_dpo_pairs_samples_with_a_4bit_base(tmp_path):
    """QUANT=nf4: the tiny model samples in 4 bits, still right and wrong often enough to make pairs, and
    each pair is a right answer over a wrong one."""
    pytest.importorskip("bitsandbytes")
    out_file = tmp_path / "pairs.jsonl"
    result = run_script(["make_dpo_pairs.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--NUM_SAMPLES_PER_PROMPT=4",
                         "--MAX_NEW_TOKENS=48", "--BATCH_SIZE=4", "--TEMPERATURE=1.5", "--DEVICE=cpu",
                         "--QUANT=nf4", f"--OUT_FILE={out_file}"])
    assert "on cpu, linear layers in 4-bit NF4" in result.stdout
    pairs = load_pairs(out_file)
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert summary["config"]["QUANT"] == "nf4"
    assert summary["questions"] == 8 and summary["pairs"] == len(pairs) > 0
    assert summary["pairs"] + summary["skipped_all_correct"] + summary["skipped_all_wrong"] == 8
    for pair in pairs:
        assert correctness_reward(pair["chosen"], pair["gold_answer"]) == 1.0
        assert correctness_reward(pair["rejected"], pair["gold_answer"]) == 0.0
    assert f"{len(pairs)} pairs from 8 questions" in result.stdout

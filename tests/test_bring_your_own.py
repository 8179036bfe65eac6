"""Your data, your prompt, your reward, end to end: a non-numeric task evaluated through the reward's
`correct`, and make_dpo_pairs.py on a TRL conversational file with a reward function of your own."""

import json

from common.data import load_pairs, load_problems, write_jsonl
from common.evaluate import evaluate
from common.model import load_model_and_tokenizer
from common.prompts import configure_prompts
from common.reward import load_reward
from tests.conftest import run_script

REWARDS = '''
def even_id(completion, id):
    return {"reward": 0.0, "correct": id % 2 == 0}


def odd_length(completion, **row):
    return len(completion) % 2 == 1
'''


def test_evaluation_of_a_non_numeric_task_reads_the_rewards_correct(micro_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(REWARDS)
    write_jsonl(tmp_path / "poems.jsonl", [{"prompt": [{"role": "user", "content": f"Poem {i}?"}], "answer": "a poem",
                                           "id": i} for i in range(5)])
    reward = load_reward("rewards.py:even_id")
    problems = load_problems(tmp_path / "poems.jsonl", numeric_gold=reward.needs_numeric_gold)
    model, tokenizer, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    prompt_format = configure_prompts(tokenizer, system_prompt="You write poems.")
    result = evaluate(model, tokenizer, problems, batch_size=2, max_new_tokens=3, progress=False, reward=reward,
                      prompt_format=prompt_format)
    assert (result.total, result.correct) == (5, 3)  # ids 0, 2 and 4
    assert [record["correct"] for record in result.records] == [True, False, True, False, True]
    assert [record["question"] for record in result.records] == [f"Poem {i}?" for i in range(5)]


def test_make_dpo_pairs_with_your_data_and_your_reward(micro_model_dir, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"Write line {i}."}], "solution": "any"} for i in range(4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": [{"role": "user", "content": "Write line 9."}]}])
    out_file = tmp_path / "pairs.jsonl"
    run_script(["make_dpo_pairs.py", f"--MODEL_PATH={micro_model_dir}", f"--TRAIN_FILE={tmp_path / 'train.jsonl'}",
                f"--EVAL_FILE={tmp_path / 'eval.jsonl'}", "--NUM_SAMPLES_PER_PROMPT=6", "--MAX_NEW_TOKENS=5",
                "--TEMPERATURE=2.0", f"--REWARD={tmp_path / 'rewards.py'}:odd_length", "--DEVICE=cpu",
                f"--OUT_FILE={out_file}"])
    pairs = load_pairs(out_file)
    summary = json.loads(out_file.with_suffix(".summary.json").read_text())
    assert summary["pairs"] == len(pairs) > 0
    for pair in pairs:  # the user's own conversation, kept as given; the reward's verdicts chose the answers
        assert pair["prompt"] in [row["prompt"] for row in rows] and "question" in pair
        assert len(pair["chosen"]) % 2 == 1 and len(pair["rejected"]) % 2 == 0

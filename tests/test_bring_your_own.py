"""Your data, your prompt, your reward, end to end: a non-numeric task evaluated through the reward's
`correct`, and make_dpo_pairs.py on a TRL conversational file with a reward function of your own."""

import json

from common.checkpoint import load_checkpoint
from common.data import load_pairs, load_problems, write_jsonl
from common.evaluate import evaluate
from common.model import load_model_and_tokenizer
from common.prompts import configure_prompts
from common.reward import load_reward
from common.sampler import SamplingParams
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
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, chunk_rows=2)
    result = evaluate(model, tokenizer, problems, greedy, progress=False, reward=reward, prompt_format=prompt_format)
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


TRAINING_REWARDS = '''
import json, os


def brevity(completion, **row):
    with open(os.environ["REWARD_CALLS"], "a") as calls:  # what the trainer passed, for the test to read
        calls.write(json.dumps(sorted(row)) + "\\n")
    return -0.01 * len(completion)
'''


def test_grpo_on_your_trl_data_with_your_reward_and_tensorboard(micro_model_dir, tmp_path):
    """TRL's conversational format with its gold under a field of its own, the math reward plus a
    reward of your own (weighted), a system prompt, and TensorBoard beside the JSONL."""
    import os
    import subprocess
    import sys

    (tmp_path / "my_rewards.py").write_text(TRAINING_REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"What is {n} plus 2?"}], "target": str(n + 2), "level": n % 3}
            for n in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    env = dict(os.environ, REWARD_CALLS=str(tmp_path / "calls.jsonl"), TQDM_DISABLE="1", OMP_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", f"--TRAIN_FILE={tmp_path / 'train.jsonl'}",
         f"--EVAL_FILE={tmp_path / 'train.jsonl'}", "--GOLD_FIELD=target", "--SYSTEM_PROMPT=Be brief.",
         f"--REWARD=math,{tmp_path / 'my_rewards.py'}:brevity", "--REWARD_WEIGHTS=1,0.5", "--LOGGER=jsonl,tensorboard",
         "--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=2", "--MAX_NEW_TOKENS=4", "--MAX_STEPS=1", "--EVAL_EVERY=1",
         "--EVAL_LIMIT=2", "--LORA_R=2", "--DEVICE=cpu", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}",
         "--RUN_NAME=yours"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: 2 of the 8 questions" in result.stdout  # the eval file is the training file here
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    # 2 questions x 2 samples in the step, and the 2 eval questions at steps 0 and 1 (the eval scores with it too)
    assert len(calls) == 8 and all({"target", "level", "prompt"} <= set(call) for call in calls)
    metrics = [json.loads(line) for line in (tmp_path / "yours.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert list((tmp_path / "tensorboard" / "yours").glob("events.out.tfevents.*"))


def test_a_hub_id_offline_is_a_clear_message_before_anything_loads(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "run_train_grpo.py", "--MODEL_PATH=Qwen/Qwen2.5-0.5B-Instruct",
                             f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr and "hf download Qwen/Qwen2.5-0.5B-Instruct" in result.stderr


def test_a_peft_adapter_starts_a_grpo_run(micro_model_dir, tmp_path):
    """INIT_LORA takes a PEFT adapter directory: an SFT LoRA exported by export_lora.py starts GRPO."""
    run_script(["run_sft.py", f"--MODEL_PATH={micro_model_dir}", f"--OUT_DIR={tmp_path / 'sft'}", "--MAX_STEPS=1",
                "--BATCH_SIZE=2", "--EVAL_EVERY=0", "--DEVICE=cpu", "--LORA_R=2", "--LORA_TARGETS=q_proj,v_proj",
                "--TRAIN_FILE=data/synth_train.jsonl", f"--LOG_DIR={tmp_path}"])
    run_script(["export_lora.py", f"--MODEL_PATH={micro_model_dir}", f"--LORA_CKPT={tmp_path / 'sft'}",
                f"--PEFT_DIR={tmp_path / 'adapter'}"])
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--NUM_PROMPTS=4", "--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=2", "--MAX_NEW_TOKENS=4",
                         "--MAX_STEPS=1", "--EVAL_EVERY=0", "--DEVICE=cpu", f"--INIT_LORA={tmp_path / 'adapter'}",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=from-peft"])
    checkpoint = load_checkpoint(tmp_path / "from-peft")
    assert checkpoint["lora_config"]["r"] == 2 and checkpoint["lora_config"]["target_modules"] == ["q_proj", "v_proj"]
    assert "done: 1 steps" in result.stdout

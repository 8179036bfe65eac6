"""Every script on a micro model of every architecture docs/bring-your-own.md lists, as a user runs them: eval,
SFT (LoRA), GRPO, PPO and DPO one step each, and the PEFT export of the SFT adapter."""

import json

import pytest

from common.checkpoint import load_checkpoint
from tests.conftest import MICRO_ARCHITECTURES, run_script

COMMON = ["--DEVICE=cpu", "--MAX_NEW_TOKENS=4", "--EVAL_LIMIT=2", "--LORA_R=2", "--LORA_TARGETS=all-linear"]
RL = ["--TRAIN_FILE=data/synth_train.jsonl", "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=4",
      "--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=2", "--MAX_STEPS=1", "--EVAL_EVERY=1", "--SAMPLE_EVERY=0"]


@pytest.mark.parametrize("arch", MICRO_ARCHITECTURES)
def test_every_script_runs_on(arch, micro_arch_dir, tmp_path):
    model = f"--MODEL_PATH={micro_arch_dir(arch)}"
    where = [f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"]

    out_file = tmp_path / "eval.jsonl"
    result = run_script(["eval_math.py", model, "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=2",
                         "--MAX_NEW_TOKENS=4", "--DEVICE=cpu", f"--OUT_FILE={out_file}"])
    assert "Total: 2" in result.stdout and len(out_file.read_text().splitlines()) == 2

    run_script(["run_sft.py", model, *COMMON, f"--OUT_DIR={tmp_path / 'sft'}", "--MAX_STEPS=1", "--BATCH_SIZE=2",
                "--TRAIN_FILE=data/synth_train.jsonl", f"--LOG_DIR={tmp_path}"])
    sft_checkpoint = tmp_path / "sft" / "lora_epoch0_step1.pt"
    assert load_checkpoint(sft_checkpoint)["step"] == 1

    for script, name, extra in (("run_train_grpo.py", "grpo", []), ("run_train_ppo.py", "ppo", ["--MINI_BATCH_SIZE=2"])):
        run_script([script, model, *COMMON, *RL, *extra, *where, f"--RUN_NAME={name}"])
        metrics = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 1] and "eval/accuracy" in metrics[1]

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {n} + 1?", "chosen": f"Answer: {n + 1}",
                                         "rejected": f"Answer: {n}"}) + "\n" for n in range(4)))
    run_script(["run_train_dpo.py", model, *COMMON, f"--TRAIN_FILE={pairs}", "--EVAL_FILE=data/synth_test.jsonl",
                "--BATCH_SIZE=2", "--MICRO_BATCH_SIZE=1", "--MAX_STEPS=1", "--EVAL_EVERY=1", *where,
                "--RUN_NAME=dpo"])
    assert (tmp_path / "dpo" / "lora_epoch0_step1.pt").is_file()

    run_script(["export_lora.py", model, f"--LORA_CKPT={sft_checkpoint}", f"--PEFT_DIR={tmp_path / 'peft'}"])
    assert (tmp_path / "peft" / "adapter_config.json").is_file()

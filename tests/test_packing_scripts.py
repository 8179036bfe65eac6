"""PACKING=true against PACKING=false through each trainer, as a user runs it: the first update's
gradients (recorded at the first optimizer step: AdamW would turn rounding-level differences into
lr-sized weight differences) and the first step's logged loss agree to 1e-5 in fp32."""

import json

import pytest
import torch

from tests.conftest import TINY_MODEL_DIR, run_script
from tests.test_dpo_trainer import pairs_file

FIRST_GRADIENT_RECORDER = (
    "import os, runpy, sys, torch\n"
    "out, script = sys.argv.pop(1), sys.argv.pop(1)\n"
    "step = torch.optim.AdamW.step\n"
    "def recording_step(self, *args, **kwargs):\n"
    "    if not os.path.exists(out):\n"
    "        torch.save([torch.zeros_like(p) if p.grad is None else p.grad.clone()\n"
    "                    for group in self.param_groups for p in group['params']], out)\n"
    "    return step(self, *args, **kwargs)\n"
    "torch.optim.AdamW.step = recording_step\n"
    "sys.argv = [script] + sys.argv[1:]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)

# Counts the decoder's forward passes (every pass of the run) and prints the count at exit.
FORWARD_COUNTER = (
    "import atexit, transformers\n"
    "calls = [0]\n"
    "_from = transformers.PreTrainedModel.from_pretrained.__func__\n"
    "def counted(cls, *args, **kwargs):\n"
    "    model = _from(cls, *args, **kwargs)\n"
    "    model.get_decoder().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))\n"
    "    return model\n"
    "transformers.PreTrainedModel.from_pretrained = classmethod(counted)\n"
    "atexit.register(lambda: print(f'forward passes: {calls[0]}'))\n"
)

RL = [f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl", "--EVAL_FILE=data/synth_test.jsonl",
      "--NUM_PROMPTS=16", "--PROMPTS_PER_STEP=4", "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=40", "--LORA_R=4",
      "--DEVICE=cpu", "--MAX_STEPS=1", "--EVAL_EVERY=0", "--KL_COEF=0.04"]


def script_args(script, micro_model_dir, tmp_path):
    if script == "run_train_ppo.py":
        return RL + ["--MINI_BATCH_SIZE=8", "--MICRO_BATCH_SIZE=3", "--CRITIC_HIDDEN=8"]
    if script == "run_train_dpo.py":
        return [f"--MODEL_PATH={micro_model_dir}", f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 6)}",
                "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_EVERY=0", "--BATCH_SIZE=6", "--MICRO_BATCH_SIZE=3",
                "--MAX_STEPS=1", "--LORA_R=2", "--RPO_ALPHA=0.5", "--DEVICE=cpu"]
    return [f"--MODEL_PATH={micro_model_dir}", "--MAX_STEPS=1", "--BATCH_SIZE=6", "--EVAL_LIMIT=2",  # run_sft.py,
            "--MAX_NEW_TOKENS=4", "--DEVICE=cpu", "--LOGPROB_CHUNK_SIZE=16"]  # full fine-tuning: the head's gradient too


@pytest.mark.parametrize("script", ["run_train_ppo.py", "run_train_dpo.py", "run_sft.py"])
def test_packed_first_update_equals_padded(script, micro_model_dir, tmp_path):
    results = {}
    for packing in ("true", "false"):
        out = tmp_path / f"grads_{packing}.pt"
        where = ([f"--OUT_DIR={tmp_path / packing}", f"--LOG_DIR={tmp_path}", f"--RUN_NAME={packing}"]
                 if script == "run_sft.py" else
                 [f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", f"--RUN_NAME={packing}"])
        result = run_script(["-c", FIRST_GRADIENT_RECORDER, str(out), script,
                             *script_args(script, micro_model_dir, tmp_path), f"--PACKING={packing}", *where])
        assert ("packed micro-batches" if packing == "true" else "padded micro-batches") in result.stdout
        loss_key = "value_loss" if script == "run_train_ppo.py" else "loss"  # PPO logs its losses apart
        metrics = next(record for record in map(json.loads, (tmp_path / f"{packing}.jsonl").read_text().splitlines())
                       if loss_key in record)  # run_sft.py's first line is its step-0 eval
        metrics["loss"] = metrics[loss_key]
        results[packing] = torch.load(out, weights_only=True), metrics
    (packed, packed_metrics), (padded, padded_metrics) = results["true"], results["false"]
    assert any(gradient.abs().sum() > 0 for gradient in padded)
    for packed_gradient, padded_gradient in zip(packed, padded, strict=True):
        torch.testing.assert_close(packed_gradient, padded_gradient, rtol=1e-5, atol=1e-5)
    assert packed_metrics["loss"] == pytest.approx(padded_metrics["loss"], abs=1e-5)


# Budgets for each trainer: a sequence (PPO, SFT) or a pair (DPO) per micro-batch, a few, all at once.
TOKEN_BUDGETS = {"run_train_ppo.py": (30, 150, 10_000), "run_train_dpo.py": (30, 120, 10_000),
                 "run_sft.py": (30, 80, 10_000)}


@pytest.mark.parametrize("script", ["run_train_ppo.py", "run_train_dpo.py", "run_sft.py"])
def test_token_budgets_give_the_padded_update(script, micro_model_dir, tmp_path):
    """MICRO_BATCH_TOKENS of three sizes, packed, against padded micro-batches of MICRO_BATCH_SIZE
    (run_sft.py: the batch in one pass): the first update's gradients agree to 1e-5, since the loss
    normaliser is the mini-batch's (PPO) or the step's, whatever the grouping."""
    runs = {"padded": ["--PACKING=false"]} | {f"budget{tokens}": [f"--MICRO_BATCH_TOKENS={tokens}"]
                                              for tokens in TOKEN_BUDGETS[script]}
    gradients, passes = {}, {}
    for name, settings in runs.items():
        out = tmp_path / f"{name}.pt"
        where = ([f"--OUT_DIR={tmp_path / name}", f"--LOG_DIR={tmp_path}", f"--RUN_NAME={name}"]
                 if script == "run_sft.py" else
                 [f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", f"--RUN_NAME={name}"])
        result = run_script(["-c", FORWARD_COUNTER + FIRST_GRADIENT_RECORDER, str(out), script,
                             *script_args(script, micro_model_dir, tmp_path), *settings, *where])
        gradients[name] = torch.load(out, weights_only=True)
        passes[name] = int(result.stdout.rsplit("forward passes: ", 1)[1].split()[0])
    assert any(gradient.abs().sum() > 0 for gradient in gradients["padded"])
    for name in runs:
        for gradient, expected in zip(gradients[name], gradients["padded"], strict=True):
            torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-5)
    smallest, _, largest = TOKEN_BUDGETS[script]
    # The budgets change the grouping: the smallest makes more forward passes than the largest.
    assert passes[f"budget{smallest}"] > passes[f"budget{largest}"]

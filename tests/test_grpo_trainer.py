"""run_train_grpo.py for real: smoke run, exact resume, micro-batch invariance of a whole step."""

import json

import pytest
import torch

from common.checkpoint import load_checkpoint
from tests.conftest import TINY_MODEL_DIR, run_script

TINY_RUN = [f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
            "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=64", "--PROMPTS_PER_STEP=4",
            "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=40", "--LORA_R=4", "--LR=5e-3", "--WARMUP_STEPS=1",
            "--DEVICE=cpu", "--SAMPLE_EVERY=1"]


def lora_of(path):
    return load_checkpoint(path)["lora"]


def test_smoke_two_steps_on_micro_model(micro_model_dir, tmp_path):
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                         "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=6", "--MAX_STEPS=2", "--EVAL_EVERY=2",
                         "--EVAL_LIMIT=2", "--DEVICE=cpu", "--KL_COEF=0.05", "--NUM_ITERATIONS=2",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=smoke",
                         "--MICRO_BATCH_SIZE=4", "--IMPORTANCE_CORRECTION=tis", "--GRADIENT_CHECKPOINTING=true"])
    assert "step 2/2" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "smoke" / "lora_epoch0_step2.pt")
    assert checkpoint["step"] == 2 and checkpoint["config"]["KL_COEF"] == 0.05
    metrics = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]  # the baseline eval, then one line per step
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[2]
    for key in ("reward", "accuracy", "format_rate", "kl", "clip_frac", "entropy", "completion_len", "truncated",
                "zero_adv_groups", "grad_norm", "generate_s", "reference_s", "policy_s", "tokens_per_s",
                "logprob_mismatch_mean", "logprob_mismatch_max", "compile_s"):
        assert key in metrics[1], key
    # fp32 on the CPU: the sampler's log-probs and the trainer's agree (the mismatch a GPU's bf16 would show).
    assert all(0 <= m["logprob_mismatch_mean"] <= m["logprob_mismatch_max"] < 1e-4 for m in metrics[1:])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Four steps in one go on the tiny model, saving at step 2 and step 4."""
    out = tmp_path_factory.mktemp("grpo")
    run_script(["run_train_grpo.py", *TINY_RUN, "--MAX_STEPS=4", "--SAVE_EVERY=2", "--EVAL_EVERY=0",
                f"--CHECKPOINT_DIR={out}", f"--LOG_DIR={out}", "--RUN_NAME=straight"])
    return out


def test_resume_equals_uninterrupted_run(straight_run):
    run_script(["run_train_grpo.py", *TINY_RUN, "--MAX_STEPS=4", "--SAVE_EVERY=2", "--EVAL_EVERY=0",
                f"--CHECKPOINT_DIR={straight_run}", f"--LOG_DIR={straight_run}", "--RUN_NAME=resumed",
                f"--RESUME={straight_run / 'straight' / 'lora_epoch0_step2.pt'}"])
    straight = lora_of(straight_run / "straight" / "lora_epoch0_step4.pt")
    resumed = lora_of(straight_run / "resumed" / "lora_epoch0_step4.pt")
    halfway = lora_of(straight_run / "straight" / "lora_epoch0_step2.pt")
    assert any(not torch.equal(straight[key], halfway[key]) for key in straight)  # steps 3-4 did update
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)


def test_micro_batches_give_the_same_gradient_as_one_batch(tmp_path):
    """Accumulating over micro-batches of 3 with the step's normaliser = one batch of 16.

    The gradients are compared (recorded just before the optimizer step), not the weights after
    AdamW: Adam's first update is lr * g / (|g| + eps), which turns float-rounding differences of
    gradients near eps into weight differences of up to lr."""
    for name, micro_batch_size in (("whole", 16), ("micro", 3)):
        launcher = (
            "import runpy, sys, torch\n"
            "step = torch.optim.AdamW.step\n"
            "def recording_step(self, *args, **kwargs):\n"
            "    torch.save([p.grad.clone() for group in self.param_groups for p in group['params']],\n"
            f"               {str(tmp_path / (name + '_grads.pt'))!r})\n"
            "    return step(self, *args, **kwargs)\n"
            "torch.optim.AdamW.step = recording_step\n"
            "sys.argv = ['run_train_grpo.py'] + sys.argv[1:]\n"
            "runpy.run_path('run_train_grpo.py', run_name='__main__')\n"
        )
        run_script(["-c", launcher, *TINY_RUN, "--MAX_STEPS=1", "--EVAL_EVERY=0",
                    f"--MICRO_BATCH_SIZE={micro_batch_size}", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}",
                    f"--RUN_NAME={name}"])
    whole = torch.load(tmp_path / "whole_grads.pt", weights_only=True)
    micro = torch.load(tmp_path / "micro_grads.pt", weights_only=True)
    metrics = json.loads((tmp_path / "whole.jsonl").read_text().splitlines()[0])
    assert metrics["zero_adv_groups"] < 1.0  # some group had an advantage: an update happened
    assert any(gradient.abs().sum() > 0 for gradient in whole)
    for micro_gradient, whole_gradient in zip(micro, whole, strict=True):
        torch.testing.assert_close(micro_gradient, whole_gradient, rtol=1e-4, atol=1e-7)


def test_non_finite_gradient_skips_the_update(tmp_path):
    """A NaN gradient norm (simulated) is counted and never reaches the weights or a checkpoint."""
    launcher = (
        "import runpy, sys, torch\n"
        "torch.nn.utils.clip_grad_norm_ = lambda *args, **kwargs: torch.tensor(float('nan'))\n"
        "sys.argv = ['run_train_grpo.py'] + sys.argv[1:]\n"
        "runpy.run_path('run_train_grpo.py', run_name='__main__')\n"
    )
    result = run_script(["-c", launcher, *TINY_RUN, "--PROMPTS_PER_STEP=8", "--MAX_STEPS=2", "--EVAL_EVERY=0",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=nan"])
    lines = (tmp_path / "nan.jsonl").read_text().splitlines()
    assert all("NaN" not in line for line in lines)  # valid JSON: a non-finite number is written as null
    metrics = [json.loads(line) for line in lines]
    # grad_norm is null both for a NaN norm and for a step without any advantage (no update attempted).
    attempted = [m for m in metrics if m["zero_adv_groups"] < 1.0]
    assert attempted, "no step had an advantage; the test needs one"
    assert all(m["grad_norm"] is None for m in metrics)
    assert metrics[-1]["skipped_updates"] == len(attempted)
    assert "update skipped" in result.stdout
    lora = lora_of(tmp_path / "nan" / "lora_epoch0_step2.pt")
    assert all(torch.count_nonzero(tensor) == 0 for key, tensor in lora.items() if key.endswith("lora_B"))

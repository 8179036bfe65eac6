"""run_train_ppo.py for real: smoke run with a reference, exact resume, the non-finite guard."""

import json

import pytest
import torch

from common.checkpoint import load_checkpoint
from tests.conftest import TINY_MODEL_DIR, run_script

TINY_RUN = [f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
            "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=64", "--PROMPTS_PER_STEP=4",
            "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=40", "--LORA_R=4", "--LR=5e-3", "--CRITIC_LR=1e-2",
            "--WARMUP_STEPS=1", "--KL_COEF=0.05", "--MINI_BATCH_SIZE=8", "--MICRO_BATCH_SIZE=4", "--CRITIC_HIDDEN=16",
            "--DEVICE=cpu", "--SAMPLE_EVERY=1"]


def trained_weights(path) -> dict[str, torch.Tensor]:
    """The actor's LoRA and the critic of a checkpoint, in one dict."""
    checkpoint = load_checkpoint(path)
    return {**checkpoint["lora"], **{f"critic.{k}": v for k, v in checkpoint["extra"]["critic"].items()}}


VALUE_HEAD_KEYS = {"value_head.mlp.0.weight", "value_head.mlp.0.bias", "value_head.mlp.2.weight",
                   "value_head.mlp.2.bias"}


@pytest.mark.parametrize("features,groups", [("detached", 2), ("adapter", 3), ("shared", 2)])
def test_smoke_two_steps_on_micro_model(micro_model_dir, tmp_path, features, groups):
    result = run_script(["run_train_ppo.py", f"--MODEL_PATH={micro_model_dir}", f"--CRITIC_FEATURES={features}",
                         "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                         "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=6", "--MAX_STEPS=2", "--EVAL_EVERY=2",
                         "--EVAL_LIMIT=2", "--DEVICE=cpu", "--KL_COEF=0.05", "--MINI_BATCH_SIZE=4",
                         "--MICRO_BATCH_SIZE=2", "--CRITIC_HIDDEN=8", "--TARGET_KL=10.0",
                         "--IMPORTANCE_CORRECTION=tis", "--GRADIENT_CHECKPOINTING=true",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=smoke"])
    assert "step 2/2" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    # fp32 on the CPU: the sampler's log-probs and the trainer's agree (the mismatch a GPU's bf16 would show).
    assert all(0 <= m["logprob_mismatch_mean"] <= m["logprob_mismatch_max"] < 1e-4 for m in metrics[1:])
    checkpoint = load_checkpoint(tmp_path / "smoke" / "lora_epoch0_step2.pt")
    assert checkpoint["step"] == 2 and checkpoint["config"]["KL_COEF"] == 0.05
    critic_keys = set(checkpoint["extra"]["critic"])
    assert VALUE_HEAD_KEYS <= critic_keys
    # The adapter critic also saves its own LoRA factors: as many as the actor's (an A and a B per layer).
    adapter_keys = critic_keys - VALUE_HEAD_KEYS
    assert len(adapter_keys) == (len(checkpoint["lora"]) if features == "adapter" else 0)
    assert len(checkpoint["optimizer"]["param_groups"]) == groups  # LoRA, value head (, critic adapter)
    metrics = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]  # the baseline eval, then one line per step
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[2]
    for key in ("reward", "accuracy", "format_rate", "approx_kl", "clip_frac", "value_loss", "explained_variance",
                "returns_mean", "kl", "entropy", "completion_len", "truncated", "grad_norm", "generate_s",
                "reference_s", "policy_s", "tokens_per_s", "elapsed_s"):
        assert key in metrics[1], key
    assert metrics[1]["ppo_epochs"] == 2 and metrics[1]["grad_norm"] is not None


@pytest.mark.parametrize("features", ["detached", "adapter"])
def test_resume_equals_uninterrupted_run(tmp_path, features):
    """Four steps in one go, saving at steps 2 and 4, against steps 3-4 resumed from step 2."""
    run = [*TINY_RUN, f"--CRITIC_FEATURES={features}", "--MAX_STEPS=4", "--SAVE_EVERY=2", "--EVAL_EVERY=0",
           f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"]
    run_script(["run_train_ppo.py", *run, "--RUN_NAME=straight"])
    run_script(["run_train_ppo.py", *run, "--RUN_NAME=resumed",
                f"--RESUME={tmp_path / 'straight' / 'lora_epoch0_step2.pt'}"])
    straight = trained_weights(tmp_path / "straight" / "lora_epoch0_step4.pt")
    resumed = trained_weights(tmp_path / "resumed" / "lora_epoch0_step4.pt")
    halfway = trained_weights(tmp_path / "straight" / "lora_epoch0_step2.pt")
    prefixes = ("critic.value_head.", "model.") + (("critic.adapter.",) if features == "adapter" else ())
    for prefix in prefixes:  # steps 3-4 updated the critic (head and adapter) and the LoRA
        assert any(not torch.equal(straight[key], halfway[key]) for key in straight if key.startswith(prefix)), prefix
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)


def test_resume_refuses_another_critic(tmp_path):
    """A checkpoint of a detached-feature critic cannot continue as an adapter critic (it has no adapter)."""
    run = [*TINY_RUN, "--MAX_STEPS=1", "--EVAL_EVERY=0", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"]
    run_script(["run_train_ppo.py", *run, "--RUN_NAME=detached"])
    result = run_script(["run_train_ppo.py", *run, "--RUN_NAME=adapter", "--CRITIC_FEATURES=adapter", "--MAX_STEPS=2",
                         f"--RESUME={tmp_path / 'detached' / 'lora_epoch0_step1.pt'}"], check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == ("error: CRITIC_FEATURES='adapter' differs from the resumed run's 'detached', "
                                     "and a resume cannot change it: resume with CRITIC_FEATURES='detached', "
                                     "or start a new run")


def test_non_finite_gradient_skips_the_update(tmp_path):
    """A NaN gradient norm (simulated) is counted and never reaches the weights or a checkpoint."""
    launcher = (
        "import runpy, sys, torch\n"
        "torch.nn.utils.clip_grad_norm_ = lambda *args, **kwargs: torch.tensor(float('nan'))\n"
        "sys.argv = ['run_train_ppo.py'] + sys.argv[1:]\n"
        "runpy.run_path('run_train_ppo.py', run_name='__main__')\n"
    )
    result = run_script(["-c", launcher, *TINY_RUN, "--MAX_STEPS=1", "--EVAL_EVERY=0",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=nan"])
    metrics = [json.loads(line) for line in (tmp_path / "nan.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_updates"] == 4  # 16 rows / MINI_BATCH_SIZE 8, PPO_EPOCHS 2
    assert metrics[-1]["grad_norm"] is None
    assert "update skipped" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "nan" / "lora_epoch0_step1.pt")
    assert all(torch.count_nonzero(tensor) == 0 for key, tensor in checkpoint["lora"].items() if key.endswith("lora_B"))

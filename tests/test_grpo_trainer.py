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
    assert "eval/accuracy_strict" in metrics[0] and "eval/accuracy_strict_ci_high" in metrics[2]  # strict beside it
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


GRADIENT_RECORDER = (
    "import runpy, sys, torch\n"
    "out = sys.argv.pop(1)\n"
    "step = torch.optim.AdamW.step\n"
    "def recording_step(self, *args, **kwargs):\n"
    "    torch.save([p.grad.clone() for group in self.param_groups for p in group['params']], out)\n"
    "    return step(self, *args, **kwargs)\n"
    "torch.optim.AdamW.step = recording_step\n"
    "sys.argv = ['run_train_grpo.py'] + sys.argv[1:]\n"
    "runpy.run_path('run_train_grpo.py', run_name='__main__')\n"
)


def test_packing_and_token_budgets_give_the_padded_gradient(tmp_path):
    """Packed micro-batches of three token budgets (one sequence each at 30 tokens, a few at 120, the
    whole step at 10,000), with rows of PACK_LENGTH=auto or 64, give the padded one-batch gradient to
    1e-5: the normaliser is the step's, and packing changes no value."""
    runs = {"padded": ["--PACKING=false"], "budget30": ["--MICRO_BATCH_TOKENS=30"],
            "budget120": ["--MICRO_BATCH_TOKENS=120", "--PACK_LENGTH=64"], "budget10000": ["--MICRO_BATCH_TOKENS=10000"]}
    for name, settings in runs.items():
        run_script(["-c", GRADIENT_RECORDER, str(tmp_path / f"{name}.pt"), *TINY_RUN, "--MAX_STEPS=1",
                    "--EVAL_EVERY=0", "--KL_COEF=0.04", *settings, f"--CHECKPOINT_DIR={tmp_path}",
                    f"--LOG_DIR={tmp_path}", f"--RUN_NAME={name}"])
    padded = torch.load(tmp_path / "padded.pt", weights_only=True)
    assert any(gradient.abs().sum() > 0 for gradient in padded)
    for name in runs:
        metrics = json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[0])
        assert metrics["zero_adv_groups"] < 1.0  # an update happened
        for gradient, expected in zip(torch.load(tmp_path / f"{name}.pt", weights_only=True), padded, strict=True):
            torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-5)


COPY_AND_READ_COUNTER = (
    "import json, runpy, sys, torch\n"
    "from torch.utils._python_dispatch import TorchDispatchMode\n"
    "import common.logprobs, common.rollout\n"
    "out = sys.argv.pop(1)\n"
    "counts = {'to_device': 0, 'reads': 0, 'copies_in_update': 0, 'updates': 0}\n"
    "state = {'step': False, 'update': False, 'body': False}\n"
    "to = torch.Tensor.to\n"
    "def counting_to(self, *args, **kwargs):\n"  # the repository's own moves (torch's and transformers' aside)
    "    moves = 'device' in kwargs or any(isinstance(a, (str, torch.device)) for a in args)\n"
    "    ours = 'site-packages' not in sys._getframe(1).f_code.co_filename\n"
    "    if moves and ours and state['step']:\n"
    "        counts['to_device'] += 1\n"
    "        counts['copies_in_update'] += state['update']\n"
    "    return to(self, *args, **kwargs)\n"
    "torch.Tensor.to = counting_to\n"
    "class Reads(TorchDispatchMode):\n"  # scalar reads outside the model body (transformers' mask checks are its own)
    "    def __torch_dispatch__(self, func, types, args=(), kwargs=None):\n"
    "        if state['update'] and not state['body'] and func is torch.ops.aten._local_scalar_dense.default:\n"
    "            counts['reads'] += 1\n"
    "        return func(*args, **(kwargs or {}))\n"
    "tolist = torch.Tensor.tolist\n"
    "def counting_tolist(self):\n"
    "    if state['update'] and not state['body']:\n"
    "        counts['reads'] += 1\n"
    "    return tolist(self)\n"
    "torch.Tensor.tolist = counting_tolist\n"
    "rollout_batch = common.rollout.rollout_batch\n"
    "def step_starts(*args, **kwargs):\n"  # the rollouts, on the host, are laid out for training: the step's copies begin
    "    batch = rollout_batch(*args, **kwargs)\n"
    "    state['step'] = True\n"
    "    return batch\n"
    "common.rollout.rollout_batch = step_starts\n"
    "body = common.logprobs.body_hidden_states\n"
    "def in_body(*args, **kwargs):\n"
    "    state['update'] = state['update'] or torch.is_grad_enabled()\n"  # from the first policy forward
    "    state['body'] = True\n"
    "    try:\n"
    "        return body(*args, **kwargs)\n"
    "    finally:\n"
    "        state['body'] = False\n"
    "common.logprobs.body_hidden_states = in_body\n"
    "adam_step = torch.optim.AdamW.step\n"
    "def update_ends(self, *args, **kwargs):\n"
    "    state.update(step=False, update=False)\n"
    "    counts['updates'] += 1\n"
    "    json.dump(counts, open(out, 'w'))\n"
    "    return adam_step(self, *args, **kwargs)\n"
    "torch.optim.AdamW.step = update_ends\n"
    "sys.argv = ['run_train_grpo.py'] + sys.argv[1:]\n"
    "with Reads():\n"
    "    runpy.run_path('run_train_grpo.py', run_name='__main__')\n"
)


def test_one_copy_to_the_device_per_step_and_one_read_per_update(tmp_path):
    """Counted over one GRPO step with the reference pass, from the rollout batch to the optimizer
    step: the repository's moves to the device (Tensor.to with a device) are one per dtype whatever
    the number of micro-batches, none inside the update; the host reads of device values (a scalar
    or a tolist) in the update, the model body aside, are one: the gradient norm with the loss.
    (Before packing: 3 to 5 moves per micro-batch, and the norm and the loss read apart.)"""
    counted = {}
    for micro_batch_size in (16, 2):
        out = tmp_path / f"counts{micro_batch_size}.json"
        run_script(["-c", COPY_AND_READ_COUNTER, str(out), *TINY_RUN, "--MAX_STEPS=1", "--EVAL_EVERY=0",
                    "--KL_COEF=0.04", f"--MICRO_BATCH_SIZE={micro_batch_size}", f"--CHECKPOINT_DIR={tmp_path}",
                    f"--LOG_DIR={tmp_path}", f"--RUN_NAME=count{micro_batch_size}"])
        counted[micro_batch_size] = json.loads(out.read_text())
    assert counted[16]["updates"] == counted[2]["updates"] == 1
    assert counted[2]["to_device"] == counted[16]["to_device"] == 2  # one buffer of ids, one of float values
    assert counted[2]["copies_in_update"] == 0
    assert counted[2]["reads"] == counted[16]["reads"] == 1

"""Out-of-memory never ends a run (common/oom.py): the back-off alone, an eval batch in process, and
run_train_grpo.py's rollouts, eval batches, reference and policy passes (run_train_ppo.py's passes,
run_train_dpo.py's and run_sft.py's updates) with an injected CUDA out-of-memory error, whose run
equals a run at the smaller size from the start."""

import json

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.oom import BatchSizes
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR, run_script
from tests.test_grpo_trainer import TINY_RUN
from tests.test_ppo_trainer import TINY_RUN as PPO_TINY_RUN


def out_of_memory() -> torch.OutOfMemoryError:
    """The error CUDA's caching allocator raises (torch.cuda.OutOfMemoryError is the same class),
    constructible without a GPU."""
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_an_out_of_memory_error_halves_the_size_rewinds_and_retries(capsys):
    sizes = BatchSizes(MICRO_BATCH_SIZE=16)
    generator = torch.Generator().manual_seed(0)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(0))
    tried = []
    for attempt in sizes.attempts("MICRO_BATCH_SIZE", "the policy pass", rewind=[generator]):
        with attempt:
            tried.append((attempt.size, attempt.retry))
            drawn = torch.rand(3, generator=generator)
            if attempt.size > 4:
                raise out_of_memory()
    assert tried == [(16, False), (8, True), (4, True)]
    assert torch.equal(drawn, expected)  # each retry drew what the first try drew
    assert sizes["MICRO_BATCH_SIZE"] == 4 and sizes.state_dict() == {"MICRO_BATCH_SIZE": 4}
    assert capsys.readouterr().out.splitlines() == [
        "out of memory in the policy pass at MICRO_BATCH_SIZE=16: retrying with 8 for the rest of the run",
        "out of memory in the policy pass at MICRO_BATCH_SIZE=8: retrying with 4 for the rest of the run"]


def test_at_size_1_and_for_other_errors_the_error_is_raised():
    sizes = BatchSizes(EVAL_BATCH_SIZE=1, MICRO_BATCH_SIZE=4)
    with pytest.raises(torch.OutOfMemoryError):
        for attempt in sizes.attempts("EVAL_BATCH_SIZE", "an eval batch"):
            with attempt:
                raise out_of_memory()
    with pytest.raises(RuntimeError, match="not memory"):
        for attempt in sizes.attempts("MICRO_BATCH_SIZE", "the policy pass"):
            with attempt:
                raise RuntimeError("not memory")
    assert sizes.state_dict() == {"EVAL_BATCH_SIZE": 1, "MICRO_BATCH_SIZE": 4}


def test_a_resume_keeps_the_smaller_sizes_of_unchanged_constants():
    sizes = BatchSizes(MICRO_BATCH_SIZE=16, EVAL_BATCH_SIZE=64, GENERATION_BATCH_SIZE=32)
    sizes.load_state_dict({"MICRO_BATCH_SIZE": 4, "EVAL_BATCH_SIZE": 8, "GENERATION_BATCH_SIZE": 64},
                          unchanged=["MICRO_BATCH_SIZE", "GENERATION_BATCH_SIZE"])
    # EVAL_BATCH_SIZE was given anew on resume: its value wins; a larger saved size changes nothing.
    assert sizes.state_dict() == {"MICRO_BATCH_SIZE": 4, "EVAL_BATCH_SIZE": 64, "GENERATION_BATCH_SIZE": 32}


def test_an_eval_batch_out_of_memory_gives_the_same_records(monkeypatch):
    """Greedy and sampled (seeded per row) passes whose second batch runs out of memory once: the
    records of a run at the halved size, which the run's sizes keep."""
    import common.evaluate
    from common.evaluate import evaluate
    from common.model import load_model_and_tokenizer
    from common.prompts import INSTRUCTION, configure_prompts
    from common.sampler import SamplingParams

    model, tokenizer, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu", "float32", "none")
    problems = [json.loads(line) for line in (REPO_ROOT / "data" / "synth_test.jsonl").read_text().splitlines()[:8]]
    options = dict(progress=False, prompt_format=configure_prompts(tokenizer, INSTRUCTION, "", "auto"), seed=3)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, chunk_rows=4, sampler="eager")
    sampled = SamplingParams(2, max_new_tokens=16, temperature=1.0, chunk_rows=4 * 2, sampler="eager")
    expected = evaluate(model, tokenizer, problems, greedy, sampled=sampled, **options)

    sample, calls = common.evaluate.sample, []

    def fails_on_the_second_call(*args, **kwargs):
        calls.append(args[2].chunk_rows)
        if len(calls) == 2:
            raise out_of_memory()
        return sample(*args, **kwargs)

    monkeypatch.setattr(common.evaluate, "sample", fails_on_the_second_call)
    sizes = BatchSizes(model, EVAL_BATCH_SIZE=4)
    result = evaluate(model, tokenizer, problems, greedy, sampled=sampled, sizes=sizes, **options)
    assert result.records == expected.records and result.sampled.records == expected.sampled.records
    assert sizes["EVAL_BATCH_SIZE"] == 2
    # Greedy: 4, then 4 failed, 2, 2; the sampled pass keeps 2 prompts (4 rows) per batch.
    assert calls == [4, 4, 2, 2] + [4] * 4


# Runs SCRIPT, saving the first update's gradients (just before its AdamW step) to OUT, with
# torch.OutOfMemoryError raised by the Nth call of MODULE.NAME (none for "-"), counting every call
# ("any") or those made with gradients enabled ("grad": an update's).
OOM_AT_CALL = (
    "import importlib, os, runpy, sys, torch\n"
    "out, script, module_name, name = (sys.argv.pop(1) for _ in range(4))\n"
    "failing_call, counted = int(sys.argv.pop(1)), sys.argv.pop(1)\n"
    "step = torch.optim.AdamW.step\n"
    "def recording_step(self, *args, **kwargs):\n"
    "    if not os.path.exists(out):\n"
    "        torch.save([p.grad.clone() for group in self.param_groups for p in group['params']], out)\n"
    "    return step(self, *args, **kwargs)\n"
    "torch.optim.AdamW.step = recording_step\n"
    "if module_name != '-':\n"
    "    module = importlib.import_module(module_name)\n"
    "    original, calls = getattr(module, name), [0]\n"
    "    def fails_once(*args, **kwargs):\n"
    "        if counted == 'any' or torch.is_grad_enabled():\n"
    "            calls[0] += 1\n"
    "            if calls[0] == failing_call:\n"
    "                raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (injected)')\n"
    "        return original(*args, **kwargs)\n"
    "    setattr(module, name, fails_once)\n"
    "sys.argv = [script] + sys.argv[1:]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def train(tmp_path, name: str, *settings: str, fail: tuple[str, str, int, str] | None = None,
          script: str = "run_train_grpo.py", tiny_run: list[str] = TINY_RUN):
    """A run of ``script`` on the tiny model (the out-of-memory error ``fail``: module, function, call,
    calls counted), its metrics lines, and its first update's gradients in {name}_gradients.pt."""
    # Checkpoints in tmp_path / name: run_sft.py's OUT_DIR, the RL trainers' CHECKPOINT_DIR / RUN_NAME.
    folder = f"--OUT_DIR={tmp_path / name}" if script == "run_sft.py" else f"--CHECKPOINT_DIR={tmp_path}"
    where = [folder, f"--LOG_DIR={tmp_path}", f"--RUN_NAME={name}"]
    launcher = ["-c", OOM_AT_CALL, str(tmp_path / f"{name}_gradients.pt"), script,
                *map(str, fail or ("-", "-", 0, "any"))]
    result = run_script([*launcher, *tiny_run, *settings, *where])
    return result, [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def assert_same_gradients(tmp_path, name: str, expected_name: str):
    """The first update's gradients, to 1e-5 (test_grpo_trainer.py says why not the weights after AdamW)."""
    gradients = torch.load(tmp_path / f"{name}_gradients.pt", weights_only=True)
    expected = torch.load(tmp_path / f"{expected_name}_gradients.pt", weights_only=True)
    assert any(gradient.abs().sum() > 0 for gradient in expected)
    for gradient, expected_gradient in zip(gradients, expected, strict=True):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-5)


def assert_same_lora(path, expected_path):
    lora, expected = load_checkpoint(path)["lora"], load_checkpoint(expected_path)["lora"]
    for key in expected:
        torch.testing.assert_close(lora[key], expected[key], rtol=1e-5, atol=1e-5)


UNTIMED = ("reward", "accuracy", "completion_len", "loss", "entropy", "kl", "grad_norm", "policy_micro_batches")


@pytest.mark.parametrize("phase, kl_coef", [("the policy pass", "0"), ("the reference pass", "0.04")])
def test_a_micro_batch_out_of_memory_gives_the_update_at_half_the_size(tmp_path, phase, kl_coef):
    """The first micro-batch's log-probs (the policy pass's; with KL_COEF > 0, the reference pass's
    first) run out of memory once at MICRO_BATCH_SIZE=4: the run goes on at 2, and its updates, metrics
    and LoRA after each step are those of a run at 2 from the start; its checkpoints record 2, and a
    resume from one keeps it."""
    settings = ["--MAX_STEPS=2", "--SAVE_EVERY=1", "--EVAL_EVERY=0", f"--KL_COEF={kl_coef}"]
    result, metrics = train(tmp_path, "backed_off", *settings, "--MICRO_BATCH_SIZE=4",
                           fail=("common.logprobs", "layout_logprobs", 1, "any"))
    _, expected = train(tmp_path, "at2", *settings, "--MICRO_BATCH_SIZE=2")
    assert result.stdout.count("out of memory") == 1
    assert (f"out of memory in {phase} at MICRO_BATCH_SIZE=4: retrying with 2 for the rest of the run"
            in result.stdout)
    assert all(step["zero_adv_groups"] < 1.0 for step in expected)  # each step updated
    for step, expected_step in zip(metrics, expected, strict=True):
        for key in UNTIMED:
            assert step[key] == pytest.approx(expected_step[key], rel=1e-5, abs=1e-6), key
    assert_same_gradients(tmp_path, "backed_off", "at2")
    for step in (1, 2):
        assert_same_lora(tmp_path / "backed_off" / f"lora_epoch0_step{step}.pt",
                         tmp_path / "at2" / f"lora_epoch0_step{step}.pt")
    checkpoint = load_checkpoint(tmp_path / "backed_off" / "lora_epoch0_step1.pt")
    assert checkpoint["extra"]["batch_sizes"]["MICRO_BATCH_SIZE"] == 2
    if kl_coef == "0":  # one resume is enough: the sizes are kept alike for every phase
        resumed = run_script(["run_train_grpo.py", *TINY_RUN, *settings, "--MICRO_BATCH_SIZE=4",
                              f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=resumed",
                              f"--RESUME={tmp_path / 'backed_off' / 'lora_epoch0_step1.pt'}"])
        assert "resume: MICRO_BATCH_SIZE=2" in resumed.stdout
        resumed_step = json.loads((tmp_path / "resumed.jsonl").read_text().splitlines()[-1])
        assert resumed_step["policy_micro_batches"] == expected[1]["policy_micro_batches"]
        assert_same_lora(tmp_path / "resumed" / "lora_epoch0_step2.pt", tmp_path / "at2" / "lora_epoch0_step2.pt")


def test_a_rollout_chunk_out_of_memory_samples_the_rollouts_of_half_the_size(tmp_path):
    """The step's 16 rows in chunks of 8; the second chunk runs out of memory, after the first drew
    its tokens: the rollouts are sampled again in chunks of 4 from the generator's state at the
    step's start, and the step is a run's at GENERATION_BATCH_SIZE=4."""
    result, metrics = train(tmp_path, "backed_off", "--MAX_STEPS=1", "--EVAL_EVERY=0", "--GENERATION_BATCH_SIZE=8",
                           fail=("common.sampler", "_sample_rows", 2, "any"))
    _, expected = train(tmp_path, "at4", "--MAX_STEPS=1", "--EVAL_EVERY=0", "--GENERATION_BATCH_SIZE=4")
    _, unrewound = train(tmp_path, "at8", "--MAX_STEPS=1", "--EVAL_EVERY=0", "--GENERATION_BATCH_SIZE=8")
    assert ("out of memory in the rollouts at GENERATION_BATCH_SIZE=8: retrying with 4 for the rest of the run"
            in result.stdout)
    for key in UNTIMED:
        assert metrics[0][key] == pytest.approx(expected[0][key], rel=1e-5, abs=1e-6), key
    assert metrics[0]["completion_len"] != unrewound[0]["completion_len"]  # the chunk size changes the draws
    assert_same_gradients(tmp_path, "backed_off", "at4")
    assert_same_lora(tmp_path / "backed_off" / "lora_epoch0_step1.pt", tmp_path / "at4" / "lora_epoch0_step1.pt")
    assert load_checkpoint(tmp_path / "backed_off" / "lora_epoch0_step1.pt")["extra"]["batch_sizes"][
        "GENERATION_BATCH_SIZE"] == 4


def test_an_eval_batch_out_of_memory_halves_the_eval_batches_for_the_rest_of_the_run(tmp_path):
    """The step-0 eval's second batch of 4 runs out of memory: that eval and the next go on in
    batches of 2, with the results of a run at EVAL_BATCH_SIZE=2."""
    settings = ["--MAX_STEPS=1", "--EVAL_EVERY=1", "--EVAL_LIMIT=8", "--MAX_NEW_TOKENS=16"]
    result, metrics = train(tmp_path, "backed_off", *settings, "--EVAL_BATCH_SIZE=4",
                           fail=("common.evaluate", "sample", 2, "any"))
    _, expected = train(tmp_path, "at2", *settings, "--EVAL_BATCH_SIZE=2")
    assert ("out of memory in an eval batch at EVAL_BATCH_SIZE=4: retrying with 2 for the rest of the run"
            in result.stdout)
    assert result.stdout.count("out of memory") == 1
    for step, expected_step in zip(metrics, expected, strict=True):
        assert step["eval/accuracy"] == expected_step["eval/accuracy"] and step["eval/total"] == 8
    assert load_checkpoint(tmp_path / "backed_off" / "lora_epoch0_step1.pt")["extra"]["batch_sizes"][
        "EVAL_BATCH_SIZE"] == 2


PPO_RUN = [setting for setting in PPO_TINY_RUN if not setting.startswith("--MICRO_BATCH_SIZE=")]


@pytest.mark.parametrize("phase, counted", [("the reference pass", "any"), ("the policy pass", "grad")])
def test_ppo_backs_off_a_micro_batch_to_the_update_at_half_the_size(tmp_path, phase, counted):
    """run_train_ppo.py: the first pass of the sampling policy's log-probs and values, or the first
    micro-batch of the first mini-batch's update, runs out of memory once at MICRO_BATCH_SIZE=4: the
    first update's gradients and the step's metrics are a run's at 2 from the start. (The weights
    after the step's several AdamW steps are not compared: after a policy-pass back-off the old
    log-probs and values came from passes at 4, which round differently, and Adam's first steps,
    lr * g / (|g| + eps), turn such differences of gradients near eps into weight differences.)"""
    settings = ["--MAX_STEPS=1", "--EVAL_EVERY=0"]
    result, metrics = train(tmp_path, "backed_off", *settings, "--MICRO_BATCH_SIZE=4", script="run_train_ppo.py",
                            tiny_run=PPO_RUN, fail=("ppo.critic", "completion_logprobs_and_values", 1, counted))
    _, expected = train(tmp_path, "at2", *settings, "--MICRO_BATCH_SIZE=2", script="run_train_ppo.py",
                        tiny_run=PPO_RUN)
    assert (f"out of memory in {phase} at MICRO_BATCH_SIZE=4: retrying with 2 for the rest of the run"
            in result.stdout)
    for key in ("reward", "kl", "approx_kl", "clip_frac", "value_loss", "entropy", "grad_norm", "value_grad_norm"):
        assert metrics[0][key] == pytest.approx(expected[0][key], rel=1e-5, abs=1e-6), key
    assert_same_gradients(tmp_path, "backed_off", "at2")


def test_dpo_backs_off_a_micro_batch_to_the_update_at_half_the_size(micro_model_dir, tmp_path):
    """run_train_dpo.py: the first policy micro-batch (pair_logprobs with gradients; the cached reference
    pass runs without) runs out of memory once at MICRO_BATCH_SIZE=4: the update is redone at 2 pairs per
    micro-batch, and equals a run at 2 from the start (the RPO term included)."""
    from tests.test_dpo_trainer import pairs_file
    dpo_run = [f"--MODEL_PATH={micro_model_dir}", f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 8)}",
               "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_EVERY=0", "--BATCH_SIZE=8", "--MAX_STEPS=1",
               "--LORA_R=2", "--RPO_ALPHA=0.5", "--DEVICE=cpu"]
    result, metrics = train(tmp_path, "backed_off", "--MICRO_BATCH_SIZE=4", script="run_train_dpo.py",
                            tiny_run=dpo_run, fail=("dpo.pairs", "pair_logprobs", 1, "grad"))
    _, expected = train(tmp_path, "at2", "--MICRO_BATCH_SIZE=2", script="run_train_dpo.py", tiny_run=dpo_run)
    assert result.stdout.count("out of memory") == 1
    assert "out of memory in the DPO pass at MICRO_BATCH_SIZE=4: retrying with 2 for the rest of the run" in result.stdout
    for key in ("loss", "total_loss", "sft_loss", "reward_accuracy", "grad_norm"):
        assert metrics[-1][key] == pytest.approx(expected[-1][key], rel=1e-5, abs=1e-6), key
    assert_same_gradients(tmp_path, "backed_off", "at2")


@pytest.mark.parametrize("tokens, failing_call, name, size, expected_settings", [
    ("0", 1, "MICRO_BATCH_SIZE", 8, []), ("200", 2, "MICRO_BATCH_TOKENS", 200, ["--MICRO_BATCH_TOKENS=100"])])
def test_sft_backs_off_a_micro_batch_to_the_update_at_half_the_size(tmp_path, tokens, failing_call, name, size,
                                                                     expected_settings):
    """run_sft.py (LoRA on the tiny model, 8 examples): the update's first pass runs out of memory, the
    batch in one pass (no MICRO_BATCH_TOKENS: 8 examples per micro-batch, 4 after), or the second of
    its micro-batches of 200 tokens (the first one's gradients already accumulated: the retry zeroes
    them). The update is redone at half the size and its gradients and metrics are those of a run at
    MICRO_BATCH_TOKENS=100 from the start, or, where SFT has no constant for 4 examples, of the batch
    in one pass (the normaliser is the batch's answer tokens, whatever the grouping); the checkpoint
    records the smaller size."""
    sft_run = ["--MAX_STEPS=1", "--EVAL_EVERY=0", "--BATCH_SIZE=8", "--LORA_R=2", "--DEVICE=cpu"]
    result, metrics = train(tmp_path, "backed_off", f"--MICRO_BATCH_TOKENS={tokens}", script="run_sft.py",
                            tiny_run=sft_run, fail=("common.logprobs", "body_hidden_states", failing_call, "grad"))
    _, expected = train(tmp_path, "expected", *expected_settings, script="run_sft.py", tiny_run=sft_run)
    assert result.stdout.count("out of memory") == 1
    assert (f"out of memory in the SFT pass at {name}={size}: retrying with {size // 2} for the rest of the run"
            in result.stdout)
    for key in ("loss", "grad_norm", "answer_tokens"):
        assert metrics[-1][key] == pytest.approx(expected[-1][key], rel=1e-5, abs=1e-6), key
    assert_same_gradients(tmp_path, "backed_off", "expected")
    checkpoint = load_checkpoint(tmp_path / "backed_off" / "lora_epoch0_step1.pt")
    assert checkpoint["extra"]["batch_sizes"][name] == size // 2

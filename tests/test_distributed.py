"""Several processes under torchrun (gloo on the CPU): every trainer and eval_math.py run with 2 ranks,
and 2 ranks give what 1 process gives (the GRPO update on fixed completions, the eval records)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from common.checkpoint import load_checkpoint, rng_state
from common.distributed import (DistributedContext, all_gather_objects, all_reduce_sum, restore_rank_state,
                                setup_distributed, shard, sum_gradients)
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR
from tests.test_dpo_trainer import pairs_file

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(args: list[str], processes: int | None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` (processes None) or ``torchrun --standalone --nproc_per_node=PROCESSES ARGS``,
    one CPU thread per process; fail with the output if it fails."""
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    launcher = [] if processes is None else ["-m", "torch.distributed.run", "--standalone",
                                             f"--nproc_per_node={processes}"]
    result = subprocess.run([sys.executable, *launcher, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, launcher + args))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def metrics_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_python_is_one_process_without_a_process_group(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    context = setup_distributed("cpu")
    assert context == DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert context.is_main and not dist.is_initialized()
    # Every collective is what it is for one process.
    assert all_reduce_sum(3) == 3.0
    assert all_reduce_sum({"tokens": torch.tensor(5), "loss": 0.5}) == {"tokens": 5.0, "loss": 0.5}
    items = list(range(5))
    assert shard(items) is items and all_gather_objects("x") == ["x"]
    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.full((2,), 0.5)
    sum_gradients([parameter])
    assert parameter.grad.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("nccl", [True, False])
def test_torchrun_on_cuda_takes_gloo_where_pytorch_has_no_nccl(nccl, monkeypatch, capsys):
    """PyTorch's Windows builds have no NCCL (issue 29, finding 16): torchrun on CUDA joins through gloo
    there, saying so in one line; NCCL where it is. Simulated: a CUDA device, NCCL's availability, and
    the process group's start recorded instead of made."""
    import common.distributed

    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(common.distributed, "get_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    backends = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: backends.append(backend))
    setup_distributed("auto")
    assert backends == ["nccl" if nccl else "gloo"]
    said = "torchrun: 2 processes on CUDA through gloo (this PyTorch has no NCCL, as on Windows)"
    assert (said in capsys.readouterr().out) != nccl


def test_resume_refuses_another_number_of_processes():
    two_ranks = {"rng": rng_state(), "extra": {"ranks": {"world_size": 2, "rng": [rng_state(), rng_state()]}}}
    with pytest.raises(SystemExit, match="2 process\\(es\\), this run has 1"):
        restore_rank_state(two_ranks, DistributedContext())
    one_process = {"rng": rng_state(), "extra": {}}  # a checkpoint from before torchrun support
    restore_rank_state(one_process, DistributedContext())
    with pytest.raises(SystemExit, match="1 process\\(es\\), this run has 2"):
        restore_rank_state(one_process, DistributedContext(rank=1, world_size=2, local_rank=1, local_world_size=2))


def check_one_writer(result, run_dir, log_file, steps):
    """Rank 0 alone printed, wrote one checkpoint and one metrics line per step (plus the step-0 eval)."""
    assert result.stdout.count(f"step {steps}/{steps}") == 1
    assert [path.name for path in run_dir.iterdir()] == [f"lora_epoch0_step{steps}.pt"]  # no temporary left either
    assert [m["step"] for m in metrics_of(log_file)] == list(range(steps + 1))


def test_grpo_two_ranks_two_steps(micro_model_dir, tmp_path):
    result = launch(["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                     "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                     "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=6", "--MAX_STEPS=2", "--EVAL_EVERY=2",
                     "--EVAL_LIMIT=3", "--DEVICE=cpu", "--KL_COEF=0.05", f"--CHECKPOINT_DIR={tmp_path}",
                     f"--LOG_DIR={tmp_path}", "--RUN_NAME=smoke"], processes=2)
    check_one_writer(result, tmp_path / "smoke", tmp_path / "smoke.jsonl", steps=2)
    assert "2 process(es) x 1 questions per step" in result.stdout
    assert metrics_of(tmp_path / "smoke.jsonl")[2]["eval/total"] == 3  # the eval sharded 2 + 1, gathered
    ranks = load_checkpoint(tmp_path / "smoke" / "lora_epoch0_step2.pt")["extra"]["ranks"]
    assert ranks["world_size"] == 2
    sampling_states = [state["generators"]["sampling"] for state in ranks["rng"]]
    assert not torch.equal(*sampling_states)  # each rank samples from its own stream


def test_grpo_refuses_prompts_that_do_not_divide(micro_model_dir, tmp_path):
    with pytest.raises(AssertionError, match="PROMPTS_PER_STEP=3 does not divide between 2 processes"):
        launch(["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=3", "--EVAL_EVERY=0", "--DEVICE=cpu",
                f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"], processes=2)


def test_dpo_two_ranks_two_steps(micro_model_dir, tmp_path):
    result = launch(["run_train_dpo.py", f"--MODEL_PATH={micro_model_dir}",
                     f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 12)}", "--EVAL_FILE=data/synth_test.jsonl",
                     "--EVAL_LIMIT=2", "--EVAL_EVERY=2", "--MAX_NEW_TOKENS=4", "--BATCH_SIZE=4",
                     "--MICRO_BATCH_SIZE=1", "--MAX_STEPS=2", "--LR=1e-2", "--WARMUP_STEPS=1", "--LORA_R=2",
                     "--RPO_ALPHA=0.5", "--DEVICE=cpu", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}",
                     "--RUN_NAME=smoke"], processes=2)
    check_one_writer(result, tmp_path / "smoke", tmp_path / "smoke.jsonl", steps=2)
    # The LoRA starts at B = 0: every pair's loss is log 2, on both ranks' pairs.
    assert metrics_of(tmp_path / "smoke.jsonl")[1]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_sft_two_ranks_two_steps(micro_model_dir, tmp_path):
    log_file = tmp_path / "sft.jsonl"
    result = launch(["run_sft.py", f"--MODEL_PATH={micro_model_dir}", f"--OUT_DIR={tmp_path / 'sft'}",
                     "--MAX_STEPS=2", "--BATCH_SIZE=4", "--EVAL_LIMIT=3", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu",
                     "--LORA_R=4", f"--LOG_DIR={tmp_path}", "--RUN_NAME=sft", "--TRAIN_FILE=data/synth_train.jsonl"],
                    processes=2)
    assert result.stdout.count("saved ") == 1
    assert [path.name for path in (tmp_path / "sft").iterdir()] == ["lora_epoch0_step2.pt"]
    steps = metrics_of(log_file)
    assert [s["step"] for s in steps] == [0, 1, 2]  # the step-0 eval, two steps (the last with its eval), written once
    assert steps[2]["eval/total"] == 3


def test_ppo_two_ranks_two_steps(micro_model_dir, tmp_path):
    result = launch(["run_train_ppo.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                     "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                     "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=6", "--MAX_STEPS=2", "--EVAL_EVERY=2",
                     "--EVAL_LIMIT=3", "--DEVICE=cpu", "--KL_COEF=0.05", "--MINI_BATCH_SIZE=2",
                     "--MICRO_BATCH_SIZE=2", "--CRITIC_HIDDEN=8", "--TARGET_KL=10.0", f"--CHECKPOINT_DIR={tmp_path}",
                     f"--LOG_DIR={tmp_path}", "--RUN_NAME=smoke"], processes=2)
    check_one_writer(result, tmp_path / "smoke", tmp_path / "smoke.jsonl", steps=2)
    assert load_checkpoint(tmp_path / "smoke" / "lora_epoch0_step2.pt")["extra"]["ranks"]["world_size"] == 2


# A trainer (the first argument) with its sampler replaced by fixed completions: the same answers for a question
# whatever the rank and its seed, so that 1 and 2 processes train on exactly the same rollouts. A
# group answers with 3 of the 4 ANSWERS, chosen by the prompt's length (so groups differ in tokens);
# a prompt whose length is a multiple of 4 gets ANSWERS[0] 3 times: no advantage, a dropped group.
FIXED_COMPLETIONS_LAUNCHER = '''
import runpy, sys
sys.path.insert(0, {repo!r})
import torch
import common.sampler

ANSWERS = ["Answer: 4", "2 + 2 = 4\\nAnswer: 4", "I think it is 5", "Answer: 5\\nAnswer: 5\\nAnswer: 5"]


def fixed_sample(model, prompt_ids, settings, tokenizer, eos_token_ids, **kwargs):
    num_samples = settings.num_samples
    rows = [prompt for prompt in prompt_ids for _ in range(num_samples)]
    texts = [ANSWERS[0] if len(prompt) % 4 == 0 else ANSWERS[(k + len(prompt)) % len(ANSWERS)]
             for prompt in prompt_ids for k in range(num_samples)]
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_token_ids[-1]] for text in texts]
    width = max(len(completion) for completion in completions)
    completion_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    completion_mask = torch.zeros(len(rows), width)
    for row, completion in enumerate(completions):
        completion_ids[row, :len(completion)] = torch.tensor(completion)
        completion_mask[row, :len(completion)] = 1.0
    return common.sampler.SampleOutput(
        prompt_ids=rows, completion_ids=completion_ids, completion_mask=completion_mask,
        logprobs=torch.zeros(len(rows), width), truncated=torch.zeros(len(rows), dtype=torch.bool), texts=texts,
        prompt_index=torch.arange(len(prompt_ids)).repeat_interleave(num_samples))


common.sampler.sample = fixed_sample
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_grpo_updates_with_two_ranks_equal_one_process(micro_model_dir, tmp_path):
    """Two GRPO steps on 4 questions x 3 fixed completions: 2 ranks x 2 questions (normaliser summed
    over the ranks, gradients summed) give the LoRA and the metrics of 1 process x 4 questions.

    The prompts of the first two steps are 34, 33 | 31, 31 and 34, 33 | 32, 36 tokens long: in step 1
    the ranks have different token counts, in step 2 rank 1's groups are both dropped and it has
    nothing to train on (it still takes part in the gradient sum)."""
    launcher = tmp_path / "fixed_completions.py"
    launcher.write_text(FIXED_COMPLETIONS_LAUNCHER.format(repo=str(REPO_ROOT)))
    settings = [f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl", "--NUM_PROMPTS=16",
                "--PROMPTS_PER_STEP=4", "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=24", "--MAX_STEPS=2",
                "--SAVE_EVERY=1", "--EVAL_EVERY=0", "--KL_COEF=0.05", "--MICRO_BATCH_SIZE=4", "--LORA_R=4",
                "--LR=1e-3", "--WARMUP_STEPS=0", "--DEVICE=cpu", f"--CHECKPOINT_DIR={tmp_path}",
                f"--LOG_DIR={tmp_path}"]
    launch([str(launcher), "run_train_grpo.py", *settings, "--RUN_NAME=one"], processes=None)
    launch([str(launcher), "run_train_grpo.py", *settings, "--RUN_NAME=two"], processes=2)
    one_metrics, two_metrics = metrics_of(tmp_path / "one.jsonl"), metrics_of(tmp_path / "two.jsonl")
    assert [m["zero_adv_groups"] for m in one_metrics] == [0.0, 0.5]
    for step, (one_step, two_step) in enumerate(zip(one_metrics, two_metrics, strict=True), start=1):
        one = load_checkpoint(tmp_path / "one" / f"lora_epoch0_step{step}.pt")["lora"]
        two = load_checkpoint(tmp_path / "two" / f"lora_epoch0_step{step}.pt")["lora"]
        assert any(key.endswith("lora_B") and tensor.abs().sum() > 0 for key, tensor in one.items())  # updated
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
        for key in ("reward", "reward_std", "accuracy", "format_rate", "loss", "kl", "clip_frac", "entropy",
                    "completion_len", "zero_adv_groups", "grad_norm"):
            assert two_step[key] == pytest.approx(one_step[key], rel=1e-5, abs=1e-7), (step, key)


def test_ppo_update_with_two_ranks_equals_one_process(micro_model_dir, tmp_path):
    """One PPO epoch over one mini-batch holding the whole buffer (so the shuffle cannot matter), on
    4 questions x 3 fixed completions: 2 ranks x 2 questions (advantages whitened and explained variance
    computed with the whole step's statistics, normaliser summed, gradients of the LoRA and the critic
    summed) give the weights and the metrics of 1 process x 4 questions."""
    launcher = tmp_path / "fixed_completions.py"
    launcher.write_text(FIXED_COMPLETIONS_LAUNCHER.format(repo=str(REPO_ROOT)))
    settings = [f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl", "--NUM_PROMPTS=16",
                "--PROMPTS_PER_STEP=4", "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=24", "--MAX_STEPS=2",
                "--SAVE_EVERY=1", "--EVAL_EVERY=0", "--KL_COEF=0.05", "--PPO_EPOCHS=1", "--MINI_BATCH_SIZE=12",
                "--MICRO_BATCH_SIZE=4", "--LORA_R=4", "--CRITIC_HIDDEN=8", "--LR=1e-3", "--WARMUP_STEPS=0",
                "--DEVICE=cpu", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"]
    launch([str(launcher), "run_train_ppo.py", *settings, "--RUN_NAME=one"], processes=None)
    launch([str(launcher), "run_train_ppo.py", *settings, "--RUN_NAME=two"], processes=2)
    for step, (one_step, two_step) in enumerate(zip(metrics_of(tmp_path / "one.jsonl"),
                                                    metrics_of(tmp_path / "two.jsonl"), strict=True), start=1):
        one = load_checkpoint(tmp_path / "one" / f"lora_epoch0_step{step}.pt")
        two = load_checkpoint(tmp_path / "two" / f"lora_epoch0_step{step}.pt")
        assert any(key.endswith("lora_B") and tensor.abs().sum() > 0 for key, tensor in one["lora"].items())
        for part in ("lora", "critic"):
            weights_one = one["lora"] if part == "lora" else one["extra"]["critic"]
            weights_two = two["lora"] if part == "lora" else two["extra"]["critic"]
            for key in weights_one:
                torch.testing.assert_close(weights_two[key], weights_one[key], atol=1e-5, rtol=0)
        for key in ("reward", "reward_std", "accuracy", "kl", "approx_kl", "clip_frac", "value_loss", "entropy",
                    "explained_variance", "returns_mean", "values_mean", "completion_len", "grad_norm",
                    "value_grad_norm"):
            assert two_step[key] == pytest.approx(one_step[key], rel=1e-4, abs=1e-6), (step, key)


def test_grpo_resume_with_two_ranks_equals_uninterrupted_run(tmp_path):
    """Each rank gets its own sampling stream back: the resumed step 2 samples what the straight run did."""
    settings = [f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl", "--NUM_PROMPTS=64",
                "--PROMPTS_PER_STEP=4", "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=40", "--LORA_R=4",
                "--LR=5e-3", "--WARMUP_STEPS=1", "--MAX_STEPS=2", "--SAVE_EVERY=1", "--EVAL_EVERY=0", "--DEVICE=cpu",
                f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}"]
    launch(["run_train_grpo.py", *settings, "--RUN_NAME=straight"], processes=2)
    launch(["run_train_grpo.py", *settings, "--RUN_NAME=resumed",
            f"--RESUME={tmp_path / 'straight' / 'lora_epoch0_step1.pt'}"], processes=2)
    halfway = load_checkpoint(tmp_path / "straight" / "lora_epoch0_step1.pt")["lora"]
    straight = load_checkpoint(tmp_path / "straight" / "lora_epoch0_step2.pt")["lora"]
    resumed = load_checkpoint(tmp_path / "resumed" / "lora_epoch0_step2.pt")["lora"]
    assert any(not torch.equal(straight[key], halfway[key]) for key in straight)  # step 2 did update
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)


def test_sharded_eval_equals_single_process(tmp_path):
    """24 problems in batches of 5: sharded 12 + 12, the batches (and so their left padding) differ
    from the single process's, and the greedy answers do not."""
    settings = ["eval_math.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=24",
                "--EVAL_BATCH_SIZE=5", "--MAX_NEW_TOKENS=40", "--DEVICE=cpu"]
    single = launch([*settings, f"--OUT_FILE={tmp_path / 'single.jsonl'}"], processes=None)
    sharded = launch([*settings, f"--OUT_FILE={tmp_path / 'sharded.jsonl'}"], processes=2)

    def accuracy_lines(stdout: str) -> list[str]:  # "Total: N  Correct: M  Accuracy: X%", without the speed
        return [line.split("  (95% CI")[0] for line in stdout.splitlines() if line.startswith("Total:")]

    assert len(accuracy_lines(single.stdout)) == 1
    assert accuracy_lines(sharded.stdout) == accuracy_lines(single.stdout)  # printed once, by rank 0
    single_records = metrics_of(tmp_path / "single.jsonl")
    assert metrics_of(tmp_path / "sharded.jsonl") == single_records
    assert 0 < sum(record["correct"] for record in single_records) < 24
    single_summary = json.loads((tmp_path / "single.summary.json").read_text())
    sharded_summary = json.loads((tmp_path / "sharded.summary.json").read_text())
    for key in ("eval/accuracy", "eval/total", "eval/correct", "eval/ci_low", "eval/ci_high"):
        assert sharded_summary[key] == single_summary[key], key

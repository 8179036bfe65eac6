"""common/health.py on crafted metric streams: each symptom's line, its step and the constant it names,
once per episode; nothing on a healthy stream or on the recorded demo runs (tests/fixtures/demo-*.jsonl).

The steps at which a line appears are worked out by hand from the windows (START_STEPS = 3,
RECENT_STEPS = 5, TRUNCATION_STEPS = 3, ...), asserted below with the constants they come from.
"""

import json
import math

import pytest

from common import health
from common.checkpoint import load_checkpoint
from common.health import HealthMonitor
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR, run_script
from tests.test_dpo_trainer import pairs_file


def step_metrics(step: int, **changes) -> dict:
    """One step of a healthy GRPO run, as the trainer logs it (values of the tiny model's demo), with a
    wobble of a few percent so that no check sees a flat line; ``changes`` replace values."""
    wobble = 1 + 0.05 * ((step % 3) - 1)
    metrics = {"step": step, "reward": 0.6 * wobble, "reward_std": 0.5, "accuracy": 0.4 * wobble, "format_rate": 1.0,
               "completion_len": 18.0 * wobble, "truncated": 0.0, "repetition": 0.0, "entropy": 0.11 * wobble,
               "kl": 0.0, "zero_adv_groups": 0.25 * wobble, "grad_norm": 0.15 * wobble,
               "logprob_mismatch_mean": 6e-7 * wobble, "loss": 0.01, "skipped_updates": 0,
               "lora_norm": 12.0 + 0.01 * step, "lora_b_norm": 0.02 * step, "lora_update_norm": 0.01 * wobble}
    metrics.update(changes)
    return metrics


def replay(stream, mode="warn"):
    """[(step, line)] of what the monitor says on ``stream``, and the monitor."""
    monitor = HealthMonitor(mode)
    said = [(metrics["step"], line) for metrics in stream for line in monitor.observe(metrics)]
    return said, monitor


def steps_of(said):
    return [step for step, _ in said]


def test_a_healthy_stream_says_nothing():
    stream = [{"step": 0, "eval/accuracy": 0.57}] + [step_metrics(step) for step in range(1, 121)]
    stream[50]["eval/accuracy"] = 0.6
    said, monitor = replay(stream)
    assert said == [] and monitor.summary() == ""


@pytest.mark.parametrize("name", ["demo-grpo", "demo-ppo", "demo-dpo"])
def test_the_recorded_demo_runs_say_nothing(name):
    """The demos' metrics as `make demo`, `make demo-ppo` and `make demo-dpo` logged them (logs/demo-*.jsonl of
    a healthy run), trimmed to the keys the checks read and rounded to 4 significant digits."""
    stream = [json.loads(line) for line in (REPO_ROOT / "tests" / "fixtures" / f"{name}.jsonl").read_text().splitlines()]
    assert len(stream) > 100 and "eval/accuracy" in stream[0]
    said, monitor = replay(stream)
    assert said == [] and monitor.summary() == ""


def test_truncation_once_per_episode_and_again_when_it_returns():
    cut = {step: 0.5 for step in (*range(1, 6), *range(21, 26))}
    said, monitor = replay([step_metrics(step, truncated=cut.get(step, 0.0)) for step in range(1, 26)])
    # Over the last TRUNCATION_STEPS = 3 steps: step 3 (0.5) first, step 6 (0.33) last of the first episode;
    # step 22 (0.33) begins the second, 16 steps after the first ended (more than EPISODE_GAP).
    assert health.TRUNCATION_STEPS == 3 and health.TRUNCATION_SHARE == 0.2
    assert steps_of(said) == [3, 22]
    assert said[0][1] == ("health: truncation: 50% of the completions cut at MAX_NEW_TOKENS over steps 1-3; likely "
                          "cause: the answers need more tokens than the limit, and a cut answer is scored unfinished; "
                          "change MAX_NEW_TOKENS (raise it)")
    assert monitor.summary() == "health: 1 symptom seen: truncation (steps 3-6, 22-25)"


def test_a_symptom_that_flaps_within_the_gap_is_one_episode():
    # Truncated every other step: the 3-step mean alternates 0.33 / 0.17 around the threshold.
    said, monitor = replay([step_metrics(step, truncated=0.5 * (step % 2)) for step in range(1, 30)])
    assert steps_of(said) == [3]
    assert monitor.summary() == "health: 1 symptom seen: truncation (steps 3-29)"


def test_no_learning_signal_from_zero_advantage_groups():
    said, _ = replay([step_metrics(step, zero_adv_groups=1.0) for step in range(1, 9)])
    assert steps_of(said) == [health.NO_SIGNAL_STEPS]
    assert said[0][1].startswith("health: no learning signal: 100% of the groups scored alike (zero advantage, "
                                 "no gradient) over steps 1-5")
    assert "NUM_SAMPLES_PER_PROMPT" in said[0][1] and "TEMPERATURE" in said[0][1]
    below, _ = replay([step_metrics(step, zero_adv_groups=0.7) for step in range(1, 20)])
    assert below == []


def test_no_learning_signal_without_groups_is_a_reward_that_never_varies():
    """PPO logs no zero_adv_groups: a step whose completions all scored alike has reward_std 0."""
    stream = [{key: value for key, value in step_metrics(step, reward_std=0.0).items() if key != "zero_adv_groups"}
              for step in range(1, 8)]
    said, _ = replay(stream)
    assert steps_of(said) == [5] and "every completion got the same reward over steps 1-5" in said[0][1]


def test_collapse_of_the_eval_accuracy_names_lr():
    stream = [{"step": 0, "eval/accuracy": 0.5}] + [step_metrics(step) for step in range(1, 13)]
    stream[4]["eval/accuracy"] = 0.3  # 60% of the start: not yet
    stream[8]["eval/accuracy"] = 0.2  # 40%: below COLLAPSE_FRACTION = 0.5
    said, monitor = replay(stream)
    assert steps_of(said) == [8]
    assert said[0][1].startswith("health: collapse: eval accuracy fell from 50.0% (step 0) to 20.0% (step 8);")
    assert said[0][1].endswith("change LR (lower it)")
    assert monitor.summary() == "health: 1 symptom seen: collapse (steps 8-12)"  # the last eval still says so


@pytest.mark.parametrize("key, fallen, expected", [
    ("format_rate", 0.3, "the format rate fell from 1.00 (steps 1-3) to 0.30 (steps 4-8)"),
    ("accuracy", 0.1, "the training accuracy fell from 0.40 (steps 1-3) to 0.10 (steps 4-8)"),
    ("reward", -0.2, "the mean reward fell from 0.600 (steps 1-3) to -0.200 (steps 4-8)"),
])
def test_collapse_of_the_rollouts(key, fallen, expected):
    stream = [step_metrics(step) for step in range(1, 4)] + [step_metrics(step, **{key: fallen}) for step in range(4, 10)]
    if key != "format_rate":
        for metrics in stream[:3]:
            metrics[key] = {"accuracy": 0.4, "reward": 0.6}[key]  # a start without wobble: a round number to read
    said, _ = replay(stream)
    # START_STEPS = 3, then RECENT_STEPS = 5 steps after them: step 8 is the first that compares.
    assert steps_of(said) == [8] and expected in said[0][1] and "LR (lower it), TEMPERATURE" in said[0][1]


def test_collapse_of_the_entropy_names_temperature():
    stream = [step_metrics(step, entropy=0.1) for step in range(1, 4)]
    stream += [step_metrics(step, entropy=0.005) for step in range(4, 10)]
    said, _ = replay(stream)
    assert steps_of(said) == [8]
    assert "the entropy fell from 0.1 (steps 1-3) to 0.005 (steps 4-8)" in said[0][1]
    assert said[0][1].endswith("change TEMPERATURE (raise it), LR (lower it)")


def test_a_gradient_norm_jump_is_exploding_updates():
    stream = [step_metrics(step, grad_norm=0.15) for step in range(1, 6)] + [step_metrics(6, grad_norm=2.0)]
    said, _ = replay(stream)
    assert said == [(6, "health: exploding updates: gradient norm 2 at step 6, 13x the median 0.15 of steps 1-5; "
                        "likely cause: the learning rate is too large for this model and data; change LR (lower it), "
                        "GRAD_CLIP (lower it)")]
    under, _ = replay(stream[:5] + [step_metrics(6, grad_norm=0.15 * 9)])  # 9x: under GRAD_JUMP
    assert under == []


@pytest.mark.parametrize("changes, expected", [
    ({"grad_norm": math.nan}, "non-finite grad_norm at step 4"),
    ({"loss": math.inf, "grad_norm": math.inf}, "non-finite grad_norm, loss at step 4"),
    ({"skipped_updates": 1}, "1 update(s) skipped at step 4 (non-finite loss or gradient)"),
    ({"lora_update_norm": 8.0, "lora_norm": 10.0}, "step 4 moved the LoRA by 8, 80% of its norm 10"),
])
def test_non_finite_values_skipped_updates_and_huge_steps_are_exploding_updates(changes, expected):
    stream = [step_metrics(step) for step in range(1, 4)] + [step_metrics(4, **changes)]
    said, _ = replay(stream)
    assert steps_of(said) == [4] and said[0][1].startswith(f"health: exploding updates: {expected};")
    assert "change LR (lower it), GRAD_CLIP (lower it)" in said[0][1]


def test_an_adapter_norm_growing_without_bound_is_exploding_updates():
    stream = [step_metrics(step, lora_norm=10.0 * 1.2 ** step) for step in range(1, 15)]
    said, _ = replay(stream)
    # 1.2^10 = 6.2 > ADAPTER_GROWTH = 3 over the ADAPTER_GROWTH_STEPS = 10 steps before step 11.
    assert steps_of(said) == [11]
    assert "the LoRA's norm grew from 12 to 74.3 over steps 1-11" in said[0][1]
    slow, _ = replay([step_metrics(step, lora_norm=10.0 * 1.1 ** step) for step in range(1, 30)])  # 2.6x: under
    assert slow == []


def test_lora_b_still_zero_after_steps_with_a_gradient():
    said, _ = replay([step_metrics(step, lora_b_norm=0.0) for step in range(1, 9)])
    assert steps_of(said) == [health.STILL_STEPS]
    assert said[0][1] == ("health: adapter not moving: LoRA B still exactly zero after steps 1-5, each with a "
                          "gradient; likely cause: a learning rate too small for the updates to change the adapter; "
                          "change LR (raise it)")
    # Steps without a gradient (no group had an advantage) are no evidence.
    no_signal, _ = replay([step_metrics(step, lora_b_norm=0.0, grad_norm=None, zero_adv_groups=0.5)
                           for step in range(1, 9)])
    assert no_signal == []


def test_updates_of_size_about_zero_are_an_adapter_not_moving():
    said, _ = replay([step_metrics(step, lora_update_norm=1e-6) for step in range(1, 9)])  # 1e-6 / 12: under 1e-6
    assert steps_of(said) == [5] and "each of steps 1-5 moved the LoRA by under 8.3e-08 of its norm" in said[0][1]
    moving, _ = replay([step_metrics(step, lora_update_norm=1e-4) for step in range(1, 9)])
    assert moving == []


def test_kl_running_away_names_kl_coef():
    said, _ = replay([step_metrics(step, kl=0.06 * step) for step in range(1, 12)])
    # The mean of the last RECENT_STEPS = 5 steps' KL passes KL_LIMIT = 0.25 at step 7 (steps 3-7: 0.3; 2-6: 0.24).
    assert steps_of(said) == [7] and "KL to the reference 0.3 nats per token over steps 3-7" in said[0][1]
    assert "change KL_COEF (raise it)" in said[0][1]


def test_a_growing_logprob_mismatch_names_dtype_and_importance_correction():
    stream = [step_metrics(step, logprob_mismatch_mean=1e-3) for step in range(1, 4)]
    stream += [step_metrics(step, logprob_mismatch_mean=0.05) for step in range(4, 10)]
    said, _ = replay(stream)
    assert steps_of(said) == [8] and "differ by 0.05 per token over steps 4-8, 50x the start's 0.001" in said[0][1]
    assert said[0][1].endswith("change DTYPE (float32), IMPORTANCE_CORRECTION (tis)")
    # bf16's usual gap, steady: nothing.
    steady, _ = replay([step_metrics(step, logprob_mismatch_mean=0.02) for step in range(1, 20)])
    assert steady == []


def fp16_stream(scales, skipped):
    """Steps whose loss scale and skipped-update count are given; a skipped update's gradient norm is inf."""
    return [step_metrics(step, loss_scale=scale, skipped_updates=count,
                         grad_norm=math.inf if count > (skipped[step - 2] if step > 1 else 0) else 0.15)
            for step, (scale, count) in enumerate(zip(scales, skipped), start=1)]


def test_fp16_calibration_is_no_symptom():
    """The scale comes down from 2^16 at the start, one overflow (a skipped update) at a time."""
    scales = [2.0 ** (16 - min(step, 4)) for step in range(1, 30)]
    skipped = [min(step, 4) for step in range(1, 30)]
    said, _ = replay(fp16_stream(scales, skipped))
    assert said == []


def test_fp16_updates_skipped_in_a_row_name_float32():
    skipped = list(range(1, 10))
    said, _ = replay(fp16_stream([2.0 ** (16 - count) for count in skipped], skipped))
    # FP16_SKIPPED_IN_A_ROW = 5 increases of the count: steps 2-6.
    assert steps_of(said) == [6] and "an update skipped at each of steps 2-6 (the loss scale now 1024)" in said[0][1]
    assert said[0][1].endswith("change DTYPE=float32 (or bfloat16 on a card that has it)")


def test_fp16_loss_scale_falling_again_and_again_names_float32():
    falls = {12: 1, 20: 2, 30: 3}  # after the calibration's FP16_CALIBRATION_STEPS = 10
    count = [max([n for step, n in falls.items() if step <= s], default=0) for s in range(1, 35)]
    said, _ = replay(fp16_stream([1024.0 / 2 ** n for n in count], count))
    assert steps_of(said) == [30] and "the loss scale fell 3 times, at steps 12, 20, 30, to 128" in said[0][1]


def test_reward_hacking_reward_up_correctness_down():
    stream = [step_metrics(step, reward=0.6, accuracy=0.4) for step in range(1, 4)]
    stream += [step_metrics(step, reward=0.9, accuracy=0.2) for step in range(4, 10)]
    said, _ = replay(stream)
    assert steps_of(said) == [8]
    assert said[0][1] == ("health: reward hacking: the mean reward rose from 0.600 (steps 1-3) to 0.900 (steps 4-8) "
                          "while the accuracy fell from 0.40 to 0.20; likely cause: the reward pays for something "
                          "other than correct answers; change REWARD")


def test_reward_hacking_by_repetition():
    stream = [step_metrics(step, reward=1.0, repetition=0.0) for step in range(1, 4)]
    stream += [step_metrics(step, reward=2.0, repetition=0.5) for step in range(4, 10)]
    said, _ = replay(stream)
    assert steps_of(said) == [8] and "share of repeated lines rose from 0.00 to 0.50" in said[0][1]
    # Repetition with a falling reward is a collapse (an exploded model babbling), not hacking.
    falling = stream[:3] + [dict(metrics, reward=0.2) for metrics in stream[3:]]
    assert all("reward hacking" not in line for _, line in replay(falling)[0])


def test_reward_hacking_by_length_only_when_the_accuracy_does_not_rise():
    stream = [step_metrics(step, reward=0.6, accuracy=0.4, completion_len=18.0) for step in range(1, 4)]
    stream += [step_metrics(step, reward=0.8, accuracy=0.4, completion_len=40.0) for step in range(4, 10)]
    said, _ = replay(stream)
    assert steps_of(said) == [8] and "the answers grew from 18.0 to 40.0 tokens" in said[0][1]
    # Longer answers that are right more often: reasoning that grows, a healthy run.
    better = stream[:3] + [dict(metrics, accuracy=0.6) for metrics in stream[3:]]
    assert replay(better)[0] == []


def test_several_symptoms_are_summed_up_in_order_of_appearance():
    stream = [step_metrics(step, truncated=0.5, zero_adv_groups=1.0 if step >= 4 else 0.25) for step in range(1, 12)]
    said, monitor = replay(stream)
    # Zero-advantage share over steps 3-7: (0.2375 + 4 x 1.0) / 5 = 0.85, the first 5-step mean over 0.75.
    assert steps_of(said) == [3, 7]
    assert monitor.summary() == ("health: 2 symptoms seen: truncation (steps 3-11), "
                                 "no learning signal (steps 7-11)")


def test_off_checks_nothing_and_a_bad_mode_is_refused():
    said, monitor = replay([step_metrics(step, truncated=1.0) for step in range(1, 10)], mode="off")
    assert said == [] and monitor.summary() == ""
    with pytest.raises(ValueError, match="HEALTH must be one of warn, stop, off"):
        HealthMonitor("loud")


def test_a_check_whose_metrics_are_absent_does_not_run():
    """DPO logs no rollouts and SFT no adapter metrics when every weight trains: those checks say nothing."""
    sft = [{"step": step, "loss": 1.0, "grad_norm": 0.5, "lr": 1e-3, "skipped_updates": 0} for step in range(1, 30)]
    assert replay(sft)[0] == []


# ----------------------------------------------------------------------------- the symptoms provoked in real runs
TINY_GRPO = ["run_train_grpo.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
             "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=16", "--EVAL_EVERY=0", "--PROMPTS_PER_STEP=4",
             "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=40", "--DEVICE=cpu", "--SAMPLE_EVERY=0"]


def health_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("health:")]


def tiny_grpo(tmp_path, *settings, check=True):
    """run_train_grpo.py on the tiny model: TINY_GRPO with ``settings`` (--NAME=value) in place of its own."""
    names = {setting.split("=")[0] for setting in settings}
    base = [argument for argument in TINY_GRPO if argument.split("=")[0] not in names]
    return run_script([*base, f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=sick", *settings],
                      check=check)


def test_a_learning_rate_far_too_large_is_named_at_the_first_step(tmp_path):
    result = tiny_grpo(tmp_path, "--LR=1e3", "--MAX_STEPS=1")
    lines = health_lines(result)
    # The first step (at LR / WARMUP_STEPS = 200) moves the fresh adapter by about its whole norm.
    assert lines[0].startswith("health: exploding updates: step 1 moved the LoRA by ")
    assert lines[0].endswith("change LR (lower it), GRAD_CLIP (lower it)")
    assert lines[-1] == "health: 1 symptom seen: exploding updates (step 1)"  # after the done: line
    assert result.stdout.splitlines()[-2].startswith("done: 1 steps")


def test_max_new_tokens_too_small_is_named_and_summed_up(tmp_path):
    result = tiny_grpo(tmp_path, "--MAX_NEW_TOKENS=6", "--MAX_STEPS=4")
    lines = health_lines(result)
    # Every completion is cut at 6 tokens: the mean over TRUNCATION_STEPS = 3 steps says so at step 3.
    assert lines == ["health: truncation: 100% of the completions cut at MAX_NEW_TOKENS over steps 1-3; likely cause: "
                     "the answers need more tokens than the limit, and a cut answer is scored unfinished; change "
                     "MAX_NEW_TOKENS (raise it)",
                     "health: 1 symptom seen: truncation (steps 3-4)"]
    assert result.stdout.index("step 3/4") < result.stdout.index(lines[0]) < result.stdout.index("step 4/4")


def test_health_stop_saves_the_step_and_stops_with_status_3(tmp_path):
    result = tiny_grpo(tmp_path, "--MAX_NEW_TOKENS=6", "--MAX_STEPS=6", "--HEALTH=stop", check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    checkpoint = tmp_path / "sick" / "lora_epoch0_step3.pt"
    assert health_lines(result)[0].startswith("health: truncation: 100% of the completions cut")
    assert (f"HEALTH=stop: stopped after step 3 of 6, saved {checkpoint}; change what the health line above names, "
            f"then continue it with: python run_train_grpo.py") in result.stdout
    assert load_checkpoint(checkpoint)["step"] == 3 and "step 4/6" not in result.stdout
    assert [json.loads(line)["step"] for line in (tmp_path / "sick.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_health_off_says_nothing(tmp_path):
    result = tiny_grpo(tmp_path, "--MAX_NEW_TOKENS=6", "--MAX_STEPS=3", "--HEALTH=off")
    assert health_lines(result) == [] and "step 3/3" in result.stdout


def test_a_reward_that_never_varies_is_no_learning_signal(tmp_path):
    (tmp_path / "same.py").write_text("def same(completion):\n    return 1.0\n")
    result = tiny_grpo(tmp_path, f"--REWARD={tmp_path / 'same.py'}:same", f"--MAX_STEPS={health.NO_SIGNAL_STEPS}")
    lines = health_lines(result)
    assert lines[0].startswith("health: no learning signal: 100% of the groups scored alike (zero advantage, "
                               "no gradient) over steps 1-5")
    assert "NUM_SAMPLES_PER_PROMPT" in lines[0] and "TEMPERATURE" in lines[0]


def test_a_reward_for_repeated_answer_lines_is_reward_hacking(tmp_path):
    """A reward of one point per "Answer:" line. At TEMPERATURE=2 some answers have two, and a large LR
    learns to repeat the line within a few steps (0.02 of the lines repeated in steps 1-3, half by steps
    4-8), the reward rising with it: the line appears at step 8, the first that compares RECENT_STEPS
    steps after the START_STEPS."""
    (tmp_path / "hack.py").write_text("def answer_lines(completion):\n"
                                      "    return float(sum(line.strip().startswith('Answer:') for line in "
                                      "completion.splitlines()))\n")
    result = tiny_grpo(tmp_path, f"--REWARD={tmp_path / 'hack.py'}:answer_lines", "--NUM_SAMPLES_PER_PROMPT=8",
                       "--TEMPERATURE=2.0", "--LR=2e-2", "--WARMUP_STEPS=1", "--MAX_STEPS=8")
    hacking = [line for line in health_lines(result) if line.startswith("health: reward hacking:")]
    assert len(hacking) == 1 and "while the share of repeated lines rose from" in hacking[0]
    assert hacking[0].endswith("change REWARD")
    assert result.stdout.index("step 8/8") < result.stdout.index(hacking[0])


@pytest.mark.parametrize("trainer", ["run_train_ppo.py", "run_train_dpo.py", "run_sft.py"])
def test_every_trainer_names_a_learning_rate_far_too_large(trainer, tmp_path):
    """The other trainers run the same checks (HEALTH, through TrainingRun): LR=1e3 moves a fresh LoRA by
    about its whole norm at the first step."""
    settings = {
        "run_train_ppo.py": ["--TRAIN_FILE=data/synth_train.jsonl", "--PROMPTS_PER_STEP=4", "--NUM_SAMPLES_PER_PROMPT=4",
                             "--MAX_NEW_TOKENS=40", "--MINI_BATCH_SIZE=8", "--MICRO_BATCH_SIZE=4", "--CRITIC_HIDDEN=16",
                             f"--CHECKPOINT_DIR={tmp_path}", "--SAMPLE_EVERY=0"],
        "run_train_dpo.py": [f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 4)}", "--BATCH_SIZE=2",
                             f"--CHECKPOINT_DIR={tmp_path}"],
        "run_sft.py": ["--BATCH_SIZE=4", f"--OUT_DIR={tmp_path / 'sft'}"],
    }[trainer]
    result = run_script([trainer, f"--MODEL_PATH={TINY_MODEL_DIR}", "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_EVERY=0",
                         "--LORA_R=4", "--LR=1e3", "--MAX_STEPS=1", "--DEVICE=cpu", f"--LOG_DIR={tmp_path}",
                         "--RUN_NAME=sick", *settings])
    lines = health_lines(result)
    assert lines[0].startswith("health: exploding updates: step 1 moved the LoRA by ")
    assert lines[0].endswith("change LR (lower it), GRAD_CLIP (lower it)")
    assert lines[-1] == "health: 1 symptom seen: exploding updates (step 1)"

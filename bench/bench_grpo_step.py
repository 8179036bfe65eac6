"""GRPO step anatomy: where the time of one run_train_grpo.py step goes, phase by phase.

    python bench/bench_grpo_step.py                                   # the demo's settings (Makefile DEMO_GRPO)
    python bench/bench_grpo_step.py --KL_COEF=0.04 --NUM_ITERATIONS=2  # with the reference and old log-prob passes
    python bench/bench_grpo_step.py --TRAINER_ARGS="--IMPORTANCE_CORRECTION=tis" --COMPARE=false

The step timed is run_train_grpo.py's own: the script runs as a subprocess (bench.run_trainer, through
bench/launch_trainer.py) with WARMUP_STEPS + STEPS as MAX_STEPS and this benchmark's settings as its
constants, in a temporary folder (CHECKPOINT_DIR and LOG_DIR), and its metrics file is read back: the
phases it logs, in seconds (CUDA phases synchronized), means of the STEPS steps after WARMUP_STEPS
untimed ones (means, not medians: the phases then add up to the step). The settings are the demo's:
16 questions x 8 samples, 40 new tokens, LoRA r=16 on every linear layer, lr 2e-4, no KL, one
iteration, the math reward; the trainer's defaults for everything else (TRAINER_ARGS adds more).

  generation    generate_s: encode the questions, sample the completions (a compilation excluded)
  scoring       score_s: rewards, group advantages, the rollout batch, its layouts, the copy to the device
  reference     reference_s: log-probs with the adapters off (only with KL_COEF > 0)
  old logprobs  old_logp_s: the sampling policy's log-probs (only with NUM_ITERATIONS > 1)
  policy        policy_s: per micro-batch, log-probs and entropy, the loss, backward (every iteration)
  optimizer     optimizer_s: the gradient sum over processes, clipping, the AdamW step
  rest          step_s less the phases: the step's questions, metrics, the schedule

Then (COMPARE) the policy pass packed against padded (PACKING=true / false, common/packing.py): the
same settings run again in the other layout, on the demo's rollouts (sampled: after the first update
the two runs' samples may differ a little), and both layouts on rollouts with a GSM8K-like spread of
completion lengths (launch_trainer.py's GSM8K_LIKE: the sampler replaced by forced completions of
random tokens, lengths uniform from 40 to GSM8K_MAX_NEW_TOKENS, a tenth at the limit, the same in both
runs; a random reward, bench/random_reward.py, so that no group is dropped; it times the pass, not the
learning). Per layout, from the metrics: the policy pass's micro-batches, positions computed and real
tokens per iteration (policy_micro_batches, policy_positions, policy_tokens; means per step), the
median of its seconds per step (policy_s, every iteration), and the run's peak resident memory
(ru_maxrss of the trainer's process, the whole run: loading and sampling included; Linux and macOS,
"n/a" on Windows).
"""

import shlex
import statistics
import sys
import tempfile
from pathlib import Path

# Run as `python bench/bench_grpo_step.py`, Python puts bench/ on the path, not the repository root with common/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import configure  # noqa: E402

# ---------------------------------------------------------------- constants
# the demo's settings (Makefile DEMO_GRPO): run_train_grpo.py's constants of the same names
MODEL_PATH = "models/tiny-gemma2-math"  # local model directory
TRAIN_FILE = "data/synth_train.jsonl"  # training questions {"question", "gold_answer"}
PROMPTS_PER_STEP = 16  # questions per step
NUM_SAMPLES_PER_PROMPT = 8  # group size G
MAX_NEW_TOKENS = 40  # completion length limit
LR = 2e-4  # AdamW learning rate of the LoRA
KL_COEF = 0.0  # KL penalty weight (0 = no reference pass)
NUM_ITERATIONS = 1  # updates per batch of rollouts (1 = no old log-prob pass)
MICRO_BATCH_SIZE = 16  # sequences per forward/backward
MICRO_BATCH_TOKENS = 0  # micro-batches by tokens instead (0 = off)
PACKING = True  # the anatomy's layout: packed rows (true) or padded rectangles (false); the comparison runs both
PACK_LENGTH = "auto"  # longest packed row: auto (the step's longest sequence) or tokens
LORA_R = 16  # adapter rank
SEED = 0  # data order, sampling and initialisation
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 on CUDA, else fp32), float32, bfloat16
TRAINER_ARGS = ""  # more of run_train_grpo.py's constants for every run, as on its command line ("--NAME=value ...")
# the measurement
WARMUP_STEPS = 1  # untimed steps first (first calls cost more)
STEPS = 5  # timed steps of each run
COMPARE = True  # also the policy pass packed against padded, on the demo's rollouts and on GSM8K-like ones
GSM8K_MAX_NEW_TOKENS = 256  # the GSM8K-like completions' length limit
OUT_FILE = "logs/bench/grpo_step.json"  # where the results go

config = configure(globals())
# ---------------------------------------------------------------------------

from bench import RANDOM_REWARD, markdown_table, run_trainer, write_results  # noqa: E402
from common.model import get_device  # noqa: E402

PHASES = {"generation": "generate_s", "scoring": "score_s", "reference": "reference_s",
          "old logprobs": "old_logp_s", "policy": "policy_s", "optimizer": "optimizer_s"}  # metric of each phase


def trainer_args(text: str) -> dict:
    """TRAINER_ARGS as {NAME: value}."""
    arguments = shlex.split(text)
    if not all(arg.startswith("--") and "=" in arg for arg in arguments):
        raise SystemExit(f"error: TRAINER_ARGS are --NAME=value, got {text!r}")
    return dict(arg[2:].split("=", 1) for arg in arguments)


def mean_of(steps: list[dict], key: str) -> float:
    return statistics.mean(step[key] for step in steps)


device = get_device(DEVICE)
demo = dict(MODEL_PATH=MODEL_PATH, TRAIN_FILE=TRAIN_FILE, PROMPTS_PER_STEP=PROMPTS_PER_STEP,
            NUM_SAMPLES_PER_PROMPT=NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS=MAX_NEW_TOKENS, LR=LR, KL_COEF=KL_COEF,
            NUM_ITERATIONS=NUM_ITERATIONS, MICRO_BATCH_SIZE=MICRO_BATCH_SIZE, MICRO_BATCH_TOKENS=MICRO_BATCH_TOKENS,
            PACK_LENGTH=PACK_LENGTH, LORA_R=LORA_R, SEED=SEED, DEVICE=DEVICE, DTYPE=DTYPE,
            MAX_STEPS=WARMUP_STEPS + STEPS, **trainer_args(TRAINER_ARGS))
gsm8k_like = dict(demo, MAX_NEW_TOKENS=GSM8K_MAX_NEW_TOKENS, REWARD=RANDOM_REWARD)
layout_name = {True: "packed", False: "padded"}

with tempfile.TemporaryDirectory(prefix="bench_grpo_step-") as folder:
    def timed_run(settings: dict, name: str, launcher: dict | None = None):
        """The run's timed steps (the untimed ones dropped) and the launcher's report."""
        print(f"run_train_grpo.py: {name}", flush=True)
        run = run_trainer(settings, folder, name, launcher, output=Path(folder) / f"{name}.log")
        return run.steps[WARMUP_STEPS:], run.report

    steps, _ = timed_run({**demo, "PACKING": PACKING}, f"demo-{layout_name[PACKING]}")
    comparison_runs = {}
    if COMPARE:
        comparison_runs["demo"] = {PACKING: (steps, _), not PACKING: timed_run(
            {**demo, "PACKING": not PACKING}, f"demo-{layout_name[not PACKING]}")}
        comparison_runs["gsm8k-like"] = {packed: timed_run({**gsm8k_like, "PACKING": packed},
                                                           f"gsm8k-like-{layout_name[packed]}", {"GSM8K_LIKE": True})
                                         for packed in (True, False)}

step_seconds = mean_of(steps, "step_s")
phase_seconds = {name: mean_of(steps, key) for name, key in PHASES.items()}
rest_seconds = step_seconds - sum(phase_seconds.values())
rows_per_step = PROMPTS_PER_STEP * NUM_SAMPLES_PER_PROMPT
tokens_per_step = mean_of(steps, "completion_len") * rows_per_step
generation_tokens_per_s = tokens_per_step / phase_seconds["generation"]
step_tokens_per_s = tokens_per_step / step_seconds
policy_pass = {key: mean_of(steps, key) for key in ("policy_micro_batches", "policy_positions", "policy_tokens")}

print(f"\nrun_train_grpo.py's step on {device}: {PROMPTS_PER_STEP} questions x {NUM_SAMPLES_PER_PROMPT} samples, up to "
      f"{MAX_NEW_TOKENS} new tokens, LoRA r={LORA_R}, KL_COEF {KL_COEF}, NUM_ITERATIONS {NUM_ITERATIONS}, PACKING "
      f"{PACKING}{f', {TRAINER_ARGS}' if TRAINER_ARGS else ''}; means of {STEPS} steps after {WARMUP_STEPS} untimed:\n")
print(markdown_table(
    ["phase", "seconds per step", "share of the step"],
    [[name, f"{seconds:.3f}", f"{100 * seconds / step_seconds:.0f}%"]
     for name, seconds in [*phase_seconds.items(), ("rest", rest_seconds)]]
    + [["whole step", f"{step_seconds:.3f}", "100%"]]))
print(f"\n{tokens_per_step:.0f} generated tokens per step: {generation_tokens_per_s:,.0f} tokens/s while generating, "
      f"{step_tokens_per_s:,.0f} tokens/s over the whole step. The policy pass: "
      f"{policy_pass['policy_micro_batches']:.1f} micro-batches per iteration, {policy_pass['policy_positions']:,.0f} "
      f"positions computed for {policy_pass['policy_tokens']:,.0f} real tokens (prompts and the completions of the "
      f"groups with an advantage).")

comparison = {}
for rollouts, runs in comparison_runs.items():
    comparison[rollouts] = {layout_name[packed]: {
        "seconds": statistics.median(step["policy_s"] for step in layout_steps),
        "micro_batches": mean_of(layout_steps, "policy_micro_batches"),
        "computed": mean_of(layout_steps, "policy_positions"), "real": mean_of(layout_steps, "policy_tokens"),
        "peak_rss_bytes": report["peak_rss_bytes"]} for packed, (layout_steps, report) in sorted(runs.items(),
                                                                                                  reverse=True)}
if comparison:
    print(f"\nPolicy pass packed vs padded on {device} (MICRO_BATCH_SIZE {MICRO_BATCH_SIZE}, MICRO_BATCH_TOKENS "
          f"{MICRO_BATCH_TOKENS}, PACK_LENGTH {PACK_LENGTH}; one run of each, per step: means of its {STEPS} timed "
          f"steps, seconds their median; GSM8K-like: up to {GSM8K_MAX_NEW_TOKENS} new tokens):\n")
    table = []
    for rollouts, layouts in comparison.items():
        padded_seconds = layouts["padded"]["seconds"]
        for name, result in layouts.items():
            peak = "n/a" if result["peak_rss_bytes"] is None else f"{result['peak_rss_bytes'] / 2 ** 20:,.0f}"
            table.append([rollouts, name, f"{result['micro_batches']:.1f}", f"{result['computed']:,.0f}",
                          f"{result['real']:,.0f}", f"{100 * (result['computed'] / result['real'] - 1):.1f}%",
                          f"{result['seconds']:.3f}", f"{padded_seconds / result['seconds']:.2f}x", peak])
    print(markdown_table(["rollouts", "layout", "micro-batches", "positions computed", "real tokens",
                          "computed over real", "policy pass s", "speed-up", "run's peak RSS MiB"], table))

out = write_results(OUT_FILE, "grpo_step", config, {
    "device": str(device), "steps": steps, "phase_seconds": phase_seconds, "rest_seconds": rest_seconds,
    "step_seconds": step_seconds, "tokens_per_step": tokens_per_step,
    "generation_tokens_per_s": generation_tokens_per_s, "step_tokens_per_s": step_tokens_per_s,
    "policy_pass": policy_pass, "packing_comparison": comparison})
print(f"results in {out}")

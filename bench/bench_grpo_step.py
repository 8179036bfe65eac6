"""GRPO step anatomy: where the time of one run_train_grpo.py step goes, phase by phase.

    python bench/bench_grpo_step.py                                   # the demo's settings (Makefile DEMO_GRPO)
    python bench/bench_grpo_step.py --KL_COEF=0.04 --NUM_ITERATIONS=2  # with the reference and old log-prob passes

The step is run_train_grpo.py's, through the same code (common.sampler.sample, the reward,
grpo.advantage, common.rollout, common.lora.disable_lora, common.logprobs via the rollout batch,
grpo.loss, AdamW on the LoRA), with its constants set as the demo sets them: 16 questions x 8
samples, 40 new tokens, temperature 1, LoRA r=16 on every linear layer, lr 2e-4, no KL, one
iteration. WARMUP_STEPS untimed steps, then STEPS timed ones. Phases:

  generation   encode the questions, sample the completions (model.eval(), no grad)
  scoring      rewards, group advantages, the rollout batch (groups with one reward dropped)
  reference    log-probs with the adapters off (only with KL_COEF > 0)
  old logprobs the sampling policy's log-probs (only with NUM_ITERATIONS > 1)
  policy       per micro-batch: log-probs and entropy, grpo_loss, backward
  optimizer    gradient clipping, AdamW step, learning-rate schedule

Forward passes are counted with a hook on the model body (model.get_decoder()): the sampler calls
it once for the prompts and once per new token, token_logprobs once per micro-batch.
"""

import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Run as `python bench/bench_grpo_step.py`, Python puts bench/ on the path, not the repository root with common/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.config import configure  # noqa: E402

# ---------------------------------------------------------------- constants
# the demo's settings (Makefile DEMO_GRPO over run_train_grpo.py's defaults)
MODEL_PATH = "models/tiny-gemma2-math"  # local model directory
TRAIN_FILE = "data/synth_train.jsonl"  # training questions {"question", "gold_answer"}
PROMPTS_PER_STEP = 16  # questions per step
NUM_SAMPLES_PER_PROMPT = 8  # group size G
MAX_NEW_TOKENS = 40  # completion length limit
TEMPERATURE = 1.0  # sampling temperature, and that of the training log-probs
TOP_P = 1.0  # nucleus sampling (1.0 = off)
TOP_K = 0  # top-k sampling (0 = off)
REWARD = "math"  # reward function of common/reward.py
ADVANTAGE = "std"  # group advantage: mean, std or rank
LOSS_AGG = "token_mean"  # token_mean (DAPO), seq_mean (GRPO), seq_sum_const (Dr. GRPO)
IMPORTANCE_LEVEL = "token"  # ratio per token, or per sequence (GSPO)
CLIP_EPS_LOW = 0.2  # ratio clipped below at 1 - CLIP_EPS_LOW
CLIP_EPS_HIGH = 0.28  # ratio clipped above at 1 + CLIP_EPS_HIGH
KL_COEF = 0.0  # KL penalty weight (0 = no reference pass)
KL_ESTIMATOR = "k3"  # k1, k2 or k3
NUM_ITERATIONS = 1  # updates per batch of rollouts (1 = no old log-prob pass)
LR = 2e-4  # AdamW learning rate of the LoRA
LR_WARMUP_STEPS = 5  # linear learning-rate warm-up steps (run_train_grpo.py's WARMUP_STEPS)
GRAD_CLIP = 1.0  # max global gradient norm
MICRO_BATCH_SIZE = 16  # sequences per forward/backward
LOGPROB_CHUNK_SIZE = 1024  # positions per chunk of the output head
LORA_R = 16  # adapter rank
LORA_ALPHA = 32.0  # adapter scale numerator
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # wrapped layers
# the measurement
WARMUP_STEPS = 1  # untimed steps first
STEPS = 5  # timed steps
SEED = 0  # data order, sampling and initialisation
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 on CUDA, else fp32), float32, bfloat16
OUT_FILE = "logs/bench/grpo_step.json"  # where the results go

config = configure(globals())
# ---------------------------------------------------------------------------

from bench import markdown_table, write_results  # noqa: E402
from common.data import epoch_order, load_problems  # noqa: E402
from common.lora import apply_lora, disable_lora, lora_parameters  # noqa: E402
from common.model import load_model_and_tokenizer, stop_token_ids  # noqa: E402
from common.prompts import encode_prompts  # noqa: E402
from common.reward import get_reward_fn  # noqa: E402
from common.rollout import rollout_batch  # noqa: E402
from common.sampler import SamplingParams, sample  # noqa: E402
from common.schedule import lr_factor  # noqa: E402
from grpo.advantage import group_advantages, zero_advantage_groups  # noqa: E402
from grpo.loss import grpo_loss  # noqa: E402

PHASES = ("generation", "scoring", "reference", "old logprobs", "policy", "optimizer")

torch.manual_seed(SEED)
reward_fn = get_reward_fn(REWARD)
problems = load_problems(TRAIN_FILE)
total_steps = WARMUP_STEPS + STEPS
if total_steps * PROMPTS_PER_STEP > len(problems):
    raise SystemExit(f"error: {TRAIN_FILE} has fewer than {total_steps * PROMPTS_PER_STEP} questions")
model, tokenizer, device = load_model_and_tokenizer(MODEL_PATH, DEVICE, DTYPE)
stop_ids = stop_token_ids(model, tokenizer)
sampling_generator = torch.Generator(device=device).manual_seed(SEED)
apply_lora(model, LORA_R, LORA_ALPHA, LORA_TARGETS)
trainable = lora_parameters(model)
optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)  # run_train_grpo.py's WEIGHT_DECAY
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, LR_WARMUP_STEPS, total_steps))
order = epoch_order(len(problems), SEED, 0)


class PhaseTimer:
    """Seconds and model forward passes of each phase of one step (a phase's seconds stop once the device is done)."""

    def __init__(self):
        self.current = PHASES[0]
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.forward_passes = dict.fromkeys(PHASES, 0)

    def count_forward(self) -> None:
        self.forward_passes[self.current] += 1

    @contextmanager
    def phase(self, name: str):
        self.current = name
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start


def grpo_step(step: int) -> int:
    """One step of run_train_grpo.py, phase by phase into ``timer``; returns the number of generated tokens."""
    batch = [problems[i] for i in order[step * PROMPTS_PER_STEP:(step + 1) * PROMPTS_PER_STEP]]
    with timer.phase("generation"):
        model.eval()
        prompt_ids = encode_prompts(tokenizer, [p["question"] for p in batch])
        samples = sample(model, prompt_ids, SamplingParams(NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_P,
                                                           TOP_K, generator=sampling_generator),
                         tokenizer=tokenizer, eos_token_ids=stop_ids)
    with timer.phase("scoring"):
        golds = [batch[i]["gold_answer"] for i in samples.prompt_index.tolist()]
        rewards = torch.tensor([reward_fn(text, gold, bool(cut)).total
                                for text, gold, cut in zip(samples.texts, golds, samples.truncated)])
        rewards = rewards.view(len(batch), NUM_SAMPLES_PER_PROMPT)
        advantages = group_advantages(rewards, ADVANTAGE).flatten()
        informative = ~zero_advantage_groups(rewards).repeat_interleave(NUM_SAMPLES_PER_PROMPT)
        rollouts = rollout_batch(samples, informative, tokenizer.pad_token_id)
    ref_logp = old_logp = None
    with timer.phase("reference"), torch.no_grad():
        if KL_COEF > 0 and rollouts.num_rows:
            with disable_lora(model):
                ref_logp = rollouts.completion_logprobs(model, TEMPERATURE, MICRO_BATCH_SIZE, LOGPROB_CHUNK_SIZE)
    with timer.phase("old logprobs"), torch.no_grad():
        if NUM_ITERATIONS > 1 and rollouts.num_rows:
            old_logp = rollouts.completion_logprobs(model, TEMPERATURE, MICRO_BATCH_SIZE, LOGPROB_CHUNK_SIZE)
    model.train()
    row_advantages = advantages[rollouts.rows].to(device)
    normalizer = {"token_mean": rollouts.num_tokens, "seq_mean": rollouts.num_rows,
                  "seq_sum_const": rollouts.num_rows * MAX_NEW_TOKENS}[LOSS_AGG]
    for _ in range(NUM_ITERATIONS if rollouts.num_rows else 0):
        with timer.phase("policy"):
            optimizer.zero_grad(set_to_none=True)
            for micro in rollouts.micro_batches(MICRO_BATCH_SIZE):
                logp, _entropy = rollouts.completion_logprobs_for(model, micro, TEMPERATURE, LOGPROB_CHUNK_SIZE,
                                                                  with_entropy=True)
                old = logp.detach() if old_logp is None else old_logp[micro].to(device)
                ref = None if ref_logp is None else ref_logp[micro].to(device)
                loss, _stats = grpo_loss(logp, old, row_advantages[micro], rollouts.completion_mask[micro].to(device),
                                         ref_logp=ref, beta=KL_COEF, eps_low=CLIP_EPS_LOW, eps_high=CLIP_EPS_HIGH,
                                         loss_agg=LOSS_AGG, importance_level=IMPORTANCE_LEVEL, normalizer=normalizer,
                                         max_tokens=MAX_NEW_TOKENS, kl_estimator=KL_ESTIMATOR)
                loss.backward()
        with timer.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
            optimizer.step()
    with timer.phase("optimizer"):
        scheduler.step()
    return int(samples.completion_mask.sum())


model.get_decoder().register_forward_hook(lambda *_: timer.count_forward())  # the timer of the step running
steps = []
for step in range(total_steps):
    timer = PhaseTimer()
    tokens = grpo_step(step)
    if step >= WARMUP_STEPS:
        steps.append({"seconds": timer.seconds, "forward_passes": timer.forward_passes, "tokens": tokens,
                      "step_s": sum(timer.seconds.values())})

# Means, not medians: the phases then add up to the step.
step_seconds = statistics.mean(s["step_s"] for s in steps)
phase_seconds = {name: statistics.mean(s["seconds"][name] for s in steps) for name in PHASES}
phase_forwards = {name: statistics.mean(s["forward_passes"][name] for s in steps) for name in PHASES}
tokens_per_step = statistics.mean(s["tokens"] for s in steps)
generation_tokens_per_s = tokens_per_step / phase_seconds["generation"]
step_tokens_per_s = tokens_per_step / step_seconds

print(f"\nGRPO step on {device}: {PROMPTS_PER_STEP} questions x {NUM_SAMPLES_PER_PROMPT} samples, up to "
      f"{MAX_NEW_TOKENS} new tokens, LoRA r={LORA_R}, KL_COEF {KL_COEF}, NUM_ITERATIONS {NUM_ITERATIONS}; "
      f"means of {STEPS} steps after {WARMUP_STEPS} untimed:\n")
print(markdown_table(
    ["phase", "seconds per step", "share of the step", "model forward passes per step"],
    [[name, f"{phase_seconds[name]:.3f}", f"{100 * phase_seconds[name] / step_seconds:.0f}%",
      f"{phase_forwards[name]:.1f}"] for name in PHASES]
    + [["whole step", f"{step_seconds:.3f}", "100%", f"{sum(phase_forwards.values()):.1f}"]]))
print(f"\n{tokens_per_step:.0f} generated tokens per step: {generation_tokens_per_s:,.0f} tokens/s while "
      f"generating, {step_tokens_per_s:,.0f} tokens/s over the whole step")
out = write_results(OUT_FILE, "grpo_step", config, {
    "device": str(device), "steps": steps, "phase_seconds": phase_seconds, "phase_forward_passes": phase_forwards,
    "step_seconds": step_seconds, "tokens_per_step": tokens_per_step,
    "generation_tokens_per_s": generation_tokens_per_s, "step_tokens_per_s": step_tokens_per_s})
print(f"results in {out}")

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

Then the policy pass packed against padded (PACKING=true / false, run_train_grpo.py's two layouts,
common/packing.py), alternating in this process, on the last timed step's rollouts (the demo's) and
on rollouts with a GSM8K-like spread of completion lengths (uniform from 40 to 256 tokens, a tenth
clipped at 256; forced lengths and random tokens: it times the pass, not the learning), reporting
per layout the positions computed against the real tokens, the pass's seconds and its peak memory
(CUDA: max_memory_allocated; Linux CPU: the peak resident memory, VmHWM, in passes of their own,
after the timed ones, with glibc's mmap threshold at one page so that freed memory goes back at once
and resident memory follows the live tensors, as tests/memory_probe.py measures it; elsewhere not
measured).

Forward passes are counted with a hook on the model body (model.get_decoder()): the sampler calls
it once for the prompts and once per new token, token_logprobs once per micro-batch.
"""

import ctypes
import gc
import re
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
MICRO_BATCH_TOKENS = 0  # micro-batches by tokens instead (0 = off)
PACKING = True  # the step's layout: packed rows (true) or padded rectangles (false); the comparison runs both
PACK_LENGTH = "auto"  # longest packed row: auto (the step's longest sequence) or tokens
LOGPROB_CHUNK_SIZE = 1024  # positions per chunk of the output head
LORA_R = 16  # adapter rank
LORA_ALPHA = 32.0  # adapter scale numerator
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # wrapped layers
# the measurement
WARMUP_STEPS = 1  # untimed steps first
STEPS = 5  # timed steps
COMPARE_REPEATS = 3  # policy passes of each layout on each set of rollouts, alternating (0 = no comparison)
GSM8K_ROWS = 128  # rows of the GSM8K-like rollouts (16 questions x 8 samples)
GSM8K_MAX_NEW_TOKENS = 256  # their completion length limit
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
from common.packing import packing_plan, resolve_pack_length, to_device  # noqa: E402
from common.rollout import RolloutBatch, rollout_batch  # noqa: E402
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
packing, pack_length, packing_line = packing_plan(model, PACKING, PACK_LENGTH)
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
        last_rollouts.append(rollouts)
        step_pack_length = resolve_pack_length(pack_length, max(rollouts.sequence_lengths.tolist(), default=1))
        rollouts, micro_batches, layouts = rollouts.in_pass_order(MICRO_BATCH_SIZE, MICRO_BATCH_TOKENS, packing,
                                                                  step_pack_length)
        layouts, completion_mask, row_advantages = to_device(
            (layouts, rollouts.completion_mask, advantages[rollouts.rows]), device)
    ref_logp = old_logp = None
    with timer.phase("reference"), torch.no_grad():
        if KL_COEF > 0 and rollouts.num_rows:
            with disable_lora(model):
                ref_logp = rollouts.completion_logprobs(model, TEMPERATURE, layouts, LOGPROB_CHUNK_SIZE)
    with timer.phase("old logprobs"), torch.no_grad():
        if NUM_ITERATIONS > 1 and rollouts.num_rows:
            old_logp = rollouts.completion_logprobs(model, TEMPERATURE, layouts, LOGPROB_CHUNK_SIZE)
    model.train()
    normalizer = {"token_mean": rollouts.num_tokens, "seq_mean": rollouts.num_rows,
                  "seq_sum_const": rollouts.num_rows * MAX_NEW_TOKENS}[LOSS_AGG]
    for _ in range(NUM_ITERATIONS if rollouts.num_rows else 0):
        with timer.phase("policy"):
            optimizer.zero_grad(set_to_none=True)
            for micro, layout in zip(micro_batches, layouts):
                logp, _entropy = rollouts.completion_logprobs_for(model, layout, TEMPERATURE, LOGPROB_CHUNK_SIZE,
                                                                  with_entropy=True)
                old = logp.detach() if old_logp is None else old_logp[micro]
                ref = None if ref_logp is None else ref_logp[micro]
                loss, _stats = grpo_loss(logp, old, row_advantages[micro], completion_mask[micro],
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
last_rollouts: list[RolloutBatch] = []
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
      f"{MAX_NEW_TOKENS} new tokens, LoRA r={LORA_R}, KL_COEF {KL_COEF}, NUM_ITERATIONS {NUM_ITERATIONS}, "
      f"{packing_line}; means of {STEPS} steps after {WARMUP_STEPS} untimed:\n")
print(markdown_table(
    ["phase", "seconds per step", "share of the step", "model forward passes per step"],
    [[name, f"{phase_seconds[name]:.3f}", f"{100 * phase_seconds[name] / step_seconds:.0f}%",
      f"{phase_forwards[name]:.1f}"] for name in PHASES]
    + [["whole step", f"{step_seconds:.3f}", "100%", f"{sum(phase_forwards.values()):.1f}"]]))
print(f"\n{tokens_per_step:.0f} generated tokens per step: {generation_tokens_per_s:,.0f} tokens/s while "
      f"generating, {step_tokens_per_s:,.0f} tokens/s over the whole step")


def gsm8k_like_rollouts(prompts: RolloutBatch, generator: torch.Generator) -> RolloutBatch:
    """GSM8K_ROWS rows with the demo's prompts (cycled) and forced completions of random tokens, lengths
    uniform in [40, GSM8K_MAX_NEW_TOKENS], a tenth of them clipped at the limit."""
    lengths = torch.randint(40, GSM8K_MAX_NEW_TOKENS + 1, (GSM8K_ROWS,), generator=generator)
    lengths[torch.randperm(GSM8K_ROWS, generator=generator)[:GSM8K_ROWS // 10]] = GSM8K_MAX_NEW_TOKENS
    source = torch.arange(GSM8K_ROWS) % prompts.num_rows
    completion_mask = (torch.arange(GSM8K_MAX_NEW_TOKENS) < lengths[:, None]).float()
    completion_ids = torch.randint(3, model.config.vocab_size, (GSM8K_ROWS, GSM8K_MAX_NEW_TOKENS), generator=generator)
    completion_ids = torch.where(completion_mask.bool(), completion_ids, prompts.pad_token_id)
    prompt_ids = prompts.input_ids[source, :prompts.prompt_width]
    prompt_mask = prompts.attention_mask[source, :prompts.prompt_width]
    return RolloutBatch(torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask.long()], 1),
                        completion_mask, prompts.prompt_width, torch.arange(GSM8K_ROWS), prompts.pad_token_id)


CPU_PEAKS = device.type == "cpu" and Path("/proc/self/clear_refs").exists() and sys.platform == "linux"


def set_mmap_threshold(size: int) -> None:
    """glibc's M_MMAP_THRESHOLD (mallopt parameter -3): allocations of ``size`` bytes or more get pages of
    their own, returned to the system when freed."""
    ctypes.CDLL("libc.so.6").mallopt(-3, size)


def status_bytes(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def policy_peak(rollouts: RolloutBatch, packed: bool) -> int:
    """Peak memory of one policy pass above what was live before it, in bytes (-1 where not measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        policy_pass(rollouts, packed)
        return torch.cuda.max_memory_allocated() - before
    if not CPU_PEAKS:
        return -1
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to VmRSS
    before = status_bytes("VmHWM")
    policy_pass(rollouts, packed)
    return max(0, status_bytes("VmHWM") - before)  # the kernel's RSS counters lag by up to a few hundred KB


def policy_pass(rollouts: RolloutBatch, packed: bool) -> dict:
    """run_train_grpo.py's policy pass over ``rollouts`` (one iteration, no KL) in one layout, without
    the optimizer step: seconds, positions computed and real tokens."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    longest = max(rollouts.sequence_lengths.tolist())
    rollouts, micro_batches, layouts = rollouts.in_pass_order(
        MICRO_BATCH_SIZE, MICRO_BATCH_TOKENS, packed, resolve_pack_length(pack_length, longest) if packed else None)
    layouts, completion_mask, advantages = to_device(
        (layouts, rollouts.completion_mask, torch.sin(rollouts.rows.float())), device)  # an advantage per sample row
    for micro, layout in zip(micro_batches, layouts):
        logp, _entropy = rollouts.completion_logprobs_for(model, layout, TEMPERATURE, LOGPROB_CHUNK_SIZE,
                                                          with_entropy=True)
        loss, _stats = grpo_loss(logp, logp.detach(), advantages[micro], completion_mask[micro], eps_low=CLIP_EPS_LOW,
                                 eps_high=CLIP_EPS_HIGH, loss_agg=LOSS_AGG, normalizer=rollouts.num_tokens,
                                 max_tokens=rollouts.completion_width)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "computed": sum(layout.computed_positions for layout in layouts),
            "real": sum(layout.real_tokens for layout in layouts), "rows": sum(layout.input_ids.size(0) for layout in layouts)}


comparison = {}
if COMPARE_REPEATS:
    rollout_sets = {"demo": last_rollouts[-1],
                    "gsm8k-like": gsm8k_like_rollouts(last_rollouts[-1], torch.Generator().manual_seed(SEED))}
    for name, rollouts in rollout_sets.items():
        policy_pass(rollouts, True)  # untimed: first-call costs of these shapes
        policy_pass(rollouts, False)
        runs = {True: [], False: []}
        for repeat in range(COMPARE_REPEATS):
            for packed in ((True, False) if repeat % 2 == 0 else (False, True)):  # alternating, in both orders
                runs[packed].append(policy_pass(rollouts, packed))
        comparison[name] = {("packed" if packed else "padded"): {
            "seconds": statistics.median(r["seconds"] for r in passes),
            **{key: passes[0][key] for key in ("computed", "real", "rows")}} for packed, passes in runs.items()}
    if CPU_PEAKS:
        set_mmap_threshold(4096)
    for name, rollouts in rollout_sets.items():
        for packed in (True, False, True, False):  # each layout's peak: the larger of two passes
            result = comparison[name]["packed" if packed else "padded"]
            result["peak_bytes"] = max(result.get("peak_bytes", -1), policy_peak(rollouts, packed))
    print(f"\nPolicy pass packed vs padded on {device} (MICRO_BATCH_SIZE {MICRO_BATCH_SIZE}, MICRO_BATCH_TOKENS "
          f"{MICRO_BATCH_TOKENS}, PACK_LENGTH {PACK_LENGTH}; medians of {COMPARE_REPEATS} alternating passes each):\n")
    table = []
    for name, layouts_of in comparison.items():
        padded_seconds = layouts_of["padded"]["seconds"]
        for layout_name, result in layouts_of.items():
            peak = "n/a" if result["peak_bytes"] < 0 else f"{result['peak_bytes'] / 2**20:.0f}"
            table.append([name, layout_name, str(result["rows"]), f"{result['computed']:,}", f"{result['real']:,}",
                          f"{100 * (result['computed'] / result['real'] - 1):.1f}%", f"{result['seconds']:.3f}",
                          f"{padded_seconds / result['seconds']:.2f}x", peak])
    print(markdown_table(["rollouts", "layout", "rows", "positions computed", "real tokens", "computed over real",
                          "policy pass s", "speed-up", "peak MiB"], table))

out = write_results(OUT_FILE, "grpo_step", config, {
    "device": str(device), "steps": steps, "phase_seconds": phase_seconds, "phase_forward_passes": phase_forwards,
    "step_seconds": step_seconds, "tokens_per_step": tokens_per_step,
    "generation_tokens_per_s": generation_tokens_per_s, "step_tokens_per_s": step_tokens_per_s,
    "packing_comparison": comparison})
print(f"results in {out}")

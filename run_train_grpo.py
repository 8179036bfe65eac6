"""GRPO with a LoRA: sample a group of answers per question, reward them, push up the better ones.

    python run_train_grpo.py | tee logs/grpo.log                       # Gemma 2 2B Instruct on GSM8K
    python run_train_grpo.py --MODEL_PATH=models/tiny-gemma2-math \\
        --TRAIN_FILE=data/synth_train.jsonl --EVAL_FILE=data/synth_test.jsonl --MAX_STEPS=60
    python run_train_grpo.py --RESUME=checkpoints/grpo/lora_epoch0_step40.pt   # continue that run

One step (DeepSeekMath's GRPO, Shao et al. 2024, with the DAPO / Dr. GRPO options):
  1. sample NUM_SAMPLES_PER_PROMPT (G) completions for each of PROMPTS_PER_STEP questions, one batch;
  2. reward each completion (REWARD), and give it the group-relative advantage
     A = (r - mean of its group) [/ std] (grpo/advantage.py); a group whose answers all scored the
     same has A = 0: it is dropped from the update (no gradient, no tokens in the normaliser);
  3. reference log-probs with the adapters switched off (only when KL_COEF > 0);
  4. NUM_ITERATIONS passes of: per micro-batch, policy log-probs -> grpo_loss (clipped ratio x A,
     + KL_COEF x KL) -> backward; then clip the gradient and take an AdamW step on the LoRA.
With NUM_ITERATIONS = 1 the policy's own forward, detached, is the "old" policy: ratio = 1 exactly
and the update is the plain policy gradient (no extra forward pass).
A CUDA out-of-memory error in the rollouts, an eval batch or a micro-batch ends no run: that phase is
done again from its start at half its size (GENERATION_BATCH_SIZE, EVAL_BATCH_SIZE, MICRO_BATCH_SIZE or
MICRO_BATCH_TOKENS), which the rest of the run keeps (common/oom.py).

Under torchrun (torchrun --nproc_per_node=N run_train_grpo.py ...) each of the N processes samples
PROMPTS_PER_STEP / N of the step's questions with its own seed; the normaliser is the whole step's
and the LoRA gradients are summed over the processes (common/distributed.py), so the update is the
one process's; rank 0 alone prints, writes the metrics and saves checkpoints.
"""

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from tqdm import tqdm

from common.config import Device, Dtype, RunName, configure
from common.distributed import is_main_process
from common.prompts import INSTRUCTION as MATH_INSTRUCTION

# ---------------------------------------------------------------- constants
# model and data
MODEL_PATH = "models/gemma-2-2b-it"  # local model directory (built-in tiny model: models/tiny-gemma2-math)
TRAIN_FILE = "data/gsm8k_train.jsonl"  # training questions: {"question", "gold_answer"}, raw GSM8K, or TRL's {"prompt", ...}
EVAL_FILE = "data/gsm8k_test.jsonl"  # held-out questions for greedy eval: {"question", "gold_answer"}, raw GSM8K, or TRL's {"prompt", ...}
GOLD_FIELD: str | None = None  # the field holding the gold answer (None = gold_answer, answer, solution or ground_truth)
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question: a text, "" for none, or a preset: math (this one)
#                                   or think (reasoning in <think>...</think>, then the answer line: docs/reasoning.md);
#                                   a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # a system message before every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or the path of a Jinja file
NUM_PROMPTS: Annotated[int, ">= 0"] = 0  # use the first NUM_PROMPTS training questions (0 = all)
SKIP_LONG_PROMPTS = False  # leave out (and count) examples too long for the context, instead of refusing the file
EVAL_LIMIT: Annotated[int, ">= 0"] = 200  # held-out questions per eval (0 = all)
EVAL_EVERY: Annotated[int, ">= 0"] = 50  # steps between evals, plus one at step 0 and one at the end (0 = no evaluation)
EVAL_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # prompts per eval generation batch: auto (the
#                                   most that fit in the GPU's memory, by the memory plan, at most 64; 64 off a GPU) or a number
EVAL_NUM_SAMPLES: Annotated[int, ">= 1"] = 1  # k: completions per held-out question at EVAL_TEMPERATURE > 0, logged as
#                                   eval/mean@k, eval/pass@j (j = 1, 2, 4, ..., k), eval/maj@k beside eval/accuracy
EVAL_TEMPERATURE: Annotated[float, ">= 0"] = 0.0  # 0 = the greedy eval alone; > 0 adds k samples per question at
#                                   this temperature (each question's seeded by SEED and its index; EVAL_BATCH_SIZE x k rows)
# rollouts
NUM_EPOCHS: Annotated[int, ">= 1"] = 1  # passes over the training data
MAX_STEPS: Annotated[int, ">= 0"] = 0  # stop after this many steps (0 = run the epochs)
PROMPTS_PER_STEP: Annotated[int, ">= 1"] = 16  # questions per step
NUM_SAMPLES_PER_PROMPT: Annotated[int, ">= 2"] = 8  # group size G: completions sampled per question
#                                   (differs from PPO: a group of 1 has no advantage)
MAX_NEW_TOKENS: Annotated[int, ">= 1"] = 256  # completion length limit of the rollouts (a cut-off answer is flagged truncated)
TEMPERATURE: Annotated[float, "> 0"] = 1.0  # sampling temperature; the training log-probs use the same one
TOP_P: Annotated[float, "0 < x <= 1"] = 1.0  # nucleus sampling (1.0 = off)
TOP_K: Annotated[int, ">= 0"] = 0  # top-k sampling (0 = off)
GENERATION_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 0"] = "auto"  # rows sampled together: auto (the fewest
#                                   equal chunks that fit in the GPU's memory, by the memory plan; off a GPU all of a
#                                   step's rows), or a number (0 = all of a step's rows at once)
SAMPLER: Literal["auto", "eager", "static", "compiled"] = "auto"  # rollouts and evals: auto (compiled static-cache
#                                   decode on CUDA, eager elsewhere), eager, static (static cache, not compiled) or compiled
REWARD = "math"  # math (correctness + format - hacks), think (the same for reasoning in <think>...</think>, then
#                                   the answer line: docs/reasoning.md), correctness, your.py:function, or several: math,my.py:brevity
REWARD_WEIGHTS: tuple[float, ...] = ()  # one weight per REWARD entry (empty = all 1)
# objective
ADVANTAGE: Literal["mean", "std", "rank"] = "std"  # group advantage: mean (r - mean), std ((r - mean) / std), rank (centred ranks)
LOSS_AGG: Literal["token_mean", "seq_mean", "seq_sum_const"] = "token_mean"  # token_mean (DAPO), seq_mean (original GRPO), seq_sum_const (Dr. GRPO)
IMPORTANCE_LEVEL: Literal["token", "sequence"] = "token"  # ratio per token, or per sequence (GSPO)
CLIP_EPS_LOW: Annotated[float, "0 <= x < 1"] = 0.2  # ratio clipped below at 1 - CLIP_EPS_LOW
CLIP_EPS_HIGH: Annotated[float, ">= 0"] = 0.28  # ratio clipped above at 1 + CLIP_EPS_HIGH (DAPO's clip-higher)
KL_COEF: Annotated[float, ">= 0"] = 0.0  # beta: weight of the KL penalty to the base model (0 = no reference pass)
KL_ESTIMATOR: Literal["k1", "k2", "k3"] = "k3"  # k1, k2 or k3 estimate of KL(policy || reference)
NUM_ITERATIONS: Annotated[int, ">= 1"] = 1  # updates per batch of rollouts (1 = on-policy, ratio = 1)
IMPORTANCE_CORRECTION: Literal["none", "tis"] = "none"  # correct the sampler -> trainer log-prob mismatch: none, or tis
#                                   (each token's policy term times min(exp(trainer - sampler log-prob), TIS_CAP))
TIS_CAP: Annotated[float, "> 0"] = 2.0  # truncation of the TIS weights (TRL's and verl's default: 2)
# optimisation
LR: Annotated[float, "> 0"] = 2e-5  # peak AdamW learning rate of the LoRA (a cautious start for Gemma 2B, untuned; the tiny model learns at 2e-4)
WARMUP_STEPS: Annotated[int, ">= 0"] = 5  # linear warm-up steps
LR_SCHEDULE: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine decay to 10% of LR
WEIGHT_DECAY: Annotated[float, ">= 0"] = 0.0  # AdamW weight decay
GRAD_CLIP: Annotated[float, "> 0"] = 1.0  # max global gradient norm
MICRO_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # sequences per forward/backward (gradient
#                                   accumulation over the step): auto (the memory plan's fastest that fits, at most 16;
#                                   16 off a GPU) or a number; packed, as many rows as MICRO_BATCH_SIZE of the longest
#                                   sequence would take
MICRO_BATCH_TOKENS: Annotated[int, ">= 0"] = 0  # fill each micro-batch with whole sequences up to this many tokens
#                                   instead of MICRO_BATCH_SIZE sequences (0 = off); the normaliser stays the step's
PACKING = True  # the training passes pack their sequences into rows without pads (common/packing.py);
#                 with false, padded rectangles; padded anyway for an attention the packing tests do not cover
PACK_LENGTH: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # longest packed row: auto (the step's longest
#                                   sequence; one row per micro-batch under flash-attention's variable-length kernels) or tokens
LOGPROB_CHUNK_SIZE: Annotated[int, ">= 1"] = 1024  # positions per chunk of the output head (bounds [positions, vocab] logits)
GRADIENT_CHECKPOINTING: Literal["auto"] | bool = "auto"  # recompute each layer's activations in backward: less
#                                   memory, a third slower policy pass; auto: where the memory plan finds it faster than
#                                   smaller micro-batches (never off a GPU)
GPU_MEMORY_GB: Annotated[float, ">= 0"] = 0.0  # memory the run may take (0 = the GPU's free memory): a run whose
#                                   memory plan (printed at start) does not fit is refused before the model loads
# LoRA
LORA_R: Annotated[int, ">= 1"] = 16  # adapter rank
LORA_ALPHA: Annotated[float, "> 0"] = 32.0  # the update is (LORA_ALPHA / LORA_R) * B @ A
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # layers that get an adapter
LORA_DROPOUT: Annotated[float, "0 <= x < 1"] = 0.0  # dropout on the adapters' input (0 keeps sampling and training the same policy)
# bookkeeping
SAVE_EVERY: Annotated[int, ">= 0"] = 0  # steps between checkpoints (0 = only at the end of each epoch and of the run)
SAVE_EVERY_MINUTES: Annotated[float, ">= 0"] = 30.0  # also save when this many minutes have passed since the last save
#                                   (0 = by steps only): a crash then costs at most that much
KEEP_CHECKPOINTS: Annotated[int, ">= 0"] = 0  # keep only the newest N step checkpoints of the run (0 = keep all)
CHECKPOINT_DIR = "checkpoints"  # checkpoints go to CHECKPOINT_DIR/RUN_NAME/
RUN_NAME: RunName = "grpo"  # name of the run: its checkpoint folder and its metrics file LOG_DIR/RUN_NAME.jsonl
#                                   (differs from the other trainers: the trainer's name)
LOG_DIR = "logs"  # where the metrics JSONL goes
LOGGER = "jsonl"  # jsonl (always), plus tensorboard and/or wandb: e.g. jsonl,tensorboard
HEALTH: Literal["warn", "stop", "off"] = "warn"  # a run going wrong (common/health.py): warn (one health: line per
#                                   symptom, naming the constant to change), stop (that line, then save the step and
#                                   exit with status 3) or off (no checks)
OVERWRITE = False  # replace an earlier run of the same RUN_NAME, its own files only (else a new run on its name is refused)
RESUME: Path | None = None  # checkpoint (or run folder: its newest) of a run to continue: LR and the schedule may
#                             change, the LoRA layout, group size, questions per step and seed may not
#                             (differs from the other trainers: each fixes its own)
INIT_LORA: Path | None = None  # start a new run from this LoRA checkpoint (an SFT warm-up, a model_soup.py soup):
#                                its layout replaces LORA_*; the KL reference stays the base model
SAMPLE_EVERY: Annotated[int, ">= 0"] = 10  # print one sampled completion with its reward every this many steps (0 = never)
SEED = 0  # every random draw of the run: data order, sampling, initialisation
DEVICE: Device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu
DTYPE: Dtype = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
QUANT: Literal["none", "nf4"] = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)

config = configure(globals(), quiet=not is_main_process())
# ---------------------------------------------------------------------------

from common.checkpoint import init_lora_settings, start_lora  # noqa: E402
from common.data import step_items  # noqa: E402
from common.distributed import all_reduce_max, all_reduce_sum, setup_distributed, shard, sum_gradients  # noqa: E402
from common.evaluate import check_sampling, evaluate  # noqa: E402
from common.logprobs import enable_gradient_checkpointing, layout_logprobs  # noqa: E402
from common.lora import LoRAMotion, disable_lora, lora_parameters  # noqa: E402
from common.memory_plan import Sizes  # noqa: E402
from common.model import get_device, load_tokenizer  # noqa: E402
from common.oom import BatchSizes  # noqa: E402
from common.packing import packing_plan, resolve_pack_length  # noqa: E402
from common.policy_gradient import logprob_mismatch, truncated_importance_weights  # noqa: E402
from common.prompts import configure_prompts  # noqa: E402
from common.reward import load_reward, score_batch  # noqa: E402
from common.rollout import rollout_batch, rollout_means, rollout_summary, rollout_sums, sample_rollouts  # noqa: E402
from common.run import TrainingRun, device_clock  # noqa: E402
from common.run_setup import (check_lora_targets, check_memory, eval_sampling, load_model_for_training,  # noqa: E402
                              load_questions, questions_in_context, steps_in_epoch)
from common.sampler import SamplingParams, even_chunk_rows, release_static_cache  # noqa: E402
from common.schedule import warmup_then_schedule  # noqa: E402
from grpo.advantage import group_advantages, zero_advantage_groups  # noqa: E402
from grpo.loss import GRPOObjective, grpo_loss  # noqa: E402

# ------------------------------------------- plumbing (common/run.py, common/run_setup.py)
check_sampling(EVAL_NUM_SAMPLES, EVAL_TEMPERATURE, ("EVAL_NUM_SAMPLES", "EVAL_TEMPERATURE"))
distributed = setup_distributed(DEVICE)
run = TrainingRun("grpo", config, distributed, model_path=MODEL_PATH, run_name=RUN_NAME, checkpoint_dir=CHECKPOINT_DIR,
                  log_dir=LOG_DIR, logger=LOGGER, overwrite=OVERWRITE, resume=RESUME, init_lora=INIT_LORA,
                  fixed_on_resume=("LORA_R", "LORA_ALPHA", "LORA_TARGETS", "LORA_DROPOUT", "SEED", "NUM_PROMPTS",
                                   "PROMPTS_PER_STEP", "NUM_SAMPLES_PER_PROMPT"))
if RESUME is None and INIT_LORA is None:
    check_lora_targets(run.model_path, LORA_TARGETS)  # on the model without its weights
elif INIT_LORA is not None:  # its layout replaces LORA_* (one line says so), in the memory plan and the checkpoints
    LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT = init_lora_settings(INIT_LORA, LORA_R, LORA_ALPHA, LORA_TARGETS,
                                                                        LORA_DROPOUT, say=distributed.is_main)
    config.update(LORA_R=LORA_R, LORA_ALPHA=LORA_ALPHA, LORA_TARGETS=list(LORA_TARGETS), LORA_DROPOUT=LORA_DROPOUT)
torch.manual_seed(SEED)  # the same on every rank: the same LoRA initialisation
reward = load_reward(REWARD, REWARD_WEIGHTS)
problems, eval_problems = load_questions(TRAIN_FILE, NUM_PROMPTS, EVAL_FILE if EVAL_EVERY else None, EVAL_LIMIT,
                                         GOLD_FIELD, reward.needs_numeric_gold)
run.check_divides(PROMPTS_PER_STEP, "PROMPTS_PER_STEP")

device = get_device(DEVICE)
tokenizer = load_tokenizer(run.model_path)
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)  # before stop_token_ids
(problems, eval_problems), longest_prompt = questions_in_context(  # each prompt leaves MAX_NEW_TOKENS in the context
    tokenizer, prompt_format, [(problems, TRAIN_FILE), (eval_problems, EVAL_FILE if EVAL_EVERY else None)],
    run.model_config, MAX_NEW_TOKENS, SKIP_LONG_PROMPTS)
steps_per_epoch = steps_in_epoch(len(problems), PROMPTS_PER_STEP, TRAIN_FILE)
total_steps = MAX_STEPS or NUM_EPOCHS * steps_per_epoch
rows_per_step = PROMPTS_PER_STEP // distributed.world_size * NUM_SAMPLES_PER_PROMPT  # this rank's
# The memory plan, before the weights load: the sizes left at auto, the fastest that fit (off a GPU: 16, no
# checkpointing, all rows, 64, this trainer's sizes before auto).
planned = check_memory(
    run.model_path, device, GPU_MEMORY_GB,
    Sizes(MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, GENERATION_BATCH_SIZE, EVAL_BATCH_SIZE), Sizes(16, False, 0, 64),
    evaluates=EVAL_EVERY > 0, quant=QUANT, dtype=DTYPE, lora_r=LORA_R, lora_targets=LORA_TARGETS,
    logprob_chunk_size=LOGPROB_CHUNK_SIZE, sampler=SAMPLER, rows=rows_per_step,
    samples_per_prompt=NUM_SAMPLES_PER_PROMPT, prompt_tokens=longest_prompt, max_new_tokens=MAX_NEW_TOKENS,
    micro_batch_tokens=MICRO_BATCH_TOKENS,
    pack_length=0 if PACK_LENGTH == "auto" else PACK_LENGTH,
    eval_samples=EVAL_NUM_SAMPLES if EVAL_TEMPERATURE > 0 else 1)
model, loss_scaler = load_model_for_training(run.model_path, device, DTYPE, QUANT, quiet=not distributed.is_main)
packing, pack_length, packing_line = packing_plan(model, PACKING, PACK_LENGTH)
# The sampling settings, as one value: a step's rows in equal chunks of at most GENERATION_BATCH_SIZE
# (the static path pads the last chunk, and the last eval batch, to one row count per run).
# Where the plan frees the static KV before each policy pass, its buffers come back at a new address
# every step: the compiled decode step then runs without CUDA graphs, not recorded again each step.
sampling = SamplingParams(NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K,
                          chunk_rows=even_chunk_rows(rows_per_step, planned.generation_batch_size), sampler=SAMPLER,
                          cuda_graphs=not planned.release_static_kv,
                          generator=run.random_generator("sampling", SEED + distributed.rank, device))  # each rank its own
eval_greedy, eval_sampled = eval_sampling(MAX_NEW_TOKENS, planned.eval_batch_size, SAMPLER, EVAL_NUM_SAMPLES,
                                          EVAL_TEMPERATURE, cuda_graphs=sampling.cuda_graphs)
# The sizes in use: an out-of-memory error in the rollouts, an eval batch or a micro-batch halves its own for
# the rest of the run (common/oom.py); saved in every checkpoint, kept on resume. A micro-batch is cut by
# MICRO_BATCH_TOKENS where it is set, else by MICRO_BATCH_SIZE: that is the size a micro-batch's error halves.
sizes = BatchSizes(model, GENERATION_BATCH_SIZE=sampling.chunk_rows, EVAL_BATCH_SIZE=planned.eval_batch_size,
                   MICRO_BATCH_SIZE=planned.micro_batch_size, MICRO_BATCH_TOKENS=MICRO_BATCH_TOKENS)
micro_batch_limit = "MICRO_BATCH_TOKENS" if MICRO_BATCH_TOKENS else "MICRO_BATCH_SIZE"
# The LoRA (a resumed run's, INIT_LORA's, or a fresh one of LORA_*) and its optimizer.
start_lora(model, run.checkpoint, RESUME, INIT_LORA, LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT)
if planned.gradient_checkpointing:
    enable_gradient_checkpointing(model)
trainable = lora_parameters(model)
optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
scheduler = warmup_then_schedule(optimizer, WARMUP_STEPS, total_steps, LR_SCHEDULE)
run.track(model, optimizer, scheduler, loss_scaler,
          evaluate=lambda step: evaluate(model, tokenizer, eval_problems, eval_greedy, desc=f"eval@{step}",
                                         reward=reward, prompt_format=prompt_format, sampled=eval_sampled,
                                         seed=SEED, sizes=sizes),
          sizes=sizes)
run.restore()  # a resumed run's optimizer, schedule, loss scale and random states
lora_motion = LoRAMotion(model)  # the adapter's norm and each step's update, for the health checks
# The objective, as one value: what grpo_loss optimises (grpo/loss.py).
objective = GRPOObjective(clip_eps_low=CLIP_EPS_LOW, clip_eps_high=CLIP_EPS_HIGH, kl_coef=KL_COEF,
                          kl_estimator=KL_ESTIMATOR, loss_agg=LOSS_AGG, importance_level=IMPORTANCE_LEVEL,
                          max_new_tokens=MAX_NEW_TOKENS)
print(f"{len(problems)} training questions, {steps_per_epoch} steps per epoch, {total_steps} steps; "
      f"LoRA {sum(p.numel() for p in trainable) / 1e6:.3f}M trainable parameters on {device}; "
      f"{distributed.world_size} process(es) x {PROMPTS_PER_STEP // distributed.world_size} questions per step; "
      f"{packing_line}")


def plan_micro_batches(rollouts):
    """This rank's micro-batches at the sizes in use, packed (or padded) on the CPU
    (common.packing.micro_batch_rows), then the batch to the device with everything the update reads, in
    one copy per dtype: the loops copy nothing."""
    rollouts.plan_passes(sizes["MICRO_BATCH_SIZE"], sizes["MICRO_BATCH_TOKENS"], packing,
                         resolve_pack_length(pack_length, max(rollouts.sequence_lengths.tolist(), default=1)))
    return rollouts.to(device)


# ------------------------------------------------------------ the algorithm
for step in run.steps(total_steps, steps_per_epoch, eval_every=EVAL_EVERY, save_every=SAVE_EVERY,
                      save_every_minutes=SAVE_EVERY_MINUTES, keep_checkpoints=KEEP_CHECKPOINTS, health=HEALTH):
    epoch, indices = step_items(len(problems), SEED, step, PROMPTS_PER_STEP)  # a function of SEED and the step alone
    batch = [problems[i] for i in shard(indices)]  # this rank's share of the step's questions

    # 1. Rollouts: G completions per question in one batch; each scored by REWARD with its question's row.
    #    Out of memory: the same questions again in chunks of half the rows, the sampling generator rewound
    #    to the step's start (common/oom.py): the rollouts a run at the smaller size from this step samples.
    for attempt in sizes.attempts("GENERATION_BATCH_SIZE", "the rollouts", rewind=[sampling.generator]):
        with attempt:
            samples, sample_rows, generate_seconds = sample_rollouts(
                model, tokenizer, prompt_format, batch,
                dataclasses.replace(sampling, chunk_rows=even_chunk_rows(rows_per_step, attempt.size)))
    if planned.release_static_kv:  # the memory plan: the sampler's static KV does not fit beside the policy pass
        release_static_cache(model)
    score_start = time.perf_counter()
    scores = score_batch(reward, samples.texts, sample_rows, samples.truncated)

    # 2. Group advantages. A group whose answers all scored the same has none: its rows leave the batch.
    rewards = torch.tensor([s.total for s in scores]).view(len(batch), NUM_SAMPLES_PER_PROMPT)
    advantages = group_advantages(rewards, ADVANTAGE).flatten()
    informative = ~zero_advantage_groups(rewards).repeat_interleave(NUM_SAMPLES_PER_PROMPT)
    rollouts = rollout_batch(samples, informative, tokenizer.pad_token_id)
    rollouts.advantages = advantages[rollouts.rows]
    rollouts.sampler_logp = samples.logprobs[rollouts.rows]  # what each token was drawn with
    rollouts = plan_micro_batches(rollouts)

    # 3. Reference (adapters off) and, for several iterations, old log-probs: once, before any update.
    #    Out of memory: both again, in micro-batches of half the size.
    reference_start = device_clock(device)
    score_seconds = reference_start - score_start
    with torch.no_grad():
        for attempt in sizes.attempts(micro_batch_limit, "the reference pass"):
            with attempt:
                if attempt.retry:
                    rollouts = plan_micro_batches(rollouts)
                if KL_COEF > 0 and rollouts.num_rows:
                    with disable_lora(model):
                        rollouts.ref_logp = rollouts.logprobs(model, TEMPERATURE, LOGPROB_CHUNK_SIZE)
                old_logp_start = device_clock(device)
                if NUM_ITERATIONS > 1 and rollouts.num_rows:
                    rollouts.old_logp = rollouts.logprobs(model, TEMPERATURE, LOGPROB_CHUNK_SIZE)
    policy_start = device_clock(device)
    reference_seconds, old_logp_seconds = old_logp_start - reference_start, policy_start - old_logp_start

    # 4. Policy update(s), accumulated over micro-batches with the whole step's normaliser, counted
    #    over every rank; the gradients are then summed over the ranks (see sum_gradients). Statistics
    #    stay on the device until the end of the step: one host sync per update (gradient norm and loss).
    model.train()
    step_counts = all_reduce_sum({"rows": rollouts.num_rows, "tokens": rollouts.num_tokens})
    normalizer = objective.normalizer(step_counts["rows"], step_counts["tokens"])  # the whole step's
    update_sums = {key: torch.zeros((), device=device)
                   for key in ("loss", "entropy", "kl", "clip_frac", "approx_kl", "mismatch")}
    mismatch_max = torch.zeros((), device=device)
    grad_norm = None  # None when no group had an advantage
    optimizer_seconds = 0.0  # of the policy pass's time: gradient sum, clipping and the AdamW step
    for iteration in range(NUM_ITERATIONS if step_counts["rows"] else 0):
        # Out of memory in a micro-batch: the update again from its start, its gradients and statistics
        # zeroed, in micro-batches of half the size (common/oom.py): the update a run at that size makes.
        for attempt in sizes.attempts(micro_batch_limit, "the policy pass"):
            with attempt:
                if attempt.retry:
                    rollouts = plan_micro_batches(rollouts)
                optimizer.zero_grad(set_to_none=True)
                iteration_sums = {key: torch.zeros((), device=device) for key in update_sums}
                iteration_mismatch_max = torch.zeros((), device=device)
                for micro in rollouts.micro_batches():
                    logp, entropy, _ = layout_logprobs(model, micro.layout, TEMPERATURE, LOGPROB_CHUNK_SIZE,
                                                       with_entropy=True)
                    # The trainer's log-probs of the policy that sampled (with one iteration, the policy's own,
                    # detached: ratio = 1); the sampler's own differ by the training-inference mismatch (logged;
                    # corrected with IMPORTANCE_CORRECTION=tis).
                    old_logp = logp.detach() if micro.old_logp is None else micro.old_logp
                    correction = (truncated_importance_weights(old_logp, micro.sampler_logp, TIS_CAP)
                                  if IMPORTANCE_CORRECTION == "tis" else None)
                    loss, stats = grpo_loss(logp, old_logp, micro.advantages, micro.completion_mask, objective,
                                            normalizer, micro.ref_logp, correction)
                    loss_scaler.backward(loss)  # scaled first for an fp16 model (common.run.LossScaler)
                    iteration_sums["loss"] += loss.detach()
                    iteration_sums["entropy"] += (entropy.detach() * micro.completion_mask).sum()
                    for key in ("kl", "clip_frac", "approx_kl"):
                        iteration_sums[key] += stats.get(key, 0.0) * stats["tokens"]
                    if iteration == 0:  # the sampling policy's log-probs are the same in every iteration
                        mismatch_mean, micro_max = logprob_mismatch(micro.sampler_logp, old_logp,
                                                                    micro.completion_mask)
                        iteration_sums["mismatch"] += mismatch_mean * stats["tokens"]
                        iteration_mismatch_max = torch.maximum(iteration_mismatch_max, micro_max)
        update_sums = {key: update_sums[key] + iteration_sums[key] for key in update_sums}
        mismatch_max = torch.maximum(mismatch_max, iteration_mismatch_max)
        optimizer_start = device_clock(device)
        sum_gradients(trainable)
        loss_scaler.unscale_gradients(optimizer)
        # The gradient norm and the loss in one read: the update's only host sync.
        iteration_loss = iteration_sums["loss"]
        grad_norm, rank_loss = torch.stack([torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP).to(iteration_loss),
                                            iteration_loss]).tolist()
        # The step's loss (every rank's share) and the gradients are the same on every rank: every rank decides the same.
        if not run.update_is_finite(step + 1, grad_norm, all_reduce_sum(rank_loss)):
            optimizer.zero_grad(set_to_none=True)
            break
        loss_scaler.step(optimizer)
        optimizer_seconds += device_clock(device) - optimizer_start
    scheduler.step()
    policy_seconds = device_clock(device) - policy_start - optimizer_seconds
    step_seconds = run.step_seconds() - samples.compile_seconds

    # Metrics of the step over every rank (sums in one all-reduce, then the means); update statistics
    # are means over the updated tokens of every iteration. Times are rank 0's.
    totals = all_reduce_sum({**rollout_sums(scores, samples), **update_sums,
                             "groups": len(batch), "zero_adv_groups": zero_advantage_groups(rewards).sum()})
    updated_tokens = max(1.0, step_counts["tokens"] * NUM_ITERATIONS)
    layouts = [layout for _, layout in rollouts.passes]
    metrics = {
        "step": step + 1, "epoch": epoch, **rollout_means(totals, generate_seconds),
        "loss": totals["loss"] / NUM_ITERATIONS,
        **{key: totals[key] / updated_tokens for key in ("kl", "clip_frac", "approx_kl", "entropy")},
        "logprob_mismatch_mean": totals["mismatch"] / max(1.0, step_counts["tokens"]),
        "logprob_mismatch_max": all_reduce_max(mismatch_max),
        "zero_adv_groups": totals["zero_adv_groups"] / totals["groups"],
        "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], **lora_motion.metrics(),
        "policy_micro_batches": len(layouts),  # per iteration: positions computed and real tokens of the
        "policy_positions": sum(layout.computed_positions for layout in layouts),  # packed or padded layout
        "policy_tokens": sum(layout.real_tokens for layout in layouts),
        "generate_s": generate_seconds, "score_s": score_seconds, "reference_s": reference_seconds,
        "old_logp_s": old_logp_seconds, "policy_s": policy_seconds, "optimizer_s": optimizer_seconds,
        "step_s": step_seconds, "compile_s": samples.compile_seconds,
    }
    run.bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}")
    tqdm.write(f"step {step + 1}/{total_steps} reward {metrics['reward']:.3f} acc {metrics['accuracy']:.3f} "
               f"fmt {metrics['format_rate']:.2f} kl {metrics['kl']:.4f} clip {metrics['clip_frac']:.3f} "
               f"ent {metrics['entropy']:.3f} len {metrics['completion_len']:.1f} trunc {metrics['truncated']:.2f} "
               f"zero-adv {metrics['zero_adv_groups']:.2f} gnorm {'-' if grad_norm is None else f'{grad_norm:.3f}'} "
               f"{rollout_summary(metrics)}")
    if SAMPLE_EVERY and (step + 1) % SAMPLE_EVERY == 0:
        tqdm.write(f"--- sample (reward {scores[0].total:.2f}, gold {sample_rows[0].get('gold_answer')}):\n"
                   f"{samples.texts[0]}\n---")
    run.end_step(step + 1, metrics)
run.finish()

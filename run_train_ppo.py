"""PPO with a LoRA actor and a value-head critic: sample answers, reward them, GAE, clipped updates.

    python run_train_ppo.py | tee logs/ppo.log                         # Gemma 2 2B Instruct on GSM8K
    python run_train_ppo.py --MODEL_PATH=models/tiny-gemma2-math \\
        --TRAIN_FILE=data/synth_train.jsonl --EVAL_FILE=data/synth_test.jsonl --MAX_STEPS=60
    python run_train_ppo.py --RESUME=checkpoints/ppo/lora_epoch0_step40.pt    # continue that run

One step (PPO, Schulman et al. 2017, in the RLHF form of InstructGPT / TRL's PPOTrainer):
  1. sample NUM_SAMPLES_PER_PROMPT completions for each of PROMPTS_PER_STEP questions, one batch,
     and reward each one (REWARD, common/reward.py);
  2. with the sampling policy, once: old log-probs and values (ppo/critic.py: a value head on
     hidden states, their source set by CRITIC_FEATURES), and reference log-probs with the
     adapters off (KL_COEF > 0);
  3. per-token rewards: -KL_COEF x KL(policy || reference) on every answer token, the task reward
     on the last one (ppo.loss.token_rewards); GAE advantages and returns (ppo.gae.compute_gae),
     bootstrapping rows cut off at MAX_NEW_TOKENS with the value of the state after their last
     token; advantages whitened over all answer tokens of the step;
  4. PPO_EPOCHS passes over the rollouts in shuffled mini-batches of MINI_BATCH_SIZE sequences,
     one AdamW step per mini-batch (actor and critic together, each its own learning rate) on
     clipped surrogate + VF_COEF x clipped value loss - ENT_COEF x entropy, accumulated over
     micro-batches of MICRO_BATCH_SIZE with the mini-batch's token count as the normaliser;
     stopped early when the mean approx KL of an epoch exceeds TARGET_KL.
A step's rollouts (common.rollout.RolloutBatch) go to the device once, with everything the updates
read (sampler, old and reference log-probs, values, advantages, returns, in the rollouts' order); each
mini-batch's micro-batches take their rows from it.
A CUDA out-of-memory error in the rollouts, an eval batch or a micro-batch ends no run: that phase (a
mini-batch's update, for a micro-batch) is done again from its start at half its size
(GENERATION_BATCH_SIZE, EVAL_BATCH_SIZE, MICRO_BATCH_SIZE or MICRO_BATCH_TOKENS), which the rest of the
run keeps (common/oom.py).

Under torchrun (torchrun --nproc_per_node=N run_train_ppo.py ...) each of the N processes samples
PROMPTS_PER_STEP / N of the step's questions with its own seed and keeps its own buffer; advantages
are whitened with the statistics of the whole step, every mini-batch is MINI_BATCH_SIZE / N rows
of each process with the whole mini-batch's token count as normaliser, and the gradients are summed
over the processes (common/distributed.py); rank 0 alone prints, writes metrics and checkpoints.
"""

from pathlib import Path
import dataclasses
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
NUM_SAMPLES_PER_PROMPT: Annotated[int, ">= 1"] = 4  # completions sampled per question
MAX_NEW_TOKENS: Annotated[int, ">= 1"] = 256  # completion length limit of the rollouts (a cut-off answer is flagged truncated)
#                                   (differs from GRPO: its return is bootstrapped with the value after its last token)
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
KL_COEF: Annotated[float, ">= 0"] = 0.05  # weight of the KL penalty to the base model (0 = no reference pass)
#                                   (differs from GRPO: a per-token penalty in the reward, InstructGPT's)
KL_ESTIMATOR: Literal["k1", "k2", "k3"] = "k1"  # k1, k2 or k3 estimate of KL(policy || reference)
#                                   (differs from GRPO: k1 in the reward, as InstructGPT and TRL)
GAMMA: Annotated[float, "0 <= x <= 1"] = 1.0  # discount over answer tokens
LAM: Annotated[float, "0 <= x <= 1"] = 0.95  # GAE lambda (1 = Monte-Carlo returns, 0 = one-step TD)
PPO_EPOCHS: Annotated[int, ">= 1"] = 2  # passes over each step's rollouts
MINI_BATCH_SIZE: Annotated[int, ">= 1"] = 16  # sequences per optimizer step
CLIP_EPS: Annotated[float, "0 <= x < 1"] = 0.2  # policy ratio clipped to [1 - CLIP_EPS, 1 + CLIP_EPS]
VALUE_CLIP: Annotated[float, ">= 0"] = 0.2  # value predictions clipped to old value +- VALUE_CLIP in the value loss (0 = unclipped)
VF_COEF: Annotated[float, ">= 0"] = 0.5  # weight of the value loss
ENT_COEF: Annotated[float, ">= 0"] = 0.0  # weight of the entropy bonus
TARGET_KL: Annotated[float, "> 0"] | None = None  # stop a step's PPO epochs once an epoch's mean approx KL exceeds this (None = off)
IMPORTANCE_CORRECTION: Literal["none", "tis"] = "none"  # correct the sampler -> trainer log-prob mismatch: none, or tis
#                                   (each token's policy term times min(exp(trainer - sampler log-prob), TIS_CAP))
TIS_CAP: Annotated[float, "> 0"] = 2.0  # truncation of the TIS weights (TRL's and verl's default: 2)
# optimisation
LR: Annotated[float, "> 0"] = 2e-5  # peak AdamW learning rate of the LoRA (a cautious start for Gemma 2B, untuned; the tiny model learns at 2e-4)
CRITIC_FEATURES: Literal["detached", "adapter", "shared"] = "detached"  # value head reads: the actor's hidden states
#                               with a stop-gradient (detached), a second LoRA of its own on the same base (adapter),
#                               or the actor's, trained (shared)
CRITIC_LR: Annotated[float, "> 0"] = 1e-3  # peak AdamW learning rate of the value head (untuned)
CRITIC_HIDDEN: Annotated[int, ">= 1"] = 256  # width of the value head's hidden layer
WARMUP_STEPS: Annotated[int, ">= 0"] = 5  # linear warm-up steps (differs from GRPO and DPO: of both LR and CRITIC_LR)
LR_SCHEDULE: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine decay to 10% of LR
WEIGHT_DECAY: Annotated[float, ">= 0"] = 0.0  # AdamW weight decay
GRAD_CLIP: Annotated[float, "> 0"] = 1.0  # max global gradient norm
#                                   (differs from the other trainers: of the actor's LoRA and of the critic apart)
MICRO_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # sequences per forward/backward (gradient
#                                   accumulation over a mini-batch): auto (the memory plan's fastest that fits, at most 8;
#                                   8 off a GPU) or a number; packed, as many rows as MICRO_BATCH_SIZE of the longest
#                                   sequence would take (differs from GRPO: PPO updates per mini-batch, MINI_BATCH_SIZE
#                                   sequences)
MICRO_BATCH_TOKENS: Annotated[int, ">= 0"] = 0  # fill each micro-batch with whole sequences up to this many tokens
#                                   instead of MICRO_BATCH_SIZE sequences (0 = off); the normaliser stays the
#                                   mini-batch's (differs from GRPO: PPO updates per mini-batch)
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
RUN_NAME: RunName = "ppo"  # name of the run: its checkpoint folder and its metrics file LOG_DIR/RUN_NAME.jsonl
#                                   (differs from the other trainers: the trainer's name)
LOG_DIR = "logs"  # where the metrics JSONL goes
LOGGER = "jsonl"  # jsonl (always), plus tensorboard and/or wandb: e.g. jsonl,tensorboard
HEALTH: Literal["warn", "stop", "off"] = "warn"  # a run going wrong (common/health.py): warn (one health: line per
#                                   symptom, naming the constant to change), stop (that line, then save the step and
#                                   exit with status 3) or off (no checks)
OVERWRITE = False  # replace an earlier run of the same RUN_NAME, its own files only (else a new run on its name is refused)
RESUME: Path | None = None  # checkpoint (or run folder: its newest) of a run to continue: LR and the schedule may
#                             change, the LoRA layout, critic, samples and questions per step and seed may not
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
from common.kl import kl_estimate  # noqa: E402
from common.logprobs import enable_gradient_checkpointing  # noqa: E402
from common.lora import LoRAMotion, disable_lora, lora_parameters  # noqa: E402
from common.memory_plan import Sizes  # noqa: E402
from common.model import get_device, load_tokenizer  # noqa: E402
from common.oom import BatchSizes  # noqa: E402
from common.packing import packing_plan, resolve_pack_length, to_device  # noqa: E402
from common.policy_gradient import logprob_mismatch, truncated_importance_weights  # noqa: E402
from common.prompts import configure_prompts  # noqa: E402
from common.reward import load_reward, score_batch  # noqa: E402
from common.rollout import rollout_batch, rollout_means, rollout_summary, rollout_sums, sample_rollouts  # noqa: E402
from common.run import TrainingRun, device_clock  # noqa: E402
from common.run_setup import (check_lora_targets, check_memory, eval_sampling, load_model_for_training,  # noqa: E402
                              load_questions, questions_in_context, steps_in_epoch)
from common.sampler import SamplingParams, even_chunk_rows, release_static_cache  # noqa: E402
from common.schedule import warmup_then_schedule  # noqa: E402
from ppo.critic import Critic, completion_logprobs_and_values  # noqa: E402
from ppo.gae import compute_gae, explained_variance, masked_sums, masked_whiten  # noqa: E402
from ppo.loss import entropy_bonus, ppo_policy_loss, ppo_total_loss, ppo_value_loss, token_rewards  # noqa: E402

# ------------------------------------------- plumbing (common/run.py, common/run_setup.py)
check_sampling(EVAL_NUM_SAMPLES, EVAL_TEMPERATURE, ("EVAL_NUM_SAMPLES", "EVAL_TEMPERATURE"))
distributed = setup_distributed(DEVICE)
run = TrainingRun("ppo", config, distributed, model_path=MODEL_PATH, run_name=RUN_NAME, checkpoint_dir=CHECKPOINT_DIR,
                  log_dir=LOG_DIR, logger=LOGGER, overwrite=OVERWRITE, resume=RESUME, init_lora=INIT_LORA,
                  fixed_on_resume=("LORA_R", "LORA_ALPHA", "LORA_TARGETS", "LORA_DROPOUT", "SEED", "NUM_PROMPTS",
                                   "PROMPTS_PER_STEP", "NUM_SAMPLES_PER_PROMPT", "CRITIC_FEATURES", "CRITIC_HIDDEN"))
if RESUME is None and INIT_LORA is None:
    check_lora_targets(run.model_path, LORA_TARGETS)  # on the model without its weights
elif INIT_LORA is not None:  # its layout replaces LORA_* (one line says so), in the memory plan and the checkpoints
    LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT = init_lora_settings(INIT_LORA, LORA_R, LORA_ALPHA, LORA_TARGETS,
                                                                        LORA_DROPOUT, say=distributed.is_main)
    config.update(LORA_R=LORA_R, LORA_ALPHA=LORA_ALPHA, LORA_TARGETS=list(LORA_TARGETS), LORA_DROPOUT=LORA_DROPOUT)
torch.manual_seed(SEED)  # the same on every rank: the same LoRA and critic initialisation
reward = load_reward(REWARD, REWARD_WEIGHTS)
problems, eval_problems = load_questions(TRAIN_FILE, NUM_PROMPTS, EVAL_FILE if EVAL_EVERY else None, EVAL_LIMIT,
                                         GOLD_FIELD, reward.needs_numeric_gold)
run.check_divides(PROMPTS_PER_STEP, "PROMPTS_PER_STEP")
run.check_divides(MINI_BATCH_SIZE, "MINI_BATCH_SIZE")

device = get_device(DEVICE)
tokenizer = load_tokenizer(run.model_path)
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)  # before stop_token_ids
(problems, eval_problems), longest_prompt = questions_in_context(  # each prompt leaves MAX_NEW_TOKENS in the context
    tokenizer, prompt_format, [(problems, TRAIN_FILE), (eval_problems, EVAL_FILE if EVAL_EVERY else None)],
    run.model_config, MAX_NEW_TOKENS, SKIP_LONG_PROMPTS)
steps_per_epoch = steps_in_epoch(len(problems), PROMPTS_PER_STEP, TRAIN_FILE)
total_steps = MAX_STEPS or NUM_EPOCHS * steps_per_epoch
# The memory plan, before the weights load. The critic's own adapter is a second LoRA of the actor's rank,
# run as a second body pass whose activations the backward holds too: planned as rank 2r and twice the rows.
critic_passes = 2 if CRITIC_FEATURES == "adapter" else 1
rows_per_step = PROMPTS_PER_STEP // distributed.world_size * NUM_SAMPLES_PER_PROMPT  # this rank's
# The sizes left at auto: the fastest that fit (off a GPU: 8, no checkpointing, all rows, 64, the sizes before auto).
planned = check_memory(
    run.model_path, device, GPU_MEMORY_GB,
    Sizes(MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, GENERATION_BATCH_SIZE, EVAL_BATCH_SIZE), Sizes(8, False, 0, 64),
    micro_batch_scale=critic_passes, evaluates=EVAL_EVERY > 0, quant=QUANT, dtype=DTYPE,
    lora_r=LORA_R * critic_passes, lora_targets=LORA_TARGETS, logprob_chunk_size=LOGPROB_CHUNK_SIZE, sampler=SAMPLER,
    rows=rows_per_step, samples_per_prompt=NUM_SAMPLES_PER_PROMPT, prompt_tokens=longest_prompt,
    max_new_tokens=MAX_NEW_TOKENS, micro_batch_tokens=MICRO_BATCH_TOKENS * critic_passes,
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
start_lora(model, run.checkpoint, RESUME, INIT_LORA, LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT)
critic = Critic(model, CRITIC_FEATURES, CRITIC_HIDDEN).to(device)
if planned.gradient_checkpointing:
    enable_gradient_checkpointing(model)
if run.checkpoint is not None:
    critic.load_state_dict(run.checkpoint["extra"]["critic"])
actor_parameters = lora_parameters(model)
critic_parameters = list(critic.parameters())
# One optimizer, a group each: the critic's moments then live in the same checkpointed state. The
# critic's adapter (CRITIC_FEATURES = "adapter") is a LoRA like the actor's and trains at its rate.
parameter_groups = [{"params": actor_parameters, "lr": LR},
                    {"params": list(critic.value_head.parameters()), "lr": CRITIC_LR}]
if critic.adapter is not None:
    parameter_groups.append({"params": list(critic.adapter.parameters()), "lr": LR})
optimizer = torch.optim.AdamW(parameter_groups, weight_decay=WEIGHT_DECAY)
scheduler = warmup_then_schedule(optimizer, WARMUP_STEPS, total_steps, LR_SCHEDULE)
run.track(model, optimizer, scheduler, loss_scaler,
          evaluate=lambda step: evaluate(model, tokenizer, eval_problems, eval_greedy, desc=f"eval@{step}",
                                         reward=reward, prompt_format=prompt_format, sampled=eval_sampled,
                                         seed=SEED, sizes=sizes),
          extra=lambda: {"critic": critic.state_dict(), "critic_features": CRITIC_FEATURES}, sizes=sizes)
run.restore()  # a resumed run's optimizer, schedule, loss scale and random states
lora_motion = LoRAMotion(model)  # the adapter's norm and each step's update, for the health checks
print(f"{len(problems)} training questions, {steps_per_epoch} steps per epoch, {total_steps} steps; "
      f"LoRA {sum(p.numel() for p in actor_parameters) / 1e6:.3f}M + critic ({CRITIC_FEATURES}) "
      f"{sum(p.numel() for p in critic_parameters) / 1e6:.3f}M trainable parameters on {device}; "
      f"{distributed.world_size} process(es) x {PROMPTS_PER_STEP // distributed.world_size} questions per step; "
      f"{packing_line}")


def mini_batch_generator(step: int) -> torch.Generator:
    """The generator of a step's mini-batch shuffles: a function of SEED and the step alone, so a
    resumed run shuffles exactly as the uninterrupted run did."""
    return torch.Generator().manual_seed(SEED * 1_000_003 + step)


def plan_micro_batches(rollouts, step_pack_length: int | None):
    """The step's micro-batches at the sizes in use, then the batch to the device with everything the
    updates read, in one copy per dtype."""
    rollouts.plan_passes(sizes["MICRO_BATCH_SIZE"], sizes["MICRO_BATCH_TOKENS"], packing, step_pack_length)
    return rollouts.to(device)


# ------------------------------------------------------------ the algorithm
for step in run.steps(total_steps, steps_per_epoch, eval_every=EVAL_EVERY, save_every=SAVE_EVERY,
                      save_every_minutes=SAVE_EVERY_MINUTES, keep_checkpoints=KEEP_CHECKPOINTS, health=HEALTH):
    epoch, indices = step_items(len(problems), SEED, step, PROMPTS_PER_STEP)  # a function of SEED and the step alone
    batch = [problems[i] for i in shard(indices)]  # this rank's share of the step's questions

    # 1. Rollouts and their task rewards, each scored by REWARD with its question's row. Out of memory:
    #    the same questions again in chunks of half the rows, the sampling generator rewound to the step's
    #    start (common/oom.py): the rollouts a run at the smaller size from this step samples.
    for attempt in sizes.attempts("GENERATION_BATCH_SIZE", "the rollouts", rewind=[sampling.generator]):
        with attempt:
            samples, sample_rows, generate_seconds = sample_rollouts(
                model, tokenizer, prompt_format, batch,
                dataclasses.replace(sampling, chunk_rows=even_chunk_rows(rows_per_step, attempt.size)))
    if planned.release_static_kv:  # the memory plan: the sampler's static KV does not fit beside the policy pass
        release_static_cache(model)
    scores = score_batch(reward, samples.texts, sample_rows, samples.truncated)
    task_rewards = torch.tensor([s.total for s in scores], dtype=torch.float32)
    rollouts = rollout_batch(samples, None, tokenizer.pad_token_id)
    rollouts.sampler_logp = samples.logprobs[rollouts.rows]  # what each token was drawn with
    # Each rank packs its own rows (common/packing.py), into rows of at most the step's pack length; the
    # batch then goes to the device with everything the updates read, in one copy per dtype.
    step_pack_length = resolve_pack_length(pack_length, max(rollouts.sequence_lengths.tolist(), default=1))
    rollouts = plan_micro_batches(rollouts, step_pack_length)
    mask = rollouts.completion_mask

    # 2. The sampling policy's log-probs and values, and the reference's log-probs: once, before any update.
    #    Out of memory: all again, in micro-batches of half the size.
    reference_start = device_clock(device)
    with torch.no_grad():
        for attempt in sizes.attempts(micro_batch_limit, "the reference pass"):
            with attempt:
                if attempt.retry:
                    rollouts = plan_micro_batches(rollouts, step_pack_length)
                passes = [completion_logprobs_and_values(model, critic, layout, TEMPERATURE, LOGPROB_CHUNK_SIZE)
                          for _, layout in rollouts.passes]
                rollouts.old_logp, rollouts.values, bootstrap_values = (
                    rollouts.in_row_order([part[index] for part in passes]) for index in (0, 2, 3))
                if KL_COEF > 0:
                    with disable_lora(model):
                        rollouts.ref_logp = rollouts.logprobs(model, TEMPERATURE, LOGPROB_CHUNK_SIZE)
                else:
                    rollouts.ref_logp = rollouts.old_logp  # no reference pass: the KL term is 0
    reference_seconds = device_clock(device) - reference_start
    # The sampler drew each token with its own log-prob; the trainer's (old_logp) differs by the
    # training-inference mismatch (logged; corrected with IMPORTANCE_CORRECTION=tis).
    mismatch_mean, mismatch_max = logprob_mismatch(rollouts.sampler_logp, rollouts.old_logp, mask)

    # 3. Per-token rewards, GAE, whitened advantages. Rows cut off by MAX_NEW_TOKENS would have gone
    # on: they are bootstrapped with the value after their last token; EOS-ended rows are over.
    rewards = token_rewards(task_rewards.to(device), rollouts.old_logp, rollouts.ref_logp, mask, KL_COEF, KL_ESTIMATOR)
    last_values = torch.where(samples.truncated[rollouts.rows].to(device), bootstrap_values, 0.0)
    advantages, rollouts.returns = compute_gae(rewards, rollouts.values, mask, GAMMA, LAM, last_values)
    rollouts.advantages = masked_whiten(advantages, mask, combine=all_reduce_sum)  # the whole step's statistics

    # 4. PPO epochs over shuffled mini-batches, one optimizer step each. Every rank has as many rows,
    #    so MINI_BATCH_SIZE / N rows each make the same number of mini-batches (and collectives).
    #    Statistics stay on the device as token sums: one host sync per mini-batch, none per micro-batch.
    policy_start = device_clock(device)
    model.train()
    shuffle_generator = mini_batch_generator(step)
    update_sums = {key: torch.zeros((), device=device)
                   for key in ("tokens", "entropy", "value_loss", "approx_kl", "clip_frac")}
    lora_grad_norms, value_grad_norms, epochs_run = [], [], 0
    for _ in range(PPO_EPOCHS):
        epoch_start_sums = {key: update_sums[key].clone() for key in ("approx_kl", "tokens")}
        for mini_batch in torch.randperm(rollouts.num_rows, generator=shuffle_generator).split(
                MINI_BATCH_SIZE // distributed.world_size):
            normalizer = all_reduce_sum(mask[mini_batch].sum())  # the tokens of the mini-batch on every rank
            # Out of memory in a micro-batch: the mini-batch's update again from its start, its gradients and
            # statistics zeroed, in micro-batches of half the size (common/oom.py).
            for attempt in sizes.attempts(micro_batch_limit, "the policy pass"):
                with attempt:
                    optimizer.zero_grad(set_to_none=True)
                    mini_batch_loss = torch.zeros((), device=device)
                    mini_batch_sums = {key: torch.zeros((), device=device) for key in update_sums}
                    # The mini-batch's shuffled rows packed together, its micro-batches cut from the packed rows.
                    for rows, layout in rollouts.pass_plan(mini_batch, sizes["MICRO_BATCH_SIZE"],
                                                           sizes["MICRO_BATCH_TOKENS"], packing, step_pack_length):
                        micro = rollouts.micro_batch(*to_device((rows, layout), device))
                        logp, entropy, values, _ = completion_logprobs_and_values(
                            model, critic, micro.layout, TEMPERATURE, LOGPROB_CHUNK_SIZE, with_entropy=True)
                        correction = (truncated_importance_weights(micro.old_logp, micro.sampler_logp, TIS_CAP)
                                      if IMPORTANCE_CORRECTION == "tis" else None)
                        policy_loss, policy_stats = ppo_policy_loss(logp, micro.old_logp, micro.advantages,
                                                                    micro.completion_mask, CLIP_EPS,
                                                                    normalizer=normalizer, sampler_correction=correction)
                        value_loss, _ = ppo_value_loss(values, micro.values, micro.returns, micro.completion_mask,
                                                       VALUE_CLIP, normalizer=normalizer)
                        entropy_term = entropy_bonus(entropy, micro.completion_mask, normalizer=normalizer)
                        loss = ppo_total_loss(policy_loss, value_loss, entropy_term, VF_COEF, ENT_COEF)
                        loss_scaler.backward(loss)  # scaled first for an fp16 model (common.run.LossScaler)
                        mini_batch_loss += loss.detach()
                        # Statistics as sums over tokens: the losses above are sums divided by the normaliser.
                        micro_tokens = micro.completion_mask.sum()
                        mini_batch_sums["tokens"] += micro_tokens
                        mini_batch_sums["entropy"] += entropy_term.detach() * normalizer
                        mini_batch_sums["value_loss"] += value_loss.detach() * normalizer
                        mini_batch_sums["approx_kl"] += policy_stats["approx_kl"] * micro_tokens
                        mini_batch_sums["clip_frac"] += policy_stats["clip_frac"] * micro_tokens
            update_sums = {key: update_sums[key] + mini_batch_sums[key] for key in update_sums}
            sum_gradients(actor_parameters + critic_parameters)
            loss_scaler.unscale_gradients(optimizer)
            # Separately: the critic's gradient would otherwise dominate the LoRA's norm and shrink its step.
            lora_grad_norm = float(torch.nn.utils.clip_grad_norm_(actor_parameters, GRAD_CLIP))
            value_grad_norm = float(torch.nn.utils.clip_grad_norm_(critic_parameters, GRAD_CLIP))
            # Loss and gradients are sums over the ranks, the same on each, so every rank decides the same.
            if not run.update_is_finite(step + 1, lora_grad_norm, value_grad_norm, all_reduce_sum(mini_batch_loss)):
                optimizer.zero_grad(set_to_none=True)
                continue
            loss_scaler.step(optimizer)
            lora_grad_norms.append(lora_grad_norm)
            value_grad_norms.append(value_grad_norm)
        epochs_run += 1
        epoch_kl = all_reduce_sum({key: update_sums[key] - epoch_start_sums[key] for key in ("approx_kl", "tokens")})
        if TARGET_KL is not None and epoch_kl["approx_kl"] / max(1.0, epoch_kl["tokens"]) > TARGET_KL:
            break  # the same on every rank: the sums are every rank's
    scheduler.step()
    policy_seconds = device_clock(device) - policy_start
    step_seconds = run.step_seconds() - samples.compile_seconds

    # Metrics of the step: rollout statistics over all answers, update statistics over the tokens trained
    # on, both over every rank (sums in one all-reduce, then the means). Times are rank 0's.
    token_sums = {f"{name}_{key}": value for name, tensor in
                  (("kl", kl_estimate(rollouts.old_logp, rollouts.ref_logp, KL_ESTIMATOR)),
                   ("returns", rollouts.returns), ("values", rollouts.values))
                  for key, value in masked_sums(tensor, mask).items()}
    totals = all_reduce_sum({**rollout_sums(scores, samples), **update_sums, **token_sums,
                             "mismatch": mismatch_mean * mask.sum()})
    updated_tokens = max(1.0, totals["tokens"])
    metrics = {
        "step": step + 1, "epoch": epoch, **rollout_means(totals, generate_seconds),
        "kl": totals["kl_sum"] / totals["kl_count"],
        "logprob_mismatch_mean": totals["mismatch"] / totals["kl_count"], "logprob_mismatch_max": all_reduce_max(mismatch_max),
        **{key: totals[key] / updated_tokens for key in ("approx_kl", "clip_frac", "value_loss", "entropy")},
        "explained_variance": explained_variance(rollouts.values, rollouts.returns, mask, combine=all_reduce_sum),
        "returns_mean": totals["returns_sum"] / totals["returns_count"],
        "values_mean": totals["values_sum"] / totals["values_count"],
        "grad_norm": sum(lora_grad_norms) / len(lora_grad_norms) if lora_grad_norms else None,
        "value_grad_norm": sum(value_grad_norms) / len(value_grad_norms) if value_grad_norms else None,
        "ppo_epochs": epochs_run, "lr": scheduler.get_last_lr()[0], "critic_lr": scheduler.get_last_lr()[1],
        **lora_motion.metrics(),
        "generate_s": generate_seconds, "reference_s": reference_seconds, "policy_s": policy_seconds,
        "step_s": step_seconds, "compile_s": samples.compile_seconds,
    }
    run.bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}")
    grad_norm_text = "-" if metrics["grad_norm"] is None else f"{metrics['grad_norm']:.3f}"
    tqdm.write(f"step {step + 1}/{total_steps} reward {metrics['reward']:.3f} acc {metrics['accuracy']:.3f} "
               f"fmt {metrics['format_rate']:.2f} kl {metrics['kl']:.4f} approx_kl {metrics['approx_kl']:.4f} "
               f"clip {metrics['clip_frac']:.3f} vloss {metrics['value_loss']:.4f} "
               f"ev {metrics['explained_variance']:.3f} ent {metrics['entropy']:.3f} "
               f"len {metrics['completion_len']:.1f} trunc {metrics['truncated']:.2f} gnorm {grad_norm_text} "
               f"{rollout_summary(metrics)}")
    if SAMPLE_EVERY and (step + 1) % SAMPLE_EVERY == 0:
        tqdm.write(f"--- sample (reward {scores[0].total:.2f}, gold {sample_rows[0].get('gold_answer')}):\n"
                   f"{samples.texts[0]}\n---")
    run.end_step(step + 1, metrics)
run.finish()

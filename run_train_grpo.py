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

Under torchrun (torchrun --nproc_per_node=N run_train_grpo.py ...) each of the N processes samples
PROMPTS_PER_STEP / N of the step's questions with its own seed; the normaliser is the whole step's
and the LoRA gradients are summed over the processes (common/distributed.py), so the update is the
one process's; rank 0 alone prints, writes the metrics and saves checkpoints.
"""

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
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question ("" for none); a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # a system message before every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or the path of a Jinja file
NUM_PROMPTS: Annotated[int, ">= 0"] = 0  # use the first NUM_PROMPTS training questions (0 = all)
SKIP_LONG_PROMPTS = False  # leave out (and count) examples too long for the context, instead of refusing the file
EVAL_LIMIT: Annotated[int, ">= 0"] = 200  # held-out questions per eval (0 = all)
EVAL_EVERY: Annotated[int, ">= 0"] = 50  # steps between evals, plus one at step 0 and one at the end (0 = no evaluation)
EVAL_BATCH_SIZE: Annotated[int, ">= 1"] = 64  # prompts per eval generation batch
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
GENERATION_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 0"] = "auto"  # rows sampled together: auto (the most that
#                                   fit in the GPU's memory, by the memory plan), or a number (0 = all of a step's rows at once)
SAMPLER: Literal["auto", "eager", "static", "compiled"] = "auto"  # rollouts and evals: auto (compiled static-cache
#                                   decode on CUDA, eager elsewhere), eager, static (static cache, not compiled) or compiled
REWARD = "math"  # math (correctness + format - hacks), correctness, your.py:function, or several: math,my.py:brevity
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
MICRO_BATCH_SIZE: Annotated[int, ">= 1"] = 16  # sequences per forward/backward (gradient accumulation over the step);
#                                   packed, as many rows as MICRO_BATCH_SIZE of the longest sequence would take
MICRO_BATCH_TOKENS: Annotated[int, ">= 0"] = 0  # fill each micro-batch with whole sequences up to this many tokens
#                                   instead of MICRO_BATCH_SIZE sequences (0 = off); the normaliser stays the step's
PACKING = True  # the training passes pack their sequences into rows without pads (common/packing.py);
#                 with false, padded rectangles; padded anyway for an attention the packing tests do not cover
PACK_LENGTH: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # longest packed row: auto (the step's longest
#                                   sequence; one row per micro-batch under flash-attention's variable-length kernels) or tokens
LOGPROB_CHUNK_SIZE: Annotated[int, ">= 1"] = 1024  # positions per chunk of the output head (bounds [positions, vocab] logits)
GRADIENT_CHECKPOINTING = False  # recompute each layer's activations in backward: less memory, a slower policy pass
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

from common.distributed import all_reduce_max, all_reduce_sum, setup_distributed, sum_gradients  # noqa: E402
from common.evaluate import check_sampling, evaluate  # noqa: E402
from common.lora import disable_lora  # noqa: E402
from common.packing import packing_plan, resolve_pack_length, to_device  # noqa: E402
from common.policy_gradient import logprob_mismatch, truncated_importance_weights  # noqa: E402
from common.prompts import configure_prompts  # noqa: E402
from common.reward import load_reward, score_batch  # noqa: E402
from common.rollout import rollout_batch, rollout_means, rollout_summary, rollout_sums, sample_rollouts  # noqa: E402
from common.sampler import SamplingParams, even_chunk_rows  # noqa: E402
from common.run import TrainingRun, device_clock  # noqa: E402
from grpo.advantage import group_advantages, zero_advantage_groups  # noqa: E402
from grpo.loss import GRPOObjective, grpo_loss  # noqa: E402

# ------------------------------------------------- plumbing (common/run.py)
check_sampling(EVAL_NUM_SAMPLES, EVAL_TEMPERATURE, ("EVAL_NUM_SAMPLES", "EVAL_TEMPERATURE"))
distributed = setup_distributed(DEVICE)
run = TrainingRun("grpo", config, distributed, fixed_on_resume=("PROMPTS_PER_STEP", "NUM_SAMPLES_PER_PROMPT"))
torch.manual_seed(SEED)  # the same on every rank: the same LoRA initialisation
reward = load_reward(REWARD, REWARD_WEIGHTS)
problems, eval_problems = run.load_questions(reward, PROMPTS_PER_STEP)

tokenizer, device = run.load_tokenizer()
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)  # before stop_token_ids
problems, eval_problems, steps_per_epoch, total_steps = run.fit_questions(tokenizer, prompt_format, problems,
                                                                          eval_problems, PROMPTS_PER_STEP)
rows_per_step = PROMPTS_PER_STEP // distributed.world_size * NUM_SAMPLES_PER_PROMPT  # this rank's
generation_batch_size = run.check_memory(  # the memory plan, before the weights load
    rows=rows_per_step,
    samples_per_prompt=NUM_SAMPLES_PER_PROMPT, prompt_tokens=run.longest_prompt, max_new_tokens=MAX_NEW_TOKENS,
    micro_batch_size=MICRO_BATCH_SIZE, micro_batch_tokens=MICRO_BATCH_TOKENS,
    pack_length=0 if PACK_LENGTH == "auto" else PACK_LENGTH,
    eval_samples=EVAL_NUM_SAMPLES if EVAL_TEMPERATURE > 0 else 1)
model = run.load_model()
packing, pack_length, packing_line = packing_plan(model, PACKING, PACK_LENGTH)
# The sampling settings, as one value: a step's rows in equal chunks of at most GENERATION_BATCH_SIZE
# (the static path pads the last chunk, and the last eval batch, to one row count per run).
sampling = SamplingParams(NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K,
                          chunk_rows=even_chunk_rows(rows_per_step, generation_batch_size), sampler=SAMPLER,
                          generator=run.sampling_generator(device))  # each rank its own samples
eval_sampling, eval_sampled = run.eval_settings()  # greedy, and the sampled pass when EVAL_TEMPERATURE > 0
trainable, optimizer, scheduler = run.lora_and_optimizer(model, total_steps)
run.track(model, tokenizer, optimizer, scheduler,
          evaluate=lambda step: evaluate(model, tokenizer, eval_problems, eval_sampling, desc=f"eval@{step}",
                                         reward=reward, prompt_format=prompt_format, sampled=eval_sampled,
                                         seed=SEED))
# The objective, as one value: what grpo_loss optimises (grpo/loss.py).
objective = GRPOObjective(clip_eps_low=CLIP_EPS_LOW, clip_eps_high=CLIP_EPS_HIGH, kl_coef=KL_COEF,
                          kl_estimator=KL_ESTIMATOR, loss_agg=LOSS_AGG, importance_level=IMPORTANCE_LEVEL,
                          max_new_tokens=MAX_NEW_TOKENS)
print(f"{len(problems)} training questions, {steps_per_epoch} steps per epoch, {total_steps} steps; "
      f"LoRA {sum(p.numel() for p in trainable) / 1e6:.3f}M trainable parameters on {device}; "
      f"{distributed.world_size} process(es) x {PROMPTS_PER_STEP // distributed.world_size} questions per step; "
      f"{packing_line}")

# ------------------------------------------------------------ the algorithm
for step in run.steps(total_steps, steps_per_epoch):
    epoch, batch = run.step_items(problems, step, PROMPTS_PER_STEP)  # this rank's share of the step's questions

    # 1. Rollouts: G completions per question in one batch; each scored by REWARD with its question's row.
    samples, sample_rows, generate_seconds = sample_rollouts(model, tokenizer, prompt_format, batch, sampling)
    run.release_rollout_memory(model)  # the static KV, where the memory plan says it does not fit beside the policy pass
    score_start = time.perf_counter()
    scores = score_batch(reward, samples.texts, sample_rows, samples.truncated)

    # 2. Group advantages.
    rewards = torch.tensor([s.total for s in scores]).view(len(batch), NUM_SAMPLES_PER_PROMPT)
    advantages = group_advantages(rewards, ADVANTAGE).flatten()
    informative = ~zero_advantage_groups(rewards).repeat_interleave(NUM_SAMPLES_PER_PROMPT)
    rollouts = rollout_batch(samples, informative, tokenizer.pad_token_id)
    # This rank's micro-batches, packed (or padded) on the CPU: packed, the rows are reordered so that each
    # micro-batch is a slice (common.packing.micro_batch_rows). Then moved to the device with everything the
    # update reads, in one copy per dtype (pinned, non_blocking): the micro-batch loops copy nothing.
    step_pack_length = resolve_pack_length(pack_length, max(rollouts.sequence_lengths.tolist(), default=1))
    rollouts, micro_batches, layouts = rollouts.in_pass_order(MICRO_BATCH_SIZE, MICRO_BATCH_TOKENS, packing,
                                                              step_pack_length)
    layouts, completion_mask, row_advantages, sampler_logp = to_device(
        (layouts, rollouts.completion_mask, advantages[rollouts.rows],
         samples.logprobs[rollouts.rows]), device)  # sampler_logp: what each token was drawn with

    # 3. Reference (adapters off) and, for several iterations, old log-probs: once, before any update.
    reference_start = device_clock(device)
    score_seconds = reference_start - score_start
    ref_logp = old_logp = None
    with torch.no_grad():
        if KL_COEF > 0 and rollouts.num_rows:
            with disable_lora(model):
                ref_logp = rollouts.completion_logprobs(model, TEMPERATURE, layouts, LOGPROB_CHUNK_SIZE)
        old_logp_start = device_clock(device)
        if NUM_ITERATIONS > 1 and rollouts.num_rows:
            old_logp = rollouts.completion_logprobs(model, TEMPERATURE, layouts, LOGPROB_CHUNK_SIZE)
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
        optimizer.zero_grad(set_to_none=True)
        iteration_loss = torch.zeros((), device=device)
        for micro, layout in zip(micro_batches, layouts):
            logp, entropy = rollouts.completion_logprobs_for(model, layout, TEMPERATURE, LOGPROB_CHUNK_SIZE,
                                                             with_entropy=True)
            mask = completion_mask[micro]
            # The trainer's log-probs of the policy that sampled: the sampler's own differ by the
            # training-inference mismatch (logged; corrected with IMPORTANCE_CORRECTION=tis).
            trainer_old_logp = logp.detach() if old_logp is None else old_logp[micro]
            correction = (truncated_importance_weights(trainer_old_logp, sampler_logp[micro], TIS_CAP)
                          if IMPORTANCE_CORRECTION == "tis" else None)
            loss, stats = grpo_loss(logp, trainer_old_logp, row_advantages[micro], mask, objective, normalizer,
                                    None if ref_logp is None else ref_logp[micro], correction)
            run.backward(loss)  # scaled first for an fp16 model (common.run.LossScaler)
            iteration_loss += loss.detach()
            update_sums["entropy"] += (entropy.detach() * mask).sum()
            for key in ("kl", "clip_frac", "approx_kl"):
                update_sums[key] += stats.get(key, 0.0) * stats["tokens"]
            if iteration == 0:  # the sampling policy's log-probs are the same in every iteration
                mismatch_mean, micro_max = logprob_mismatch(sampler_logp[micro], trainer_old_logp, mask)
                update_sums["mismatch"] += mismatch_mean * stats["tokens"]
                mismatch_max = torch.maximum(mismatch_max, micro_max)
        update_sums["loss"] += iteration_loss
        optimizer_start = device_clock(device)
        sum_gradients(trainable)
        run.unscale_gradients(optimizer)
        # The gradient norm and the loss in one read: the update's only host sync.
        grad_norm, rank_loss = torch.stack([torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP).to(iteration_loss),
                                            iteration_loss]).tolist()
        # The step's loss (every rank's share) and the gradients are the same on every rank: every rank decides the same.
        if not run.update_is_finite(step + 1, grad_norm, all_reduce_sum(rank_loss)):
            optimizer.zero_grad(set_to_none=True)
            break
        run.optimizer_step(optimizer)
        optimizer_seconds += device_clock(device) - optimizer_start
    scheduler.step()
    policy_seconds = device_clock(device) - policy_start - optimizer_seconds
    step_seconds = run.step_seconds() - samples.compile_seconds

    # Metrics of the step over every rank (sums in one all-reduce, then the means); update statistics
    # are means over the updated tokens of every iteration. Times are rank 0's.
    totals = all_reduce_sum({**rollout_sums(scores, samples), **update_sums,
                             "groups": len(batch), "zero_adv_groups": zero_advantage_groups(rewards).sum()})
    updated_tokens = max(1.0, step_counts["tokens"] * NUM_ITERATIONS)
    metrics = {
        "step": step + 1, "epoch": epoch, **rollout_means(totals, generate_seconds),
        "loss": totals["loss"] / NUM_ITERATIONS,
        **{key: totals[key] / updated_tokens for key in ("kl", "clip_frac", "approx_kl", "entropy")},
        "logprob_mismatch_mean": totals["mismatch"] / max(1.0, step_counts["tokens"]),
        "logprob_mismatch_max": all_reduce_max(mismatch_max),
        "zero_adv_groups": totals["zero_adv_groups"] / totals["groups"],
        "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
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
    run.show_sample(step + 1, samples.texts[0], scores[0].total, sample_rows[0].get("gold_answer"))
    run.end_step(step + 1, metrics)
run.finish()

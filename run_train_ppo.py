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
The rollout buffer stays on the CPU; micro-batches move to the device as they are used.

Under torchrun (torchrun --nproc_per_node=N run_train_ppo.py ...) each of the N processes samples
PROMPTS_PER_STEP / N of the step's questions with its own seed and keeps its own buffer; advantages
are whitened with the statistics of the whole step, every mini-batch is MINI_BATCH_SIZE / N rows
of each process with the whole mini-batch's token count as normaliser, and the gradients are summed
over the processes (common/distributed.py); rank 0 alone prints, writes metrics and checkpoints.
"""

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import configure
from common.distributed import is_main_process

# ---------------------------------------------------------------- constants
# model and data
MODEL_PATH = "models/gemma-2-2b-it"  # local model directory (built-in tiny model: models/tiny-gemma2-math)
TRAIN_FILE = "data/gsm8k_train.jsonl"  # training questions {"question", "gold_answer"}
EVAL_FILE = "data/gsm8k_test.jsonl"  # held-out questions for greedy eval
NUM_PROMPTS = 0  # use the first NUM_PROMPTS training questions (0 = all)
EVAL_LIMIT = 200  # held-out questions per eval (0 = all)
EVAL_EVERY = 50  # steps between evals, plus one at the end (0 = no evaluation during or after training)
EVAL_BATCH_SIZE = 64  # prompts per eval generation batch
# rollouts
NUM_EPOCHS = 1  # passes over the training questions
MAX_STEPS = 0  # stop after this many steps (0 = run the epochs)
PROMPTS_PER_STEP = 16  # questions per step
NUM_SAMPLES_PER_PROMPT = 4  # completions sampled per question
MAX_NEW_TOKENS = 256  # completion length limit (a cut-off answer is flagged truncated and bootstrapped)
TEMPERATURE = 1.0  # sampling temperature; the training log-probs use the same one
TOP_P = 1.0  # nucleus sampling (1.0 = off)
TOP_K = 0  # top-k sampling (0 = off)
GENERATION_BATCH_SIZE = 0  # rows sampled together (0 = all PROMPTS_PER_STEP x NUM_SAMPLES_PER_PROMPT at once)
REWARD = "math"  # reward function of common/reward.py: math (correctness + format - hacks) or correctness
# objective
KL_COEF = 0.05  # weight of the per-token KL penalty to the base model in the reward (0 = no reference pass)
KL_ESTIMATOR = "k1"  # k1 (InstructGPT, TRL), k2 or k3 estimate of KL(policy || reference) in the reward
GAMMA = 1.0  # discount over answer tokens
LAM = 0.95  # GAE lambda (1 = Monte-Carlo returns, 0 = one-step TD)
PPO_EPOCHS = 2  # passes over each step's rollouts
MINI_BATCH_SIZE = 16  # sequences per optimizer step
CLIP_EPS = 0.2  # policy ratio clipped to [1 - CLIP_EPS, 1 + CLIP_EPS]
VALUE_CLIP = 0.2  # value predictions clipped to old value +- VALUE_CLIP in the value loss (0 = unclipped)
VF_COEF = 0.5  # weight of the value loss
ENT_COEF = 0.0  # weight of the entropy bonus
TARGET_KL: float | None = None  # stop a step's PPO epochs once an epoch's mean approx KL exceeds this (None = off)
# optimisation
LR = 2e-5  # peak AdamW learning rate of the LoRA (a cautious start for Gemma 2B, untuned)
CRITIC_FEATURES = "detached"  # value head reads: the actor's hidden states with a stop-gradient (detached),
#                               a second LoRA of its own on the same base (adapter), or the actor's, trained (shared)
CRITIC_LR = 1e-3  # peak AdamW learning rate of the value head (untuned)
CRITIC_HIDDEN = 256  # width of the value head's hidden layer
WARMUP_STEPS = 5  # linear warm-up steps (both learning rates)
LR_SCHEDULE = "constant"  # after warm-up: constant, or cosine decay to 10% of LR
WEIGHT_DECAY = 0.0  # AdamW weight decay
GRAD_CLIP = 1.0  # max gradient norm, of the actor's LoRA and of the critic separately
MICRO_BATCH_SIZE = 8  # sequences per forward/backward (gradient accumulation over a mini-batch)
LOGPROB_CHUNK_SIZE = 1024  # positions per chunk of the output head (bounds [positions, vocab] logits)
# LoRA
LORA_R = 16  # adapter rank
LORA_ALPHA = 32.0  # the update is (LORA_ALPHA / LORA_R) * B @ A
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # wrapped layers
LORA_DROPOUT = 0.0  # dropout on the adapters' input (0 keeps sampling and training the same policy)
# bookkeeping
SAVE_EVERY = 0  # steps between checkpoints (0 = only at the end of each epoch and of the run)
CHECKPOINT_DIR = "checkpoints"  # checkpoints go to CHECKPOINT_DIR/RUN_NAME/
RUN_NAME = "ppo"  # name of the run: its checkpoint folder and its metrics file LOG_DIR/RUN_NAME.jsonl
LOG_DIR = "logs"  # where the metrics JSONL goes
RESUME: Path | None = None  # checkpoint of this run to continue from (same config)
INIT_LORA: Path | None = None  # start a new run from this LoRA checkpoint (an SFT warm-up, a model_soup.py soup):
#                                its layout replaces LORA_*; the KL reference stays the base model (RESUME wins)
SAMPLE_EVERY = 10  # print one sampled completion with its reward every this many steps (0 = never)
SEED = 0  # data order, sampling, mini-batch order and initialisation
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 on CUDA, else fp32), float32, bfloat16

config = configure(globals(), quiet=not is_main_process())
# ---------------------------------------------------------------------------

from common.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, start_lora,  # noqa: E402
                               restore_training_state, save_checkpoint, warn_config_differences)
from common.data import load_problems, open_metrics_log, step_items  # noqa: E402
from common.distributed import (all_reduce_sum, cleanup, gather_rank_states, restore_rank_state,  # noqa: E402
                                setup_distributed, shard, sum_gradients)
from common.evaluate import evaluate  # noqa: E402
from common.kl import kl_estimate  # noqa: E402
from common.lora import disable_lora, lora_parameters  # noqa: E402
from common.model import load_model_and_tokenizer, stop_token_ids  # noqa: E402
from common.prompts import encode_prompts  # noqa: E402
from common.reward import get_reward_fn  # noqa: E402
from common.rollout import rollout_batch  # noqa: E402
from common.sampler import sample  # noqa: E402
from common.schedule import lr_factor  # noqa: E402
from ppo.critic import Critic, completion_logprobs_and_values  # noqa: E402
from ppo.gae import compute_gae, explained_variance, masked_sums, masked_whiten  # noqa: E402
from ppo.loss import entropy_bonus, ppo_policy_loss, ppo_total_loss, ppo_value_loss, token_rewards  # noqa: E402

distributed = setup_distributed(DEVICE)
torch.manual_seed(SEED)  # the same on every rank: the same LoRA and critic initialisation
reward_fn = get_reward_fn(REWARD)
problems = load_problems(TRAIN_FILE, limit=NUM_PROMPTS or None)
eval_problems = load_problems(EVAL_FILE, limit=EVAL_LIMIT or None) if EVAL_EVERY else []
if len(problems) < PROMPTS_PER_STEP:
    raise SystemExit(f"error: {TRAIN_FILE} has {len(problems)} questions, fewer than PROMPTS_PER_STEP={PROMPTS_PER_STEP}")
for name, value in {"PROMPTS_PER_STEP": PROMPTS_PER_STEP, "MINI_BATCH_SIZE": MINI_BATCH_SIZE}.items():
    if value % distributed.world_size:
        raise SystemExit(f"error: {name}={value} does not divide between {distributed.world_size} processes; "
                         f"make it a multiple of the number of processes")
steps_per_epoch = len(problems) // PROMPTS_PER_STEP
total_steps = MAX_STEPS or NUM_EPOCHS * steps_per_epoch

model, tokenizer, device = load_model_and_tokenizer(MODEL_PATH, DEVICE, DTYPE)
stop_ids = stop_token_ids(model, tokenizer)
sampling_generator = torch.Generator(device=device).manual_seed(SEED + distributed.rank)  # each rank its own samples
resume_checkpoint = load_checkpoint(RESUME) if RESUME else None
start_lora(model, resume_checkpoint, RESUME, INIT_LORA, LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT)
critic = Critic(model, CRITIC_FEATURES, CRITIC_HIDDEN).to(device)
if resume_checkpoint is not None:
    if "critic" not in resume_checkpoint["extra"]:
        raise CheckpointError(f"{RESUME} has no critic: not a checkpoint of run_train_ppo.py")
    saved_features = resume_checkpoint["extra"]["critic_features"]
    if saved_features != CRITIC_FEATURES:
        raise CheckpointError(f"{RESUME} holds a critic with CRITIC_FEATURES={saved_features!r}, this run asks "
                              f"for {CRITIC_FEATURES!r}: resume with the run's own setting")
    critic.load_state_dict(resume_checkpoint["extra"]["critic"])
actor_parameters = lora_parameters(model)
critic_parameters = list(critic.parameters())
# One optimizer, a group each: the critic's moments then live in the same checkpointed state. The
# critic's adapter (CRITIC_FEATURES = "adapter") is a LoRA like the actor's and trains at its rate.
parameter_groups = [{"params": actor_parameters, "lr": LR},
                    {"params": list(critic.value_head.parameters()), "lr": CRITIC_LR}]
if critic.adapter is not None:
    parameter_groups.append({"params": list(critic.adapter.parameters()), "lr": LR})
optimizer = torch.optim.AdamW(parameter_groups, weight_decay=WEIGHT_DECAY)
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: lr_factor(s, WARMUP_STEPS, total_steps, LR_SCHEDULE))
start_step = 0
if resume_checkpoint is not None:
    restore_training_state(resume_checkpoint, optimizer, scheduler)
    restore_rank_state(resume_checkpoint, distributed, generators={"sampling": sampling_generator})
    start_step = resume_checkpoint["step"]
    print(f"resumed {RESUME} at step {start_step}")
    warn_config_differences(resume_checkpoint, config)
print(f"{len(problems)} training questions, {steps_per_epoch} steps per epoch, {total_steps} steps; "
      f"LoRA {sum(p.numel() for p in actor_parameters) / 1e6:.3f}M + critic ({CRITIC_FEATURES}) "
      f"{sum(p.numel() for p in critic_parameters) / 1e6:.3f}M trainable parameters on {device}; "
      f"{distributed.world_size} process(es) x {PROMPTS_PER_STEP // distributed.world_size} questions per step")


def mini_batch_generator(step: int) -> torch.Generator:
    """The generator of a step's mini-batch shuffles: a function of SEED and the step alone, so a
    resumed run shuffles exactly as the uninterrupted run did."""
    return torch.Generator().manual_seed(SEED * 1_000_003 + step)


def save(step: int) -> Path | None:
    """Rank 0 writes the checkpoint, with every rank's random state (gathered: every rank calls this)."""
    rank_states = gather_rank_states(distributed, {"sampling": sampling_generator})
    if not distributed.is_main:
        return None
    path = checkpoint_path(CHECKPOINT_DIR, RUN_NAME, step // steps_per_epoch, step)
    return save_checkpoint(path, model, MODEL_PATH, config, optimizer, scheduler, epoch=step // steps_per_epoch,
                           step=step, generators={"sampling": sampling_generator},
                           extra={"critic": critic.state_dict(), "critic_features": CRITIC_FEATURES,
                                  "ranks": rank_states})


def run_eval(step: int) -> dict:
    result = evaluate(model, tokenizer, eval_problems, EVAL_BATCH_SIZE, MAX_NEW_TOKENS, desc=f"eval@{step}")
    tqdm.write(f"step {step} eval: {result.summary()}")
    return result.metrics()


def rollout_logprobs_and_values(rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Old log-probs, values [N, T] and bootstrap values [N] of every rollout, on the CPU (call under no_grad)."""
    parts = [completion_logprobs_and_values(model, critic, rollouts, rows, TEMPERATURE, LOGPROB_CHUNK_SIZE)
             for rows in rollouts.micro_batches(MICRO_BATCH_SIZE)]
    return tuple(torch.cat([part[index].cpu() for part in parts]) for index in (0, 2, 3))


log_path = Path(LOG_DIR) / f"{RUN_NAME}.jsonl"
log_file = open_metrics_log(log_path, append=RESUME is not None, is_main=distributed.is_main)  # rank 0 writes
skipped_updates = 0
if EVAL_EVERY and start_step == 0:
    log_file.write(json.dumps({"step": 0, **run_eval(0)}) + "\n")

run_start = time.perf_counter()
bar = tqdm(range(start_step, total_steps), desc="ppo", unit="step", initial=start_step, total=total_steps,
           disable=not distributed.is_main)
for step in bar:
    step_start = time.perf_counter()
    epoch, step_indices = step_items(len(problems), SEED, step, PROMPTS_PER_STEP)
    batch = [problems[i] for i in shard(step_indices)]  # this rank's share of the step's questions

    # 1. Rollouts and their task rewards.
    model.eval()
    prompt_ids = encode_prompts(tokenizer, [p["question"] for p in batch])
    samples = sample(model, prompt_ids, NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K,
                     eos_token_ids=stop_ids, tokenizer=tokenizer, generator=sampling_generator,
                     max_rows_per_chunk=GENERATION_BATCH_SIZE or None)
    generate_seconds = time.perf_counter() - step_start
    golds = [batch[i]["gold_answer"] for i in samples.prompt_index.tolist()]
    scores = [reward_fn(text, gold, bool(cut)) for text, gold, cut in zip(samples.texts, golds, samples.truncated)]
    task_rewards = torch.tensor([s.total for s in scores], dtype=torch.float32)
    rollouts = rollout_batch(samples, None, tokenizer.pad_token_id)
    mask = rollouts.completion_mask

    # 2. The sampling policy's log-probs and values, and the reference's log-probs: once, before any update.
    reference_start = time.perf_counter()
    with torch.no_grad():
        old_logp, old_values, bootstrap_values = rollout_logprobs_and_values(rollouts)
        if KL_COEF > 0:
            with disable_lora(model):
                ref_logp = rollouts.completion_logprobs(model, TEMPERATURE, MICRO_BATCH_SIZE, LOGPROB_CHUNK_SIZE)
        else:
            ref_logp = old_logp  # no reference pass: the KL term is 0
    reference_seconds = time.perf_counter() - reference_start

    # 3. Per-token rewards, GAE, whitened advantages. Rows cut off by MAX_NEW_TOKENS would have gone
    # on: they are bootstrapped with the value after their last token; EOS-ended rows are over.
    rewards = token_rewards(task_rewards, old_logp, ref_logp, mask, KL_COEF, KL_ESTIMATOR)
    truncated = samples.truncated[rollouts.rows].cpu()
    last_values = torch.where(truncated, bootstrap_values, 0.0)
    advantages, returns = compute_gae(rewards, old_values, mask, GAMMA, LAM, last_values)
    advantages = masked_whiten(advantages, mask, combine=all_reduce_sum)  # the whole step's statistics

    # 4. PPO epochs over shuffled mini-batches, one optimizer step each. Every rank has as many rows,
    #    so MINI_BATCH_SIZE / N rows each make the same number of mini-batches (and collectives).
    policy_start = time.perf_counter()
    model.train()
    shuffle_generator = mini_batch_generator(step)
    tokens_seen = entropy_sum = value_loss_sum = approx_kl_sum = clip_sum = 0.0
    lora_grad_norms, value_grad_norms, epochs_run = [], [], 0
    for _ in range(PPO_EPOCHS):
        epoch_tokens = epoch_approx_kl_sum = 0.0
        for mini_batch in torch.randperm(rollouts.num_rows, generator=shuffle_generator).split(
                MINI_BATCH_SIZE // distributed.world_size):
            optimizer.zero_grad(set_to_none=True)
            normalizer = all_reduce_sum(mask[mini_batch].sum())  # the tokens of the mini-batch on every rank
            loss_values = []
            for micro in mini_batch.split(MICRO_BATCH_SIZE):
                logp, entropy, values, _ = completion_logprobs_and_values(
                    model, critic, rollouts, micro, TEMPERATURE, LOGPROB_CHUNK_SIZE, with_entropy=True)
                micro_mask = mask[micro].to(device)
                policy_loss, policy_stats = ppo_policy_loss(logp, old_logp[micro].to(device),
                                                            advantages[micro].to(device), micro_mask, CLIP_EPS,
                                                            normalizer=normalizer)
                value_loss, _ = ppo_value_loss(values, old_values[micro].to(device), returns[micro].to(device),
                                               micro_mask, VALUE_CLIP, normalizer=normalizer)
                entropy_term = entropy_bonus(entropy, micro_mask, normalizer=normalizer)
                loss = ppo_total_loss(policy_loss, value_loss, entropy_term, VF_COEF, ENT_COEF)
                loss.backward()
                loss_values.append(float(loss))
                # Statistics as sums over tokens: the losses above are sums divided by the normaliser.
                micro_tokens = float(micro_mask.sum())
                tokens_seen += micro_tokens
                epoch_tokens += micro_tokens
                entropy_sum += float(entropy_term) * normalizer
                value_loss_sum += float(value_loss) * normalizer
                approx_kl_sum += policy_stats["approx_kl"] * micro_tokens
                epoch_approx_kl_sum += policy_stats["approx_kl"] * micro_tokens
                clip_sum += policy_stats["clip_frac"] * micro_tokens
            sum_gradients(actor_parameters + critic_parameters)
            # Separately: the critic's gradient would otherwise dominate the LoRA's norm and shrink its step.
            lora_grad_norm = float(torch.nn.utils.clip_grad_norm_(actor_parameters, GRAD_CLIP))
            value_grad_norm = float(torch.nn.utils.clip_grad_norm_(critic_parameters, GRAD_CLIP))
            # A non-finite loss or gradient never reaches the weights (nor, so, a checkpoint). Loss and
            # gradients are sums over the ranks, the same on each, so every rank makes the same decision.
            mini_batch_loss = all_reduce_sum(sum(loss_values))
            if not all(math.isfinite(v) for v in (lora_grad_norm, value_grad_norm, mini_batch_loss)):
                optimizer.zero_grad(set_to_none=True)
                skipped_updates += 1
                tqdm.write(f"step {step + 1}: non-finite loss or gradient; update skipped ({skipped_updates} so far)")
                continue
            optimizer.step()
            lora_grad_norms.append(lora_grad_norm)
            value_grad_norms.append(value_grad_norm)
        epochs_run += 1
        epoch_kl = all_reduce_sum({"approx_kl": epoch_approx_kl_sum, "tokens": epoch_tokens})  # same stop on every rank
        if TARGET_KL is not None and epoch_kl["approx_kl"] / max(1.0, epoch_kl["tokens"]) > TARGET_KL:
            break
    scheduler.step()
    policy_seconds = time.perf_counter() - policy_start
    step_seconds = time.perf_counter() - step_start

    # Metrics of the step: rollout statistics over all answers, update statistics over the tokens trained
    # on, both over every rank (sums in one all-reduce, then the means). Times are rank 0's.
    lengths = samples.completion_lengths.float()
    token_sums = {f"{name}_{key}": value for name, tensor in
                  (("kl", kl_estimate(old_logp, ref_logp, KL_ESTIMATOR)), ("returns", returns), ("values", old_values))
                  for key, value in masked_sums(tensor, mask).items()}
    totals = all_reduce_sum({
        "completions": len(scores), "reward": task_rewards.sum(), "reward_sq": task_rewards.square().sum(),
        "correct": sum(s.correct for s in scores), "format_ok": sum(s.format_ok for s in scores),
        "length": lengths.sum(), "truncated": samples.truncated.sum(), "updated_tokens": tokens_seen,
        "approx_kl": approx_kl_sum, "clip_frac": clip_sum, "value_loss": value_loss_sum, "entropy": entropy_sum,
        **token_sums,
    })
    completions, updates = totals["completions"], max(1.0, totals["updated_tokens"])
    reward_mean = totals["reward"] / completions
    reward_variance = max(0.0, totals["reward_sq"] - completions * reward_mean ** 2) / max(1.0, completions - 1)
    metrics = {
        "step": step + 1, "epoch": epoch,
        "reward": reward_mean, "reward_std": math.sqrt(reward_variance),  # unbiased, as torch.std
        "accuracy": totals["correct"] / completions, "format_rate": totals["format_ok"] / completions,
        "kl": totals["kl_sum"] / totals["kl_count"],
        "approx_kl": totals["approx_kl"] / updates, "clip_frac": totals["clip_frac"] / updates,
        "value_loss": totals["value_loss"] / updates, "entropy": totals["entropy"] / updates,
        "explained_variance": explained_variance(old_values, returns, mask, combine=all_reduce_sum),
        "returns_mean": totals["returns_sum"] / totals["returns_count"],
        "values_mean": totals["values_sum"] / totals["values_count"],
        "completion_len": totals["length"] / completions, "truncated": totals["truncated"] / completions,
        "grad_norm": sum(lora_grad_norms) / len(lora_grad_norms) if lora_grad_norms else None,
        "value_grad_norm": sum(value_grad_norms) / len(value_grad_norms) if value_grad_norms else None,
        "ppo_epochs": epochs_run, "lr": scheduler.get_last_lr()[0], "critic_lr": scheduler.get_last_lr()[1],
        "skipped_updates": skipped_updates,
        "generate_s": generate_seconds, "reference_s": reference_seconds, "policy_s": policy_seconds,
        "step_s": step_seconds, "tokens_per_s": totals["length"] / generate_seconds,
    }
    if EVAL_EVERY and ((step + 1) % EVAL_EVERY == 0 or step + 1 == total_steps):
        metrics.update(run_eval(step + 1))
    metrics["elapsed_s"] = time.perf_counter() - run_start  # wall clock of the run so far, evals included
    log_file.write(json.dumps(metrics) + "\n")
    log_file.flush()
    bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}")
    grad_norm_text = "-" if metrics["grad_norm"] is None else f"{metrics['grad_norm']:.3f}"
    tqdm.write(f"step {step + 1}/{total_steps} reward {metrics['reward']:.3f} acc {metrics['accuracy']:.3f} "
               f"fmt {metrics['format_rate']:.2f} kl {metrics['kl']:.4f} approx_kl {metrics['approx_kl']:.4f} "
               f"clip {metrics['clip_frac']:.3f} vloss {metrics['value_loss']:.4f} "
               f"ev {metrics['explained_variance']:.3f} ent {metrics['entropy']:.3f} "
               f"len {metrics['completion_len']:.1f} trunc {metrics['truncated']:.2f} gnorm {grad_norm_text} | "
               f"gen {generate_seconds:.1f}s ref {reference_seconds:.1f}s policy {policy_seconds:.1f}s | "
               f"{metrics['tokens_per_s']:.0f} tok/s")
    if SAMPLE_EVERY and (step + 1) % SAMPLE_EVERY == 0:
        tqdm.write(f"--- sample (reward {scores[0].total:.2f}, gold {golds[0]}):\n{samples.texts[0]}\n---")
    end_of_epoch = (step + 1) % steps_per_epoch == 0
    if (SAVE_EVERY and (step + 1) % SAVE_EVERY == 0) or end_of_epoch or step + 1 == total_steps:
        tqdm.write(f"saved {save(step + 1)}")
log_file.close()
print(f"done: {total_steps} steps, {skipped_updates} mini-batch updates skipped; metrics in {log_path}")
cleanup()

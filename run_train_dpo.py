"""DPO with a LoRA: raise the chosen answer's likelihood over the rejected one's, relative to the base model.

    python make_dpo_pairs.py && python run_train_dpo.py | tee logs/dpo.log     # Gemma 2 2B Instruct on GSM8K
    python run_train_dpo.py --MODEL_PATH=models/tiny-gemma2-math --TRAIN_FILE=data/dpo_pairs_tiny.jsonl \\
        --EVAL_FILE=data/synth_test.jsonl --MAX_STEPS=60
    python run_train_dpo.py --RESUME=checkpoints/dpo/lora_epoch0_step40.pt     # continue that run

One step (Rafailov et al. 2023; the loss family and RPO in dpo/loss.py):
  1. BATCH_SIZE pairs, in an order that depends on SEED and the epoch alone;
  2. per micro-batch of MICRO_BATCH_SIZE pairs, ONE forward pass over chosen and rejected rows
     (2n rows, dpo/pairs.py) gives the policy's sequence log-probs of both answers;
  3. the reference's (adapters off): cached for the whole dataset before training
     (PRECOMPUTE_REF), or computed for the micro-batch;
  4. dpo_loss (+ RPO_ALPHA x sft_loss on the chosen answers), scaled by the micro-batch's share
     of the step, backward; then clip the gradient and take an AdamW step on the LoRA.
The LoRA starts at B = 0, so at step 0 the policy is the reference and the sigmoid loss is log 2.

Under torchrun each of the N processes takes BATCH_SIZE / N of the step's pairs (and 1/N of the
cached reference pass); the losses are divided by the whole step's counts and the LoRA gradients
summed over the processes (common/distributed.py), so the update is the one process's; rank 0
alone prints, writes the metrics and saves checkpoints.
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
TRAIN_FILE = "data/dpo_pairs.jsonl"  # preference pairs {"question" | "prompt", "chosen", "rejected"} (make_dpo_pairs.py, TRL's)
#                                   (differs from GRPO and PPO: DPO learns from pairs, not questions)
EVAL_FILE = "data/gsm8k_test.jsonl"  # held-out questions for greedy eval: {"question", "gold_answer"}, raw GSM8K, or TRL's {"prompt", ...}
GOLD_FIELD: str | None = None  # the field holding the gold answer (None = gold_answer, answer, solution or ground_truth)
#                                   (differs from GRPO and PPO: EVAL_FILE's only; a pair needs none)
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question: a text, "" for none, or a preset: math (this one)
#                                   or think (reasoning in <think>...</think>, then the answer line: docs/reasoning.md);
#                                   a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # a system message before every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or the path of a Jinja file
EVAL_REWARD = "correctness"  # what the eval counts as correct: correctness (the number), think (the number after a
#                                   <think> block), or your.py:function
SKIP_LONG_PROMPTS = False  # leave out (and count) examples too long for the context, instead of refusing the file
EVAL_LIMIT: Annotated[int, ">= 0"] = 200  # held-out questions per eval (0 = all)
EVAL_EVERY: Annotated[int, ">= 0"] = 50  # steps between evals, plus one at step 0 and one at the end (0 = no evaluation)
EVAL_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # prompts per eval generation batch: auto (the
#                                   most that fit in the GPU's memory, by the memory plan, at most 64; 64 off a GPU) or a number
EVAL_NUM_SAMPLES: Annotated[int, ">= 1"] = 1  # k: completions per held-out question at EVAL_TEMPERATURE > 0, logged as
#                                   eval/mean@k, eval/pass@j (j = 1, 2, 4, ..., k), eval/maj@k beside eval/accuracy
EVAL_TEMPERATURE: Annotated[float, ">= 0"] = 0.0  # 0 = the greedy eval alone; > 0 adds k samples per question at
#                                   this temperature (each question's seeded by SEED and its index; EVAL_BATCH_SIZE x k rows)
MAX_NEW_TOKENS: Annotated[int, ">= 1"] = 256  # eval generation length limit (differs from GRPO and PPO: only the eval generates)
SAMPLER: Literal["auto", "eager", "static", "compiled"] = "auto"  # eval decoding: auto (compiled static-cache decode
#                                   on CUDA, eager elsewhere), eager, static (static cache, not compiled) or compiled
#                                   (differs from GRPO and PPO: no rollouts)
# objective
BETA: Annotated[float, "> 0"] = 0.1  # strength of the implicit KL to the reference: reward = BETA x (policy - reference log-prob)
LOSS_TYPE: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"  # sigmoid (DPO), robust (rDPO), hinge (SLiC), ipo (IPO; length-normalised log-probs)
LABEL_SMOOTHING: Annotated[float, "0 <= x < 0.5"] = 0.0  # assumed label-flip rate, for sigmoid and robust only
RPO_ALPHA: Annotated[float, ">= 0"] = 0.0  # weight of the chosen answers' NLL per token (RPO; 0 = off)
PRECOMPUTE_REF = True  # reference log-probs of the whole dataset once before training (else per batch)
# optimisation
NUM_EPOCHS: Annotated[int, ">= 1"] = 1  # passes over the training data
MAX_STEPS: Annotated[int, ">= 0"] = 0  # stop after this many steps (0 = run the epochs)
BATCH_SIZE: Annotated[int, ">= 1"] = 16  # pairs per step
MICRO_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # pairs per forward/backward (2 x
#                                   MICRO_BATCH_SIZE rows; gradient accumulation over the step): auto (the memory plan's
#                                   fastest that fits, at most 4; 4 off a GPU) or a number (differs from GRPO and PPO: a
#                                   pair is two sequences)
MICRO_BATCH_TOKENS: Annotated[int, ">= 0"] = 0  # fill each micro-batch with whole pairs (chosen and rejected) up to
#                                   this many tokens instead (0 = off); each pair's loss stays a share of the step's mean
#                                   (differs from GRPO and PPO: whole pairs)
LR: Annotated[float, "> 0"] = 5e-6  # peak AdamW learning rate of the LoRA
#                                   (differs from GRPO and PPO: DPO's own, untuned for Gemma 2B; the tiny model learns at 1e-4)
WARMUP_STEPS: Annotated[int, ">= 0"] = 5  # linear warm-up steps
LR_SCHEDULE: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine decay to 10% of LR
WEIGHT_DECAY: Annotated[float, ">= 0"] = 0.0  # AdamW weight decay
GRAD_CLIP: Annotated[float, "> 0"] = 1.0  # max global gradient norm
PACKING = True  # the training passes pack their sequences into rows without pads (common/packing.py);
#                 with false, padded rectangles; padded anyway for an attention the packing tests do not cover
PACK_LENGTH: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # longest packed row: auto (the micro-batch's longest
#                                   sequence; one row per micro-batch under flash-attention's variable-length kernels) or tokens
#                                   (differs from the other trainers: DPO lays out each micro-batch's pairs apart)
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
RUN_NAME: RunName = "dpo"  # name of the run: its checkpoint folder and its metrics file LOG_DIR/RUN_NAME.jsonl
#                                   (differs from the other trainers: the trainer's name)
LOG_DIR = "logs"  # where the metrics JSONL goes
LOGGER = "jsonl"  # jsonl (always), plus tensorboard and/or wandb: e.g. jsonl,tensorboard
HEALTH: Literal["warn", "stop", "off"] = "warn"  # a run going wrong (common/health.py): warn (one health: line per
#                                   symptom, naming the constant to change), stop (that line, then save the step and
#                                   exit with status 3) or off (no checks)
OVERWRITE = False  # replace an earlier run of the same RUN_NAME, its own files only (else a new run on its name is refused)
RESUME: Path | None = None  # checkpoint (or run folder: its newest) of a run to continue: LR and the schedule may
#                             change, the LoRA layout, pairs per step and seed may not
#                             (differs from the other trainers: each fixes its own)
INIT_LORA: Path | None = None  # start a new run from this LoRA checkpoint (an SFT warm-up, a model_soup.py soup):
#                                its layout replaces LORA_*; the KL reference stays the base model
SEED = 0  # every random draw of the run: data order, sampling, initialisation
DEVICE: Device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu
DTYPE: Dtype = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
QUANT: Literal["none", "nf4"] = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)

config = configure(globals(), quiet=not is_main_process())
# ---------------------------------------------------------------------------

from common.checkpoint import init_lora_settings, start_lora  # noqa: E402
from common.data import load_pairs, load_problems, step_items  # noqa: E402
from common.distributed import all_gather_objects, all_reduce_sum, setup_distributed, shard, sum_gradients  # noqa: E402
from common.evaluate import check_sampling, evaluate  # noqa: E402
from common.logprobs import enable_gradient_checkpointing  # noqa: E402
from common.lora import LoRAMotion, disable_lora, lora_parameters  # noqa: E402
from common.memory_plan import Sizes  # noqa: E402
from common.model import answer_end_token_id, context_length, get_device, load_tokenizer  # noqa: E402
from common.oom import BatchSizes  # noqa: E402
from common.packing import packing_plan, resolve_pack_length, token_budget_ranges  # noqa: E402
from common.prompts import configure_prompts, encode_prompts  # noqa: E402
from common.reward import load_reward  # noqa: E402
from common.run import TrainingRun  # noqa: E402
from common.run_setup import (check_lora_targets, check_memory, eval_sampling, fit_to_context,  # noqa: E402
                              load_model_for_training, questions_in_context, warn_shared_questions)
from common.schedule import warmup_then_schedule  # noqa: E402
from dpo.loss import dpo_loss, dpo_stats, sft_loss  # noqa: E402
from dpo.pairs import pack_pairs, pair_logprobs, tokenize_pair  # noqa: E402

# ------------------------------------------- plumbing (common/run.py, common/run_setup.py)
check_sampling(EVAL_NUM_SAMPLES, EVAL_TEMPERATURE, ("EVAL_NUM_SAMPLES", "EVAL_TEMPERATURE"))
distributed = setup_distributed(DEVICE)
run = TrainingRun("dpo", config, distributed, model_path=MODEL_PATH, run_name=RUN_NAME, checkpoint_dir=CHECKPOINT_DIR,
                  log_dir=LOG_DIR, logger=LOGGER, overwrite=OVERWRITE, resume=RESUME, init_lora=INIT_LORA,
                  fixed_on_resume=("LORA_R", "LORA_ALPHA", "LORA_TARGETS", "LORA_DROPOUT", "SEED", "BATCH_SIZE"))
if RESUME is None and INIT_LORA is None:
    check_lora_targets(run.model_path, LORA_TARGETS)  # on the model without its weights
elif INIT_LORA is not None:  # its layout replaces LORA_* (one line says so), in the memory plan and the checkpoints
    LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT = init_lora_settings(INIT_LORA, LORA_R, LORA_ALPHA, LORA_TARGETS,
                                                                        LORA_DROPOUT, say=distributed.is_main)
    config.update(LORA_R=LORA_R, LORA_ALPHA=LORA_ALPHA, LORA_TARGETS=list(LORA_TARGETS), LORA_DROPOUT=LORA_DROPOUT)
torch.manual_seed(SEED)  # the same on every rank: the same LoRA initialisation
eval_reward = load_reward(EVAL_REWARD)
pairs = load_pairs(TRAIN_FILE)
eval_problems = load_problems(EVAL_FILE, EVAL_LIMIT or None, GOLD_FIELD, eval_reward.needs_numeric_gold) if EVAL_EVERY else []
warn_shared_questions([pair["question"] for pair in pairs], [p["question"] for p in eval_problems], TRAIN_FILE, EVAL_FILE)
run.check_divides(BATCH_SIZE, "BATCH_SIZE")
length_normalise = LOSS_TYPE == "ipo"  # IPO's target 1 / (2 beta) is per token, not per answer

device = get_device(DEVICE)
tokenizer = load_tokenizer(run.model_path)
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)
answer_end_id = answer_end_token_id(tokenizer, run.model_config)  # the token that closes an assistant turn, else EOS
prompt_ids = encode_prompts(tokenizer, pairs, prompt_format)
tokenized = [tokenize_pair(tokenizer, prompt, pair["chosen"], pair["rejected"], answer_end_id)
             for prompt, pair in zip(prompt_ids, pairs)]
tokenized = fit_to_context(tokenized, [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected
                                       in tokenized], TRAIN_FILE, context_length(run.model_config),
                           "prompt with its longer answer", SKIP_LONG_PROMPTS)
(eval_problems,), longest_eval_prompt = questions_in_context(  # each eval prompt leaves MAX_NEW_TOKENS in the context
    tokenizer, prompt_format, [(eval_problems, EVAL_FILE if EVAL_EVERY else None)],
    run.model_config, MAX_NEW_TOKENS, SKIP_LONG_PROMPTS)
if len(tokenized) < BATCH_SIZE:
    raise SystemExit(f"error: {TRAIN_FILE} has {len(tokenized)} pairs, fewer than BATCH_SIZE={BATCH_SIZE}")
longest_pair = max(2 * len(prompt) + len(chosen) + len(rejected) for prompt, chosen, rejected in tokenized)
# The memory plan, before the weights load: a micro-batch is its pairs' 2 x MICRO_BATCH_SIZE rows; the sizes left at
# auto, the fastest that fit (off a GPU: 4 pairs, no checkpointing, 64, this trainer's sizes before auto).
planned = check_memory(
    run.model_path, device, GPU_MEMORY_GB, Sizes(MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, 0, EVAL_BATCH_SIZE),
    Sizes(4, False, 0, 64), micro_batch_scale=2, evaluates=EVAL_EVERY > 0, quant=QUANT, dtype=DTYPE, lora_r=LORA_R,
    lora_targets=LORA_TARGETS, logprob_chunk_size=LOGPROB_CHUNK_SIZE, sampler=SAMPLER,
    prompt_tokens=max(max(len(prompt) for prompt, _, _ in tokenized), longest_eval_prompt),
    max_new_tokens=max(max(len(chosen), len(rejected)) for _, chosen, rejected in tokenized),
    eval_max_new_tokens=MAX_NEW_TOKENS,
    micro_batch_tokens=MICRO_BATCH_TOKENS and max(MICRO_BATCH_TOKENS, longest_pair),  # a longer pair goes alone
    head_on_prompt=True, entropy=False,
    pack_length=0 if PACK_LENGTH == "auto" else PACK_LENGTH,
    eval_samples=EVAL_NUM_SAMPLES if EVAL_TEMPERATURE > 0 else 1)
model, loss_scaler = load_model_for_training(run.model_path, device, DTYPE, QUANT, quiet=not distributed.is_main)
packing, pack_length, packing_line = packing_plan(model, PACKING, PACK_LENGTH)
steps_per_epoch = len(tokenized) // BATCH_SIZE
total_steps = MAX_STEPS or NUM_EPOCHS * steps_per_epoch
# The LoRA (a resumed run's, INIT_LORA's, or a fresh one of LORA_*) and its optimizer.
start_lora(model, run.checkpoint, RESUME, INIT_LORA, LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT)
if planned.gradient_checkpointing:
    enable_gradient_checkpointing(model)
trainable = lora_parameters(model)
optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
scheduler = warmup_then_schedule(optimizer, WARMUP_STEPS, total_steps, LR_SCHEDULE)
eval_greedy, eval_sampled = eval_sampling(MAX_NEW_TOKENS, planned.eval_batch_size, SAMPLER, EVAL_NUM_SAMPLES,
                                          EVAL_TEMPERATURE)
# An out-of-memory error in an eval batch halves EVAL_BATCH_SIZE for the rest of the run (common/oom.py).
sizes = BatchSizes(model, EVAL_BATCH_SIZE=planned.eval_batch_size, MICRO_BATCH_SIZE=planned.micro_batch_size,
                   MICRO_BATCH_TOKENS=MICRO_BATCH_TOKENS)
micro_batch_limit = "MICRO_BATCH_TOKENS" if MICRO_BATCH_TOKENS else "MICRO_BATCH_SIZE"  # what cuts a micro-batch
run.track(model, optimizer, scheduler, loss_scaler,
          evaluate=lambda step: evaluate(model, tokenizer, eval_problems, eval_greedy, desc=f"eval@{step}",
                                         reward=eval_reward, prompt_format=prompt_format, sampled=eval_sampled,
                                         seed=SEED, sizes=sizes),
          sizes=sizes)
run.restore()  # a resumed run's optimizer, schedule, loss scale and random states
lora_motion = LoRAMotion(model)  # the adapter's norm and each step's update, for the health checks
print(f"{len(tokenized)} pairs, {steps_per_epoch} steps per epoch, {total_steps} steps; "
      f"LoRA {sum(p.numel() for p in trainable) / 1e6:.3f}M trainable parameters on {device}; "
      f"{distributed.world_size} process(es) x {BATCH_SIZE // distributed.world_size} pairs per step; {packing_line}")


def micro_batches(indices: list[int]) -> list[list[int]]:
    """The pairs ``indices`` in micro-batches: MICRO_BATCH_SIZE pairs each, or (MICRO_BATCH_TOKENS > 0) as
    many whole pairs as fit in that many tokens (a pair: its prompt twice, the chosen and the rejected answer)."""
    lengths = [2 * len(tokenized[i][0]) + len(tokenized[i][1]) + len(tokenized[i][2]) for i in indices]
    return [indices[cut] for cut in token_budget_ranges(lengths, sizes["MICRO_BATCH_SIZE"], sizes["MICRO_BATCH_TOKENS"])]


def micro_batch_pairs(indices: list[int]):
    """The PairBatch of the pairs ``indices``, packed into rows of at most PACK_LENGTH (auto: their longest sequence)."""
    pairs = [tokenized[i] for i in indices]
    longest = max(len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in pairs)
    return pack_pairs(pairs, tokenizer.pad_token_id, packing, resolve_pack_length(pack_length, longest))


@torch.no_grad()
def reference_logprobs(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [n], rejected [n]) sequence log-probs of the pairs ``indices`` under the base model,
    on the CPU, a micro-batch per forward."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with disable_lora(model):
        for micro in micro_batches(indices):
            batch = micro_batch_pairs(micro)
            chosen_logps, rejected_logps, _ = pair_logprobs(model, batch, LOGPROB_CHUNK_SIZE, length_normalise)
            chosen.append(chosen_logps.cpu())
            rejected.append(rejected_logps.cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


cached_reference = None
if PRECOMPUTE_REF:
    reference_start = time.perf_counter()
    # Each rank computes its share of the dataset; every rank gets all of it, in order.
    every_rank = all_gather_objects(reference_logprobs(shard(list(range(len(tokenized))))))
    cached_reference = tuple(torch.cat(parts) for parts in zip(*every_rank))
    print(f"reference log-probs of {len(tokenized)} pairs in {time.perf_counter() - reference_start:.1f}s")

# ------------------------------------------------------------ the algorithm
for step in run.steps(total_steps, steps_per_epoch, eval_every=EVAL_EVERY, save_every=SAVE_EVERY,
                      save_every_minutes=SAVE_EVERY_MINUTES, keep_checkpoints=KEEP_CHECKPOINTS, health=HEALTH):
    epoch, indices = step_items(len(tokenized), SEED, step, BATCH_SIZE)  # a function of SEED and the step alone
    batch_indices = shard(indices)  # this rank's share of the step's pairs
    # RPO's per-token mean is over the whole step's chosen tokens (every rank's), so neither
    # micro-batching nor the number of processes changes the update.
    chosen_tokens = all_reduce_sum(sum(len(tokenized[i][1]) for i in batch_indices))

    model.train()
    # Out of memory in a micro-batch: the update again from its start, its gradients and statistics zeroed,
    # in micro-batches of half the size (common/oom.py): the update a run at that size makes.
    for attempt in sizes.attempts(micro_batch_limit, "the DPO pass"):
        with attempt:
            optimizer.zero_grad(set_to_none=True)
            losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = [], [], [], [], []
            step_loss = step_sft = torch.zeros((), device=device)
            for micro in micro_batches(batch_indices):
                if cached_reference is not None:
                    ref_chosen, ref_rejected = (logps[micro] for logps in cached_reference)
                else:
                    ref_chosen, ref_rejected = reference_logprobs(micro)
                batch = micro_batch_pairs(micro)
                policy_chosen, policy_rejected, token_logps = pair_logprobs(model, batch, LOGPROB_CHUNK_SIZE,
                                                                            length_normalise)
                pair_losses, micro_chosen_rewards, micro_rejected_rewards = dpo_loss(
                    policy_chosen, policy_rejected, ref_chosen.to(device), ref_rejected.to(device), beta=BETA,
                    loss_type=LOSS_TYPE, label_smoothing=LABEL_SMOOTHING)
                # Each micro-batch contributes its share of the step's mean over all BATCH_SIZE pairs (every
                # rank's), so the gradients summed over micro-batches and ranks are the whole batch's.
                loss = pair_losses.sum() / BATCH_SIZE
                if RPO_ALPHA:
                    chosen_mask = batch.answer_mask[:len(micro)].to(device)
                    sft = sft_loss(token_logps[:len(micro)], chosen_mask) * (chosen_mask.sum() / chosen_tokens)
                    loss = loss + RPO_ALPHA * sft
                    step_sft = step_sft + sft.detach()
                loss_scaler.backward(loss)  # scaled first for an fp16 model (common.run.LossScaler)
                step_loss = step_loss + loss.detach()
                losses.append(pair_losses.detach())
                chosen_rewards.append(micro_chosen_rewards)
                rejected_rewards.append(micro_rejected_rewards)
                chosen_logps.append(policy_chosen.detach())
                rejected_logps.append(policy_rejected.detach())
    step_totals = all_reduce_sum({"loss": step_loss, "sft": step_sft})  # the step's: every rank's share
    sum_gradients(trainable)
    loss_scaler.unscale_gradients(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP))
    # The loss and the gradients are the same on every rank, so every rank decides the same.
    if run.update_is_finite(step + 1, grad_norm, step_totals["loss"]):
        loss_scaler.step(optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    step_seconds = run.step_seconds()

    # Metrics over the whole step's pairs: every rank's per-pair values, gathered.
    every_rank = all_gather_objects([torch.cat(values).cpu() for values in
                                     (losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)])
    losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = (
        torch.cat(parts) for parts in zip(*every_rank))
    stats = dpo_stats(losses, chosen_rewards, rejected_rewards)
    metrics = {
        "step": step + 1, "epoch": epoch, **stats, "total_loss": step_totals["loss"], "sft_loss": step_totals["sft"],
        "chosen_logp": float(chosen_logps.mean()), "rejected_logp": float(rejected_logps.mean()),
        "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "step_s": step_seconds, **lora_motion.metrics(),
    }
    run.bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['reward_accuracy']:.2f}")
    tqdm.write(f"step {step + 1}/{total_steps} loss {metrics['loss']:.4f} acc {metrics['reward_accuracy']:.3f} "
               f"margin {metrics['reward_margin']:.4f} chosen {metrics['chosen_reward']:.4f} "
               f"rejected {metrics['rejected_reward']:.4f} | logp chosen {metrics['chosen_logp']:.2f} "
               f"rejected {metrics['rejected_logp']:.2f} sft {metrics['sft_loss']:.3f} gnorm {grad_norm:.3f} "
               f"| {step_seconds:.1f}s")
    run.end_step(step + 1, metrics)
run.finish()

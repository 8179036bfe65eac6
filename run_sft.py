"""Supervised fine-tuning on worked solutions; the loss counts the answer tokens only.

    python run_sft.py --MODEL_PATH=models/tiny-gemma2-math --OUT_DIR=checkpoints/sft-tiny --RUN_NAME=sft-tiny --MAX_STEPS=200
    python run_sft.py --MODEL_PATH=models/gemma-2-2b-it --TRAIN_FILE=data/gsm8k_train.jsonl \
        --EVAL_FILE=data/gsm8k_test.jsonl --LORA_R=16 --LR=2e-4 --BATCH_SIZE=8 --MAX_STEPS=300

Each example is  prompt (chat template) + solution + end-of-answer token.  The
prompt is context, not target: only the solution and the token that ends it
(EOS / <end_of_turn>, so the model learns to stop) are in the loss.
make_tiny_model.py uses this script to teach the built-in tiny model (all
weights).  With LORA_R > 0 only a LoRA is trained (a warm-up on worked solutions
before RL, as the original project did) and saved as a checkpoint in the same
format as the RL trainers', which eval_math.py --LORA_CKPT and RESUME accept.

Under torchrun every process draws the same batch and trains on its 1/N share of it; the loss is
divided by the whole batch's answer tokens and the gradients summed over the processes
(common/distributed.py), so the update is the one process's; rank 0 alone writes.
"""

import json
import random
import shutil
import time
from pathlib import Path
from typing import Annotated, Literal

import torch

from common.config import Device, Dtype, RunName, configure
from common.distributed import is_main_process
from common.prompts import INSTRUCTION as MATH_INSTRUCTION

# ---------------------------------------------------------------- constants
# the defaults fine-tune every weight of the tiny model (the other trainers': a LoRA on Gemma 2 2B)
MODEL_PATH = "models/tiny-gemma2-math"  # local model directory (differs from the other trainers: set for the tiny model)
OUT_DIR = "checkpoints/sft"  # full fine-tune: the model (save_pretrained); LoRA: OUT_DIR/lora_epoch0_step{N}.pt
TRAIN_FILE: Path | None = None  # JSONL with "question" and "solution"; None = an endless stream of fresh synthetic problems
#                                   (differs from the other trainers: SFT learns from worked solutions)
EVAL_FILE = "data/synth_test.jsonl"  # held-out problems for greedy eval, never in the synthetic training stream
#                                   (differs from the other trainers: set for the tiny model)
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question: a text, "" for none, or a preset: math (this one)
#                                   or think (reasoning in <think>...</think>, then the answer line: docs/reasoning.md);
#                                   a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # a system message before every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or the path of a Jinja file
EVAL_LIMIT: Annotated[int, ">= 0"] = 500  # held-out questions per eval (0 = all) (differs from the other trainers: set for the tiny model)
EVAL_EVERY: Annotated[int, ">= 0"] = 700  # steps between evals, plus one at step 0 and one at the end (0 = no evaluation)
#                                   (differs from the other trainers: set for the tiny model)
MAX_STEPS: Annotated[int, ">= 0"] = 700  # optimizer steps (0: the model as it is, evaluated and saved)
#                                   (differs from the other trainers: no epochs, the synthetic stream is endless)
BATCH_SIZE: Annotated[int, ">= 1"] = 64  # examples per step (differs from DPO: examples, not pairs; set for the tiny model)
LR: Annotated[float, "> 0"] = 2e-3  # peak AdamW learning rate (differs from the other trainers: set for the tiny model)
WARMUP_STEPS: Annotated[int, ">= 0"] = 30  # linear warm-up steps (differs from the other trainers: set for the tiny model)
LR_SCHEDULE: Literal["constant", "cosine"] = "cosine"  # after warm-up: constant, or cosine decay to 10% of LR
#                                   (differs from the other trainers: set for the tiny model)
WEIGHT_DECAY: Annotated[float, ">= 0"] = 0.0  # AdamW weight decay
GRAD_CLIP: Annotated[float, "> 0"] = 1.0  # max global gradient norm
LORA_R: Annotated[int, ">= 0"] = 0  # adapter rank; 0 = train every weight instead
#                                   (differs from the other trainers: SFT can train every weight, set for the tiny model)
LORA_ALPHA: Annotated[float, "> 0"] = 32.0  # the update is (LORA_ALPHA / LORA_R) * B @ A
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # layers that get an adapter
LORA_DROPOUT: Annotated[float, "0 <= x < 1"] = 0.0  # dropout on the adapters' input (0 keeps sampling and training the same policy)
LOGPROB_CHUNK_SIZE: Annotated[int, ">= 1"] = 1024  # positions per chunk of the output head (bounds [positions, vocab] logits)
MICRO_BATCH_TOKENS: Annotated[int, ">= 0"] = 0  # split each step's batch into micro-batches of whole examples up to
#                                   this many tokens (gradient accumulation; 0 = the batch in one pass); the
#                                   normaliser stays the batch's answer tokens (differs from the other trainers:
#                                   SFT has no MICRO_BATCH_SIZE)
PACKING = True  # the training passes pack their sequences into rows without pads (common/packing.py);
#                 with false, padded rectangles; padded anyway for an attention the packing tests do not cover
PACK_LENGTH: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # longest packed row: auto (the step's longest
#                                   sequence; one row per micro-batch under flash-attention's variable-length kernels) or tokens
GRADIENT_CHECKPOINTING: Literal["auto"] | bool = "auto"  # recompute each layer's activations in backward: less
#                                   memory, a third slower policy pass; auto: where the memory plan finds it faster than
#                                   smaller micro-batches (never off a GPU)
GPU_MEMORY_GB: Annotated[float, ">= 0"] = 0.0  # memory the run may take (0 = the GPU's free memory): a run whose
#                                   memory plan (printed at start) does not fit is refused before the model loads
#                                   (differs from the other trainers: planned for a LoRA only, LORA_R > 0)
MAX_NEW_TOKENS: Annotated[int, ">= 1"] = 64  # eval generation length limit
#                                   (differs from the other trainers: only the eval generates; the tiny model's answers are short)
SAMPLER: Literal["auto", "eager", "static", "compiled"] = "auto"  # eval decoding: auto (compiled static-cache decode
#                                   on CUDA, eager elsewhere), eager, static (static cache, not compiled) or compiled
#                                   (differs from GRPO and PPO: no rollouts)
EVAL_BATCH_SIZE: Literal["auto"] | Annotated[int, ">= 1"] = "auto"  # prompts per eval generation batch: auto (the
#                                   most that fit in the GPU's memory, by the memory plan, at most 128; 128 off a GPU) or a
#                                   number (differs from the other trainers: set for the tiny model)
EVAL_NUM_SAMPLES: Annotated[int, ">= 1"] = 1  # k: completions per held-out question at EVAL_TEMPERATURE > 0, logged as
#                                   eval/mean@k, eval/pass@j (j = 1, 2, 4, ..., k), eval/maj@k beside eval/accuracy
EVAL_TEMPERATURE: Annotated[float, ">= 0"] = 0.0  # 0 = the greedy eval alone; > 0 adds k samples per question at
#                                   this temperature (each question's seeded by SEED and its index; EVAL_BATCH_SIZE x k rows)
RUN_NAME: RunName = "sft"  # name of the run: its metrics file LOG_DIR/RUN_NAME.jsonl (differs from the other trainers:
#                                   the trainer's name; its output is OUT_DIR)
LOG_DIR = "logs"  # where the metrics JSONL goes
LOGGER = "jsonl"  # jsonl (always), plus tensorboard and/or wandb: e.g. jsonl,tensorboard
HEALTH: Literal["warn", "stop", "off"] = "warn"  # a run going wrong (common/health.py): warn (one health: line per
#                                   symptom, naming the constant to change), stop (that line, then save the step and
#                                   exit with status 3) or off (no checks)
OVERWRITE = False  # replace an earlier run's OUT_DIR and metrics (else a new run on them is refused)
#                                   (differs from the other trainers: SFT writes to OUT_DIR, not a run folder)
SAVE_EVERY_MINUTES: Annotated[float, ">= 0"] = 30.0  # also save when this many minutes have passed since the last save
#                                   (0 = by steps only): a crash then costs at most that much
KEEP_CHECKPOINTS: Annotated[int, ">= 0"] = 0  # keep only the newest N step checkpoints of the run (0 = keep all)
#                                   (differs from the other trainers: a LoRA run's, in OUT_DIR)
SEED = 0  # every random draw of the run: data order, sampling, initialisation
DEVICE: Device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu
DTYPE: Dtype = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
QUANT: Literal["none", "nf4"] = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)

config = configure(globals(), quiet=not is_main_process())
# ---------------------------------------------------------------------------

from common import synth  # noqa: E402  (after configure: --help stays fast)
from common.data import load_problems  # noqa: E402
from common.distributed import all_reduce_sum, setup_distributed, shard, sum_gradients  # noqa: E402
from common.evaluate import check_sampling, evaluate  # noqa: E402
from common.logprobs import body_hidden_states, enable_gradient_checkpointing, head_token_logprobs  # noqa: E402
from common.lora import LoRAMotion, apply_lora, lora_parameters  # noqa: E402
from common.memory_plan import Sizes  # noqa: E402
from common.model import answer_end_token_id, get_device, load_tokenizer  # noqa: E402
from common.oom import BatchSizes  # noqa: E402
from common.packing import PassLayout, micro_batch_layouts, packing_plan, resolve_pack_length, to_device  # noqa: E402
from common.prompts import configure_prompts, encode_prompts  # noqa: E402
from common.run import TrainingRun  # noqa: E402
from common.run_setup import (check_lora_targets, check_memory, eval_sampling, load_model_for_training,  # noqa: E402
                              unplanned_sizes)
from common.schedule import warmup_then_schedule  # noqa: E402

# ------------------------------------------- plumbing (common/run.py, common/run_setup.py)
check_sampling(EVAL_NUM_SAMPLES, EVAL_TEMPERATURE, ("EVAL_NUM_SAMPLES", "EVAL_TEMPERATURE"))
distributed = setup_distributed(DEVICE)
run = TrainingRun("sft", config, distributed, model_path=MODEL_PATH, run_name=RUN_NAME, log_dir=LOG_DIR, logger=LOGGER,
                  overwrite=OVERWRITE, run_dir=OUT_DIR)
if LORA_R > 0:
    check_lora_targets(run.model_path, LORA_TARGETS)  # on the model without its weights
if QUANT != "none" and LORA_R == 0:
    raise SystemExit("error: QUANT=nf4 keeps the base's weights in 4 bits, frozen: train a LoRA on it (--LORA_R=16)")
if DTYPE in ("float16", "fp16") and LORA_R == 0:  # issue 29, finding 7: torch's GradScaler refuses fp16 gradients
    raise SystemExit("error: DTYPE=float16 with LORA_R=0 would train fp16 weights, their own optimizer masters, "
                     "which the loss scaler cannot unscale: use --DTYPE=float32 (or bfloat16), or a LoRA (--LORA_R=16)")
if BATCH_SIZE % distributed.world_size:
    raise SystemExit(f"error: BATCH_SIZE={BATCH_SIZE} does not divide between {distributed.world_size} processes; "
                     f"make it a multiple of the number of processes")
random.seed(SEED)
torch.manual_seed(SEED)  # the same on every rank: the same initialisation
device = get_device(DEVICE)
tokenizer = load_tokenizer(run.model_path)
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)
answer_end_id = answer_end_token_id(tokenizer, run.model_config)  # the token that closes an assistant turn, else EOS
eval_problems = load_problems(EVAL_FILE, limit=EVAL_LIMIT or None)
held_out_questions = {synth.normalise_question(p["question"]) for p in load_problems(EVAL_FILE)}
if TRAIN_FILE is not None:
    train_problems = [p for p in load_problems(TRAIN_FILE) if "solution" in p]
    if not train_problems:
        raise SystemExit(f"{TRAIN_FILE}: no line has a 'solution' field to train on")

# The memory plan, before the weights load, for the longest example: of TRAIN_FILE, or of 1,000 synthetic problems;
# a micro-batch is the step's batch (or MICRO_BATCH_TOKENS' share). The sizes left at auto: the fastest that fit (off a
# GPU, or without a plan: no checkpointing, 128, this trainer's sizes before auto).
requested_sizes = Sizes(BATCH_SIZE // distributed.world_size, GRADIENT_CHECKPOINTING, 0, EVAL_BATCH_SIZE)
sizes_before_auto = Sizes(BATCH_SIZE // distributed.world_size, False, 0, 128)
if LORA_R > 0:
    plan_rng = random.Random(SEED + 1)
    examples = train_problems if TRAIN_FILE is not None else [synth.make_problem(plan_rng) for _ in range(1000)]
    planned = check_memory(
        run.model_path, device, GPU_MEMORY_GB, requested_sizes, sizes_before_auto, evaluates=EVAL_EVERY > 0,
        quant=QUANT, dtype=DTYPE, lora_r=LORA_R, lora_targets=LORA_TARGETS, logprob_chunk_size=LOGPROB_CHUNK_SIZE,
        sampler=SAMPLER,
        prompt_tokens=max(len(ids) for ids in encode_prompts(tokenizer, examples + eval_problems,
                                                                     prompt_format)),
        max_new_tokens=1 + max(len(ids) for ids in tokenizer([p["solution"] for p in examples],
                                                             add_special_tokens=False)["input_ids"]),
        eval_max_new_tokens=MAX_NEW_TOKENS, micro_batch_tokens=MICRO_BATCH_TOKENS,
        head_on_prompt=True, entropy=False, eval_samples=EVAL_NUM_SAMPLES if EVAL_TEMPERATURE > 0 else 1)
else:
    print("no memory plan: it counts a LoRA's training (LORA_R > 0), not every weight's")
    planned = unplanned_sizes(requested_sizes, sizes_before_auto)
model, loss_scaler = load_model_for_training(run.model_path, device, DTYPE, QUANT, every_weight=LORA_R == 0,
                                             quiet=not distributed.is_main)
packing, pack_length, packing_line = packing_plan(model, PACKING, PACK_LENGTH)
if LORA_R > 0:
    wrapped = apply_lora(model, LORA_R, LORA_ALPHA, LORA_TARGETS, LORA_DROPOUT)
    print(f"LoRA r={LORA_R} alpha={LORA_ALPHA} on {len(wrapped)} layers")
if planned.gradient_checkpointing:
    enable_gradient_checkpointing(model)
trainable = lora_parameters(model) if LORA_R > 0 else [p for p in model.parameters() if p.requires_grad]
print(f"training {sum(p.numel() for p in trainable) / 1e6:.3f}M of "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters; {packing_line}")
model.train()
data_rng = random.Random(SEED)


def draw_problem() -> dict:
    if TRAIN_FILE is not None:
        return data_rng.choice(train_problems)
    while True:
        problem = synth.make_problem(data_rng)
        if synth.normalise_question(problem["question"]) not in held_out_questions:
            return problem


def next_batch() -> list[dict]:
    return [draw_problem() for _ in range(BATCH_SIZE)]


def collate(problems) -> list[PassLayout]:
    """The examples (prompt + solution + answer end) laid out for the step's passes (common/packing.py) at
    the sizes in use: one micro-batch (after an out-of-memory error, micro-batches of the smaller size), or
    micro-batches of up to MICRO_BATCH_TOKENS tokens, packed into rows of at most PACK_LENGTH tokens, or
    right-padded; the answers, end included, are the predicted tokens. On the device."""
    prompts = encode_prompts(tokenizer, problems, prompt_format)
    answers = [answer + [answer_end_id] for answer in
               tokenizer([p["solution"] for p in problems], add_special_tokens=False)["input_ids"]]
    sequences = [torch.tensor(prompt + answer) for prompt, answer in zip(prompts, answers)]
    lengths = [len(answer) for answer in answers]
    longest = max(len(sequence) for sequence in sequences)
    return to_device([layout for _, layout in micro_batch_layouts(
        sequences, lengths, max(lengths), sizes["MICRO_BATCH_SIZE"], sizes["MICRO_BATCH_TOKENS"], packing,
        resolve_pack_length(pack_length, longest), tokenizer.pad_token_id)], device)


def save_full_model(step: int) -> Path:
    """Save to a staging directory and rename it into place, so an interrupted save never leaves a
    half-written model where a loader would find it."""
    out_dir = Path(OUT_DIR)
    staging = out_dir.with_name(out_dir.name + ".saving")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "sft_info.json").write_text(json.dumps(
        {"config": config, "train_seconds": time.perf_counter() - train_start, **final_eval}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
scheduler = warmup_then_schedule(optimizer, WARMUP_STEPS, MAX_STEPS, LR_SCHEDULE)
final_eval: dict = {}  # the last eval's metrics, for sft_info.json


eval_greedy, eval_sampled = eval_sampling(MAX_NEW_TOKENS, planned.eval_batch_size, SAMPLER, EVAL_NUM_SAMPLES,
                                          EVAL_TEMPERATURE)
# An out-of-memory error halves its phase's size for the rest of the run (common/oom.py): in an eval batch
# EVAL_BATCH_SIZE; in the update MICRO_BATCH_TOKENS where it is set, else MICRO_BATCH_SIZE, the examples per
# micro-batch (no constant of SFT's: this rank's share of BATCH_SIZE, one pass, until a back-off halves it).
sizes = BatchSizes(model, EVAL_BATCH_SIZE=planned.eval_batch_size, MICRO_BATCH_SIZE=planned.micro_batch_size,
                   MICRO_BATCH_TOKENS=MICRO_BATCH_TOKENS)
micro_batch_limit = "MICRO_BATCH_TOKENS" if MICRO_BATCH_TOKENS else "MICRO_BATCH_SIZE"  # what cuts a micro-batch


def run_eval(step: int):
    result = evaluate(model, tokenizer, eval_problems, eval_greedy, desc=f"eval@{step}",
                      prompt_format=prompt_format, sampled=eval_sampled, seed=SEED, sizes=sizes)
    final_eval.update(result.metrics())
    return result


# LoRA: a checkpoint like the RL trainers' (eval_math.py --LORA_CKPT, INIT_LORA); all weights: the model itself.
run.track(model, optimizer, scheduler, loss_scaler, evaluate=run_eval, save=None if LORA_R > 0 else save_full_model,
          sizes=sizes)
# The adapter's norm and each step's update, for the health checks (none when every weight trains).
lora_motion = LoRAMotion(model) if LORA_R > 0 else None

# ------------------------------------------------------------ the algorithm
train_start = time.perf_counter()
for step in run.steps(MAX_STEPS, None, eval_every=EVAL_EVERY, save_every=0,  # a stream of problems: no epochs
                      save_every_minutes=SAVE_EVERY_MINUTES, keep_checkpoints=KEEP_CHECKPOINTS, health=HEALTH):
    step_start = time.perf_counter()
    # Every rank draws the same batch (same seed) and trains on its share of it.
    problems = shard(next_batch())
    layouts = collate(problems)
    answer_tokens = all_reduce_sum(sum(len(layout.predicting) for layout in layouts))  # the whole batch's, every rank's
    # Out of memory in a micro-batch: the update again from its start, its gradients zeroed, in micro-batches of
    # half the size (common/oom.py): the update a run at that size makes.
    for attempt in sizes.attempts(micro_batch_limit, "the SFT pass"):
        with attempt:
            if attempt.retry:
                layouts = collate(problems)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for layout in layouts:  # one pass, or micro-batches: each its share of the batch's mean
                # The log-prob of each answer token, from the position before it (the head runs on those alone).
                hidden_states = body_hidden_states(model, layout.input_ids, layout.attention_mask,
                                                   layout.position_ids)
                answer_logp = head_token_logprobs(model, hidden_states, layout.input_ids,
                                                  chunk_size=LOGPROB_CHUNK_SIZE, from_position=layout.predicting)
                micro_loss = -answer_logp.sum() / answer_tokens
                loss_scaler.backward(micro_loss)  # scaled first for an fp16 model (common.run.LossScaler)
                loss += micro_loss.detach()
    sum_gradients(trainable)
    loss_scaler.unscale_gradients(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP))
    totals = all_reduce_sum({"loss": loss, "tokens": sum(layout.real_tokens for layout in layouts)})  # every rank's share
    if run.update_is_finite(step + 1, grad_norm, totals["loss"]):
        loss_scaler.step(optimizer)
    scheduler.step()
    seconds = time.perf_counter() - step_start
    metrics = {"step": step + 1, "loss": totals["loss"], "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
               "answer_tokens": int(answer_tokens), "step_s": seconds, "tokens_per_s": totals["tokens"] / seconds}
    if lora_motion is not None:
        metrics.update(lora_motion.metrics())
    run.bar.set_postfix(loss=f"{metrics['loss']:.3f}", gnorm=f"{metrics['grad_norm']:.2f}")
    run.end_step(step + 1, metrics)
if MAX_STEPS == 0:  # nothing to train (bench/learning_table.py's base row): saved as it is, after the step-0 eval
    run.save(0)
run.finish()

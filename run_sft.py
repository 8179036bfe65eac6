"""Supervised fine-tuning on worked solutions; the loss counts the answer tokens only.

    python run_sft.py --MODEL_PATH=models/tiny-gemma2-math --OUT_DIR=checkpoints/sft-tiny --MAX_STEPS=200

Each example is  prompt (chat template) + solution + end-of-answer token.  The
prompt is context, not target: only the solution and the token that ends it
(EOS / <end_of_turn>, so the model learns to stop) are in the loss.
make_tiny_model.py uses this script to teach the built-in tiny model.
"""

import json
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import configure

# ---------------------------------------------------------------- constants
MODEL_PATH = "models/tiny-gemma2-math"  # local directory of the model to fine-tune
OUT_DIR = "checkpoints/sft"  # where the fine-tuned model is saved (save_pretrained format)
TRAIN_FILE: Path | None = None  # JSONL with "question" and "solution"; None = an endless stream of fresh synthetic problems
EVAL_FILE = "data/synth_test.jsonl"  # held-out problems for greedy eval (never in the synthetic training stream)
EVAL_LIMIT = 500  # how many eval problems (0 = all)
EVAL_EVERY = 0  # steps between evals (0 = only after training)
MAX_STEPS = 700  # optimizer steps
BATCH_SIZE = 64  # examples per step
LR = 2e-3  # peak learning rate of AdamW
WARMUP_STEPS = 30  # linear warm-up from 0 to LR, then constant
WEIGHT_DECAY = 0.0  # AdamW weight decay
GRAD_CLIP = 1.0  # max global gradient norm
MAX_NEW_TOKENS = 64  # eval generation length
EVAL_BATCH_SIZE = 128  # prompts per eval batch
SEED = 0  # python / torch seed: the same seed gives the same model
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 on CUDA, else fp32), float32, bfloat16
LOG_FILE: Path | None = None  # metrics JSONL (None = logs/sft_<time>.jsonl)

config = configure(globals())
# ---------------------------------------------------------------------------

from common import synth  # noqa: E402  (after configure: --help stays fast)
from common.data import load_problems  # noqa: E402
from common.evaluate import evaluate  # noqa: E402
from common.model import load_model_and_tokenizer, stop_token_ids  # noqa: E402
from common.prompts import encode_prompts  # noqa: E402

random.seed(SEED)
torch.manual_seed(SEED)
model, tokenizer, device = load_model_and_tokenizer(MODEL_PATH, DEVICE, DTYPE)
model.train()
# The token that ends an answer: <end_of_turn> under a chat template, else EOS.
answer_end_id = stop_token_ids(model, tokenizer)[-1]
eval_problems = load_problems(EVAL_FILE, limit=EVAL_LIMIT or None)
eval_questions = {synth.normalise_question(p["question"]) for p in eval_problems}

if TRAIN_FILE is not None:
    train_problems = [p for p in load_problems(TRAIN_FILE) if "solution" in p]
    if not train_problems:
        raise SystemExit(f"{TRAIN_FILE}: no line has a 'solution' field to train on")
    data_rng = random.Random(SEED)

    def next_batch():
        return data_rng.sample(train_problems, min(BATCH_SIZE, len(train_problems)))
else:
    data_rng = random.Random(SEED)

    def next_batch():
        batch = []
        while len(batch) < BATCH_SIZE:
            problem = synth.make_problem(data_rng)
            if synth.normalise_question(problem["question"]) not in eval_questions:
                batch.append(problem)
        return batch


def collate(problems):
    """Right-padded input ids, attention mask and answer mask ([B, L] each), built from lengths."""
    prompts = encode_prompts(tokenizer, [p["question"] for p in problems])
    answers = tokenizer([p["solution"] for p in problems], add_special_tokens=False)["input_ids"]
    sequences = [prompt + answer + [answer_end_id] for prompt, answer in zip(prompts, answers)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    answer_mask = torch.zeros_like(input_ids, dtype=torch.float32)
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
        answer_mask[row, len(prompt):len(sequence)] = 1.0
    return input_ids.to(device), attention_mask.to(device), answer_mask.to(device)


def run_eval(step):
    result = evaluate(model, tokenizer, eval_problems, EVAL_BATCH_SIZE, MAX_NEW_TOKENS, desc=f"eval@{step}")
    print(f"step {step} eval: {result.summary()}")
    return result


optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                              weight_decay=WEIGHT_DECAY)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, WARMUP_STEPS)))
log_path = Path(LOG_FILE or f"logs/sft_{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
log_path.parent.mkdir(parents=True, exist_ok=True)
log_file = log_path.open("a")
start = time.perf_counter()
bar = tqdm(range(1, MAX_STEPS + 1), desc="sft", unit="step")
for step in bar:
    step_start = time.perf_counter()
    input_ids, attention_mask, answer_mask = collate(next_batch())
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    # Logits at position t predict token t+1: drop the last logit, shift the targets and mask by one.
    token_logp = logits[:, :-1].log_softmax(dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    target_mask = answer_mask[:, 1:]
    loss = -(token_logp * target_mask).sum() / target_mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    scheduler.step()
    seconds = time.perf_counter() - step_start
    metrics = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
               "answer_tokens": int(target_mask.sum()), "step_s": seconds,
               "tokens_per_s": int(attention_mask.sum()) / seconds, "elapsed_s": time.perf_counter() - start}
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", gnorm=f"{metrics['grad_norm']:.2f}")
    if EVAL_EVERY and step % EVAL_EVERY == 0 and step < MAX_STEPS:
        metrics.update(run_eval(step).metrics())
        model.train()
    log_file.write(json.dumps(metrics) + "\n")
    log_file.flush()
train_seconds = time.perf_counter() - start

final = run_eval(MAX_STEPS)
log_file.write(json.dumps({"step": MAX_STEPS, **final.metrics()}) + "\n")
log_file.close()

# Save to a staging directory and rename it into place, so an interrupted save
# never leaves a half-written model where a loader would find it.
out_dir = Path(OUT_DIR)
staging = out_dir.with_name(out_dir.name + ".saving")
model.save_pretrained(staging)
tokenizer.save_pretrained(staging)
(staging / "sft_info.json").write_text(json.dumps(
    {"config": config, "train_seconds": train_seconds, **final.metrics()}, indent=2))
if out_dir.exists():
    shutil.rmtree(out_dir)
staging.rename(out_dir)
print(f"saved {out_dir}  ({train_seconds:.0f} s of training, {MAX_STEPS} steps)")

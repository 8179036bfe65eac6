"""Greedy math accuracy of a model on a JSONL test file.

    python eval_math.py --MODEL_PATH=models/tiny-gemma2-math --EVAL_FILE=data/synth_test.jsonl
    python eval_math.py --EVAL_LIMIT=200     # Gemma 2 2B Instruct on the first 200 GSM8K test questions
    python eval_math.py --LORA_CKPT=checkpoints/grpo/lora_epoch1_step100.pt   # base + a trained LoRA

Prints `Total: N  Correct: M  Accuracy: X.XX%` with a 95% confidence interval
and tokens/s, and writes one JSONL line per question (question, gold, output,
prediction, correct) under logs/.

    torchrun --standalone --nproc_per_node=4 eval_math.py ...   # the problems sharded across 4 processes

Under torchrun each process greedy-decodes its share of the problems, the records are gathered,
and rank 0 alone prints and writes them. The accuracy and the records are the single process's.
"""

import json
import os
import time
from pathlib import Path
from typing import Annotated, Literal

from common.config import Device, Dtype, configure, repo_path
from common.distributed import is_main_process
from common.prompts import INSTRUCTION as MATH_INSTRUCTION

# ---------------------------------------------------------------- constants
MODEL_PATH = "models/gemma-2-2b-it"  # local model directory (built-in tiny model: models/tiny-gemma2-math)
LORA_CKPT: Path | None = None  # LoRA checkpoint (.pt, or a run directory: its newest) to evaluate on MODEL_PATH
EVAL_FILE = "data/gsm8k_test.jsonl"  # JSONL problems: {"question", "gold_answer"}, raw GSM8K, or TRL's {"prompt", ...}
GOLD_FIELD: str | None = None  # the field holding the gold answer (None = gold_answer, answer, solution or ground_truth)
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question ("" for none); a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # a system message before every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or the path of a Jinja file
REWARD = "correctness"  # what counts as correct: correctness (the extracted number), or your.py:function's "correct"
EVAL_LIMIT: Annotated[int, ">= 0"] = 0  # evaluate the first EVAL_LIMIT problems (0 = all)
EVAL_BATCH_SIZE: Annotated[int, ">= 1"] = 64  # prompts generated together
MAX_NEW_TOKENS: Annotated[int, ">= 1"] = 256  # answer length limit; an answer cut off here counts as wrong unless its number is right
SAMPLER: Literal["auto", "eager", "static", "compiled"] = "auto"  # eval decoding: auto (compiled static-cache decode
#                                   on CUDA, eager elsewhere), eager, static (static cache, not compiled) or compiled
SKIP_LONG_PROMPTS = False  # leave out (and count) problems too long for the context, instead of refusing the file
DEVICE: Device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu
DTYPE: Dtype = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
QUANT: Literal["none", "nf4"] = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)
OUT_FILE: Path | None = None  # per-question JSONL (None = logs/eval_<model>_<time>_<process id>.jsonl)
COMPARE_TO: Path | None = None  # summary JSON of an earlier eval (e.g. the base model's) to print before -> after

config = configure(globals(), quiet=not is_main_process())
# ---------------------------------------------------------------------------

from common.checkpoint import load_lora_checkpoint, resolve_checkpoint  # noqa: E402
from common.data import load_problems  # noqa: E402
from common.distributed import cleanup, setup_distributed  # noqa: E402
from common.evaluate import evaluate  # noqa: E402
from common.model import load_model_and_tokenizer  # noqa: E402
from common.prompts import configure_prompts  # noqa: E402
from common.reward import load_reward  # noqa: E402
from common.run import check_writable, preflight_model, questions_that_fit, room_for_prompts  # noqa: E402
from common.sampler import SamplingParams  # noqa: E402

distributed = setup_distributed(DEVICE)
# Before the model loads: a missing model file or an unwritable OUT_FILE would otherwise cost the whole evaluation.
run_name = Path(LORA_CKPT).stem if LORA_CKPT else Path(MODEL_PATH).name
# The process id makes the default unique: two evals started in the same second write two files.
out_file = Path(OUT_FILE or repo_path(f"logs/eval_{run_name}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.jsonl"))
if distributed.is_main:
    check_writable(out_file.parent, "the folder of OUT_FILE")
preflight_model(MODEL_PATH)
reward = load_reward(REWARD)
problems = load_problems(EVAL_FILE, EVAL_LIMIT or None, GOLD_FIELD, reward.needs_numeric_gold)
model, tokenizer, device = load_model_and_tokenizer(MODEL_PATH, DEVICE, DTYPE, QUANT)
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)
problems, _ = questions_that_fit(tokenizer, prompt_format, problems, EVAL_FILE,
                                 room_for_prompts(model, MAX_NEW_TOKENS), SKIP_LONG_PROMPTS)
if LORA_CKPT is not None:
    LORA_CKPT = resolve_checkpoint(LORA_CKPT)
    checkpoint = load_lora_checkpoint(model, LORA_CKPT)
    print(f"loaded LoRA {LORA_CKPT} (step {checkpoint['step']}, trained on {checkpoint['base_model']['path']})")
print(f"evaluating {MODEL_PATH}{' + ' + str(LORA_CKPT) if LORA_CKPT else ''} on {len(problems)} problems of {EVAL_FILE} ({device}, {next(model.parameters()).dtype})")

eval_sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, chunk_rows=EVAL_BATCH_SIZE, sampler=SAMPLER)
result = evaluate(model, tokenizer, problems, eval_sampling,  # sharded across the ranks
                  reward=reward, prompt_format=prompt_format)
cleanup()
if not distributed.is_main:  # rank 0 alone writes: every rank holds the same gathered result
    raise SystemExit(0)

with out_file.open("w") as f:
    for record in result.records:
        f.write(json.dumps(record) + "\n")
summary_file = out_file.with_suffix(".summary.json")
summary_file.write_text(json.dumps({"config": config, **result.metrics()}, indent=2))
print(result.summary())
print(f"per-question results: {out_file}  summary: {summary_file}")
if COMPARE_TO is not None:
    before = json.loads(Path(COMPARE_TO).read_text())
    change = 100 * (result.accuracy - before["eval/accuracy"])
    print(f"before -> after: {100 * before['eval/accuracy']:.2f}% ({before['eval/total']} problems, "
          f"{before['config'].get('LORA_CKPT') or before['config']['MODEL_PATH']}) -> {100 * result.accuracy:.2f}% "
          f"({result.total} problems): {change:+.2f} points")

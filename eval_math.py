"""Math accuracy of a model on a JSONL test file: greedy, or k samples per question at a temperature.

    python eval_math.py --MODEL_PATH=models/tiny-gemma2-math --EVAL_FILE=data/synth_test.jsonl
    python eval_math.py --EVAL_LIMIT=200     # Gemma 2 2B Instruct on the first 200 GSM8K test questions
    python eval_math.py --LORA_CKPT=checkpoints/grpo/lora_epoch1_step100.pt   # base + a trained LoRA
    python eval_math.py --NUM_SAMPLES=16 --TEMPERATURE=1 --GREEDY_TOO=true    # mean@16, pass@1..16, maj@16, greedy

Greedy (the default, TEMPERATURE=0) prints `Total: N  Correct: M  Accuracy: X.XX%` with a 95%
confidence interval, the strict accuracy (`Strict: Y.YY%`, the answers given in the requested format
'Answer: <number>' as the last line; docs/evaluation.md) with its own, and tokens/s, and writes one
JSONL line per question (question, gold, output, prediction, correct, strict_correct, truncated) under logs/.

Sampled (TEMPERATURE > 0): NUM_SAMPLES = k completions per question, and for each, with a 95%
bootstrap interval over the questions (the method is printed and stored):
  mean@k   the accuracy of one sample, averaged over the k samples and the questions (pass@1 at T)
  pass@j   for j = 1, 2, 4, ..., k: the chance that one of j samples is right (Chen et al. 2021's
           unbiased estimator from the k samples; common/sampled_metrics.py)
  maj@k    the accuracy of the majority vote of the k extracted answers (ties: the answer sampled first)
  mean@k_strict  mean@k of the answers given in the requested format
and a JSONL line per question with its k samples (output, prediction, correct, strict_correct, truncated each),
num_correct and the majority's answer; GREEDY_TOO=true adds the greedy completion ("greedy").
Next to the JSONL, a .summary.json holds the config and every metric with its interval;
COMPARE_TO= an earlier one prints before -> after for each metric both have (lenient and strict), on the
problems both evaluated (matched by question), after one line naming what differs between the two
evaluations (file, number of problems, prompt, generation settings), if anything does.

    torchrun --standalone --nproc_per_node=4 eval_math.py ...   # the problems sharded across 4 processes

Under torchrun each process evaluates its share of the problems, the records are gathered, and
rank 0 alone prints and writes them. The numbers and the records are the single process's: a
question's samples come from streams seeded by SEED and the question's index, not by the rank.
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
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question: a text, "" for none, or a preset: math (this one)
#                                   or think (reasoning in <think>...</think>, then the answer line: docs/reasoning.md);
#                                   a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # a system message before every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or the path of a Jinja file
REWARD = "correctness"  # what counts as correct: correctness (the extracted number), think (the number after
#                                   a <think> block, with INSTRUCTION=think), or your.py:function's "correct"
EVAL_LIMIT: Annotated[int, ">= 0"] = 0  # evaluate the first EVAL_LIMIT problems (0 = all)
EVAL_BATCH_SIZE: Annotated[int, ">= 1"] = 64  # prompts generated together
MAX_NEW_TOKENS: Annotated[int, ">= 1"] = 256  # answer length limit; an answer cut off here counts as wrong unless its number is right
SAMPLER: Literal["auto", "eager", "static", "compiled"] = "auto"  # eval decoding: auto (compiled static-cache decode
#                                   on CUDA, eager elsewhere), eager, static (static cache, not compiled) or compiled
NUM_SAMPLES: Annotated[int, ">= 1"] = 1  # k: completions per question at TEMPERATURE > 0, for mean@k, pass@j
#                                   (j = 1, 2, 4, ..., k) and maj@k; EVAL_BATCH_SIZE x k rows are sampled together
TEMPERATURE: Annotated[float, ">= 0"] = 0.0  # 0 = greedy (one completion, accuracy); > 0 samples NUM_SAMPLES per question
TOP_P: Annotated[float, "0 < x <= 1"] = 1.0  # nucleus sampling at TEMPERATURE > 0 (1.0 = off)
TOP_K: Annotated[int, ">= 0"] = 0  # top-k sampling at TEMPERATURE > 0 (0 = off)
SEED: Annotated[int, ">= 0"] = 0  # the samples (each question's from its own stream: SEED, its index) and the bootstrap
GREEDY_TOO = False  # at TEMPERATURE > 0, the greedy accuracy as well, in the same run (and each record's "greedy")
SKIP_LONG_PROMPTS = False  # leave out (and count) problems too long for the context, instead of refusing the file
DEVICE: Device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu
DTYPE: Dtype = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
QUANT: Literal["none", "nf4"] = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)
OUT_FILE: Path | None = None  # per-question JSONL (None = logs/eval_<model>_<time>_<process id>.jsonl)
COMPARE_TO: Path | None = None  # summary JSON of an earlier eval (e.g. the base model's) to print before -> after
OVERWRITE = False  # replace existing outputs (else an existing one is refused, before any work)

config = configure(globals(), quiet=not is_main_process())
# ---------------------------------------------------------------------------

from common.checkpoint import load_lora_checkpoint, resolve_checkpoint  # noqa: E402
from common.compare import comparison_lines, read_records, read_summary, records_file  # noqa: E402
from common.data import load_problems, write_jsonl  # noqa: E402
from common.distributed import cleanup, setup_distributed  # noqa: E402
from common.evaluate import check_sampling, evaluate, evaluate_sampled  # noqa: E402
from common.model import load_model_and_tokenizer  # noqa: E402
from common.prompts import configure_prompts  # noqa: E402
from common.reward import load_reward  # noqa: E402
from common.run import check_output, preflight_model, stop_quietly_on_signal  # noqa: E402
from common.run_setup import questions_that_fit, room_for_prompts  # noqa: E402
from common.sampler import SamplingParams  # noqa: E402

check_sampling(NUM_SAMPLES, TEMPERATURE, ("NUM_SAMPLES", "TEMPERATURE"))
if COMPARE_TO is not None and not Path(COMPARE_TO).is_file():
    raise SystemExit(f"error: COMPARE_TO={COMPARE_TO}: no such summary file (an earlier eval's .summary.json)")
before = read_summary(COMPARE_TO) if COMPARE_TO is not None else None  # read now: a bad file costs no eval
distributed = setup_distributed(DEVICE)
# Before the model loads: a missing model file or an unwritable OUT_FILE would otherwise cost the whole evaluation.
run_name = Path(LORA_CKPT).stem if LORA_CKPT else Path(MODEL_PATH).name
# The process id makes the default unique: two evals started in the same second write two files.
out_file = Path(OUT_FILE or repo_path(f"logs/eval_{run_name}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.jsonl"))
summary_file = out_file.with_suffix(".summary.json")
written: list[Path] = []  # what a stop signal leaves behind, said in its line
stop_quietly_on_signal(written, [out_file, summary_file])
if distributed.is_main:
    check_output(out_file, "OUT_FILE", OVERWRITE, companions=(summary_file,))
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

greedy_settings = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, chunk_rows=EVAL_BATCH_SIZE,
                                 sampler=SAMPLER)
sampled_settings = SamplingParams(NUM_SAMPLES, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K,
                                  chunk_rows=EVAL_BATCH_SIZE * NUM_SAMPLES, sampler=SAMPLER) if TEMPERATURE > 0 else None
options = dict(reward=reward, prompt_format=prompt_format)  # sharded across the ranks
greedy = evaluate(model, tokenizer, problems, greedy_settings, **options) if TEMPERATURE == 0 or GREEDY_TOO else None
sampled = (evaluate_sampled(model, tokenizer, problems, sampled_settings, seed=SEED, **options)
           if TEMPERATURE > 0 else None)
cleanup()
if not distributed.is_main:  # rank 0 alone writes: every rank holds the same gathered result
    raise SystemExit(0)

if sampled is None:
    records = greedy.records
else:  # the sampled record of each question, its greedy completion beside it when GREEDY_TOO
    records = sampled.records if greedy is None else [
        {**record, "greedy": {key: greedy_record[key]
                              for key in ("output", "prediction", "correct", "strict_correct", "truncated")}}
        for record, greedy_record in zip(sampled.records, greedy.records)]
write_jsonl(out_file, records)  # atomic: a stop signal mid-write leaves no half file
written.append(out_file)
metrics = greedy.metrics() if greedy is not None else {}
if sampled is not None:
    metrics.update(sampled.metrics())
    metrics["eval/interval"] = sampled.interval_method  # how the *_ci_low, *_ci_high were made
summary_file.write_text(json.dumps({"config": config, **metrics}, indent=2))
written.append(summary_file)
if greedy is not None:
    print(greedy.summary())
if sampled is not None:
    print(sampled.table())
print(f"per-question results: {out_file}  summary: {summary_file}")
if before is not None:  # matched by question: only the problems both evaluated are compared
    for line in comparison_lines(COMPARE_TO, before, read_records(records_file(COMPARE_TO)),
                                 {"config": config, **metrics}, records):
        print(line)

"""Preference pairs for DPO from the model's own samples: right answer chosen, wrong one rejected.

    python make_dpo_pairs.py                                             # Gemma 2 2B Instruct on GSM8K
    python make_dpo_pairs.py --MODEL_PATH=models/tiny-gemma2-math --TRAIN_FILE=data/synth_train.jsonl \\
        --EVAL_FILE=data/synth_test.jsonl --NUM_PROMPTS=512 --OUT_FILE=data/dpo_pairs_tiny.jsonl

For each training question (eval questions removed, compared normalised) K answers are sampled
and scored with REWARD. The pair is the highest-reward correct answer against the lowest-reward
incorrect one, ties by sample order; a question whose K answers are all correct or all wrong
gives no pair and is counted (dpo/pairs.py). Writes OUT_FILE, lines
{"question", "chosen", "rejected", "gold_answer"} (a TRAIN_FILE of TRL prompts gives "prompt" in
place of "question"), and the counts to OUT_FILE's .summary.json. The pairs keep the bare
question: run_train_dpo.py builds its prompt again, so give it the same INSTRUCTION,
SYSTEM_PROMPT and CHAT_TEMPLATE as here.
"""

import json
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from common.config import configure
from common.prompts import INSTRUCTION as MATH_INSTRUCTION

# ---------------------------------------------------------------- constants
MODEL_PATH = "models/gemma-2-2b-it"  # model directory that samples the answers (tiny one: models/tiny-gemma2-math)
TRAIN_FILE = "data/gsm8k_train.jsonl"  # questions to sample answers for (any format of common/data.py)
EVAL_FILE = "data/gsm8k_test.jsonl"  # held-out questions: never made into pairs (compared normalised)
NUM_PROMPTS = 0  # use the first NUM_PROMPTS training questions left after removing eval ones (0 = all)
NUM_SAMPLES_PER_PROMPT = 8  # K: answers sampled per question
MAX_NEW_TOKENS = 256  # answer length limit (a cut-off answer is flagged truncated for the reward)
TEMPERATURE = 1.0  # sampling temperature: diversity is what makes a group hold both outcomes
BATCH_SIZE = 16  # questions per sampling batch (BATCH_SIZE x K rows sampled together)
REWARD = "math"  # ranks the correct and the incorrect answers: math, correctness, think, your.py:function, or several
REWARD_WEIGHTS: tuple[float, ...] = ()  # one weight per REWARD entry (empty = all 1)
GOLD_FIELD: str | None = None  # the field holding the gold answer (None = gold_answer, answer, solution, ground_truth)
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question: a text, "" for none, or a preset: math (this one)
#                                   or think (reasoning in <think>...</think>, then the answer line: docs/reasoning.md);
#                                   a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # system message of every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or a Jinja file
OUT_FILE = "data/dpo_pairs.jsonl"  # pairs JSONL; the counts go to the same name with .summary.json
OVERWRITE = False  # replace existing outputs (else an existing one is refused, before any work)
SEED = 0  # sampling seed
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
QUANT: Literal["none", "nf4"] = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)

config = configure(globals())
# ---------------------------------------------------------------------------

from common.data import load_problems, write_jsonl  # noqa: E402
from common.model import load_model_and_tokenizer, stop_token_ids  # noqa: E402
from common.prompts import configure_prompts, encode_prompts  # noqa: E402
from common.reward import load_reward, score_batch  # noqa: E402
from common.run import check_output, stop_quietly_on_signal  # noqa: E402
from common.sampler import SamplingParams, sample  # noqa: E402
from dpo.pairs import build_pairs, exclude_eval_questions  # noqa: E402

out_path, summary_path = Path(OUT_FILE), Path(OUT_FILE).with_suffix(".summary.json")
check_output(out_path, "OUT_FILE", OVERWRITE, companions=(summary_path,))  # before the sampling, not after it
written: list[Path] = []  # what a stop signal leaves behind, said in its line
stop_quietly_on_signal(written, [out_path, summary_path])
torch.manual_seed(SEED)
reward = load_reward(REWARD, REWARD_WEIGHTS)
problems, excluded = exclude_eval_questions(load_problems(TRAIN_FILE, None, GOLD_FIELD, reward.needs_numeric_gold),
                                            load_problems(EVAL_FILE, None, GOLD_FIELD, reward.needs_numeric_gold))
if NUM_PROMPTS:
    problems = problems[:NUM_PROMPTS]
if not problems:
    raise SystemExit(f"error: no training questions left in {TRAIN_FILE} after removing {EVAL_FILE}'s")
model, tokenizer, device = load_model_and_tokenizer(MODEL_PATH, DEVICE, DTYPE, QUANT)
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)
stop_ids = stop_token_ids(model, tokenizer)
# Each batch's rows sampled together; the static path pads the last batch to as many.
sampling = SamplingParams(NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE,
                          chunk_rows=BATCH_SIZE * NUM_SAMPLES_PER_PROMPT,
                          generator=torch.Generator(device=device).manual_seed(SEED))
print(f"{len(problems)} questions ({excluded} eval questions removed), {NUM_SAMPLES_PER_PROMPT} samples each, "
      f"on {device}" + (", linear layers in 4-bit NF4" if QUANT == "nf4" else ""))

texts_per_question, correct_per_question, rewards_per_question = [], [], []
for first in tqdm(range(0, len(problems), BATCH_SIZE), desc="sampling", unit="batch"):
    batch = problems[first:first + BATCH_SIZE]
    samples = sample(model, encode_prompts(tokenizer, batch, prompt_format), sampling, tokenizer=tokenizer,
                     eos_token_ids=stop_ids)
    scores = score_batch(reward, samples.texts, [batch[i] for i in samples.prompt_index.tolist()], samples.truncated)
    # Rows are question-major (row = question * K + k): slice each question's K answers.
    for start in range(0, len(scores), NUM_SAMPLES_PER_PROMPT):
        group = slice(start, start + NUM_SAMPLES_PER_PROMPT)
        texts_per_question.append(samples.texts[group])
        correct_per_question.append([s.correct for s in scores[group]])
        rewards_per_question.append([s.total for s in scores[group]])

pairs, counts = build_pairs(problems, texts_per_question, correct_per_question, rewards_per_question)
counts["excluded_eval_questions"] = excluded
write_jsonl(out_path, pairs)
written.append(out_path)
summary_path.write_text(json.dumps({**counts, "config": config}, indent=2) + "\n")
written.append(summary_path)
print(f"{counts['pairs']} pairs from {counts['questions']} questions: {counts['skipped_all_correct']} all correct, "
      f"{counts['skipped_all_wrong']} all wrong skipped; {excluded} eval questions excluded")
print(f"wrote {out_path} and {summary_path}")

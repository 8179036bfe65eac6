"""Model soup: combine LoRA checkpoints of one base model into one adapter, and compare them.

    python model_soup.py --CKPTS=checkpoints/grpo/lora_epoch0_step100.pt,checkpoints/grpo/lora_epoch0_step150.pt
    python model_soup.py --CKPTS=a.pt,b.pt,c.pt --RECIPE=greedy --OUT=checkpoints/soup/greedy.pt
    python model_soup.py --CKPTS=a.pt,b.pt --RECIPE=weighted --WEIGHTS=3,1 --AVERAGE=factors

Recipes: uniform (equal weights), weighted (WEIGHTS, normalised to sum 1) and greedy
(Wortsman et al. 2022, "Model soups"): rank the ingredients by accuracy on DEV_FILE,
start from the best, and add each next one (equal weights over those kept) only if
the soup's dev accuracy does not drop.  TEST_FILE is reported, never used to choose.

AVERAGE=delta (default) averages the updates ΔW = s · B · A exactly: the soup is a
LoRA of rank Σ r_i (the A's and the weighted B's stacked along the rank).
AVERAGE=factors averages A and B separately, as the original project did; that is
not the mean of the updates (common/soup.py has the algebra).

An ingredient may also be a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) of the same base.  The soup goes to OUT as an ordinary
checkpoint (step 0, no optimizer state), which eval_math.py --LORA_CKPT and
export_lora.py load like any other; a table of each ingredient's dev and test accuracy
and the soup's is printed and written to OUT with the suffix .summary.json.

QUANT=nf4 evaluates the ingredients and the soup on a 4-bit base (less memory). Nothing is
merged into the base: each LoRA runs on the adapter path, beside the 4-bit layers, and the
soup itself is computed from the checkpoints alone, so OUT holds the same adapter as with
QUANT=none; only the accuracies come from the 4-bit base.
"""

import json
from pathlib import Path
from typing import Literal

from common.config import configure
from common.prompts import INSTRUCTION as MATH_INSTRUCTION

# ---------------------------------------------------------------- constants
CKPTS: tuple[Path, ...] = ()  # the ingredients: LoRA checkpoints (.pt, run directories, PEFT adapter directories)
#   of one base model and one set of targets (required)
RECIPE = "uniform"  # uniform (equal weights), weighted (WEIGHTS) or greedy (add by dev accuracy while it does not drop)
WEIGHTS: tuple[float, ...] = ()  # RECIPE=weighted: one weight >= 0 per checkpoint, normalised to sum 1
AVERAGE = "delta"  # delta: mean of the updates s·B·A, exactly (rank Σ r); factors: mean of A and of B (not the same)
MODEL_PATH: str | None = None  # base model directory or Hub id (None = the one stored in the first checkpoint)
DEV_FILE: str | None = "data/synth_dev.jsonl"  # problems the greedy recipe chooses on, disjoint from TEST_FILE (None = skip)
TEST_FILE: str | None = "data/synth_test.jsonl"  # problems reported only (None = skip)
DEV_LIMIT = 0  # evaluate the first DEV_LIMIT dev problems (0 = all)
TEST_LIMIT = 0  # evaluate the first TEST_LIMIT test problems (0 = all)
BATCH_SIZE = 64  # prompts generated together
MAX_NEW_TOKENS = 256  # answer length limit of the greedy evaluation
INSTRUCTION = MATH_INSTRUCTION  # put before each bare question: a text, "" for none, or a preset: math (this one)
#                                   or think (reasoning in <think>...</think>, then the answer line: docs/reasoning.md);
#                                   a TRL "prompt" is used as given
SYSTEM_PROMPT = ""  # system message of every prompt ("" for none)
CHAT_TEMPLATE = "auto"  # auto (the tokenizer's own), none (raw text) or a Jinja file
GOLD_FIELD: str | None = None  # the field holding the gold answer (None = gold_answer, answer, solution, ground_truth)
REWARD = "correctness"  # what judges an answer correct: correctness (the number), think (the number after a
#                                   <think> block), or your.py:function
OUT = "checkpoints/soup/soup.pt"  # the soup checkpoint; its table goes beside it as .summary.json
OVERWRITE = False  # replace existing outputs (else an existing one is refused, before any work)
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
QUANT: Literal["none", "nf4"] = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)

config = configure(globals())
# ---------------------------------------------------------------------------

RECIPES = ("uniform", "weighted", "greedy")
if not CKPTS:
    raise SystemExit("error: --CKPTS=a.pt,b.pt,... is required: the checkpoints to soup")
if RECIPE not in RECIPES:
    raise SystemExit(f"error: RECIPE must be one of {', '.join(RECIPES)}, got {RECIPE!r}")
if (RECIPE == "weighted") != bool(WEIGHTS):
    raise SystemExit("error: --WEIGHTS=... goes with --RECIPE=weighted, and only with it")
if RECIPE == "greedy" and DEV_FILE is None:
    raise SystemExit("error: the greedy recipe chooses on --DEV_FILE, which is None")

from common.checkpoint import (CheckpointError, load_checkpoint, resolve_checkpoint, restore_lora,  # noqa: E402
                               save_checkpoint)
from common.data import load_problems  # noqa: E402
from common.evaluate import evaluate  # noqa: E402
from common.sampler import SamplingParams  # noqa: E402
from common.model import get_device, get_dtype, load_model, load_tokenizer, resolve_model_path  # noqa: E402
from common.prompts import configure_prompts  # noqa: E402
from common.reward import load_reward  # noqa: E402
from common.run import check_output, stop_quietly_on_signal  # noqa: E402
from common.soup import check_ingredients, normalise_weights, soup_lora  # noqa: E402

paths = [str(resolve_checkpoint(path)) for path in CKPTS]
repeated = sorted({path for path in paths if paths.count(path) > 1})
if repeated:
    raise SystemExit(f"error: CKPTS lists {', '.join(repeated)} more than once (use RECIPE=weighted to weight it)")
if Path(OUT).resolve() in {Path(path).resolve() for path in paths}:
    raise SystemExit(f"error: OUT={OUT} is one of the CKPTS: the soup would replace an ingredient; give another --OUT")
# Before any evaluation: the greedy recipe on a real model takes hours, which an unwritable OUT would waste.
out_path, summary_file = Path(OUT), Path(OUT).with_suffix(".summary.json")
check_output(out_path, "OUT", OVERWRITE, companions=(summary_file,))
written: list[Path] = []  # what a stop signal leaves behind, said in its line
stop_quietly_on_signal(written, [out_path, summary_file])
try:
    checkpoints = {path: load_checkpoint(path) for path in paths}
    check_ingredients(checkpoints, AVERAGE)
    # The greedy recipe replaces these once it has chosen.
    weights = normalise_weights(list(WEIGHTS) if RECIPE == "weighted" else [1.0] * len(paths), len(paths))
except (CheckpointError, FileNotFoundError, ValueError) as exc:
    raise SystemExit(f"error: {exc}") from None

base_path = resolve_model_path(MODEL_PATH or checkpoints[paths[0]]["base_model"]["path"])
device = get_device(DEVICE)
dtype = get_dtype(DTYPE, device)
tokenizer = load_tokenizer(base_path)
prompt_format = configure_prompts(tokenizer, INSTRUCTION, SYSTEM_PROMPT, CHAT_TEMPLATE)
reward = load_reward(REWARD)
splits = {"dev": (DEV_FILE, DEV_LIMIT), "test": (TEST_FILE, TEST_LIMIT)}
problems = {split: load_problems(file, limit or None, GOLD_FIELD, reward.needs_numeric_gold)
            for split, (file, limit) in splits.items() if file is not None}
base_storage = f"{device}, {dtype}" + (", linear layers in 4-bit NF4" if QUANT == "nf4" else "")
print(f"{len(paths)} ingredients on {base_path} ({base_storage}); recipe {RECIPE}, average {AVERAGE}; "
      + ", ".join(f"{split} {splits[split][0]} ({len(items)} problems)" for split, items in problems.items()))


def with_lora(checkpoint: dict, label: str):
    """A fresh copy of the base model with this LoRA (each adapter has its own rank, so no reuse); the
    LoRA stays an adapter beside the base layers, 4-bit ones included (QUANT=nf4), never merged."""
    model = load_model(base_path, device, dtype, QUANT)
    restore_lora(model, checkpoint, where=label)
    return model


eval_sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, chunk_rows=BATCH_SIZE)


def accuracy(model, split: str, label: str) -> float | None:
    """Greedy accuracy on the split (None when its file is None)."""
    if split not in problems:
        return None
    result = evaluate(model, tokenizer, problems[split], eval_sampling, desc=f"{split}: {label}", reward=reward,
                      prompt_format=prompt_format)
    print(f"{label} on {split}: {result.summary()}")
    return result.accuracy


def soup_of(soup_weights: list[float]) -> dict:
    """The soup as an in-memory checkpoint (what restore_lora reads)."""
    state, lora_config = soup_lora([checkpoints[path] for path in paths], soup_weights, AVERAGE)
    return {"lora": state, "lora_config": lora_config, "base_model": checkpoints[paths[0]]["base_model"]}


dev_accuracy, test_accuracy = {}, {}
for path in paths:
    model = with_lora(checkpoints[path], path)
    dev_accuracy[path], test_accuracy[path] = accuracy(model, "dev", path), accuracy(model, "test", path)

greedy_trials = []
soup_dev_accuracy = None
if RECIPE == "greedy":
    # Best first; sorted() is stable, so ties keep the order of CKPTS.
    ranked = sorted(paths, key=lambda path: -dev_accuracy[path])
    chosen, soup_dev_accuracy = [ranked[0]], dev_accuracy[ranked[0]]
    for candidate in ranked[1:]:
        trial = chosen + [candidate]
        trial_soup = soup_of([1 / len(trial) if path in trial else 0.0 for path in paths])
        trial_accuracy = accuracy(with_lora(trial_soup, "soup"), "dev", f"soup + {candidate}")
        kept = trial_accuracy >= soup_dev_accuracy
        greedy_trials.append({"added": candidate, "dev_accuracy": trial_accuracy, "kept": kept})
        if kept:
            chosen, soup_dev_accuracy = trial, trial_accuracy
    weights = [1 / len(chosen) if path in chosen else 0.0 for path in paths]

soup = soup_of(weights)
model = with_lora(soup, "soup")
if soup_dev_accuracy is None:
    soup_dev_accuracy = accuracy(model, "dev", "soup")
soup_test_accuracy = accuracy(model, "test", "soup")
save_checkpoint(out_path, model, base_path, config,
                extra={"soup": {"ingredients": paths, "weights": weights, "recipe": RECIPE, "average": AVERAGE}})
written.append(out_path)

soup_label = f"soup ({RECIPE}, {AVERAGE}, r={soup['lora_config']['r']})"
rows = [(path, dev_accuracy[path], test_accuracy[path], weight) for path, weight in zip(paths, weights)]
rows.append((soup_label, soup_dev_accuracy, soup_test_accuracy, sum(weights)))
width = max(len(row[0]) for row in rows)
print(f"\n{'checkpoint':<{width}}  {'dev acc':>8}  {'test acc':>8}  {'weight':>6}")
for label, dev, test, weight in rows:
    dev_text, test_text = (f"{100 * value:.2f}%" if value is not None else "-" for value in (dev, test))
    print(f"{label:<{width}}  {dev_text:>8}  {test_text:>8}  {weight:>6.3f}")

summary_file.write_text(json.dumps({
    "config": config,
    "ingredients": [{"path": path, "step": checkpoints[path]["step"], "dev_accuracy": dev, "test_accuracy": test,
                     "weight": weight} for path, dev, test, weight in rows[:-1]],
    "greedy_trials": greedy_trials,
    "soup": {"path": str(out_path), "rank": soup["lora_config"]["r"], "dev_accuracy": soup_dev_accuracy,
             "test_accuracy": soup_test_accuracy},
}, indent=2) + "\n")
written.append(summary_file)
print(f"soup written to {out_path}  summary: {summary_file}")

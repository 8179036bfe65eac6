"""eval_math.py's COMPARE_TO: this evaluation against an earlier one, on the problems both hold.

Two evaluations are only comparable when they asked the same questions the same way. So the
comparison (1) names, in one line, every way the two differ (the file, the number of problems, the
prompt, the generation settings, what counts as correct), and (2) is computed on the shared problems
only: each side's metrics are recomputed from its per-question records (the JSONL beside the
.summary.json), matched by the question's text (the n-th copy of a repeated question with the n-th),
so a 10-problem baseline is set against the same 10 problems of a 500-problem run.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from common.errors import UserError
from common.evaluate import sampled_per_question
from common.reward import strict_correct

# The settings that change what an evaluation measures (the model and LoRA differ on purpose):
# the problems, the prompt, generation, and what counts as correct. SEED only matters when sampling.
COMPARED_SETTINGS = ("EVAL_FILE", "GOLD_FIELD", "INSTRUCTION", "SYSTEM_PROMPT", "CHAT_TEMPLATE", "REWARD",
                     "MAX_NEW_TOKENS", "TEMPERATURE", "NUM_SAMPLES", "TOP_P", "TOP_K", "SEED", "QUANT")


class CompareToError(UserError, ValueError):
    """A COMPARE_TO file that is not an eval_math.py summary."""


def read_summary(path: Path) -> dict:
    """An earlier eval's .summary.json; one line naming the file when it is not one."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompareToError(f"COMPARE_TO={path}: not a readable summary JSON ({error}); give the "
                             f".summary.json an earlier eval_math.py run wrote") from None
    if not isinstance(summary, dict) or "config" not in summary or "eval/total" not in summary:
        raise CompareToError(f"COMPARE_TO={path}: not an eval_math.py summary (no config or eval/total); give the "
                             f".summary.json an earlier eval_math.py run wrote")
    return summary


def records_file(summary_file: Path) -> Path:
    """The per-question JSONL an eval wrote beside its summary (OUT_FILE: x.jsonl -> x.summary.json)."""
    summary_file = Path(summary_file)
    return summary_file.with_name(summary_file.name.removesuffix(".summary.json") + ".jsonl")


def _shown(value) -> str:
    text = json.dumps(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + '..."'


def setting_differences(before: dict, after: dict) -> list[str]:
    """'NAME before -> after' for each compared setting the two summaries hold and set differently, and
    'problems m -> n' when they evaluated a different number. SEED only when either one sampled."""
    sampled = any(summary["config"].get("TEMPERATURE", 0) > 0 for summary in (before, after))
    differences = []
    for name in COMPARED_SETTINGS:
        if name not in before["config"] or name not in after["config"] or (name == "SEED" and not sampled):
            continue
        was, now = before["config"][name], after["config"][name]
        if name == "EVAL_FILE":  # "./data/x.jsonl" is "data/x.jsonl"
            same = Path(was) == Path(now)
        elif isinstance(was, (int, float)) and isinstance(now, (int, float)):
            same = math.isclose(was, now)
        else:
            same = was == now
        if not same:
            differences.append(f"{name} {_shown(was)} -> {_shown(now)}")
    if before["eval/total"] != after["eval/total"]:
        differences.insert(0, f"problems {before['eval/total']} -> {after['eval/total']}")
    return differences


def _keys(records: list[dict]) -> list[tuple[str, int]]:
    """Each record's identity: its question and which copy of that question it is."""
    seen = Counter()
    keys = []
    for record in records:
        keys.append((record["question"], seen[record["question"]]))
        seen[record["question"]] += 1
    return keys


def _with_strict(scored: dict, gold) -> dict:
    """A scored completion with its strict_correct, computed from its output when an older eval lacks it."""
    return scored if "strict_correct" in scored else {**scored, "strict_correct": strict_correct(scored["output"], gold)}


def record_metrics(records: list[dict], num_samples: int) -> dict[str, float]:
    """{metric: value} recomputed from per-question records: accuracy and accuracy_strict of the greedy
    completions (a greedy eval's records, or a sampled eval's "greedy" with GREEDY_TOO), and the sampled
    metrics (mean@k, pass@j, maj@k, mean@k_strict) of their "samples"."""
    if not records:
        return {}
    values = {}
    greedy = [record.get("greedy", record) for record in records]
    if all("correct" in scored for scored in greedy):
        greedy = [_with_strict(scored, record["gold"]) for scored, record in zip(greedy, records)]
        values["accuracy"] = sum(scored["correct"] for scored in greedy) / len(greedy)
        strict = [scored["strict_correct"] for scored in greedy]
        if None not in strict:
            values["accuracy_strict"] = sum(strict) / len(strict)
    if "samples" in records[0]:
        sampled = [{**record, "samples": [_with_strict(scored, record["gold"]) for scored in record["samples"]]}
                   for record in records]
        values.update({name: math.fsum(per_question) / len(per_question)
                       for name, per_question in sampled_per_question(sampled, num_samples).items()})
    return values


def read_records(path: Path) -> list[dict] | None:
    """The per-question records of a JSONL file, or None when it is missing or unreadable."""
    try:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def comparison_lines(before_file: Path, before: dict, before_records: list[dict] | None,
                     after: dict, after_records: list[dict]) -> list[str]:
    """The lines COMPARE_TO prints: what differs between the two evaluations (when anything does), then
    before -> after for each metric both have, on the problems both evaluated."""
    lines = []
    differences = setting_differences(before, after)
    source = before["config"].get("LORA_CKPT") or before["config"].get("MODEL_PATH")
    if before_records is None:
        # An eval whose JSONL is gone: only its totals are left, so nothing can be matched.
        lines.append(f"COMPARE_TO: {records_file(before_file)} (its per-question records) is missing: the "
                     f"problems cannot be matched, so the whole of each evaluation is compared")
        was_values = {name.removeprefix("eval/"): value for name, value in before.items()
                      if name.startswith("eval/") and isinstance(value, (int, float))}
        now_values = {name.removeprefix("eval/"): value for name, value in after.items()
                      if name.startswith("eval/") and isinstance(value, (int, float))}
        was_count, now_count = before["eval/total"], after["eval/total"]
    else:
        before_keys = dict(zip(_keys(before_records), before_records))
        after_keys = _keys(after_records)
        shared = [key for key in after_keys if key in before_keys]
        was_values = record_metrics([before_keys[key] for key in shared], before["config"].get("NUM_SAMPLES", 1))
        now_by_key = dict(zip(after_keys, after_records))
        now_values = record_metrics([now_by_key[key] for key in shared], after["config"].get("NUM_SAMPLES", 1))
        was_count = now_count = len(shared)
        if len(shared) < max(len(before_records), len(after_records)):
            differences.append(f"{len(shared)} problems in common")
    if differences:
        lines.append(f"COMPARE_TO: the two evaluations differ: {', '.join(differences)}"
                     + (f"; compared on the {was_count} shared problems" if before_records is not None else ""))
    if before_records is not None and was_count == 0:
        lines.append(f"before -> after: no problem of {before_file} is in this evaluation: nothing to compare")
        return lines
    names = [name for name in now_values if name in was_values and _comparable(name)]
    if not names:
        lines.append(f"before -> after: {before_file} has none of this run's metrics "
                     f"({', '.join(name for name in now_values if _comparable(name))})")
    for name in names:
        was, now = was_values[name], now_values[name]
        label = {"accuracy": "before -> after", "accuracy_strict": "before -> after strict"}.get(
            name, f"before -> after {name}")
        lines.append(f"{label}: {100 * was:.2f}% ({was_count} problems, {source}) -> {100 * now:.2f}% "
                     f"({now_count} problems): {100 * (now - was):+.2f} points")
    return lines


def _comparable(name: str) -> bool:
    """An accuracy-like metric (not a count, an interval bound or a speed)."""
    return name in ("accuracy", "accuracy_strict") or any(
        name.startswith(prefix) and not name.endswith(("_ci_low", "_ci_high")) for prefix in ("mean@", "pass@", "maj@"))

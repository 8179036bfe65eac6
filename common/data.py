"""JSONL datasets: validated loaders for problems and preference pairs, and an atomic writer.

A problem line is {"question": str, "gold_answer": str | number, ...}; a pair
line is {"prompt": str, "chosen": str, "rejected": str, ...}.  Extra fields are
kept.  Every invalid line is reported as ``<file> line <n>: <what>`` with
the 1-based line number, so a broken dataset fails at load time and points at
the line instead of failing mid-training.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import torch

# Scripts that create the data files, named in the error for a missing file.
_GENERATORS = {"gsm8k": "prepare_gsm8k.py", "synth": "make_synth_data.py"}


class DataError(ValueError):
    """A dataset line that is not valid; the message names the file and line."""


def _missing_file(path: Path) -> FileNotFoundError:
    message = f"dataset file not found: {path}"
    if "data" in path.parts:
        for marker, script in _GENERATORS.items():
            if marker in path.name:
                message += f" (run `python {script}` from the repository root to create it)"
    return FileNotFoundError(message)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; each line must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise _missing_file(path)
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {line_number}: bad JSON "
                                f"({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {line_number}: expected a JSON object, "
                                f"got {type(record).__name__}")
            yield line_number, record


def _require_text(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {field}")
    return value


def _gold_answer_text(value: object, where: str) -> str:
    """The gold answer as a string without commas or surrounding whitespace, if it is a number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: gold_answer must be a string or number, "
                        f"got {type(value).__name__}")
    if isinstance(value, str):
        text = value.replace(",", "").strip()
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value)
    try:
        is_number = math.isfinite(float(text))
    except ValueError:
        is_number = False
    if not is_number:
        raise DataError(f"{where}: gold_answer {value!r} is not a number")
    return text


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")


def load_problems(path: str | Path, limit: int | None = None) -> list[dict]:
    """Problems from a JSONL file, gold_answer as a string; at most ``limit`` (None = all)."""
    _check_limit(limit)
    problems: list[dict] = []
    if limit == 0:
        return problems
    for line_number, record in iter_jsonl(path):
        where = f"{path} line {line_number}"
        _require_text(record, "question", where)
        if "gold_answer" not in record:
            raise DataError(f"{where}: missing field 'gold_answer'")
        problems.append({**record, "gold_answer": _gold_answer_text(record["gold_answer"], where)})
        if len(problems) == limit:
            break
    return problems


def load_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """Preference pairs from a JSONL file; at most ``limit`` (None = all)."""
    _check_limit(limit)
    pairs: list[dict] = []
    if limit == 0:
        return pairs
    for line_number, record in iter_jsonl(path):
        where = f"{path} line {line_number}"
        for field in ("prompt", "chosen", "rejected"):
            _require_text(record, field, where)
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{where}: chosen and rejected are the same text")
        pairs.append(record)
        if len(pairs) == limit:
            break
    return pairs


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write one JSON object per line, atomically; returns the number of rows.

    The rows go to a temporary file in the same directory, which is flushed,
    fsynced and then renamed over ``path``, so a crash or a bad row mid-write
    leaves the previous file as it was rather than half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as for a
    # normally created file (tempfile would make it private, 0o600).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "w", encoding="utf-8") as handle:
            count = 0
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return count


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The order of the items in an epoch: a function of the seed and the epoch alone, so a
    resumed run sees exactly the items the uninterrupted run would have."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_items(num_items: int, seed: int, step: int, items_per_step: int) -> tuple[int, list[int]]:
    """(epoch, indices) of the items of a global step: the step's slice of its epoch's order
    (epoch_order), steps_per_epoch = num_items // items_per_step (a last partial slice is skipped)."""
    epoch, index_in_epoch = divmod(step, num_items // items_per_step)
    first = index_in_epoch * items_per_step
    return epoch, epoch_order(num_items, seed, epoch)[first:first + items_per_step]


def open_metrics_log(path: str | Path, append: bool, is_main: bool) -> TextIO:
    """The metrics JSONL of a run, open for writing: appended to when ``append`` (a resumed run
    continues its file), else written anew; folders created. On ranks other than 0 a sink: their
    metrics are the same reduced numbers, and rank 0 alone writes them."""
    if not is_main:
        return open(os.devnull, "w")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a" if append else "w")

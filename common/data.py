"""JSONL datasets: validated loaders for problems and preference pairs, and an atomic writer.

The format of a file is detected from its first line, and every line must then fit it:

    problems  {"question": str, "gold_answer": str | number, ...}        this repository's
              {"question": str, "answer": "reasoning ... #### 72", ...}   raw GSM8K (gold: the #### number)
              {"prompt": str, ...}                                         TRL's standard format
              {"prompt": [{"role": ..., "content": ...}, ...], ...}        TRL's conversational format
    pairs     {"question" | "prompt", "chosen", "rejected", ...}           chosen/rejected: strings, or
                                                                           one-message assistant conversations

A "question" is bare: the prompt builder (common/prompts.py) wraps it in the instruction.  A
"prompt" is the user's own and is used as given.  The gold answer is the first present of
``GOLD_FIELDS`` (or the field named by ``gold_field``); "$7" and "1,000" are normalised to "7" and
"1000", and a text gold with a "####" line or a \\boxed{...} reads the number there.  Every other
field stays in the row: a reward function receives them all.  Invalid lines are reported as
``<file>:<n>: <what>`` with the 1-based line number, the first MAX_BAD_LINES of them at once, so a
broken dataset fails at load time and points at its lines instead of failing mid-training.  A file
may start with a UTF-8 byte-order mark and end its lines with CRLF (Windows editors write both).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterable, Iterator

import torch

from common.errors import UserError
from common.reward import parse_number

# Scripts that create the data files, named in the error for a missing file.
_GENERATORS = {"gsm8k": "prepare_gsm8k.py", "synth": "make_synth_data.py"}
# Where the gold answer is looked for, in order: this repository's field, raw GSM8K's, then the
# names TRL datasets use (e.g. "solution" in NuminaMath-TIR, "ground_truth" in RLVR sets).
GOLD_FIELDS = ("gold_answer", "answer", "solution", "ground_truth")
_GSM8K_HINT = ("raw GSM8K lines are {\"question\", \"answer\": \"... #### 72\"}; "
               "`python prepare_gsm8k.py --TRAIN_FILE=train.jsonl --TEST_FILE=test.jsonl` converts them")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
# Invalid lines one error lists: enough to see a pattern, few enough to read.
MAX_BAD_LINES = 5


class DataError(UserError, ValueError):
    """A dataset line that is not valid; the message names the file and line."""


class DataFileNotFoundError(UserError, FileNotFoundError):
    """A dataset file that does not exist; the message says which script creates it, if one does."""


def _missing_file(path: Path) -> FileNotFoundError:
    message = f"dataset file not found: {path}"
    if "data" in path.parts:
        for marker, script in _GENERATORS.items():
            if marker in path.name:
                message += f" (run `python {script}` from the repository root to create it)"
    return DataFileNotFoundError(message)


def _parsed_lines(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """(1-based line number, object, or the DataError of a line that is not a JSON object) for each
    non-blank line. utf-8-sig reads a file with or without a byte-order mark; text mode turns CRLF
    into LF."""
    if not path.is_file():
        raise _missing_file(path)
    with path.open(encoding="utf-8-sig") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_number, DataError(f"{path}:{line_number}: bad JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                record = DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; each line must be a JSON object (DataError
    at the first that is not)."""
    for line_number, record in _parsed_lines(Path(path)):
        if isinstance(record, DataError):
            raise record
        yield line_number, record


def _valid_rows(path: str | Path, limit: int | None, row_of) -> list[dict]:
    """``row_of(line_number, record, where)`` for each of the first ``limit`` (None = all) lines of ``path``.
    A line it refuses (DataError) is collected and reading goes on: one DataError then lists the first
    MAX_BAD_LINES bad lines, one per line of its message, and says when there are more."""
    rows: list[dict] = []
    bad: list[str] = []
    for lines_read, (line_number, record) in enumerate(_parsed_lines(Path(path)), start=1):
        if lines_read == 1 and isinstance(record, DataError):
            raise _not_json_lines(Path(path), line_number, record)
        try:
            if isinstance(record, DataError):
                raise record
            rows.append(row_of(line_number, record, f"{path}:{line_number}"))
        except DataError as error:
            bad.append(str(error))
            if len(bad) > MAX_BAD_LINES:
                break
        if lines_read == limit:
            break
    if len(bad) > MAX_BAD_LINES:
        raise DataError("\n".join(bad[:MAX_BAD_LINES]) + f"\n{path}: more bad lines follow (the first "
                        f"{MAX_BAD_LINES} are shown)")
    if bad:
        raise DataError("\n".join(bad))
    return rows


def _not_json_lines(path: Path, line_number: int, error: DataError) -> DataError:
    """A file whose first line is no JSON object (a JSON array, a CSV file, ...): one line saying what is
    expected, rather than the same complaint about each of its first lines."""
    with path.open(encoding="utf-8-sig") as lines:
        first = next(line for number, line in enumerate(lines, start=1) if number == line_number).strip()
    looks_like = ("; it looks like a JSON array: write each element on a line of its own" if first.startswith("[")
                  else "; it looks like CSV or plain text: write each row as a JSON object"
                  if not first.startswith("{") else "")
    return DataError(f"{error}: {path} must be JSON Lines, one JSON object per line{looks_like}")


def _require_text(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {field}")
    return value


def _conversation(value: list, field: str, where: str) -> list[dict]:
    """A list of {"role": str, "content": str} messages (TRL's conversational format)."""
    if not value:
        raise DataError(f"{where}: {field} is an empty conversation")
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: {field}[{index}] must be a message {{\"role\": str, \"content\": str}}, "
                            f"got {json.dumps(message)[:80]}")
    return value


def _format_of(record: dict, where: str, kind: str) -> str:
    """The format a line is in: "question" (bare), "standard" or "conversational" (TRL)."""
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            return "conversational"
        if isinstance(prompt, str):
            return "standard"
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, "
                        f"got {type(prompt).__name__}")
    if "question" in record:
        return "question"
    expected = ('{"question", "gold_answer"}, raw GSM8K {"question", "answer"}, or TRL\'s {"prompt", ...}'
                if kind == "problems" else '{"question" or "prompt", "chosen", "rejected"}')
    raise DataError(f"{where}: no 'question' or 'prompt' field; expected {expected}")


def _check_format(record: dict, where: str, kind: str, file_format: str | None, first_line: int | None) -> str:
    """The line's format, which must be the file's (that of its first line)."""
    line_format = _format_of(record, where, kind)
    if file_format is not None and line_format != file_format:
        raise DataError(f"{where}: a {line_format} line, but line {first_line} is {file_format} "
                        f"(one format per file)")
    return line_format


def _prompt(record: dict, where: str, line_format: str) -> str:
    """The row's text: the bare question, the standard prompt, or the conversation's last user
    message (what eval records show and what eval questions are compared on)."""
    if line_format == "question":
        return _require_text(record, "question", where)
    if line_format == "standard":
        return _require_text(record, "prompt", where)
    messages = _conversation(record["prompt"], "prompt", where)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: prompt ends with an assistant message; the answer to generate must "
                        f"follow a user turn")
    users = [message["content"] for message in messages if message["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def normalise_gold(value: object, field: str, where: str, numeric: bool = True) -> str:
    """The gold answer as a string: the number after a "####" or inside a \\boxed{} of a text gold,
    without "$", thousands commas or surrounding whitespace.  ``numeric``: it must be a number
    (DataError otherwise); else a text gold is kept, stripped, for a reward that reads text."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {field} must be a string or number, got {type(value).__name__}")
    if not isinstance(value, str):
        text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    elif "####" in value:
        text = value.rsplit("####", 1)[1].strip()
    elif boxed := _BOXED.findall(value):
        text = boxed[-1].strip()
    else:
        text = value.strip()
    if parse_number(text) is not None:
        return text.replace(",", "").replace("$", "")
    if not numeric:
        return text
    if isinstance(value, str) and "####" in value:
        raise DataError(f"{where}: the final answer after '####' in {field}, {text!r}, is not a number")
    raise DataError(f"{where}: {field} {value!r} is not a number")


def _gold(record: dict, where: str, gold_field: str | None, numeric: bool) -> str | None:
    """The row's normalised gold answer (see normalise_gold), or None when it has none and none is needed."""
    fields = (gold_field,) if gold_field else GOLD_FIELDS
    field = next((name for name in fields if name in record), None)
    has = f"the line's fields are {', '.join(record)}"
    if field is None:
        if not numeric:
            return None
        if gold_field:
            raise DataError(f"{where}: missing field {gold_field!r} (the GOLD_FIELD); {has}")
        hint = f"; {_GSM8K_HINT}" if "question" in record else ""
        raise DataError(f"{where}: no gold answer: none of the fields {', '.join(GOLD_FIELDS)} "
                        f"({has}; name yours with GOLD_FIELD){hint}")
    try:
        return normalise_gold(record[field], field, where, numeric)
    except DataError as exc:
        if field == "answer" and "question" in record and "####" not in str(record[field]):
            raise DataError(f"{exc} ({_GSM8K_HINT})") from None  # a raw GSM8K answer without its final line
        if field not in ("gold_answer", "answer") and not gold_field:  # a fallback: a worked solution, say
            raise DataError(f"{where}: no 'gold_answer' or 'answer' field, and the next gold field it has, {field!r}, "
                            f"holds {str(record[field])[:60]!r}, not a number; {has}: name the one that holds "
                            f"the gold answer with GOLD_FIELD") from None
        raise


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")


def load_problems(path: str | Path, limit: int | None = None, gold_field: str | None = None,
                  numeric_gold: bool = True) -> list[dict]:
    """Problems from a JSONL file in any of the formats of the module docstring; at most ``limit``
    (None = all).  Each row is the line's object plus "gold_answer" (normalised; None when the line
    has none and ``numeric_gold`` is False) and, for TRL prompts without a "question" field,
    "question" (the prompt's text).  ``numeric_gold``: every line needs a gold answer that is a
    number (what the built-in math rewards and the numeric evaluation read); False for a reward of
    your own that reads the row itself."""
    _check_limit(limit)
    if limit == 0:
        return []
    file_format = first_line = None  # the file's format: that of its first line

    def problem(line_number: int, record: dict, where: str) -> dict:
        nonlocal file_format, first_line
        line_format = _check_format(record, where, "problems", file_format, first_line)
        if file_format is None:
            file_format, first_line = line_format, line_number
        text = _prompt(record, where, line_format)
        row = {**record, "gold_answer": _gold(record, where, gold_field, numeric_gold)}
        row.setdefault("question", text)
        return row

    return _valid_rows(path, limit, problem)


def _answer_text(record: dict, field: str, where: str) -> str:
    """chosen / rejected as text: a string, or the content of a one-message assistant conversation."""
    if field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    value = record[field]
    if isinstance(value, list):
        messages = _conversation(value, field, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"{where}: {field} must be one assistant message, got the roles "
                            f"{[message['role'] for message in messages]}")
        value = messages[0]["content"]
    elif not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string or a conversation, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {field}")
    return value


def load_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """Preference pairs from a JSONL file; at most ``limit`` (None = all).  Each row is the line's
    object with chosen and rejected as text and, for TRL prompts without a "question" field,
    "question" (the prompt's text)."""
    _check_limit(limit)
    if limit == 0:
        return []
    file_format = first_line = None  # the file's format: that of its first line

    def pair(line_number: int, record: dict, where: str) -> dict:
        nonlocal file_format, first_line
        line_format = _check_format(record, where, "pairs", file_format, first_line)
        if file_format is None:
            file_format, first_line = line_format, line_number
        text = _prompt(record, where, line_format)
        chosen, rejected = _answer_text(record, "chosen", where), _answer_text(record, "rejected", where)
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are the same text")
        row = {**record, "chosen": chosen, "rejected": rejected}
        row.setdefault("question", text)
        return row

    return _valid_rows(path, limit, pair)


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

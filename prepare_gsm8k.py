"""Convert GSM8K into this repository's format: data/gsm8k_train.jsonl, data/gsm8k_test.jsonl.

    python prepare_gsm8k.py --TRAIN_FILE=train.jsonl --TEST_FILE=test.jsonl  # raw files on disk
    python prepare_gsm8k.py                                                  # from the hub

The raw files are the original GSM8K ``train.jsonl``/``test.jsonl``
(github.com/openai/grade-school-math, grade_school_math/data), one
{"question", "answer"} per line, where the answer is the reasoning with
calculator annotations like ``<<48/2=24>>`` and a last line ``#### 24``.  The
hub only has parquet files, which need pyarrow (not a dependency of this repo),
so passing the jsonl files is the way that works everywhere.

Each output line is {"question", "gold_answer", "solution"}: the number after
``####`` without commas, and the reasoning without annotations ending in
``Answer: N`` like the synthetic data.  Train questions that also appear in the
test split (compared normalised) are dropped so that test scores are not
inflated by training on test questions.

The trainers and evals also read the raw files as they are (common/data.py takes
the number after ``####`` as the gold answer); converting adds the "solution"
that run_sft.py trains on and removes that train/test overlap.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from common.config import configure
from common.data import DataError, iter_jsonl, write_jsonl
from common.run import check_output
from common.synth import normalise_question

OUT_DIR = "data"  # directory that receives gsm8k_train.jsonl and gsm8k_test.jsonl
SOURCE = "openai/gsm8k"  # Hugging Face dataset repository to download from
CONFIG_NAME = "main"  # dataset configuration (folder in the repository): main or socratic
TRAIN_FILE: Path | None = None  # raw GSM8K train jsonl on disk (None = download)
TEST_FILE: Path | None = None  # raw GSM8K test jsonl on disk (None = download)
OVERWRITE = False  # replace existing outputs (else an existing one is refused, before any work)

_ANNOTATION = re.compile(r"<<[^>]*>>")
_RAW_FILES_URL = "https://github.com/openai/grade-school-math/tree/master/grade_school_math/data"


class GSM8KFormatError(ValueError):
    """A raw GSM8K record that cannot be converted."""


def convert_gsm8k_record(record: dict, index: int | None = None, source: str = "GSM8K") -> dict:
    """{"question", "answer": "reasoning\\n#### 1,234"} -> {"question", "gold_answer", "solution"}.

    ``index`` (1-based position in its split) and ``source`` only name the record in errors.
    """
    where = f"{source} record {index}" if index is not None else f"{source} record"
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise GSM8KFormatError(f"{where}: missing or empty 'question'")
    if not isinstance(answer, str):
        raise GSM8KFormatError(f"{where}: missing 'answer' text")
    if "####" not in answer:
        raise GSM8KFormatError(f"{where}: answer has no '#### <number>' final line")
    reasoning, final = answer.rsplit("####", 1)
    gold_answer = final.replace(",", "").strip()
    try:
        float(gold_answer)
    except ValueError:
        raise GSM8KFormatError(f"{where}: final answer {final.strip()!r} is not a number") from None
    steps = [line.rstrip() for line in _ANNOTATION.sub("", reasoning).strip().splitlines()]
    solution = "\n".join([line for line in steps if line] + [f"Answer: {gold_answer}"])
    return {"question": question.strip(), "gold_answer": gold_answer, "solution": solution}


def split_without_leakage(train: list[dict], test: list[dict]) -> tuple[list[dict], int]:
    """Train problems whose normalised question is no test question, and how many were dropped."""
    test_questions = {normalise_question(problem["question"]) for problem in test}
    kept = [p for p in train if normalise_question(p["question"]) not in test_questions]
    return kept, len(train) - len(kept)


def _download_records(split: str) -> list[dict]:
    """The raw records of a split from the Hugging Face hub (parquet, read with pyarrow)."""
    if importlib.util.find_spec("pyarrow") is None:
        raise SystemExit(
            f"the {SOURCE} files on the Hugging Face hub are parquet, which needs pyarrow: "
            f"`pip install pyarrow`, or download the raw GSM8K train.jsonl and test.jsonl "
            f"({_RAW_FILES_URL}) and pass --TRAIN_FILE=... --TEST_FILE=...")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise SystemExit("downloading needs huggingface_hub: `pip install huggingface_hub`, "
                         "or pass the raw files with --TRAIN_FILE=... --TEST_FILE=...")
    from huggingface_hub import hf_hub_download
    import pyarrow.parquet

    filename = f"{CONFIG_NAME}/{split}-00000-of-00001.parquet"
    try:
        local_path = hf_hub_download(repo_id=SOURCE, filename=filename, repo_type="dataset")
    except Exception as exc:  # offline, unknown repository, missing file: all end the same way
        raise SystemExit(f"could not download {filename} from {SOURCE}: {exc}\n"
                         f"pass the raw GSM8K jsonl files with --TRAIN_FILE=... --TEST_FILE=... "
                         f"({_RAW_FILES_URL})") from None
    return pyarrow.parquet.read_table(local_path).to_pylist()


def _load_split(split: str, local_file: Path | None) -> list[dict]:
    if local_file is None:
        records, source = _download_records(split), f"{SOURCE} {split}"
    else:
        records, source = [record for _, record in iter_jsonl(local_file)], str(local_file)
    return [convert_gsm8k_record(record, index, source) for index, record in enumerate(records, 1)]


def main() -> None:
    paths = {split: Path(OUT_DIR) / f"gsm8k_{split}.jsonl" for split in ("train", "test")}
    for path in paths.values():  # before the download: both, or neither
        check_output(path, "OUT_DIR", OVERWRITE)
    try:
        test = _load_split("test", TEST_FILE)
        train, dropped = split_without_leakage(_load_split("train", TRAIN_FILE), test)
    except (GSM8KFormatError, DataError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"dropped {dropped} train problems whose question is also in the test split")
    for split, problems in (("train", train), ("test", test)):
        write_jsonl(paths[split], problems)
        print(f"wrote {len(problems)} problems to {paths[split]}")


if __name__ == "__main__":
    config = configure(globals())
    main()

"""Where a run's metrics go (LOGGER): always its JSONL file, plus TensorBoard and/or Weights & Biases.

    LOGGER = "jsonl"                    logs/RUN_NAME.jsonl only (what plot_metrics.py reads)
    LOGGER = "jsonl,tensorboard"        also event files in LOG_DIR/tensorboard/RUN_NAME
                                        (`tensorboard --logdir logs/tensorboard`)
    LOGGER = "tensorboard,wandb"        also a Weights & Biases run named RUN_NAME (project: the
                                        WANDB_PROJECT environment variable; WANDB_MODE=offline works)

The JSONL file is written whatever LOGGER says: it is the record the other tools read.  Each
record is one line there; TensorBoard and wandb get its numeric values at the record's "step".
TensorBoard needs the ``tensorboard`` package (torch.utils.tensorboard writes its format), wandb
the ``wandb`` package: neither is a dependency, and asking for one that is not installed stops
the run before it starts, saying what to install.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


LOGGERS = ("jsonl", "tensorboard", "wandb")


class LoggerUnavailableError(RuntimeError):
    """A LOGGER whose package is not installed (the message says what to install) or that is unknown."""


def parse_loggers(loggers: str | tuple[str, ...]) -> list[str]:
    """The logger names of a LOGGER value ("jsonl,tensorboard" or a tuple), jsonl always included."""
    names = [name.strip() for name in (loggers.split(",") if isinstance(loggers, str) else loggers) if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise LoggerUnavailableError(f"unknown LOGGER {', '.join(unknown)}; choose from {', '.join(LOGGERS)}")
    return ["jsonl"] + [name for name in LOGGERS[1:] if name in names]


def _finite_or_none(value):
    """JSON has no NaN or inf: a non-finite number is written as null (json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


class MetricsFileError(ValueError):
    """A metrics file with an unreadable line before its last (the message names the file and line)."""


def read_metrics(path: str | Path) -> list[tuple[str, dict]]:
    """(line, record) for each record of a metrics file. A last line that is not a JSON object is a write
    cut short (a killed process, a full disk): dropped, with a one-line warning; a bad line before it
    is refused, naming the file and line."""
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        elif index == len(lines) - 1:
            print(f"warning: {path}:{number}: the last line is cut short (a write that did not finish) and is left out")
        else:
            raise MetricsFileError(f"{path}:{number}: not a metrics record (a JSON object per line): {line[:60]!r}")
    return records


def _numeric(record: dict) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value)}


class MetricsLogger:
    """``log(record)`` writes a metrics record everywhere LOGGER says; ``close()`` ends the run.

    On ranks other than 0 nothing is written anywhere: their metrics are the same reduced
    numbers, and rank 0 alone logs them. ``start_step`` > 0: a resumed run, which keeps the lines up to its
    step of ``history`` (its own file, or for a branch under a new RUN_NAME the run it branches from; see _start)."""

    def __init__(self, path: str | Path, loggers: str | tuple[str, ...] = "jsonl", run_name: str | None = None,
                 config: dict | None = None, start_step: int = 0, is_main: bool = True,
                 history: str | Path | None = None):
        self.path = Path(path)
        self.loggers = parse_loggers(loggers)
        self.run_name, self.config = run_name or self.path.stem, config or {}
        self.file = self.tensorboard = self.wandb = None
        self.is_main = is_main
        self.kept, self.dropped = None, 0  # the lines kept, and how many of the history's are past start_step
        if not is_main:
            return
        # A resumed run keeps the lines up to its step; the file is only rewritten at the first record (start):
        # a run that stops before its first step (a check failing) leaves it as it was.
        history = Path(history) if history is not None else self.path
        if start_step > 0 and history.exists():
            try:
                records = read_metrics(history)
            except MetricsFileError as error:
                raise LoggerUnavailableError(str(error)) from None
            self.kept = [line for line, record in records if record.get("step", 0) <= start_step]
            self.dropped = len(records) - len(self.kept)
        if "tensorboard" in self.loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise LoggerUnavailableError("LOGGER=tensorboard needs the tensorboard package: "
                                             "`.venv/bin/pip install tensorboard` (or drop it from LOGGER)") from None
        if "wandb" in self.loggers:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise LoggerUnavailableError("LOGGER=wandb needs the wandb package: `.venv/bin/pip install wandb`, "
                                             "then `wandb login` (or WANDB_MODE=offline), or drop it from LOGGER"
                                             ) from None

    def _start(self) -> None:
        """Open everything LOGGER names: the JSONL file anew for a new run; for a resumed one its kept
        lines, written to a temporary file that replaces it (a crash leaves the old file or the new)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.kept is not None:
            temporary = self.path.with_name(f".{self.path.name}.tmp")
            temporary.write_text("".join(line + "\n" for line in self.kept))
            os.replace(temporary, self.path)
            self.file = self.path.open("a")
        else:
            self.file = self.path.open("w")
        if "tensorboard" in self.loggers:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=str(self.path.parent / "tensorboard" / self.run_name))
        if "wandb" in self.loggers:
            import wandb
            self.wandb = wandb.init(name=self.run_name, config=self.config, dir=str(self.path.parent))

    def log(self, record: dict) -> None:
        """One line of the JSONL file (flushed: a crash keeps every step so far), and the numeric values
        at record["step"] for TensorBoard and wandb."""
        if not self.is_main:
            return
        if self.file is None:
            self._start()
        self.file.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")
        self.file.flush()
        values, step = _numeric(record), record.get("step")
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, global_step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
from pathlib import Path
from typing import TextIO


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


def _open_jsonl(path: Path, start_step: int) -> TextIO:
    """The JSONL file, folders created: written anew for a new run; for a run resumed at ``start_step``
    its lines up to that step are kept and the file continues after them, so no step is logged twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if start_step > 0 and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
        return path.open("a")
    return path.open("w")


def _numeric(record: dict) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value)}


class MetricsLogger:
    """``log(record)`` writes a metrics record everywhere LOGGER says; ``close()`` ends the run.

    On ranks other than 0 nothing is written anywhere: their metrics are the same reduced
    numbers, and rank 0 alone logs them. ``start_step`` > 0: a resumed run (see _open_jsonl)."""

    def __init__(self, path: str | Path, loggers: str | tuple[str, ...] = "jsonl", run_name: str | None = None,
                 config: dict | None = None, start_step: int = 0, is_main: bool = True):
        path = Path(path)
        self.loggers = parse_loggers(loggers)
        self.file = self.tensorboard = self.wandb = None
        if not is_main:
            return
        self.file = _open_jsonl(path, start_step)
        run_name = run_name or path.stem
        if "tensorboard" in self.loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LoggerUnavailableError("LOGGER=tensorboard needs the tensorboard package: "
                                             "`.venv/bin/pip install tensorboard` (or drop it from LOGGER)") from None
            self.tensorboard = SummaryWriter(log_dir=str(path.parent / "tensorboard" / run_name))
        if "wandb" in self.loggers:
            try:
                import wandb
            except ImportError:
                raise LoggerUnavailableError("LOGGER=wandb needs the wandb package: `.venv/bin/pip install wandb`, "
                                             "then `wandb login` (or WANDB_MODE=offline), or drop it from LOGGER"
                                             ) from None
            self.wandb = wandb.init(name=run_name, config=config or {}, dir=str(path.parent))

    def log(self, record: dict) -> None:
        """One line of the JSONL file (flushed: a crash keeps every step so far), and the numeric values
        at record["step"] for TensorBoard and wandb."""
        if self.file is None:
            return
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

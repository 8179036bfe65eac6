"""A training run's bookkeeping: the plumbing every trainer shares, apart from its algorithm.

CleanRL's split: the algorithm stays inline in each script, in plain sight; what surrounds it
lives here, once.

  run folder + lock  CHECKPOINT_DIR/RUN_NAME/ and LOG_DIR/RUN_NAME.jsonl belong to one run (RUN_NAME a plain
                     name, both resolving inside their folders). A new run on a name that already holds one
                     is refused before the model loads (offering RESUME where there is a checkpoint, another
                     RUN_NAME or OVERWRITE=true, which removes only what a run writes, RUN_FILES, once the
                     steps start); a second process on a running run is refused (a lock file beside the run
                     folder and the metrics file, holding host and PID; the lock of a dead process of this
                     host is taken over, another host's never); the temporary files of a killed save are removed.
                     A lock file that cannot be removed (a folder turned read-only) is said, never raised.
  preflight          before the model loads: the folders are writable, the model directory is complete,
                     RESUME and INIT_LORA are not both given.
  history            a run folder holds one line of history. RESUME of a checkpoint older than the folder's
                     newest is refused, offering a branch under a new RUN_NAME (--RUN_NAME=<name>-from-step<N>:
                     a new folder and metrics file, which starts with the lines up to step N copied from the
                     resumed run's) or OVERWRITE=true, which moves the later checkpoints and metrics lines into
                     RUN_NAME/abandoned-<time>/ when the steps start, never deletes them; a resume under another
                     RUN_NAME is a branch, whose folder must be new as a new run's.
  resume             settings the restored state would override (the optimizer's learning rates and weight
                     decay, the schedule) follow this run's constants; settings a resume cannot change (the
                     LoRA layout, the group size, ...) are refused, one line each; every other change is
                     applied and printed.
  metrics log        common.metrics_log.MetricsLogger (LOGGER): one JSON object per line, non-finite
                     numbers as null; a resumed run drops the lines past its checkpoint's step when it
                     writes its first step (a resume that fails its checks leaves the file as it was): with no
                     later checkpoint these are steps no checkpoint kept, done again, and a line says so.
  cadence            an eval at step 0, every EVAL_EVERY steps and at the end; a checkpoint every
                     SAVE_EVERY steps, SAVE_EVERY_MINUTES after the last, at the end of each epoch and of
                     the run; only the newest KEEP_CHECKPOINTS kept (0: all). Weights that exploded (a NaN, an
                     inf, an entry over common.checkpoint.WEIGHT_BOUND) are never saved: the run stops there,
                     one line naming LR, the last good checkpoint kept. A save that fails (a full disk,
                     a folder turned read-only) is one line: what failed, that the earlier checkpoints are
                     intact, the command that continues, and a lock file that could not be removed.
  stop signals       SIGINT (Ctrl-C), SIGTERM, SIGBREAK: the step in flight ends, is saved, one line names
                     the checkpoint and the command that continues it, and the run exits 128 + the signal's
                     number; every rank stops at the same step (end_step). A second signal ends it at once.
  non-finite guard   an update whose loss or gradient norm is not finite never reaches the weights; it
                     is skipped and counted (skipped_updates, kept across a resume).
  health             each step's metrics (and each eval's) go to common.health.HealthMonitor: a symptom of a
                     run going wrong is printed as one `health:` line per episode (rank 0), naming the
                     constant to change; HEALTH=stop also ends the run at that step, saved, with exit status
                     3 (every rank at the same step, end_step); the end of the run lists the symptoms seen.
  loss scaling       an fp16 model (DTYPE=auto on a V100, T4, RTX 20xx) scales the loss before backward
                     (LossScaler: torch.amp.GradScaler); the trainers call loss_scaler.backward(loss),
                     loss_scaler.unscale_gradients(optimizer) before clipping and loss_scaler.step(optimizer),
                     which are plain backward / nothing / optimizer.step() for every other dtype; the run
                     saves and restores its scale.
  batch sizes        the sizes in use (common/oom.py's BatchSizes, which an out-of-memory error halves) are
                     saved in every checkpoint; a resume keeps them, unless it gives their constant a new value.

What a run sets up before its first step (questions, the context fit, the memory plan, the model, the
eval settings) is common/run_setup.py's: plain functions the script calls with its constants.
"""

from __future__ import annotations

import atexit
import errno
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch
from tqdm import tqdm
from transformers import AutoConfig

from common.checkpoint import (WEIGHT_BOUND, CheckpointError, checkpoint_path, checkpoint_step, exploded_weights,
                               list_checkpoints, load_checkpoint, remove_stale_temporary_files,
                               resolve_checkpoint, restore_training_state, save_checkpoint, weights_to_check)
from common.distributed import DistributedContext, all_reduce_max, cleanup, gather_rank_states, restore_rank_state
from common.errors import UserError
from common.health import HEALTH_EXIT_STATUS, HealthMonitor
from common.lora import lora_modules
from common.metrics_log import LoggerUnavailableError, MetricsFileError, MetricsLogger, read_metrics
from common.model import check_model_dir, resolve_model_path
from common.oom import BatchSizes

# Settings that name where a run's files go, not what it computes: free on resume.
RUN_LOCATION_SETTINGS = ("RESUME", "INIT_LORA", "RUN_NAME", "CHECKPOINT_DIR", "LOG_DIR", "OVERWRITE")
LOCK_FILE = ".lock"
# What a run writes in its folder: its checkpoints, their temporary files (common.checkpoint), its lock,
# check_writable's probe and the steps a resume with OVERWRITE=true moved aside. OVERWRITE=true removes these,
# and never anything else.
RUN_FILES = ("lora_epoch*_step*.pt", ".*.tmp", LOCK_FILE, ".write-probe-*", "abandoned-*")
# The signals that ask a run to stop: Ctrl-C, `kill`, `docker stop`, a scheduler's preemption, and Ctrl-Break.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ())
# A second signal this soon after the first is the same interruption: a Ctrl-C reaches every process of the
# terminal's group, and torchrun forwards the one it received to its workers once more.
SAME_INTERRUPTION_S = 2.0


def device_clock(device: torch.device) -> float:
    """time.perf_counter() once ``device`` has done the work queued so far (CUDA: synchronize), so
    that a phase timed between two calls is charged its own kernels, not the next phase. One sync
    per phase, a few per step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device: torch.device) -> dict:
    """CUDA: the peaks since the last reset (reset_peak_memory), in GB of 2^30 bytes, as the memory
    plan counts: allocated (live tensors) and reserved (what the caching allocator holds, the CUDA-graph
    pool included). Elsewhere: nothing (no such counters)."""
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2 ** 30}


class RunError(UserError):
    """A run that must not start: the message is printed as ``error: ...`` and the exit status is 1."""


def _refuse_outside(path: Path, folder: str | Path, name: str) -> None:
    """A run's file must lie inside its folder, links resolved (RUN_NAME is checked to be a plain name; a
    link of that name pointing elsewhere is refused here)."""
    if Path(folder).resolve() not in path.resolve().parents:
        raise RunError(f"{path} resolves to {path.resolve()}, outside {name} {folder}: give a RUN_NAME whose "
                       f"folder and metrics file lie inside it")


def check_writable(directory: str | Path, what: str) -> Path:
    """Create ``directory`` if needed and prove it writable (a probe file made and removed), so that a
    bad folder fails now and not at the first save, hours later."""
    directory = Path(directory)
    for folder in (directory, *directory.parents):  # mkdir would say "File exists" or "Not a directory"
        if folder.exists() and not folder.is_dir():
            raise RunError(f"{what} {directory}: {folder} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        raise RunError(f"{what} {directory} is not writable: {error.strerror or error}") from None
    return directory


def check_output(path: str | Path, name: str, overwrite: bool, *, folder: bool = False,
                 companions: tuple[Path, ...] = ()) -> Path:
    """Before any work: the output of a script's constant ``name``, ``path`` (a file, or with ``folder`` a
    folder) and the files written beside it (``companions``: its .summary.json), can be written: the folder
    is writable (check_writable, which creates it) and, unless ``overwrite``, nothing is there yet (an
    empty folder is nothing). One line naming the constant, the path and what would work, rather than a
    traceback once the work is done, or a silent replacement. An output folder itself is left to its writer,
    so that a script refused later (a bad checkpoint) leaves no empty folder behind."""
    path = Path(path)
    try:
        check_writable(path.parent, f"{name}={path}: the folder")
    except RunError as error:
        raise RunError(f"{error}; give --{name} a path you can write") from None
    for output in (path, *companions):
        what = f"{name}={path}" if output == path else f"{name}={path}: the file beside it, {output},"
        wants_folder = folder and output == path
        if output.exists() and output.is_dir() != wants_folder:
            raise RunError(f"{what} is a {'folder' if output.is_dir() else 'file'}, where a "
                           f"{'folder' if wants_folder else 'file'} is written; give another --{name}")
        if not overwrite and output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise RunError(f"{what} exists; give another --{name}, or replace it with --OVERWRITE=true")
        if output.is_file() and not os.access(output, os.W_OK):
            raise RunError(f"{what} exists and is not writable; give another --{name}")
    return path


def stop_quietly_on_signal(written: list[Path], outputs: list[Path]) -> None:
    """A script that is not a training run (an eval, the DPO pairs, a soup), which writes ``outputs``
    at its end and appends each to ``written`` once written: a stop signal (STOP_SIGNALS) ends it at once
    with one line, the signal and what it kept, and the exit status 128 + the signal's number. The
    exception unwinds the script, so a file in mid-write is removed where its writer cleans up
    (write_jsonl, atomic_torch_save)."""

    def stop(signal_number: int, frame) -> None:
        missing = [str(path) for path in outputs if path not in written]
        kept = "nothing written" if not written else f"kept {', '.join(map(str, written))}"
        kept += f" ({', '.join(missing)} not written)" if written and missing else ""
        # os.write, not print: a handler that prints while the script is printing raises a reentrant-call error.
        os.write(2, f"\n{signal.Signals(signal_number).name}: stopped; {kept}\n".encode())
        raise SystemExit(128 + signal_number)

    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, stop)


def preflight_model(path: str | Path) -> Path:
    """The model directory (a Hub id is downloaded first: common.model.resolve_model_path), once checked
    complete (check_model_dir); else the run stops here with the message alone: what is missing, how to
    get it."""
    try:
        path = resolve_model_path(path)
        check_model_dir(path)
    except FileNotFoundError as error:
        raise RunError(str(error)) from None
    return path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running, on every platform (psutil.pid_exists: on
    Windows it opens the process and reads its exit code, never a signal, which would end it)."""
    return psutil.pid_exists(pid)


def read_lock_owner(path: Path) -> tuple[str | None, int]:
    """(host, PID) of a lock file: a JSON {"host", "pid"}, or a bare PID (a lock of an older version,
    host unknown); (None, 0) for an unreadable one."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None, 0
    try:
        owner = json.loads(text)
        if isinstance(owner, int):
            return None, owner
        return str(owner["host"]), int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return None, 0


class RunLock:
    """Lock files holding the host and PID of the process that runs a run, one beside each thing it
    writes (its run folder, its metrics file): of two runs sharing either, the second is refused.
    ``O_CREAT | O_EXCL`` makes taking each atomic: of two processes starting at once, one wins. The
    lock of a dead process of this machine is taken over; one taken on another machine (a shared
    folder) never is: its PID says nothing here."""

    def __init__(self, *paths: Path):
        self.paths = [Path(path) for path in paths]
        self.held: list[Path] = []
        self.host = socket.gethostname()

    @property
    def path(self) -> Path:
        return self.paths[0]

    def acquire(self) -> None:
        try:
            for path in self.paths:
                self._take(path)
                self.held.append(path)
        except BaseException:
            self.release()
            raise
        atexit.register(self.release)

    def _take(self, path: Path) -> None:
        for _ in range(2):  # the second try after removing a stale lock
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                host, owner = read_lock_owner(path)
                where = path.parent if path.name == LOCK_FILE else path.with_name(path.name[1:-len(".lock")])
                if host not in (None, self.host):
                    raise RunError(f"{where} is in use by process {owner} on host {host} (lock file {path}); "
                                   f"if that run has ended, delete the lock file, or choose another --RUN_NAME"
                                   ) from None
                if owner and process_alive(owner):
                    raise RunError(f"{where} is in use by process {owner} (lock file {path}); wait for it, or "
                                   f"choose another --RUN_NAME") from None
                print(f"taking over the stale lock {path} (process {owner or '?'} is gone)")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as lock_file:
                lock_file.write(json.dumps({"host": self.host, "pid": os.getpid()}) + "\n")
            return
        raise RunError(f"could not take the lock {path}")

    def release(self) -> list[str]:
        """Remove the lock files held. One that cannot be removed (its folder turned read-only) is returned
        as "path (why)", never raised: the caller says it in its own line, and atexit stays quiet."""
        failed = []
        while self.held:
            path = self.held.pop()
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                failed.append(f"{path} ({error.strerror or error})")
        return failed


class LossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training"; torch.amp.GradScaler)
    for an fp16 base under fp32 LoRA masters: fp16 keeps 5 exponent bits, so activation gradients
    below ~6e-8 flush to zero in the base's backward. The loss is multiplied by a scale S before
    backward, the fp32 master gradients divided by S before clipping; an overflow (a non-finite
    gradient) skips the update and halves S, and S doubles after 2000 updates without one.

    Every other dtype: disabled, and each method is what the trainers did without it."""

    def __init__(self, model_dtype: torch.dtype, device: torch.device):
        self.enabled = model_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """The true gradients (divided by S), for clipping and for the gradient norm: call once per
        update, after any all-reduce and before clip_grad_norm_."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step() on the unscaled gradients, then S's update."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def skip(self) -> str:
        """After an update the non-finite guard skipped: halve S (an fp16 overflow is what loss scaling
        expects now and then, and what brings S down to where gradients fit). What to tell the user."""
        if not self.enabled:
            return ""
        self.scaler.update()
        return f"; fp16 loss scale now {self.scaler.get_scale():g}"

    def metrics(self) -> dict:
        """The loss scale, a metric of every step while scaling (one host sync); nothing when disabled."""
        return {"loss_scale": self.scaler.get_scale()} if self.enabled else {}


class TrainingRun:
    """The bookkeeping of one trainer run; see the module docstring. Constructed right after
    ``configure`` and ``setup_distributed``, before the model loads, so that every refusal costs
    nothing. It reads no setting by name: the script hands it what it needs (here, in track and in
    steps). ``config`` is the resolved config: printed, stored in every checkpoint, and compared with a
    resumed run's, where ``fixed_on_resume`` names the settings a resume cannot change (the LoRA layout,
    the seed, the group size, ...). ``run_dir`` overrides CHECKPOINT_DIR/RUN_NAME (run_sft.py's OUT_DIR)."""

    def __init__(self, trainer: str, config: dict, distributed: DistributedContext, *, model_path: str | Path,
                 run_name: str, log_dir: str | Path, logger: str, overwrite: bool, checkpoint_dir: str | Path = "",
                 resume: Path | None = None, init_lora: Path | None = None, fixed_on_resume: tuple[str, ...] = (),
                 run_dir: str | Path | None = None):
        self.trainer = trainer
        self.config = config  # printed at start, stored in every checkpoint, compared on resume
        self.distributed = distributed
        self.name = run_name
        self.run_dir = Path(run_dir) if run_dir is not None else Path(checkpoint_dir) / self.name
        self.metrics_path = Path(log_dir) / f"{self.name}.jsonl"
        self.tensorboard_dir = Path(log_dir) / "tensorboard" / self.name
        if run_dir is None:
            _refuse_outside(self.run_dir, checkpoint_dir, "CHECKPOINT_DIR")
        _refuse_outside(self.metrics_path, log_dir, "LOG_DIR")
        self.overwrite = overwrite
        self.skipped_updates = 0
        self.stop_signal = 0  # the signal that asked the run to stop (0: none yet)
        self.health = HealthMonitor("off")  # steps() gives the script's HEALTH
        self.in_steps = False
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            for signal_number in STOP_SIGNALS:
                signal.signal(signal_number, self._on_signal)
        self.overwritten: list[Path] = []  # an earlier run's files, removed when this run starts its steps
        # (folder, checkpoints, metrics lines) of the steps after a resumed older checkpoint, moved there at the start
        self.abandoned: tuple[Path, list[Path], list[str]] | None = None
        self.loss_scaler = LossScaler(torch.float32, torch.device("cpu"))  # disabled until track gives the model's
        self.sizes: BatchSizes | None = None  # the batch sizes in use, once track gives them
        # One lock for all the run writes: its folder, and its metrics file (which two runs with one RUN_NAME
        # and two CHECKPOINT_DIRs would share).
        self.lock = RunLock(self.run_dir / LOCK_FILE, self.metrics_path.with_name(f".{self.metrics_path.name}.lock"))
        if resume is not None and init_lora is not None:
            raise RunError("RESUME continues a run, INIT_LORA starts a new one from a LoRA: give one of them")
        try:
            self.checkpoint = load_checkpoint(resume) if resume is not None else None
            self.resume_path = resolve_checkpoint(resume) if resume is not None else None  # a folder's newest
        except (CheckpointError, FileNotFoundError) as error:
            raise RunError(str(error)) from None
        if self.checkpoint is not None:
            saved_trainer = self.checkpoint["extra"].get("trainer", trainer)
            if saved_trainer != trainer:
                raise RunError(f"{resume} is a checkpoint of a {saved_trainer} run: a {trainer} run "
                               f"cannot continue it (start a new run from its LoRA with --INIT_LORA instead)")
            if self.checkpoint.get("optimizer") is None:
                raise RunError(f"{resume} holds no optimizer state (a model_soup.py soup, or an adapter), "
                               f"so no run can continue it: start a new run from it with --INIT_LORA instead")
            self._refuse_fixed_settings(fixed_on_resume)
            self.skipped_updates = self.checkpoint["extra"].get("skipped_updates", 0)
        self.start_step = self.checkpoint["step"] if self.checkpoint is not None else 0
        # A checkpoint resumed into another run folder (another RUN_NAME or CHECKPOINT_DIR) starts a branch: a new
        # run, whose metrics file starts with the resumed run's lines up to the checkpoint's step: its metrics
        # file in this run's LOG_DIR, else where the resumed run wrote it (its LOG_DIR as it recorded it).
        self.branch = (self.checkpoint is not None and self.resume_path.parent.resolve() != self.run_dir.resolve())
        history = self.metrics_path
        if self.branch:
            saved = self.checkpoint["config"]
            name = f"{saved.get('RUN_NAME', self.resume_path.parent.name)}.jsonl"
            history = next((path for path in (self.metrics_path.parent / name, Path(saved.get("LOG_DIR", ".")) / name)
                            if path.is_file()), self.metrics_path.parent / name)
        if distributed.is_main:
            self._claim()
            if self.branch:
                print(f"resume: a branch of {self.resume_path.parent} at step {self.start_step}, as the new run "
                      f"{self.name!r}: " + (f"{self.metrics_path} starts with the lines up to step {self.start_step} "
                                            f"of {history}" if history.is_file() else
                                            f"{history} not found, {self.metrics_path} starts at step "
                                            f"{self.start_step + 1}"))
        self.model_path = preflight_model(model_path)
        self.model_config = AutoConfig.from_pretrained(self.model_path)
        self.generators: dict[str, torch.Generator] = {}  # the run's random generators (random_generator)
        try:
            self.metrics = MetricsLogger(self.metrics_path, logger, self.name, config, start_step=self.start_step,
                                         is_main=distributed.is_main, history=history)
        except LoggerUnavailableError as error:
            raise RunError(str(error)) from None
        if self.metrics.dropped and not self.branch and self.abandoned is None:
            print(f"resume: {self.metrics.dropped} line(s) of {self.metrics_path} come after step {self.start_step}, "
                  f"the run's newest checkpoint: steps no checkpoint kept, which this run does again and logs anew")
        self._state: dict = {}

    # ----------------------------------------------------------------- start
    def _files(self) -> tuple[list[Path], list[Path]]:
        """(what an earlier run on this name wrote, anything else in the run folder). A run writes its
        checkpoints, their temporary files and its lock in the run folder (run_sft.py a whole model,
        marked by its sft_info.json), and its metrics file, its lock and its TensorBoard folder in LOG_DIR."""
        in_folder = sorted(self.run_dir.iterdir()) if self.run_dir.is_dir() else []
        whole_model = (self.run_dir / "sft_info.json").is_file()
        # LOG_DIR may be the run folder itself: its metrics file, its lock and TensorBoard folder are the run's.
        in_log_dir = [self.metrics_path, self.tensorboard_dir, *self.lock.paths]
        ours = [path for path in in_folder if whole_model or path in in_log_dir
                or any(path.match(pattern) for pattern in RUN_FILES)]
        others = [path for path in in_folder if path not in ours]
        ours += [path for path in (self.metrics_path, self.tensorboard_dir) if path.exists() and path not in ours]
        return ours, others

    def _claim(self) -> None:
        check_writable(self.run_dir.parent, "CHECKPOINT_DIR")
        check_writable(self.metrics_path.parent, "LOG_DIR")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        removed = remove_stale_temporary_files(self.run_dir)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of a killed save in {self.run_dir}")
        check_writable(self.run_dir, "the run folder")
        if self.checkpoint is not None and not self.branch:
            self._check_history()
            return
        ours, others = self._files()  # a new run, or a branch: its name must be free
        if others:
            self.lock.release()
            shown = ", ".join(path.name for path in others[:3]) + (f", ... ({len(others)} in all)"
                                                                    if len(others) > 3 else "")
            raise RunError(f"the run folder {self.run_dir} holds files that no run wrote ({shown}): a run, and "
                           f"OVERWRITE=true, touch only a run's own files; move them, or choose another "
                           f"--RUN_NAME or CHECKPOINT_DIR")
        earlier = [path for path in ours if path not in self.lock.paths and not (path == self.metrics_path
                                                                                 and not path.stat().st_size)]
        if not earlier:
            return
        listing = ", ".join(str(path) for path in earlier[:4]) + (f", ... ({len(earlier)} in all)"
                                                                  if len(earlier) > 4 else "")
        if not self.overwrite:
            self.lock.release()
            resume = (f"Continue it with --RESUME={self.run_dir} (its newest checkpoint), "
                      if list_checkpoints(self.run_dir) else "")
            raise RunError(f"run {self.name!r} already exists: {listing}. {resume}"
                           f"{'c' if resume else 'C'}hoose another --RUN_NAME, or replace it with --OVERWRITE=true")
        self.overwritten = earlier  # removed when the steps start: a check that fails before then loses nothing
        print(f"OVERWRITE=true: the earlier run {self.name!r} will be replaced when this one starts: {listing}")

    def _remove_overwritten(self) -> None:
        for path in self.overwritten:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if self.overwritten:
            print(f"OVERWRITE=true: removed {len(self.overwritten)} file(s) of the earlier run {self.name!r}")
        self.overwritten = []

    def _check_history(self) -> None:
        """A resume in its own run folder continues the run's one line of history: a checkpoint with later
        ones beside it is refused (before any work), offering a branch under a new RUN_NAME, or with
        OVERWRITE=true its later checkpoints and metrics lines are moved aside when the steps start."""
        step = self.start_step
        later = [path for path in list_checkpoints(self.run_dir) if checkpoint_step(path) > step]
        if not later:
            return
        newest = checkpoint_step(later[-1])
        if not self.overwrite:
            self.lock.release()
            raise RunError(f"{self.resume_path} is step {step} of run {self.name!r}, which went on to step {newest} "
                           f"({len(later)} later checkpoint(s)): resuming it here would mix two histories. Continue "
                           f"it as a branch with --RUN_NAME={self.name}-from-step{step}, or move steps "
                           f"{step + 1}-{newest} aside with --OVERWRITE=true")
        try:
            lines = [line for line, record in read_metrics(self.metrics_path) if record.get("step", 0) > step
                     ] if self.metrics_path.is_file() else []
        except MetricsFileError as error:
            self.lock.release()
            raise RunError(str(error)) from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.run_dir / f"abandoned-{stamp}"
        for number in range(1, 1000):  # a second resume within the same second
            if not aside.exists():
                break
            aside = self.run_dir / f"abandoned-{stamp}-{number}"
        self.abandoned = (aside, later, lines)  # moved when the steps start: a check that fails before loses nothing
        print(f"OVERWRITE=true: steps {step + 1}-{newest} of run {self.name!r} ({len(later)} checkpoint(s), "
              f"{len(lines)} metrics line(s)) will be moved to {aside} when this run starts, not deleted")

    def _move_abandoned(self) -> None:
        """The later checkpoints and the metrics lines past the resumed step go to the abandoned-* folder, out
        of --RESUME's and --LORA_CKPT's reach (common.checkpoint.list_checkpoints looks in the run folder only)."""
        if self.abandoned is None:
            return
        aside, later, lines = self.abandoned
        aside.mkdir()
        for path in later:
            os.replace(path, aside / path.name)
        if lines:
            (aside / self.metrics_path.name).write_text("".join(line + "\n" for line in lines))
        print(f"OVERWRITE=true: moved {len(later)} checkpoint(s) and {len(lines)} metrics line(s) of the "
              f"abandoned steps to {aside}")
        self.abandoned = None

    def _refuse_fixed_settings(self, fixed: tuple[str, ...]) -> None:
        saved = self.checkpoint["config"]
        for name in fixed:
            if name in self.config and name in saved and saved[name] != self.config[name]:
                raise RunError(f"{name}={self.config[name]!r} differs from the resumed run's {saved[name]!r}, "
                               f"and a resume cannot change it: resume with {name}={saved[name]!r}, or start a "
                               f"new run")
        changed = [f"{name}: {saved.get(name)!r} -> {value!r}" for name, value in self.config.items()
                   if name not in RUN_LOCATION_SETTINGS and name in saved and saved[name] != value]
        if self.distributed.is_main:
            for line in changed:
                print(f"resume: {line} (applied from step {self.checkpoint['step']} on)")

    def track(self, model, optimizer, scheduler, loss_scaler: LossScaler, evaluate: Callable | None = None,
              extra: Callable[[], dict] | None = None, save: Callable[[int], Path] | None = None,
              sizes: BatchSizes | None = None) -> None:
        """What a save writes, a resume restores and an eval reads: the model (its LoRA), the optimizer,
        the scheduler and the loss scaler. ``evaluate(step)`` returns an EvalResult; ``extra()`` what
        the trainer adds to a checkpoint (a critic's weights, say); ``save(step)``, when given, writes
        the run's output instead of a LoRA checkpoint (run_sft.py's full model); ``sizes``, the batch
        sizes in use (common.oom: smaller after an out-of-memory error), saved and kept on resume."""
        self.device = next(model.parameters()).device
        self.loss_scaler = loss_scaler
        self.sizes = sizes
        self._state = dict(model=model, optimizer=optimizer, scheduler=scheduler, evaluate=evaluate,
                           extra=extra or dict, save=save)

    def random_generator(self, name: str, seed: int, device: torch.device) -> torch.Generator:
        """A random generator of the run (the rollouts' sampling: SEED + rank, so that each rank samples
        its own completions), saved in every checkpoint and restored on resume with the others."""
        generator = torch.Generator(device=device).manual_seed(seed)
        self.generators[name] = generator
        return generator

    def restore(self) -> None:
        """A resumed run's optimizer, scheduler, loss scale and random states (the tracked ones), then
        the optimizer gets this run's hyperparameters back (LR, WEIGHT_DECAY, ...: load_state_dict
        would bring back the old ones) and the scheduler this run's peak learning rates. The schedule's
        shape (warm-up, decay, total steps) is the lr_lambda's, built from this run's constants."""
        if self.checkpoint is None:
            return
        optimizer, scheduler, loss_scaler = self._state["optimizer"], self._state["scheduler"], self.loss_scaler
        hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                           for group in optimizer.param_groups]
        restore_training_state(self.checkpoint, optimizer, scheduler)
        if loss_scaler.enabled and self.checkpoint["extra"].get("loss_scaler"):
            loss_scaler.scaler.load_state_dict(self.checkpoint["extra"]["loss_scaler"])
        restore_rank_state(self.checkpoint, self.distributed, self.generators)
        if self.sizes is not None:
            saved_config = self.checkpoint["config"]
            self.sizes.load_state_dict(self.checkpoint["extra"].get("batch_sizes", {}), unchanged=[
                name for name in self.sizes.sizes if self.config.get(name) == saved_config.get(name)])
        for group, wanted in zip(optimizer.param_groups, hyperparameters):
            group.update(wanted)
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        print(f"resumed {self.resume_path} at step {self.start_step}")

    # ----------------------------------------------------------------- loop
    def steps(self, total_steps: int, steps_per_epoch: int | None, *, eval_every: int, save_every: int,
              save_every_minutes: float, keep_checkpoints: int, health: str) -> Iterator[int]:
        """The steps still to run (0-based), under a tqdm bar; an eval at step 0 of a new run first. From
        here on, an earlier run OVERWRITE replaces is gone, and a stop signal ends the run at the end of
        the step in flight, saved (end_step). The cadence: an eval every ``eval_every`` steps and at the
        end (0: none), a checkpoint every ``save_every`` steps (0: at the ends of epochs and of the run),
        ``save_every_minutes`` after the last save (0: by steps only), the newest ``keep_checkpoints``
        kept (0: all). ``steps_per_epoch`` None: a stream without epochs (run_sft.py's synthetic problems).
        ``health``: HEALTH, what end_step does with a symptom of the run going wrong (common/health.py):
        warn (print its line), stop (print it, save and stop) or off (no checks)."""
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.eval_every, self.save_every = eval_every, save_every
        self.save_every_minutes, self.keep_checkpoints = save_every_minutes, keep_checkpoints
        self.health = HealthMonitor(health)
        self.started = self.last_save = time.perf_counter()
        self._remove_overwritten()
        self._move_abandoned()
        self.in_steps = True
        if self.eval_every and self.start_step == 0:
            baseline = {"step": 0, **self.evaluate(0)}
            self.metrics.log(baseline)
            self.health.observe(baseline)  # where the eval accuracy starts
        bar = tqdm(range(self.start_step, total_steps), desc=self.trainer, unit="step", initial=self.start_step,
                   total=total_steps, disable=not self.distributed.is_main)
        self.bar = bar
        for step in bar:
            self.step_started = time.perf_counter()
            if self.device.type == "cuda":  # each step's peaks: peak_memory_gb in end_step
                torch.cuda.reset_peak_memory_stats(self.device)
            yield step

    def _on_signal(self, signal_number: int, frame) -> None:
        """The first stop signal is noted (end_step acts on it); a later one ends the process at once.
        os.write, not print: a handler that prints while the loop is printing raises a reentrant-call error."""
        name = signal.Signals(signal_number).name
        if not self.in_steps:  # nothing trained yet: nothing to save
            os.write(2, f"\n{name}: stopped before the first step (nothing to save)\n".encode())
            self.lock.release()
            raise SystemExit(128 + signal_number)
        if not self.stop_signal:
            self.stop_signal, self.signalled_at = signal_number, time.monotonic()
            os.write(2, f"\n{name}: stopping at the end of this step, then saving (send it again to stop at "
                        f"once, without saving)\n".encode())
        elif time.monotonic() - self.signalled_at > SAME_INTERRUPTION_S:
            os.write(2, f"\n{name} again: stopped at once, without saving\n".encode())
            self.lock.release()
            os._exit(128 + signal_number)

    def step_seconds(self) -> float:
        """Wall clock since the current step began."""
        return time.perf_counter() - self.step_started

    def check_divides(self, count: int, name: str) -> None:
        if count % self.distributed.world_size:
            raise RunError(f"{name}={count} does not divide between {self.distributed.world_size} processes; "
                           f"make it a multiple of the number of processes")

    def update_is_finite(self, step: int, *values: float) -> bool:
        """True when every value (losses, gradient norms) is finite; else counts a skipped update. The
        values are reduced over the ranks, so every rank decides the same."""
        if all(math.isfinite(value) for value in values):
            return True
        self.skipped_updates += 1
        scale = self.loss_scaler.skip()
        tqdm.write(f"step {step}: non-finite loss or gradient; update skipped ({self.skipped_updates} so far{scale})")
        return False

    def end_step(self, step: int, metrics: dict) -> dict:
        """After step ``step`` (1-based): eval when due, the metrics line, a checkpoint when due: every
        SAVE_EVERY steps, at the end of an epoch and of the run, SAVE_EVERY_MINUTES after the last save,
        and when a stop signal came on any rank. Every rank decides alike: the clock and the signals are
        reduced over the ranks (one all-reduce, where the step already meets); a stop saves and exits
        with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as the signal would have.
        The metrics (the eval's included) go to the health monitor: its lines are printed by rank 0,
        and under HEALTH=stop a new symptom on any rank saves this step and exits with HEALTH_EXIT_STATUS."""
        metrics["skipped_updates"] = self.skipped_updates
        metrics.update(self.loss_scaler.metrics())  # the fp16 loss scale, when scaling
        metrics.update(peak_memory_gb(self.device))  # the step's, before the eval's
        if self.eval_every and (step % self.eval_every == 0 or step == self.total_steps):
            metrics.update(self.evaluate(step))
        metrics["elapsed_s"] = time.perf_counter() - self.started  # wall clock of the run so far, evals included
        self.metrics.log(metrics)
        symptoms = self.health.observe(metrics)
        if self.distributed.is_main:
            for line in symptoms:
                tqdm.write(line)
        clock_due = bool(self.save_every_minutes) and (time.perf_counter() - self.last_save
                                                       >= 60 * self.save_every_minutes)
        decided = all_reduce_max({"signal": self.stop_signal, "clock": clock_due,
                                  "health": bool(symptoms) and self.health.mode == "stop"})
        end_of_epoch = self.steps_per_epoch is not None and step % self.steps_per_epoch == 0
        if ((self.save_every and step % self.save_every == 0) or end_of_epoch or step == self.total_steps
                or decided["clock"] or decided["signal"] or decided["health"]):
            path = self.save(step)
            if decided["signal"]:
                self._stop(step, signal.Signals(int(decided["signal"])).name, 128 + int(decided["signal"]), path,
                           "continue it with")
            if decided["health"]:
                self._stop(step, "HEALTH=stop", HEALTH_EXIT_STATUS, path,
                           "change what the health line above names, then continue it with")
        return metrics

    def _stop(self, step: int, reason: str, status: int, path: Path | None, advice: str) -> None:
        """End a run stopped at ``step``, saved there (by a signal, or HEALTH=stop): one line naming the
        checkpoint and, after ``advice``, the command that continues it; then exit with ``status``."""
        if self.distributed.is_main:
            line = f"{reason}: stopped after step {step} of {self.total_steps}"
            if path is not None and path.suffix == ".pt":
                arguments = [arg for arg in sys.argv[1:] if not arg.startswith(("--RESUME=", "--OVERWRITE="))]
                launcher = (["torchrun", f"--nproc_per_node={self.distributed.world_size}"]
                            if self.distributed.world_size > 1 else ["python"])
                line += (f", saved {path}; {advice}: "
                         f"{shlex.join(launcher + [Path(sys.argv[0]).name, *arguments, f'--RESUME={path}'])}")
            elif path is not None:
                line += f", saved {path}"
            self.bar.close()
            print(line, flush=True)
        self.metrics.close()
        self.lock.release()
        cleanup()
        raise SystemExit(status)

    def evaluate(self, step: int) -> dict:
        result = self._state["evaluate"](step)
        tqdm.write(f"step {step} eval: {result.summary()}")
        return result.metrics()

    def save(self, step: int) -> Path | None:
        """Rank 0 writes the checkpoint, with every rank's random state (gathered: every rank calls this),
        once the weights are checked (_stop_if_exploded)."""
        state = self._state
        self._stop_if_exploded(step)
        rank_states = gather_rank_states(self.distributed, self.generators)
        if not self.distributed.is_main:
            return None
        if state["save"] is not None:
            path = state["save"](step)
            self.last_save = time.perf_counter()
            tqdm.write(f"saved {path}")
            return path
        epoch = step // self.steps_per_epoch if self.steps_per_epoch else 0
        try:
            path = save_checkpoint(checkpoint_path(self.run_dir, epoch, step), state["model"],
                                   self.model_path, self.config, state["optimizer"], state["scheduler"],
                                   epoch=epoch, step=step, generators=self.generators,
                                   extra={**state["extra"](), "trainer": self.trainer, "ranks": rank_states,
                                          "skipped_updates": self.skipped_updates,
                                          "batch_sizes": {} if self.sizes is None else self.sizes.state_dict(),
                                          "loss_scaler": self.loss_scaler.scaler.state_dict()})
        except OSError as error:
            raise RunError(self._save_failed(step, error)) from None
        self.last_save = time.perf_counter()
        tqdm.write(f"saved {path}")
        if self.keep_checkpoints:  # the newest KEEP_CHECKPOINTS by step, the one just written always among them
            others = [older for older in list_checkpoints(self.run_dir) if older != path]
            for older in others[:max(0, len(others) - (self.keep_checkpoints - 1))]:
                older.unlink()
        return path

    def _stop_if_exploded(self, step: int) -> None:
        """Stop the run, writing nothing, when the weights a save would write hold a NaN, an inf or an entry
        over WEIGHT_BOUND (common.checkpoint.exploded_weights): the LoRA and what the trainer adds (PPO's
        critic), or the whole model where the trainer saves one (run_sft.py). The last good checkpoint stays
        as it was, and KEEP_CHECKPOINTS removes none. Every rank checks its copy, and the ranks' verdicts are
        reduced (as end_step's decisions), so that all stop together."""
        model = self._state["model"]
        if self._state["save"] is not None:
            tensors = dict(model.named_parameters())
        else:
            lora = {f"{name}.{kind}": getattr(module, kind)
                    for name, module in lora_modules(model).items() for kind in ("lora_A", "lora_B")}
            tensors = weights_to_check(lora, self._state["extra"]())
        problem = exploded_weights(tensors)
        if not all_reduce_max({"exploded": problem is not None})["exploded"]:
            return
        earlier = list_checkpoints(self.run_dir) if self._state["save"] is None else [
            self.run_dir] * (self.run_dir / "sft_info.json").is_file()  # a whole model saved there
        kept = f"the last good checkpoint, {earlier[-1]}, is kept" if earlier else "no checkpoint of it was written"
        rates = "LR" + (" or CRITIC_LR" if problem and "critic" in problem and "CRITIC_LR" in self.config else "")
        raise RunError(f"step {step}: not saved: the weights exploded ({problem or 'on another rank'}; a healthy "
                       f"run's stay far below {WEIGHT_BOUND:.0e}); lower {rates} (LR={self.config.get('LR')}: AdamW "
                       f"moves each weight by about LR a step, whatever GRAD_CLIP={self.config.get('GRAD_CLIP')}); "
                       f"{kept}")

    def _save_failed(self, step: int, error: OSError) -> str:
        """The one line of a save that failed (a full disk; a run folder turned read-only, removed or replaced
        by a file): what failed, that the earlier checkpoints are intact, how to continue; the run ends
        here, so its lock is released, and a lock file that cannot be removed is said in the same line."""
        if error.errno == errno.ENOSPC:
            line = error.strerror  # names the file, the free space, the size, and the intact checkpoints
        else:
            line = (f"cannot write the checkpoint of step {step} in the run folder {self.run_dir}: "
                    f"{error.strerror or error}; not written, the earlier checkpoints are intact")
        saved = list_checkpoints(self.run_dir) if self.run_dir.is_dir() else []
        if saved:
            fix = "free some space" if error.errno == errno.ENOSPC else f"make {self.run_dir} writable"
            line += f"; {fix}, then continue with --RESUME={saved[-1]}"
        self.metrics.close()
        stuck = self.lock.release()
        if stuck:
            line += (f"; the lock file {', '.join(stuck)} could not be removed: delete it, or let the next run on "
                     f"this host take it over (its process is gone)")
        return line

    def finish(self) -> None:
        """The end of a run: its ``done:`` line, then the health monitor's list of the symptoms seen (a
        healthy run, or HEALTH=off, adds nothing)."""
        self.metrics.close()
        self.lock.release()
        if self.distributed.is_main:
            print(f"done: {self.total_steps} steps, {self.skipped_updates} updates skipped; "
                  f"metrics in {self.metrics_path}")
            if self.health.summary():
                print(self.health.summary())
        cleanup()

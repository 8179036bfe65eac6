"""Ctrl-C and SIGTERM: real signals sent to real runs (a micro model, a few steps). The first stops the run
at the end of the step in flight, saved, with one line naming the checkpoint and the command that continues
it; that command gives, bit for bit, the metrics and LoRA of a run that was never interrupted; one process,
and 2 CPU processes under torchrun with the signal sent to one rank only."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from tests.conftest import REPO_ROOT
from tests.test_distributed import TORCHRUN_VARIABLES, launch

STEPS = 8
RUN = ["run_train_grpo.py", "--TRAIN_FILE=data/synth_train.jsonl", "--EVAL_FILE=data/synth_test.jsonl",
       "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=6",
       "--EVAL_EVERY=0", "--DEVICE=cpu", "--LORA_R=2", "--WARMUP_STEPS=0", "--LR=2e-4", "--SAMPLE_EVERY=0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def environment() -> dict:
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def arguments(model_dir, tmp_path, name, steps=STEPS) -> list[str]:
    return [*RUN, f"--MODEL_PATH={model_dir}", f"--MAX_STEPS={steps}", f"--CHECKPOINT_DIR={tmp_path / 'ck'}",
            f"--LOG_DIR={tmp_path / 'logs'}", f"--RUN_NAME={name}"]


def deterministic(path: Path) -> list[dict]:
    """The metrics file's records without the wall-clock times (every key ending in _s), which no two runs share."""
    return [{key: value for key, value in json.loads(line).items() if not key.endswith("_s")}
            for line in path.read_text().splitlines()]


def final_lora(run_dir: Path) -> dict:
    return load_checkpoint(run_dir)["lora"]


def interrupt(command: list[str], metrics_file: Path, send) -> subprocess.CompletedProcess:
    """Start ``command``; once it has written its first metrics line, ``send(process)`` a signal; wait."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (metrics_file.exists() and metrics_file.read_text().strip()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no metrics line in 240 s"
        time.sleep(0.02)
    send(process)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def continue_command(result) -> list[str]:
    """The one line the stopped run printed, and the command it names (python -> this interpreter)."""
    lines = [line for line in result.stdout.splitlines() if "continue it with: " in line]
    assert len(lines) == 1, (result.stdout[-3000:], result.stderr[-3000:])
    command = shlex.split(lines[0].split("continue it with: ", 1)[1])
    if command[0] == "torchrun":
        return [*TORCHRUN[:4], *command[1:]]
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


@pytest.fixture(scope="module")
def uninterrupted(micro_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    launch(arguments(micro_model_dir, tmp_path, "whole"), processes=None)
    return deterministic(tmp_path / "logs" / "whole.jsonl"), final_lora(tmp_path / "ck" / "whole")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_step_and_the_resume_is_exact(micro_model_dir, tmp_path, uninterrupted, signal_number):
    metrics_file, run_dir = tmp_path / "logs" / "cut.jsonl", tmp_path / "ck" / "cut"
    result = interrupt([sys.executable, *arguments(micro_model_dir, tmp_path, "cut")], metrics_file,
                       lambda process: process.send_signal(signal_number))
    assert result.returncode == 128 + signal_number, result.stderr[-3000:]  # 130, 143: what the signal gives
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    command = continue_command(result)
    saved = Path(command[-1].removeprefix("--RESUME="))
    stopped_at = load_checkpoint(saved)["step"]
    assert 1 <= stopped_at < STEPS and saved.parent == run_dir
    assert f"stopped after step {stopped_at} of {STEPS}, saved {saved}" in result.stdout
    assert len(metrics_file.read_text().splitlines()) == stopped_at  # the step in flight finished, and no more
    assert not (run_dir / ".lock").exists() and not (tmp_path / "logs" / ".cut.jsonl.lock").exists()

    subprocess.run(command, cwd=REPO_ROOT, env=environment(), check=True, capture_output=True, timeout=240)
    metrics, lora = uninterrupted
    assert deterministic(metrics_file) == metrics
    resumed = final_lora(run_dir)
    assert resumed.keys() == lora.keys() and all(torch.equal(resumed[name], lora[name]) for name in lora)


def rank_process(parent: int, rank: int) -> int:
    """The PID of torchrun's worker of ``rank`` (Linux: read from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent \
                    and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no rank {rank} under process {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
def test_a_signal_on_one_rank_stops_every_rank_at_one_step_and_the_resume_is_exact(micro_model_dir, tmp_path):
    steps = 6
    launch(arguments(micro_model_dir, tmp_path, "whole", steps), processes=2)
    metrics_file, run_dir = tmp_path / "logs" / "cut.jsonl", tmp_path / "ck" / "cut"
    result = interrupt([*TORCHRUN, *arguments(micro_model_dir, tmp_path, "cut", steps)], metrics_file,
                       lambda process: os.kill(rank_process(process.pid, 1), signal.SIGTERM))
    assert result.returncode != 0  # torchrun reports its workers' 143
    command = continue_command(result)  # printed by rank 0, which never got the signal
    saved = Path(command[-1].removeprefix("--RESUME="))
    stopped_at = load_checkpoint(saved)["step"]
    assert 1 <= stopped_at < steps and [path.name for path in run_dir.iterdir()] == [saved.name]
    assert len(metrics_file.read_text().splitlines()) == stopped_at

    subprocess.run(command, cwd=REPO_ROOT, env=environment(), check=True, capture_output=True, timeout=240)
    assert deterministic(metrics_file) == deterministic(tmp_path / "logs" / "whole.jsonl")
    resumed, whole = final_lora(run_dir), final_lora(tmp_path / "ck" / "whole")
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)


class Stopping:
    """What TrainingRun._on_signal reads and writes, of a run in its steps."""
    in_steps, stop_signal = True, 0

    def __init__(self):
        self.lock = self
        self.released = False

    def release(self):
        self.released = True


def test_a_second_signal_ends_the_process_at_once_unless_it_is_the_same_interruption(monkeypatch, capfd):
    from common.run import TrainingRun

    def exit_now(status):
        raise SystemExit(f"os._exit({status})")

    monkeypatch.setattr(os, "_exit", exit_now)
    run = Stopping()
    TrainingRun._on_signal(run, signal.SIGINT, None)
    assert run.stop_signal == signal.SIGINT and not run.released  # noted: the step goes on
    TrainingRun._on_signal(run, signal.SIGINT, None)  # at once: the terminal's group, or torchrun forwarding it
    assert not run.released
    run.signalled_at -= 10
    with pytest.raises(SystemExit, match=r"os\._exit\(130\)"):
        TrainingRun._on_signal(run, signal.SIGINT, None)
    assert run.released
    assert "SIGINT again: stopped at once, without saving" in capfd.readouterr().err

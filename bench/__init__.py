"""Benchmarks, one script each (run from the repository root, e.g. `python bench/bench_sampling.py`).

Each prints a Markdown table (pasted as is into docs/results.md) and writes its numbers,
its config and the machine to a JSON file under logs/bench/. What they share lives here: the
machine's description, the table, the results file, and the GRPO benchmarks' way of timing a step:
run_train_grpo.py itself, as a subprocess through bench/launch_trainer.py, its metrics read back.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launch_trainer.py"
# A reward drawn at random, so that every group of a benchmark's run has an advantage (bench/random_reward.py).
RANDOM_REWARD = f"{Path(__file__).resolve().parent / 'random_reward.py'}:uniform"
OUTPUT_TAIL = 40  # lines of a failed trainer's output repeated in the error


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    """The machine's physical memory: os.sysconf where there is one (Linux, macOS), else psutil (Windows)."""
    if hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return psutil.virtual_memory().total


def machine() -> dict:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(memory_bytes() / 1e9, 1), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of already formatted cells: the first column (what a row is) left-aligned,
    the numbers after it right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path: str | Path, benchmark: str, config: dict, results: dict) -> Path:
    """Write {benchmark, config, machine, results} to ``path`` (folders created) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": benchmark, "config": config, "machine": machine(), "results": results}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# ------------------------------------------------- counters of a process's compilations
def count_cuda_graphs() -> dict:
    """From now on, count the CUDA graphs this process records: torch.compile's cudagraph trees capture
    through torch.cuda.graph, which begins every capture with CUDAGraph.capture_begin (torch 2.11 and
    2.13 alike). A tree manager (one per device) begins with an empty capture that only creates its
    memory pool: not a graph, so not counted (issue 29, finding 14). Returns the counter, {"recorded": n}."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    counter = {"recorded": 0}
    capture_begin, manager_init = torch.cuda.CUDAGraph.capture_begin, CUDAGraphTreeManager.__init__

    def counted_capture_begin(self, *args, **kwargs):
        counter["recorded"] += 1
        return capture_begin(self, *args, **kwargs)

    def pool_capture_uncounted(self, *args, **kwargs):
        manager_init(self, *args, **kwargs)
        counter["recorded"] -= 1

    torch.cuda.CUDAGraph.capture_begin = counted_capture_begin
    CUDAGraphTreeManager.__init__ = pool_capture_uncounted
    return counter


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------- run_train_grpo.py as a benchmark's step
@dataclass
class TrainerRun:
    """What one run of the trainer left: its metrics lines of the steps (an eval-only line left out)
    and the launcher's report (bench/launch_trainer.py: peak resident memory, graph counts, ...)."""
    steps: list[dict]
    report: dict


def trainer_arguments(settings: dict) -> list[str]:
    """``settings`` as the trainer's command line: --NAME=value each, booleans true / false and tuples
    comma-separated, as common.config reads them."""
    def text(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (tuple, list)):
            return ",".join(map(str, value))
        return str(value)

    return [f"--{name}={text(value)}" for name, value in settings.items()]


def run_trainer(settings: dict, folder: str | Path, run_name: str, launcher: dict | None = None,
                output: str | Path | None = None) -> TrainerRun:
    """Run run_train_grpo.py with ``settings`` (its constants) as a subprocess of this Python, from the
    repository root, through bench/launch_trainer.py (``launcher``: its constants). Its run lives in
    ``folder`` (CHECKPOINT_DIR and LOG_DIR: nothing of the user's is touched; OVERWRITE=true, no eval,
    no sample printed, saved only at the end of an epoch and of the run). Its output goes to the file
    ``output``, or through to this process's when None. A run that fails ends this process with its
    exit status and the tail of its output."""
    folder = Path(folder)
    report_file = folder / f"{run_name}.launcher.json"
    run_settings = {"EVAL_EVERY": 0, "SAMPLE_EVERY": 0, "SAVE_EVERY_MINUTES": 0, **settings,
                    "RUN_NAME": run_name, "CHECKPOINT_DIR": folder, "LOG_DIR": folder, "OVERWRITE": True}
    command = [sys.executable, str(LAUNCHER), *trainer_arguments({**(launcher or {}), "REPORT_FILE": report_file}),
               "run_train_grpo.py", *trainer_arguments(run_settings)]
    if output is None:
        print(f"running run_train_grpo.py ({run_name})", flush=True)
        status = subprocess.run(command, cwd=REPO_ROOT).returncode
    else:
        with open(output, "w") as log:
            status = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = "" if output is None else "\n".join(Path(output).read_text().splitlines()[-OUTPUT_TAIL:]) + "\n"
        raise SystemExit(f"{tail}error: run_train_grpo.py ({run_name}) exited {status}: "
                         f"{subprocess.list2cmdline(command[1:])}")
    lines = [json.loads(line) for line in (folder / f"{run_name}.jsonl").read_text().splitlines() if line.strip()]
    return TrainerRun([line for line in lines if "step_s" in line], json.loads(report_file.read_text()))

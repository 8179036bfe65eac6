"""Benchmarks, one script each (run from the repository root, e.g. `python bench/bench_sampling.py`).

Each prints a Markdown table (pasted as is into docs/results.md) and writes its numbers,
its config and the machine to a JSON file under logs/bench/. What they share lives here.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
import transformers


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on."""
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(memory_bytes / 1e9, 1), "torch": torch.__version__,
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

"""The first GPU hour in one command: the CUDA equivalence tests, the GPU benchmark at Gemma 2 2B's
shapes, and the Llama 3.1 8B NF4 step under a 12 GB cap; one table, one file.

    make gpu-check                          # = python bench/gpu_check.py (where there is no make: that line)
    python bench/gpu_check.py --QUICK=true  # parts 1 and 2 only: at most 6 minutes
    python bench/gpu_check.py --DEVICE=cpu  # the thin-body versions, in about a minute (make test runs QUICK)

It must fit one call of at most 10 minutes on a bare GPU machine. On CUDA, in this order, the quick parts
first, each part a subprocess with its own time limit (LIMITS), set from the compile times measured before
(a first compiled call took about 2 minutes on an H200, 93-119 s):

| part | what it runs | limit |
|---|---|---|
| 1 | `pytest -m cuda tests`: the equivalence tests' CUDA cases (tests/conftest.py DEVICES: log-probs and their gradients against the naive path and fp64, the LoRA layer against its formula, the NF4-LoRA gradients against a float layer, and whatever else carries the `cuda` marker); nothing compiled; a row for each number a case records (the bf16 sampler-trainer log-prob gap beside its tolerance) | 120 s |
| 3 | bench/bench_gpu.py's 12 GB check: Llama 3.1 8B's shapes with a 4-bit base, checkpointed, capped at 12 GB (the target: a peak of at most 11.5 GB), eager sampler, one untimed and one timed GRPO step; nothing compiled. Needs bitsandbytes; skipped, and said, without it. Not with QUICK | 180 s |
| 2 | bench/bench_gpu.py at Gemma 2 2B's shapes (16 prompts x 8 samples, 128 new tokens, LoRA r16 on the seven linears): our eager and compiled samplers (one compilation) and model.generate eagerly (not with QUICK), one timed call each; then run_train_grpo.py's GRPO step phase by phase (a subprocess of the benchmark) on the static path uncompiled: a second compilation would not fit | 240 s |

120 + 180 + 240 = 540 s (QUICK: 360 s), the rest of the 10 minutes for starting Python and the table. Each
part writes what it has as soon as it has it: this script its report after each part, and bench_gpu.py
its record before its
first sampling method, after each one and after its GRPO step, so a part stopped by its limit still shows
its rows measured. The table gives each part's allocated and reserved peaks and, for a GRPO step, the
memory plan's predicted peak beside them.

Without pytest (a bare GPU machine) part 1 is skipped, and said, and the other parts run.
Without CUDA each part runs its thin-body version and the table says so: part 1 finds the CUDA cases
and skips them (their CPU cases are in make test), parts 2 and 3 run bench_gpu.py on the CPU with a thin
body and tiny sizes. The table is printed last and written to OUT_DIR/gpu-CARD.md (CARD: the device's
name, e.g. gpu-nvidia-h200.md; gpu-cpu.md on the CPU) with each part's own output after it; the
benchmarks' JSON records go beside it. A part past its limit is killed with the processes it started
(the trainer); a benchmark part that fails or times out still shows the rows its record has. The report
is written again after each part, so a call stopped from outside keeps the parts finished. Exit status: 1
when an equivalence test fails, 2 when a benchmark part fails or runs past its limit, 0 otherwise.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import psutil

# Run as `python bench/gpu_check.py`, Python puts bench/ on the path, not the repository root with common/.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from common.config import configure  # noqa: E402

# ---------------------------------------------------------------- constants
QUICK = False  # parts 1 and 2 only (4 minutes on an H200), without model.generate's static cache
DEVICE = "auto"  # auto (cuda if there is one), cuda or cpu (the thin-body versions)
OUT_DIR = "logs/bench"  # where gpu-CARD.md and the benchmarks' JSON records go

config = configure(globals())
# ---------------------------------------------------------------------------

from bench import markdown_table  # noqa: E402

cuda = torch.cuda.is_available() and DEVICE != "cpu"
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise SystemExit("error: DEVICE=cuda asked for, but torch.cuda.is_available() is False")
card = torch.cuda.get_device_name() if cuda else "cpu"
out_dir = Path(OUT_DIR)
out_dir.mkdir(parents=True, exist_ok=True)
slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")

# Time limits in seconds of each part on CUDA add up to 540, nine minutes of a ten-minute call; the rest
# goes to starting Python and torch and writing the table. QUICK leaves out the Llama part. The module
# docstring says what each part covers. On the CPU the limits are generous, for a busy machine.
LIMITS = {True: {"tests": 120, "llama": 180, "gemma": 240}, False: {"tests": 300, "llama": 300, "gemma": 300}}[cuda]
# bench_gpu.py's settings per part: the README's shapes (docs: GPU numbers) on CUDA, tiny ones with a thin body
# elsewhere. Part 2 compiles once: our compiled sampler (about 2 minutes for a first call on an H200); the
# trainer's step samples on the static path uncompiled (its KV counted by the plan; a second compilation, in
# the trainer's process, would not fit the part's limit), and model.generate eagerly, without QUICK.
GEMMA = (["--METHODS=eager,compiled" + ("" if QUICK else ",generate"), "--SAMPLER=static", "--REPEATS=1",
          "--WARMUP_STEPS=1", "--STEPS=1"] if cuda else
         ["--DEVICE=cpu", "--NUM_PROMPTS=2", "--NUM_SAMPLES_PER_PROMPT=2", "--MAX_NEW_TOKENS=6",
          "--METHODS=eager", "--REPEATS=1", "--WARMUP_STEPS=0", "--STEPS=1", "--LORA_R=2"])
LLAMA = (["--MODEL=llama-3.1-8b", "--QUANT=nf4", "--GRADIENT_CHECKPOINTING=true", "--GPU_MEMORY_GB=12",
          "--NUM_PROMPTS=8", "--NUM_SAMPLES_PER_PROMPT=8", "--MAX_NEW_TOKENS=256", "--PROMPT_TOKENS=128",
          "--SAMPLER=eager", "--METHODS=", "--WARMUP_STEPS=1", "--STEPS=1"] if cuda else
         ["--MODEL=llama-3.1-8b", "--QUANT=nf4", "--GRADIENT_CHECKPOINTING=true", "--DEVICE=cpu", "--NUM_PROMPTS=2",
          "--NUM_SAMPLES_PER_PROMPT=2", "--MAX_NEW_TOKENS=4", "--PROMPT_TOKENS=32", "--METHODS=", "--WARMUP_STEPS=0",
          "--STEPS=1", "--LORA_R=2", "--SHARD_GB=0.05"])
LLAMA_TARGET_GB = 11.5  # issue 15's target for the 12 GB check


def kill_tree(pid: int) -> None:
    """The process ``pid`` and every process it started (bench_gpu.py's trainer) killed."""
    process = psutil.Process(pid)
    children = process.children(recursive=True)
    for member in [process, *children]:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


def run_part(command: list[str], limit: int) -> dict:
    """``command`` (after the Python interpreter) from the repository root: its status ("timeout" past
    ``limit`` seconds, then killed with what it started), seconds and output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
        status = process.returncode
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        stdout, stderr = process.communicate()
        status = "timeout"
    return {"status": status, "seconds": time.perf_counter() - start, "output": stdout + stderr}


def gigabytes(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def bench_rows(part: str, record_file: Path) -> list[list[str]]:
    """The table's rows of one bench_gpu.py record: each sampling method, the GRPO step, the graph counts
    (the sampling process's and the trainer's); a record of the sampling part alone says the step is missing."""
    results = json.loads(record_file.read_text())["results"]
    rows = [[f"{part}: sampling, {method}", f"{r['tokens_per_s']:,.0f} tok/s, first call {r['first_call_s']:.1f} s"
             + (f" (compile {r['compile_s']:.1f})" if r["compile_s"] else ""), f"{r['seconds']:.2f}",
             gigabytes(r["peak_gb"]), gigabytes(r.get("reserved_gb")), ""] for method, r in results["sampling"].items()]
    if "phase_seconds" not in results:
        rows.append([f"{part}: GRPO step", "missing: the benchmark stopped before it ended", "", "", "", ""])
        return rows
    phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in results["phase_seconds"].items())
    verdict = ""
    if part == "3" and results["step_peak_gb"] is not None:
        verdict = f"; target <= {LLAMA_TARGET_GB} GB: {'met' if results['step_peak_gb'] <= LLAMA_TARGET_GB else 'MISSED'}"
    # The plan's peak (weights + LoRA + max(rollout, policy pass)) beside the step's: the first card checks the plan.
    rows.append([f"{part}: GRPO step", f"{phases}{verdict}", f"{results['step_seconds']:.2f}",
                 gigabytes(results["step_peak_gb"]), gigabytes(results["step_reserved_gb"]),
                 gigabytes(results["memory_plan_gb"]["total"])])
    compiled, recorded = results["compiled_graphs"], results["cuda_graphs_recorded"]
    cuda_graphs = ("-" if recorded is None else
                   f"sampling {recorded['sampling']}, GRPO step {recorded['grpo_step']}")
    rows.append([f"{part}: compiles", f"graphs compiled: sampling {compiled['sampling']}, GRPO step "
                 f"{compiled['grpo_step']}; CUDA graphs recorded: {cuda_graphs}; compile {results['step_compile_s']:.1f} s "
                 f"in the timed steps", "", "", "", ""])
    return rows


def measured_rows(junit_file: Path) -> list[list[str]]:
    """A row for each number a CUDA case recorded beside its assertion (pytest's record_property, e.g. the
    bf16 sampler-trainer log-prob gap and its tolerance), read from pytest's JUnit XML; none where pytest
    wrote none (stopped at its limit)."""
    if not junit_file.exists():
        return []
    return [[f"1: {case.get('name')}: {recorded.get('name')}", recorded.get("value"), "", "", "", ""]
            for case in ElementTree.parse(junit_file).iter("testcase") for recorded in case.iter("property")]


HEADERS = ["check", "result", "seconds", "peak allocated GB", "peak reserved GB", "plan's peak GB"]
report = out_dir / f"gpu-{slug}.md"


def write_report(table: list[list[str]], parts: dict) -> str:
    """The table so far, written to ``report`` with each part's output after it (after each part: a call
    stopped from outside keeps the parts finished); the table's text."""
    text = markdown_table(HEADERS, table)
    header = (f"# gpu-check on {card}\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch "
              f"{torch.__version__}{', QUICK' if QUICK else ''}"
              f"{'' if cuda else '; no CUDA: the thin-body versions on the CPU'}\n\n")
    sections = "".join(f"\n## part {part}: its output\n\n```\n{run['output'].strip()[-20000:]}\n```\n"
                       for part, run in parts.items())
    report.write_text(header + text + "\n" + sections)
    return text


mode = f"CUDA, {card}" if cuda else "no CUDA: the thin-body versions on the CPU"
print(f"gpu-check ({mode}){', QUICK: parts 1 and 2' if QUICK else ''}; limits {LIMITS} s")
parts, table = {}, []

# 1. The equivalence tests' CUDA cases.
print(f"[1/3] pytest -m cuda tests (limit {LIMITS['tests']} s)", flush=True)
tests_failed = False
try:
    import pytest  # noqa: F401
except ImportError:  # a bare GPU machine (issue 29, finding 8): said in one line, and the other parts run
    no_pytest = "skipped: pytest is not installed (pip install pytest==9.2.0, or carry its wheels: docs/gpu.md)"
    print(f"[1/3] {no_pytest}")
    table.append(["1: equivalence tests, CUDA cases", no_pytest, "", "", "", ""])
else:
    # The numbers the tests measure come back in JUnit XML (xunit1: the family that keeps record_property's).
    junit = out_dir / f"gpu-check-{slug}-tests.xml"
    junit.unlink(missing_ok=True)  # an earlier check's is not this one's
    tests = parts["1"] = run_part(["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={junit}",
                                   "-o", "junit_family=xunit1", "tests"], LIMITS["tests"])
    summary = re.findall(r"^=*\s*(.*\b(?:passed|failed|skipped|deselected|error)\b.*?)\s*=*$", tests["output"], re.M)
    tests_failed = tests["status"] not in (0, 5)  # 5: nothing collected
    result = summary[-1] if summary else f"exit status {tests['status']}"
    if not cuda:
        result += " (no CUDA: the cuda cases skip; make test runs their CPU cases)"
    table.append(["1: equivalence tests, CUDA cases", ("FAILED: " if tests_failed else "") + result,
                  f"{tests['seconds']:.1f}", "", "", ""])
    table += measured_rows(junit)
write_report(table, parts)

# 3. and 2. The benchmark as the 12 GB check (nothing compiled), then at Gemma 2 2B's shapes (a compilation):
# the quicker part first, so a part 2 that runs out of time leaves the rest measured.
bench_failed = False
benches = [("2", "gemma", "Gemma 2 2B shapes", GEMMA)]
if not QUICK:
    benches.insert(0, ("3", "llama", "Llama 3.1 8B NF4, 12 GB cap", LLAMA))
for part, name, what, arguments in benches:
    if name == "llama":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            table.append([f"{part}: {what}", "skipped: bitsandbytes is not installed (pip install bitsandbytes==0.50.2)",
                          "", "", "", ""])
            continue
    record_file = out_dir / f"gpu-check-{slug}-{name}.json"
    record_file.unlink(missing_ok=True)  # an earlier check's record is not this one's
    print(f"[{part}/3] bench/bench_gpu.py: {what} (limit {LIMITS[name]} s)", flush=True)
    run = parts[part] = run_part(["bench/bench_gpu.py", *arguments, f"--OUT_FILE={record_file}"], LIMITS[name])
    if run["status"] != 0:
        bench_failed = True
        last = run["output"].strip().splitlines()[-1:] or [""]
        status = f"timed out after {LIMITS[name]} s" if run["status"] == "timeout" else f"exit status {run['status']}"
        table.append([f"{part}: {what}", f"FAILED: {status}: {last[0][:120]}", f"{run['seconds']:.1f}", "", "", ""])
        if record_file.exists():  # what finished before (bench_gpu.py writes its record as it goes)
            table += bench_rows(part, record_file)
    else:
        table.append([f"{part}: {what}", "ran" + ("" if cuda else " (thin body, CPU)"), f"{run['seconds']:.1f}",
                      "", "", ""])
        table += bench_rows(part, record_file)
    write_report(table, parts)

text = write_report(table, parts)
print()
print(text)
print(f"\nwritten: {report}")
if tests_failed:
    print("an equivalence test FAILED: its output is in the report")
    sys.exit(1)
if bench_failed:
    print("a benchmark part FAILED or ran past its limit: its output is in the report")
    sys.exit(2)

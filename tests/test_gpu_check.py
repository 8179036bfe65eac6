"""bench/gpu_check.py (make gpu-check) in its CPU mode: the thin-body versions run, one table is printed
and written to gpu-cpu.md, and the exit status says whether a part failed. QUICK (parts 1 and 2) to stay
short; part 3's thin-body run is tests/test_bench_gpu.py's Llama test."""

import json

from tests.conftest import run_script

# The test files whose equivalence tests are parametrised over tests/conftest.py's DEVICES.
DEVICES_FILES = ["tests/test_logprobs.py", "tests/test_lora.py", "tests/test_quant.py", "tests/test_static_decode.py"]


def collected(*arguments: str) -> list[str]:
    out = run_script(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *arguments, *DEVICES_FILES],
                     timeout=300).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_pytest_m_cuda_selects_every_cuda_case_and_only_those():
    """Part 1's `pytest -m cuda` (issue 29, finding 1: conftest.py defined DEVICES twice, the later
    unmarked one won, and `-m cuda` ran 11 CPU cases and 11 of the CUDA ones)."""
    cuda_cases = [case for case in collected() if "cuda]" in case or "-cuda-" in case or "[cuda-" in case]
    assert len(cuda_cases) >= 60  # every test parametrised over DEVICES has its CUDA case, even without CUDA
    assert collected("-m", "cuda") == cuda_cases


def test_gpu_check_cpu_mode_runs_the_thin_body_versions_and_writes_its_table(tmp_path):
    result = run_script(["bench/gpu_check.py", "--QUICK=true", f"--OUT_DIR={tmp_path}"], timeout=600)
    out = result.stdout
    assert "gpu-check (no CUDA: the thin-body versions on the CPU), QUICK: parts 1 and 2" in out
    table = out[out.index("| check | result |"):]
    # Part 1 ran the equivalence tests' CUDA cases: here they all skip (their CPU cases are make test's).
    part_1 = table.split("\n")[2]
    assert part_1.startswith("| 1: equivalence tests, CUDA cases | ") and " skipped" in part_1
    assert "passed" not in part_1 and "failed" not in part_1
    for row in ("| 2: Gemma 2 2B shapes | ran (thin body, CPU) |", "| 2: sampling, eager |", "| 2: GRPO step |",
                "| 2: compiles |"):
        assert row in table
    assert "| 3:" not in table  # QUICK
    report = (tmp_path / "gpu-cpu.md").read_text()
    assert report.startswith("# gpu-check on cpu") and "| 2: GRPO step |" in report and "## part 2: its output" in report
    record = json.loads((tmp_path / "gpu-check-cpu-gemma.json").read_text())
    assert record["results"]["thin_body"] is True and record["results"]["step_reserved_gb"] is None
    # The plan's predicted peak beside the measured ones (none measured on the CPU), in the last column.
    assert table.split("\n")[0].endswith("| peak allocated GB | peak reserved GB | plan's peak GB |")
    step = next(line for line in table.split("\n") if line.startswith("| 2: GRPO step |"))
    assert step.endswith(f"| - | - | {record['results']['memory_plan_gb']['total']:.2f} |")


# A bench_gpu.py whose GRPO step fails after its sampling part: it writes its record of that part, then exits 1.
FAILING_BENCH_GPU = """import json, sys
out = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--OUT_FILE="))
sampling = {"eager": {"tokens_per_s": 100.0, "first_call_s": 1.0, "compile_s": 0.0, "seconds": 0.5,
                      "peak_gb": None, "reserved_gb": None}}
open(out, "w").write(json.dumps({"results": {"sampling": sampling}}))
sys.exit("error: run_train_grpo.py (bench_gpu) exited 1")
"""


def test_gpu_check_exits_non_zero_when_an_equivalence_test_fails(tmp_path):
    """A failing CUDA case: exit status 1, FAILED in the table (simulated, in a copy of the repository with
    a failing test, and a passing one whose measured number gets its row), and a benchmark part whose GRPO
    step fails shows its sampling rows all the same."""
    import shutil

    copy = tmp_path / "repo"
    for name in ("bench", "common"):
        shutil.copytree(f"{name}", copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "bench" / "bench_gpu.py").write_text(FAILING_BENCH_GPU)
    (copy / "tests").mkdir()
    (copy / "tests" / "conftest.py").write_text(
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'cuda: CUDA cases')\n")
    (copy / "tests" / "test_fails.py").write_text(
        "import pytest\n\n@pytest.mark.cuda\ndef test_a_cuda_case_that_fails():\n    assert False\n\n"
        "@pytest.mark.cuda\ndef test_a_cuda_case_that_measures(record_property):\n"
        "    record_property('largest gap', '3.10e-04 nats over 301 tokens, tolerance 6.57e-01')\n")
    result = run_script(["bench/gpu_check.py", "--QUICK=true", f"--OUT_DIR={tmp_path / 'out'}"], cwd=copy,
                        check=False, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "| 1: equivalence tests, CUDA cases | FAILED: 1 failed, 1 passed" in result.stdout
    # What a case measured, beside its tolerance, in a row of its own (the first card's run records it).
    assert ("| 1: test_a_cuda_case_that_measures: largest gap | 3.10e-04 nats over 301 tokens, tolerance 6.57e-01 |"
            in result.stdout)
    assert ("| 2: Gemma 2 2B shapes | FAILED: exit status 1: error: run_train_grpo.py (bench_gpu) exited 1 |"
            in result.stdout)
    assert "| 2: sampling, eager | 100 tok/s, first call 1.0 s | 0.50 | - | - |" in result.stdout
    assert "| 2: GRPO step | missing: the benchmark stopped before it ended |" in result.stdout
    assert "an equivalence test FAILED" in result.stdout


# Imported at every interpreter's start (on PYTHONPATH): a machine without pytest.
NO_PYTEST = """import sys
class NoPytest:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytest", "_pytest"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoPytest())
"""


def test_gpu_check_without_pytest_says_so_and_runs_the_other_parts(tmp_path):
    """A bare GPU machine may lack pytest (issue 29, finding 8): part 1 is skipped in one line, not failed,
    and part 2 runs (here a stand-in benchmark that fails after its sampling part)."""
    import os
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "repo"
    for name in ("bench", "common"):
        shutil.copytree(f"{name}", copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "bench" / "bench_gpu.py").write_text(FAILING_BENCH_GPU)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_PYTEST)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--QUICK=true", f"--OUT_DIR={tmp_path / 'out'}"],
                            cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr  # part 2's failure alone
    assert "[1/3] skipped: pytest is not installed (pip install pytest==9.2.0" in result.stdout
    assert "| 1: equivalence tests, CUDA cases | skipped: pytest is not installed" in result.stdout
    assert "| 2: sampling, eager | 100 tok/s" in result.stdout and "an equivalence test FAILED" not in result.stdout

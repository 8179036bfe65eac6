"""bench/gpu_check.py (make gpu-check) in its CPU mode: the thin-body versions run, one table is printed
and written to gpu-cpu.md, and the exit status says whether a part failed. QUICK (parts 1 and 2) to stay
short; part 3's thin-body run is tests/test_bench_gpu.py's Llama test."""

import json

from tests.conftest import run_script


def test_gpu_check_cpu_mode_runs_the_thin_body_versions_and_writes_its_table(tmp_path):
    result = run_script(["bench/gpu_check.py", "--QUICK=true", f"--OUT_DIR={tmp_path}"], timeout=600)
    out = result.stdout
    assert "gpu-check (no CUDA: the thin-body versions on the CPU), QUICK: parts 1 and 2" in out
    table = out[out.index("| check | result |"):]
    # Part 1 ran the cuda-marked equivalence tests: here their CPU cases pass and their CUDA cases skip.
    part_1 = table.split("\n")[2]
    assert part_1.startswith("| 1: equivalence tests, CUDA cases | ") and " passed" in part_1 and "failed" not in part_1
    for row in ("| 2: Gemma 2 2B shapes | ran (thin body, CPU) |", "| 2: sampling, eager |", "| 2: GRPO step |",
                "| 2: compiles |"):
        assert row in table
    assert "| 3:" not in table  # QUICK
    report = (tmp_path / "gpu-cpu.md").read_text()
    assert report.startswith("# gpu-check on cpu") and "| 2: GRPO step |" in report and "## part 2: its output" in report
    record = json.loads((tmp_path / "gpu-check-cpu-gemma.json").read_text())
    assert record["results"]["thin_body"] is True and record["results"]["step_reserved_gb"] is None


def test_gpu_check_exits_non_zero_when_an_equivalence_test_fails(tmp_path):
    """A failing CUDA case: exit status 1, FAILED in the table (simulated: the benchmark parts are not run
    when bench_gpu.py is missing from a copy of the repository, so the table shows both failures)."""
    import shutil

    copy = tmp_path / "repo"
    for name in ("bench", "common"):
        shutil.copytree(f"{name}", copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "bench" / "bench_gpu.py").unlink()
    (copy / "tests").mkdir()
    (copy / "tests" / "conftest.py").write_text(
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'cuda: CUDA cases')\n")
    (copy / "tests" / "test_fails.py").write_text(
        "import pytest\n\n@pytest.mark.cuda\ndef test_a_cuda_case_that_fails():\n    assert False\n")
    result = run_script(["bench/gpu_check.py", "--QUICK=true", f"--OUT_DIR={tmp_path / 'out'}"], cwd=copy,
                        check=False, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "| 1: equivalence tests, CUDA cases | FAILED: 1 failed" in result.stdout
    assert "| 2: Gemma 2 2B shapes | FAILED: exit status 2" in result.stdout
    assert "an equivalence test FAILED" in result.stdout

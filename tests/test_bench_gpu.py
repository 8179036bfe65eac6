"""bench/bench_gpu.py runs for real on the CPU, thin-bodied and with tiny sizes: it builds its model,
times the sampling methods, runs run_train_grpo.py's step on it, and writes what it promises. No timing
is asserted."""

import json
import re
import sys

import pytest

from tests.conftest import run_script


def test_bench_gpu_thin_body_on_the_cpu(tmp_path):
    out_file = tmp_path / "gpu.json"
    result = run_script(["bench/bench_gpu.py", "--DEVICE=cpu", "--NUM_PROMPTS=2", "--NUM_SAMPLES_PER_PROMPT=4",
                         "--MAX_NEW_TOKENS=6", "--METHODS=eager,generate_static", "--REPEATS=1", "--WARMUP_STEPS=0",
                         "--STEPS=1", "--MICRO_BATCH_SIZE=4", "--LORA_R=2", "--GRADIENT_CHECKPOINTING=true",
                         f"--OUT_FILE={out_file}"])
    assert "thin-bodied Gemma 2 2B shapes" in result.stdout and "gradient checkpointing on" in result.stdout
    for row in ("| sampling: our eager sampler |", '| sampling: model.generate(cache_implementation="static") |',
                "| GRPO step: policy |", "| GRPO step: whole step |"):
        assert row in result.stdout
    assert "Rows that ran to 6 tokens without a stop token" in result.stdout
    assert "| peak allocated GB | peak reserved GB |" in result.stdout
    assert "CUDA graphs recorded: - (no CUDA)" in result.stdout
    record = json.loads(out_file.read_text())
    assert record["benchmark"] == "gpu" and record["config"]["GRADIENT_CHECKPOINTING"] is True
    results = record["results"]
    assert results["thin_body"] is True and results["rows"] == 8
    assert set(results["sampling"]) == {"eager", "generate_static"}
    for method in results["sampling"].values():
        assert 8 <= method["tokens"] <= 8 * 6 and method["seconds"] > 0
        assert method["peak_gb"] is None and method["reserved_gb"] is None  # measured on CUDA only
    # The step is the trainer's: its metrics line, every group kept by the random rewards.
    step = results["steps"][0]
    assert step["step"] == 1 and step["zero_adv_groups"] == 0 and step["completion_len"] == 6
    assert step["policy_s"] > 0 and results["phase_seconds"]["policy"] == step["policy_s"]
    assert step["policy_positions"] >= step["policy_tokens"] == results["policy_tokens"] >= 8 * (31 + 6)
    assert results["generated_tokens"] == 8 * 6 and results["step_seconds"] > 0
    mismatch_mean, mismatch_max = results["logprob_mismatch_mean_max"]
    assert mismatch_mean < 1e-5 and mismatch_max < 1e-4  # fp32 on the CPU: the sampler and the policy pass agree
    assert results["step_peak_gb"] is None and results["trainer"]["allocated_at_first_rollout_gb"] is None
    if sys.platform != "win32":
        assert results["trainer"]["peak_rss_bytes"] > 100 * 2 ** 20  # the trainer's process


def test_bench_gpu_keeps_the_sampling_results_when_the_step_fails(tmp_path):
    """The results file is written after the sampling part: a GRPO step that fails (here run_train_grpo.py
    refuses LOGPROB_CHUNK_SIZE=0, which the sampling part does not use) leaves it, and the exit status says so."""
    out_file = tmp_path / "gpu.json"
    result = run_script(["bench/bench_gpu.py", "--DEVICE=cpu", "--NUM_PROMPTS=2", "--NUM_SAMPLES_PER_PROMPT=2",
                         "--MAX_NEW_TOKENS=4", "--METHODS=eager", "--REPEATS=1", "--LORA_R=2", "--LOGPROB_CHUNK_SIZE=0",
                         f"--OUT_FILE={out_file}"], check=False)
    assert result.returncode == 1
    assert "error: run_train_grpo.py (bench_gpu) exited 2" in result.stderr
    assert f"part 1's results are in {out_file}" in result.stderr
    results = json.loads(out_file.read_text())["results"]
    assert set(results["sampling"]) == {"eager"} and results["rows"] == 4 and "phase_seconds" not in results


def test_bench_gpu_llama_8b_shapes_with_a_4bit_base_on_the_cpu(tmp_path):
    """The 12 GB check's path (MODEL=llama-3.1-8b, QUANT=nf4, checkpointed, no sampling methods), thin-bodied:
    the random Llama written in shards (SHARD_GB small enough for several), loaded in 4 bits, one GRPO step,
    and the memory plan of the same settings beside the measured peaks (none measured off CUDA)."""
    pytest.importorskip("bitsandbytes")
    out_file = tmp_path / "gpu.json"
    result = run_script(["bench/bench_gpu.py", "--MODEL=llama-3.1-8b", "--QUANT=nf4", "--GRADIENT_CHECKPOINTING=true",
                         "--DEVICE=cpu", "--GPU_MEMORY_GB=12", "--NUM_PROMPTS=2", "--NUM_SAMPLES_PER_PROMPT=4",
                         "--MAX_NEW_TOKENS=6", "--PROMPT_TOKENS=48", "--METHODS=", "--WARMUP_STEPS=0", "--STEPS=1",
                         "--MICRO_BATCH_SIZE=4", "--LORA_R=2", "--SHARD_GB=0.02", f"--OUT_FILE={out_file}"])
    out = result.stdout
    assert "thin-bodied Llama 3.1 8B shapes" in out and "4-bit NF4 linears" in out
    # Files of 20 MB: the embeddings (33 MB in fp32) fill the first; the two layers (0.2 MB each) and the
    # head, the second.
    assert re.search(r"random weights: 0\.017B parameters drawn on cpu and written in 2 safetensors files", out)
    assert "8 rows (2 prompts of 48 tokens x 4), 6 new tokens" in out and "gradient checkpointing on" in out
    # The plan, for the run's own settings, with its verdict for GPU_MEMORY_GB.
    assert "memory plan of a random thin-bodied Llama 3.1 8B (llama, " in out and "QUANT=nf4, float32, cpu" in out
    assert "rollout: KV cache, 8 rows x 48+6 tokens" in out and "GPU: 12.00 GB" in out
    # The trainer's own plan, the same: it read the lengthened prompts, and GPU_MEMORY_GB.
    assert out.count("rollout: KV cache, 8 rows x 48+6 tokens") == 2 and out.count("GPU: 12.00 GB") == 2
    assert "| sampling:" not in out and "Rows that ran to" not in out  # METHODS empty: the GRPO step alone
    for row in ("| GRPO step: generation (auto sampler) |", "| GRPO step: policy |", "| GRPO step: whole step |"):
        assert row in out
    record = json.loads(out_file.read_text())
    results = record["results"]
    assert results["model"] == "llama-3.1-8b" and results["quant"] == "nf4" and results["cap_gb"] is None
    assert results["thin_body"] is True and results["rows"] == 8 and results["prompt_tokens"] == [48, 48]
    assert results["parameters"] > 2 * 128256 * 64  # the vocabulary kept, the head untied
    plan = results["memory_plan_gb"]
    assert 0 < plan["weights"] < plan["total"] and plan["policy"] > 0 and plan["rollout"] > 0
    compared = results["memory_plan_vs_measured_gb"]
    assert compared["GRPO step: the plan's total, the step's peak"]["plan"] == plan["total"]
    assert all(row["measured"] is None for row in compared.values())  # nothing measured off CUDA
    # The memory table's rows: the plan in GB, the measured peak "-".
    for what in compared:
        assert f"| {what} | {compared[what]['plan']:.2f} | - |  |" in out
    step = results["steps"][0]
    assert step["completion_len"] == 6 and step["policy_s"] > 0 and step["policy_tokens"] == 8 * (48 + 6)


def test_bench_gpu_with_nf4_without_bitsandbytes_says_how_to_install_it(tmp_path, monkeypatch):
    """Refused in one line before any model is built: a bitsandbytes that fails to import stands for none."""
    fake = tmp_path / "bitsandbytes"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no bitsandbytes here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = run_script(["bench/bench_gpu.py", "--MODEL=llama-3.1-8b", "--QUANT=nf4", "--DEVICE=cpu",
                         f"--OUT_FILE={tmp_path / 'gpu.json'}"], check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: QUANT=nf4 needs bitsandbytes, which is not installed: "
                                                      "pip install bitsandbytes==0.50.2 (or use QUANT=none)")
    assert "memory plan" not in result.stdout and not (tmp_path / "gpu.json").exists()

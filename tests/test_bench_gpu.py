"""bench/bench_gpu.py runs for real on the CPU, thin-bodied and with tiny sizes: it builds its model,
times the sampling methods and a GRPO step, and writes what it promises. No timing is asserted."""

import json

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
    record = json.loads(out_file.read_text())
    assert record["benchmark"] == "gpu" and record["config"]["GRADIENT_CHECKPOINTING"] is True
    results = record["results"]
    assert results["thin_body"] is True and results["rows"] == 8
    assert set(results["sampling"]) == {"eager", "generate_static"}
    for method in results["sampling"].values():
        assert 8 <= method["tokens"] <= 8 * 6 and method["seconds"] > 0 and method["peak_gb"] is None
    step = results["steps"][0]
    assert step["generated_tokens"] >= 8 and step["phases"]["policy"]["seconds"] > 0
    if step["trained_tokens"]:  # unless every group drew equal random rewards
        mismatch_mean, mismatch_max = step["logprob_mismatch_mean_max"]
        assert mismatch_mean < 1e-5 and mismatch_max < 1e-4  # fp32 on the CPU: the two passes agree

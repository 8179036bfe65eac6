"""Every benchmark (bench/) and plot_metrics.py run for real, as subprocesses, with tiny sizes:
they keep working and write what they promise. No timing is asserted."""

import ast
import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO_ROOT, TINY_MODEL_DIR, run_script


def read_results(path, benchmark: str) -> dict:
    record = json.loads(path.read_text())
    assert record["benchmark"] == benchmark
    assert record["machine"]["torch"] and record["config"]
    return record["results"]


def test_bench_sampling_on_micro_model(micro_model_dir, tmp_path):
    out_file = tmp_path / "sampling.json"
    result = run_script(["bench/bench_sampling.py", f"--MODEL_PATH={micro_model_dir}", "--NUM_PROMPTS=2",
                         "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=5", "--REPEATS=2", "--DEVICE=cpu",
                         f"--OUT_FILE={out_file}"])
    assert "| model.generate |" in result.stdout and "shared sampler / generate" in result.stdout
    results = read_results(out_file, "sampling")
    assert results["rows"] == 6 and len(results["methods"]) == 2
    for method in results["methods"].values():
        assert len(method["tokens"]) == len(method["seconds"]) == 2
        assert all(6 <= tokens <= 6 * 5 for tokens in method["tokens"])  # at least one token per row, at most 5
        assert method["tokens_per_s"] > 0
    assert results["speedup"] > 0


def test_bench_logprobs_tiny_sizes(tmp_path):
    out_file = tmp_path / "logprobs.json"
    result = run_script(["bench/bench_logprobs.py", "--VOCAB_SIZE=500", "--HIDDEN_SIZE=16", "--NUM_LAYERS=1",
                         "--BATCH_SIZE=2", "--SEQ_LEN=16", "--CHUNK_SIZE=8", "--DEVICE=cpu",
                         f"--OUT_FILE={out_file}"])
    assert "token_logprobs (chunk 8)" in result.stdout
    results = read_results(out_file, "logprobs")
    assert set(results["paths"]) == {"naive", "chunked"}
    for path in results["paths"].values():
        assert path["peak_bytes"] >= 0 and path["forward_s"] > 0 and path["backward_s"] > 0
    assert results["max_abs_diff_logprobs"] < 1e-5
    assert results["max_abs_diff_grads"] < 1e-5 and results["max_abs_grad"] > 0


def test_bench_grpo_step_runs_the_trainer_with_every_phase(tmp_path):
    """KL and two iterations, so the reference and old log-prob passes run too; then packed against padded,
    on the demo's rollouts and on forced GSM8K-like ones (40 to 96 new tokens: padding to pack away)."""
    out_file = tmp_path / "grpo_step.json"
    result = run_script(["bench/bench_grpo_step.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--PROMPTS_PER_STEP=2",
                         "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=16", "--KL_COEF=0.05", "--NUM_ITERATIONS=2",
                         "--MICRO_BATCH_SIZE=4", "--LORA_R=2", "--WARMUP_STEPS=0", "--STEPS=1", "--DEVICE=cpu",
                         "--GSM8K_MAX_NEW_TOKENS=96", f"--OUT_FILE={out_file}"])
    assert "| whole step |" in result.stdout and "| gsm8k-like | packed |" in result.stdout
    results = read_results(out_file, "grpo_step")
    # The trainer's own metrics lines, one per timed step.
    assert len(results["steps"]) == 1 and results["steps"][0]["step"] == 1
    assert all(results["phase_seconds"][phase] > 0 for phase in ("generation", "reference", "old logprobs", "policy"))
    assert results["step_seconds"] >= sum(results["phase_seconds"].values()) > 0
    assert results["tokens_per_step"] >= 8 and results["generation_tokens_per_s"] > 0
    for layouts in results["packing_comparison"].values():
        for layout in layouts.values():
            assert layout["computed"] >= layout["real"] > 0 and layout["micro_batches"] >= 1 and layout["seconds"] > 0
            if sys.platform != "win32":  # ru_maxrss of the trainer's process: torch and a model at least
                assert layout["peak_rss_bytes"] > 100 * 2 ** 20
    gsm8k = results["packing_comparison"]["gsm8k-like"]
    # The same forced completions and rewards in both runs: the same real tokens, fewer positions packed.
    assert gsm8k["packed"]["real"] == gsm8k["padded"]["real"]
    assert gsm8k["packed"]["computed"] < gsm8k["padded"]["computed"]
    assert gsm8k["packed"]["real"] > 8 * (40 + 20)  # 8 rows of a prompt and at least 40 forced tokens


# The algorithms' losses, advantages and their pieces: a benchmark runs the trainer that calls them, never
# its own copy of the step. Every public function and class of these modules, and these names.
LOSS_MODULES = ("grpo.loss", "grpo.advantage", "ppo.loss", "ppo.gae", "dpo.loss", "common.kl",
                "common.policy_gradient")
LOSS_NAMES = {"grpo_loss", "group_advantages", "zero_advantage_groups", "GRPOObjective", "normalizer",
              "ppo_policy_loss", "ppo_value_loss", "ppo_total_loss", "compute_gae", "dpo_loss", "sft_loss"}


def loss_names() -> set[str]:
    names = set(LOSS_NAMES)
    for module in LOSS_MODULES:
        path = REPO_ROOT / f"{module.replace('.', '/')}.py"
        if path.exists():
            names |= {node.name for node in ast.parse(path.read_text()).body
                      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")}
    return names


def loss_uses(source: str, names: set[str]) -> list[str]:
    """Where ``source`` imports one of LOSS_MODULES or calls one of ``names`` (a name or an attribute)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call):
            called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if called in names:
                found.append(f"line {node.lineno}: calls {called}")
            continue
        else:
            continue
        found += [f"line {node.lineno}: imports {name}" for name in imported
                  if any(name == module or name.startswith(f"{module}.") for module in LOSS_MODULES)]
    return found


def test_the_loss_scanner_finds_a_copy_of_the_step():
    source = ("from grpo.loss import grpo_loss\nimport grpo.advantage\nfrom common import kl\nfrom ppo import gae\n"
              "loss, _ = grpo_loss(logp, old, adv, mask, objective, objective.normalizer(4, 10))\n")
    assert loss_uses(source, loss_names()) == [
        "line 1: imports grpo.loss", "line 1: imports grpo.loss.grpo_loss", "line 2: imports grpo.advantage",
        "line 3: imports common.kl", "line 4: imports ppo.gae", "line 5: calls grpo_loss", "line 5: calls normalizer"]


def test_no_benchmark_copies_the_step():
    """No file in bench/ imports a loss or advantage module or calls a loss, an advantage or the
    normaliser: the GRPO benchmarks time run_train_grpo.py's own step (issue 28)."""
    names = loss_names()
    assert {"grpo_loss", "group_advantages", "zero_advantage_groups", "dpo_loss"} <= names
    files = sorted((REPO_ROOT / "bench").glob("*.py"))
    assert len(files) >= 8
    uses = {path.name: loss_uses(path.read_text(), names) for path in files}
    assert not any(uses.values()), {name: found for name, found in uses.items() if found}


def write_metrics(path) -> None:
    lines = [{"step": 0, "eval/accuracy": 0.5}]
    lines += [{"step": step, "reward": 0.1 * step, "accuracy": 0.05 * step} for step in range(1, 6)]
    lines += [{"step": 5, "eval/accuracy": 0.6}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_metrics_without_matplotlib_says_how_to_install_it(tmp_path):
    write_metrics(tmp_path / "run.jsonl")
    with pytest.raises(AssertionError, match="needs matplotlib.*pip install matplotlib"):
        run_script(["plot_metrics.py", f"--RUNS={tmp_path / 'run.jsonl'}", f"--OUT_FILE={tmp_path / 'm.png'}"])
    assert not (tmp_path / "m.png").exists()


def test_plot_metrics_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run.jsonl")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    out_file = tmp_path / "plots" / "metrics.png"
    result = run_script(["plot_metrics.py", f"--LOG_DIR={tmp_path}", "--SMOOTHING=2", f"--OUT_FILE={out_file}"])
    assert "from 1 metric files: run\n" in result.stdout  # the pairs file has no metrics and is left out
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cuda_graph_counter_leaves_out_the_pools_empty_capture(monkeypatch):
    """Simulated (no CUDA here): a cudagraph tree manager begins with an empty capture that creates its
    pool (torch/_inductor/cudagraph_trees.py), then records its graphs; only those count (issue 29,
    finding 14)."""
    import torch
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    from bench import count_cuda_graphs

    def capture(graph=None):
        torch.cuda.CUDAGraph.capture_begin(graph)  # what torch.cuda.graph's __enter__ calls

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(CUDAGraphTreeManager, "__init__", lambda self, device_index: capture())  # the pool's
    counter = count_cuda_graphs()
    CUDAGraphTreeManager(0)
    for _ in range(2):  # two graphs recorded
        capture()
    assert counter == {"recorded": 2}

"""Sampled evaluation: the sampler's per-row generators, common.evaluate's sampled pass, eval_math.py's NUM_SAMPLES /
TEMPERATURE (and its greedy default, byte for byte), as functions and as subprocesses."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.evaluate import evaluate, evaluate_sampled, sample_seed
from common.sampled_metrics import pass_at_k
from common.sampler import SamplingParams, row_generators, sample
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR, micro_model, run_script

PROMPTS = [[2, 5, 9, 11, 4], [2, 7, 3], [2, 13, 6, 8]]
EOS, PAD = 1, 0
GREEDY_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "eval_math_greedy_records.jsonl"


def rows_of(out, rows):
    return [out.completion_ids[row, :int(out.completion_lengths[row])].tolist() for row in rows]


@pytest.mark.parametrize("sampler", ["eager", "static"])
def test_a_generator_per_row_makes_a_row_independent_of_its_batch(sampler):
    """A row's tokens depend on its seed and prompt alone: the same with other prompts beside it, alone,
    in chunks of one row, and on either path."""
    model = micro_model("gemma2")
    seeds = [11, 12, 21, 22, 31, 32]
    settings = SamplingParams(num_samples=2, max_new_tokens=12, temperature=1.0, sampler=sampler)
    ids = dict(eos_token_ids=[EOS], pad_token_id=PAD)

    def seeded(row_seeds, **changes):
        return replace(settings, generator=row_generators(row_seeds, "cpu"), **changes)

    together = sample(model, PROMPTS, seeded(seeds), **ids)
    alone = sample(model, PROMPTS[1:2], seeded(seeds[2:4]), **ids)
    chunked = sample(model, PROMPTS[::-1], seeded(seeds[4:] + seeds[2:4] + seeds[:2], chunk_rows=2), **ids)
    eager = sample(model, PROMPTS, seeded(seeds, sampler="eager"), **ids)
    assert rows_of(alone, [0, 1]) == rows_of(together, [2, 3])
    assert rows_of(chunked, range(6)) == rows_of(together, [4, 5, 2, 3, 0, 1])
    assert rows_of(eager, range(6)) == rows_of(together, range(6))
    assert torch.equal(eager.logprobs, together.logprobs) or torch.allclose(eager.logprobs, together.logprobs)
    # Different seeds draw different completions (the micro model samples near-uniformly).
    assert len({tuple(row) for row in rows_of(together, range(6))}) == 6


def test_one_generator_per_row_or_a_refusal():
    model = micro_model("gemma2")
    settings = SamplingParams(num_samples=2, max_new_tokens=3, temperature=1.0)
    ids = dict(eos_token_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(ValueError, match="needs 6 generators, got 3"):
        sample(model, PROMPTS, replace(settings, generator=row_generators([1, 2, 3], "cpu")), **ids)


def test_sample_seed_is_a_function_of_seed_question_and_sample():
    assert sample_seed(0, 5, 3) == sample_seed(0, 5, 3)
    seeds = {sample_seed(seed, question, k) for seed in range(3) for question in range(20) for k in range(8)}
    assert len(seeds) == 3 * 20 * 8  # no two (seed, question, sample) share a stream
    assert sample_seed(-1, 0, 0) == sample_seed(2**64 - 1, 0, 0)  # a negative SEED is taken modulo 2^64


@pytest.fixture(scope="module")
def tiny():
    from common.model import load_model_and_tokenizer
    from common.prompts import configure_prompts, INSTRUCTION

    model, tokenizer, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu", "float32", "none")
    problems = [json.loads(line) for line in (REPO_ROOT / "data" / "synth_test.jsonl").read_text().splitlines()[:10]]
    return model, tokenizer, problems, configure_prompts(tokenizer, INSTRUCTION, "", "auto")


def test_sampled_eval_records_and_metrics_on_the_tiny_model(tiny):
    model, tokenizer, problems, prompt_format = tiny
    options = dict(progress=False, prompt_format=prompt_format)
    settings = SamplingParams(4, max_new_tokens=24, temperature=1.0, chunk_rows=3 * 4, sampler="eager")
    result = evaluate_sampled(model, tokenizer, problems, settings, seed=3, **options)
    assert result.total == 10 and len(result.records) == 10
    for record, problem in zip(result.records, problems):
        assert record["question"] == problem["question"] and len(record["samples"]) == 4
        assert record["num_correct"] == sum(sample["correct"] for sample in record["samples"])
        assert set(record["samples"][0]) == {"output", "prediction", "correct", "strict_correct", "truncated"}
    # Every metric from the records, worked out here again.
    counts = [record["num_correct"] for record in result.records]
    metrics = result.metrics()
    assert metrics["eval/mean@4"] == pytest.approx(sum(counts) / 40)
    assert metrics["eval/pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in counts) / 10)
    assert metrics["eval/pass@4"] == pytest.approx(sum(c > 0 for c in counts) / 10)
    assert metrics["eval/maj@4"] == pytest.approx(sum(r["majority_correct"] for r in result.records) / 10)
    assert metrics["eval/mean@4_strict"] == pytest.approx(
        sum(sample["strict_correct"] for r in result.records for sample in r["samples"]) / 40)
    for name in ("mean@4", "pass@1", "pass@2", "pass@4", "maj@4"):
        assert metrics[f"eval/{name}_ci_low"] <= metrics[f"eval/{name}"] <= metrics[f"eval/{name}_ci_high"]
    assert 0 < metrics["eval/mean@4"] < metrics["eval/pass@4"]  # some right, some wrong: the curve rises
    # Another batch size, the same samples: each question's streams are its own.
    again = evaluate_sampled(model, tokenizer, problems, replace(settings, chunk_rows=10 * 4), seed=3, **options)
    assert again.records == result.records
    # The first two samples of each question are the 2-sample run's.
    two = evaluate_sampled(model, tokenizer, problems, replace(settings, num_samples=2, chunk_rows=4 * 2), seed=3,
                           **options)
    assert [r["samples"] for r in two.records] == [r["samples"][:2] for r in result.records]
    other_seed = evaluate_sampled(model, tokenizer, problems, settings, seed=4, **options)
    assert other_seed.records != result.records


def test_evaluate_adds_the_sampled_pass_to_the_greedy_one(tiny):
    model, tokenizer, problems, prompt_format = tiny
    options = dict(progress=False, prompt_format=prompt_format)
    greedy_settings = SamplingParams(max_new_tokens=24, temperature=0.0, chunk_rows=4, sampler="eager")
    sampled_settings = SamplingParams(2, max_new_tokens=24, temperature=1.0, chunk_rows=4 * 2, sampler="eager")
    greedy = evaluate(model, tokenizer, problems, greedy_settings, **options)
    both = evaluate(model, tokenizer, problems, greedy_settings, sampled=sampled_settings, seed=3, **options)
    assert greedy.sampled is None and both.records == greedy.records
    untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.endswith("tokens_per_s")}  # noqa: E731
    assert untimed(both.metrics()) == {**untimed(greedy.metrics()), **untimed(both.sampled.metrics())}
    assert both.sampled.records == evaluate_sampled(model, tokenizer, problems, sampled_settings, seed=3,
                                                    **options).records
    assert " | 2 samples at T=1: mean@2 " in both.summary() and "pass@2" in both.summary()


def run_eval(tmp_path: Path, name: str, *args: str, check: bool = True):
    out_file = tmp_path / f"{name}.jsonl"
    result = run_script(["eval_math.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--EVAL_FILE=data/synth_test.jsonl",
                         "--DEVICE=cpu", f"--OUT_FILE={out_file}", *args], check=check)
    return result, out_file


def without_strict(record: dict) -> dict:
    """A record as eval_math.py wrote it before strict accuracy: without strict_correct."""
    return {key: value for key, value in record.items() if key != "strict_correct"}


def test_eval_math_defaults_write_the_greedy_records_byte_for_byte(tmp_path):
    """k = 1 at temperature 0: the per-question records eval_math.py wrote before sampling existed
    (the fixture, written by it then with these settings), byte for byte, beside each one's strict_correct
    (checked in tests/test_compare_to.py)."""
    result, out_file = run_eval(tmp_path, "greedy", "--EVAL_LIMIT=12", "--EVAL_BATCH_SIZE=5", "--MAX_NEW_TOKENS=20")
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert all(isinstance(record["strict_correct"], bool) for record in records)
    assert "".join(json.dumps(without_strict(r)) + "\n" for r in records).encode() == GREEDY_FIXTURE.read_bytes()
    summary = json.loads(out_file.with_suffix(".summary.json").read_text())
    assert summary["eval/correct"] == 4 and not any("@" in key for key in summary)
    assert "Sampled" not in result.stdout


def test_eval_math_sampled_with_greedy_too_and_compare_to(tmp_path):
    _, base = run_eval(tmp_path, "base", "--EVAL_LIMIT=12", "--EVAL_BATCH_SIZE=5", "--MAX_NEW_TOKENS=20",
                       "--NUM_SAMPLES=4", "--TEMPERATURE=1")
    result, out_file = run_eval(tmp_path, "both", "--EVAL_LIMIT=12", "--EVAL_BATCH_SIZE=5", "--MAX_NEW_TOKENS=20",
                                "--NUM_SAMPLES=4", "--TEMPERATURE=1", "--GREEDY_TOO=true",
                                f"--COMPARE_TO={base.with_suffix('.summary.json')}")
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    greedy_records = [json.loads(line) for line in GREEDY_FIXTURE.read_text().splitlines()]
    assert [without_strict(r["greedy"]) for r in records] == [
        {key: g[key] for key in ("output", "prediction", "correct", "truncated")} for g in greedy_records]
    assert all("strict_correct" in r["greedy"] for r in records)
    base_records = [json.loads(line) for line in base.read_text().splitlines()]
    assert [r["samples"] for r in records] == [r["samples"] for r in base_records]  # SEED alone decides them
    summary = json.loads(out_file.with_suffix(".summary.json").read_text())
    assert summary["eval/interval"] == "95% percentile bootstrap over the 12 questions (1000 resamples, seed 0)"
    assert summary["eval/accuracy"] == pytest.approx(4 / 12)
    for name in ("mean@4", "pass@1", "pass@2", "pass@4", "maj@4"):
        low, value, high = (summary[f"eval/{name}{end}"] for end in ("_ci_low", "", "_ci_high"))
        assert low <= value <= high
        assert f"  {name:<9} {100 * value:6.2f}%  (95% CI {100 * low:.1f}-{100 * high:.1f}%)" in result.stdout
        assert f"before -> after {name}: {100 * value:.2f}% (12 problems, " in result.stdout  # the same samples
    assert "intervals: 95% percentile bootstrap over the 12 questions" in result.stdout
    # mean@4 of the samples in the requested format: each sample's strict_correct, averaged by hand here.
    assert summary["eval/mean@4_strict"] == pytest.approx(
        sum(sample["strict_correct"] for r in records for sample in r["samples"]) / 48)
    assert "before -> after mean@4_strict: " in result.stdout
    assert "Total: 12  Correct: 4  Accuracy: 33.33%" in result.stdout
    assert "before -> after: " not in result.stdout  # the base summary has no greedy accuracy to compare


def test_eval_math_refuses_samples_at_temperature_0_and_a_missing_compare_to(tmp_path):
    result, _ = run_eval(tmp_path, "x", "--NUM_SAMPLES=4", check=False)
    assert result.returncode != 0
    assert "NUM_SAMPLES=4 at TEMPERATURE=0 would be 4 copies" in result.stderr and "Traceback" not in result.stderr
    result, _ = run_eval(tmp_path, "x", "--COMPARE_TO=nowhere.summary.json", check=False)
    assert "COMPARE_TO=nowhere.summary.json: no such summary file" in result.stderr


def test_eval_math_help_explains_the_sampling_constants():
    result = run_script(["eval_math.py", "--help"])
    for name in ("NUM_SAMPLES", "TEMPERATURE", "TOP_P", "TOP_K", "SEED", "GREEDY_TOO"):
        assert f"--{name}" in result.stdout
    assert "pass@j" in result.stdout and "maj@k" in result.stdout


def test_memory_plan_counts_the_sampled_eval_rows():
    """A sampled eval of EVAL_BATCH_SIZE prompts x k samples: its KV cache and rollout are those of
    EVAL_BATCH_SIZE * k rows, k per prompt."""
    from common.memory_plan import MemoryPlan, kv_cache_bytes, rollout_bytes
    from tests.test_memory_plan import LLAMA_8B, LLAMA_8B_RUN

    greedy = MemoryPlan("llama-3.1-8b", LLAMA_8B, LLAMA_8B_RUN).with_settings(rows=0, eval_rows=8)
    sampled = greedy.with_settings(eval_samples=4)
    assert sampled.kv_cache == kv_cache_bytes(LLAMA_8B, sampled.settings, 32)
    assert sampled.rollout == rollout_bytes(LLAMA_8B, sampled.settings, 32, 4) > greedy.rollout
    assert "eval 8 x 4 samples x 128+256" in sampled.table() and "eval 8 x 128+256" in greedy.table()


def test_sharded_sampled_eval_equals_single_process(tmp_path):
    """13 problems, 4 samples each, in batches of 4 prompts: sharded 6 + 7, so every batch differs from
    the single process's; the samples, the records and every number do not."""
    from tests.test_distributed import launch

    settings = ["eval_math.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--EVAL_FILE=data/synth_test.jsonl",
                "--EVAL_LIMIT=13", "--EVAL_BATCH_SIZE=4", "--MAX_NEW_TOKENS=24", "--DEVICE=cpu", "--NUM_SAMPLES=4",
                "--TEMPERATURE=1", "--SEED=7"]
    single = launch([*settings, f"--OUT_FILE={tmp_path / 'single.jsonl'}"], processes=None)
    sharded = launch([*settings, f"--OUT_FILE={tmp_path / 'sharded.jsonl'}"], processes=2)
    assert (tmp_path / "sharded.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()
    single_summary = json.loads((tmp_path / "single.summary.json").read_text())
    sharded_summary = json.loads((tmp_path / "sharded.summary.json").read_text())
    untimed = [key for key in single_summary if key.startswith("eval/") and not key.endswith("tokens_per_s")]
    assert {key: sharded_summary[key] for key in untimed} == {key: single_summary[key] for key in untimed}
    assert 0 < single_summary["eval/mean@4"] < single_summary["eval/pass@4"]  # not a degenerate case
    table = lambda stdout: [line for line in stdout.splitlines() if line.startswith(("  mean@", "  pass@", "  maj@"))]  # noqa: E731
    # mean@4, pass@1, pass@2, pass@4, maj@4 and mean@4_strict
    assert table(sharded.stdout) == table(single.stdout) and len(table(single.stdout)) == 6


def trainer_args(trainer: str, model_dir, tmp_path) -> list[str]:
    """One step of ``trainer`` on the micro model, evaluated on 3 questions at steps 0 and 1."""
    from tests.test_dpo_trainer import pairs_file

    common = [f"--MODEL_PATH={model_dir}", "--MAX_NEW_TOKENS=4", "--MAX_STEPS=1", "--EVAL_LIMIT=3", "--DEVICE=cpu",
              f"--LOG_DIR={tmp_path}", "--RUN_NAME=smoke", "--EVAL_FILE=data/synth_test.jsonl"]
    if trainer == "run_sft.py":
        return [*common, f"--OUT_DIR={tmp_path / 'sft'}", "--BATCH_SIZE=2", "--LORA_R=2", "--EVAL_EVERY=1",
                "--TRAIN_FILE=data/synth_train.jsonl"]
    common += [f"--CHECKPOINT_DIR={tmp_path}", "--EVAL_EVERY=1"]
    if trainer == "run_train_dpo.py":
        return [*common, f"--TRAIN_FILE={pairs_file(tmp_path / 'pairs.jsonl', 4)}", "--BATCH_SIZE=2",
                "--MICRO_BATCH_SIZE=1", "--LORA_R=2"]
    rollouts = [*common, "--TRAIN_FILE=data/synth_train.jsonl", "--NUM_PROMPTS=4", "--PROMPTS_PER_STEP=2",
                "--NUM_SAMPLES_PER_PROMPT=2"]
    if trainer == "run_train_ppo.py":
        return [*rollouts, "--MINI_BATCH_SIZE=2", "--MICRO_BATCH_SIZE=2", "--CRITIC_HIDDEN=8"]
    return rollouts


@pytest.mark.parametrize("trainer", ["run_train_grpo.py", "run_train_ppo.py", "run_train_dpo.py", "run_sft.py"])
def test_every_trainer_logs_the_sampled_metrics_when_asked_and_explains_them(trainer, micro_model_dir, tmp_path):
    help_text = run_script([trainer, "--help"]).stdout
    assert "--EVAL_NUM_SAMPLES" in help_text and "--EVAL_TEMPERATURE" in help_text
    assert "eval/pass@j" in help_text and "eval/maj@k" in help_text
    result = run_script([trainer, *trainer_args(trainer, micro_model_dir, tmp_path), "--EVAL_NUM_SAMPLES=2",
                         "--EVAL_TEMPERATURE=1"])
    evals = [line for line in map(json.loads, (tmp_path / "smoke.jsonl").read_text().splitlines())
             if "eval/accuracy" in line]
    assert [line["step"] for line in evals] == [0, 1]
    for line in evals:
        assert {"eval/mean@2", "eval/pass@1", "eval/pass@2", "eval/maj@2", "eval/pass@2_ci_high"} <= set(line)
        assert line["eval/num_samples"] == 2 and line["eval/temperature"] == 1.0
    assert "| 2 samples at T=1: mean@2 " in result.stdout


def test_trainers_refuse_eval_samples_at_temperature_0(micro_model_dir, tmp_path):
    result = run_script(["run_train_grpo.py", *trainer_args("run_train_grpo.py", micro_model_dir, tmp_path),
                         "--EVAL_NUM_SAMPLES=4"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "EVAL_NUM_SAMPLES=4 at EVAL_TEMPERATURE=0 would be 4 copies of the greedy completion" in result.stderr


def write_summary(path: Path, lora, values: dict, greedy=None) -> Path:
    summary = {"config": {"MODEL_PATH": "models/tiny-gemma2-math", "LORA_CKPT": lora, "TEMPERATURE": 1.0},
               "eval/total": 500}
    for name, value in values.items():
        summary.update({f"eval/{name}": value, f"eval/{name}_ci_low": value - 0.02, f"eval/{name}_ci_high": value + 0.03})
    if greedy is not None:
        summary["eval/accuracy"] = greedy
    path.write_text(json.dumps(summary))
    return path


def test_plot_metrics_draws_pass_at_k_of_several_summaries(tmp_path):
    pytest.importorskip("matplotlib")
    base = write_summary(tmp_path / "base.summary.json", None,
                         {"mean@4": 0.4, "pass@1": 0.4, "pass@2": 0.55, "pass@4": 0.7, "maj@4": 0.5}, greedy=0.52)
    tuned = write_summary(tmp_path / "grpo.summary.json", "checkpoints/demo-grpo",
                          {"mean@4": 0.5, "pass@1": 0.5, "pass@2": 0.6, "pass@4": 0.72, "maj@4": 0.6})
    out_file = tmp_path / "passk.png"
    result = run_script(["plot_metrics.py", f"--PASS_AT_K={base},{tuned}", f"--OUT_FILE={out_file}"])
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("tiny-gemma2-math (T=1, 500 questions) [" in result.stdout
            and "pass@1 40.00% (38.0-43.0), pass@2 55.00% (53.0-58.0), pass@4 70.00% (68.0-73.0), "
                "maj@4 50.00% (48.0-53.0), greedy 52.00%" in result.stdout)
    assert "tiny-gemma2-math + checkpoints/demo-grpo (T=1, 500 questions)" in result.stdout
    greedy_only = tmp_path / "greedy.summary.json"
    greedy_only.write_text(json.dumps({"config": {"MODEL_PATH": "m", "TEMPERATURE": 0.0}, "eval/total": 5,
                                       "eval/accuracy": 0.5}))
    refused = run_script(["plot_metrics.py", f"--PASS_AT_K={greedy_only}", f"--OUT_FILE={out_file}", "--OVERWRITE=true"],
                         check=False)
    assert refused.returncode != 0 and "holds no pass@k" in refused.stderr and "Traceback" not in refused.stderr


def test_plot_metrics_draws_the_sampled_metrics_over_training(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [{"step": 0, "eval/accuracy": 0.5, "eval/mean@4": 0.4, "eval/pass@2": 0.55, "eval/pass@4": 0.7,
              "eval/maj@4": 0.5, "eval/pass@4_ci_low": 0.6}]
    lines += [{"step": step, "reward": 0.1 * step, "accuracy": 0.05 * step} for step in range(1, 4)]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out_file = tmp_path / "metrics.png"
    result = run_script(["plot_metrics.py", f"--RUNS={tmp_path / 'run.jsonl'}", f"--OUT_FILE={out_file}"])
    assert "from 1 metric files: run" in result.stdout and out_file.read_bytes()[:4] == b"\x89PNG"
    # Greedy, then mean@k, pass@ the largest j, maj@k; no interval bound.
    assert "run: held-out eval/accuracy, eval/mean@4, eval/pass@4, eval/maj@4\n" in result.stdout

"""Out-of-memory never ends a run (common/oom.py): the back-off alone, and an eval batch in process."""

import json

import pytest
import torch

from common.oom import BatchSizes
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR


def out_of_memory() -> torch.OutOfMemoryError:
    """The error CUDA's caching allocator raises (torch.cuda.OutOfMemoryError is the same class),
    constructible without a GPU."""
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_an_out_of_memory_error_halves_the_size_rewinds_and_retries(capsys):
    sizes = BatchSizes(MICRO_BATCH_SIZE=16)
    generator = torch.Generator().manual_seed(0)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(0))
    tried = []
    for attempt in sizes.attempts("MICRO_BATCH_SIZE", "the policy pass", rewind=[generator]):
        with attempt:
            tried.append((attempt.size, attempt.retry))
            drawn = torch.rand(3, generator=generator)
            if attempt.size > 4:
                raise out_of_memory()
    assert tried == [(16, False), (8, True), (4, True)]
    assert torch.equal(drawn, expected)  # each retry drew what the first try drew
    assert sizes["MICRO_BATCH_SIZE"] == 4 and sizes.state_dict() == {"MICRO_BATCH_SIZE": 4}
    assert capsys.readouterr().out.splitlines() == [
        "out of memory in the policy pass at MICRO_BATCH_SIZE=16: retrying with 8 for the rest of the run",
        "out of memory in the policy pass at MICRO_BATCH_SIZE=8: retrying with 4 for the rest of the run"]


def test_at_size_1_and_for_other_errors_the_error_is_raised():
    sizes = BatchSizes(EVAL_BATCH_SIZE=1, MICRO_BATCH_SIZE=4)
    with pytest.raises(torch.OutOfMemoryError):
        for attempt in sizes.attempts("EVAL_BATCH_SIZE", "an eval batch"):
            with attempt:
                raise out_of_memory()
    with pytest.raises(RuntimeError, match="not memory"):
        for attempt in sizes.attempts("MICRO_BATCH_SIZE", "the policy pass"):
            with attempt:
                raise RuntimeError("not memory")
    assert sizes.state_dict() == {"EVAL_BATCH_SIZE": 1, "MICRO_BATCH_SIZE": 4}


def test_a_resume_keeps_the_smaller_sizes_of_unchanged_constants():
    sizes = BatchSizes(MICRO_BATCH_SIZE=16, EVAL_BATCH_SIZE=64, GENERATION_BATCH_SIZE=32)
    sizes.load_state_dict({"MICRO_BATCH_SIZE": 4, "EVAL_BATCH_SIZE": 8, "GENERATION_BATCH_SIZE": 64},
                          unchanged=["MICRO_BATCH_SIZE", "GENERATION_BATCH_SIZE"])
    # EVAL_BATCH_SIZE was given anew on resume: its value wins; a larger saved size changes nothing.
    assert sizes.state_dict() == {"MICRO_BATCH_SIZE": 4, "EVAL_BATCH_SIZE": 64, "GENERATION_BATCH_SIZE": 32}


def test_an_eval_batch_out_of_memory_gives_the_same_records(monkeypatch):
    """Greedy and sampled (seeded per row) passes whose second batch runs out of memory once: the
    records of a run at the halved size, which the run's sizes keep."""
    import common.evaluate
    from common.evaluate import evaluate
    from common.model import load_model_and_tokenizer
    from common.prompts import INSTRUCTION, configure_prompts
    from common.sampler import SamplingParams

    model, tokenizer, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu", "float32", "none")
    problems = [json.loads(line) for line in (REPO_ROOT / "data" / "synth_test.jsonl").read_text().splitlines()[:8]]
    options = dict(progress=False, prompt_format=configure_prompts(tokenizer, INSTRUCTION, "", "auto"), seed=3)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, chunk_rows=4, sampler="eager")
    sampled = SamplingParams(2, max_new_tokens=16, temperature=1.0, chunk_rows=4 * 2, sampler="eager")
    expected = evaluate(model, tokenizer, problems, greedy, sampled=sampled, **options)

    sample, calls = common.evaluate.sample, []

    def fails_on_the_second_call(*args, **kwargs):
        calls.append(args[2].chunk_rows)
        if len(calls) == 2:
            raise out_of_memory()
        return sample(*args, **kwargs)

    monkeypatch.setattr(common.evaluate, "sample", fails_on_the_second_call)
    sizes = BatchSizes(model, EVAL_BATCH_SIZE=4)
    result = evaluate(model, tokenizer, problems, greedy, sampled=sampled, sizes=sizes, **options)
    assert result.records == expected.records and result.sampled.records == expected.sampled.records
    assert sizes["EVAL_BATCH_SIZE"] == 2
    # Greedy: 4, then 4 failed, 2, 2; the sampled pass keeps 2 prompts (4 rows) per batch.
    assert calls == [4, 4, 2, 2] + [4] * 4

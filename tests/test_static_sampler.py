"""The static-cache sampler (sample_with(..., sampler="static" / "compiled")) against the eager one: the same
tokens (greedy and sampled, same seed), the same log-probs as the training forward, rows stopping at
different steps, on micro models and the built-in tiny model; the compiled step once, on the CPU."""

import pytest
import torch

from common.logprobs import token_logprobs
from common.sampler import PROMPT_BUCKET, left_pad
from tests.conftest import TINY_MODEL_DIR, micro_model, sample_with

PROMPTS = [[2, 5, 9, 11, 4], [2, 7, 3], [2, 13, 6, 8]]  # different lengths: left padding matters
PAD = 0


def stop_token_ending_some_rows(model, new_tokens: int = 12) -> int:
    """A token that row 0 emits third when nothing stops it: as a stop token it ends some rows early."""
    free_run = sample_with(model, PROMPTS, num_samples=2, max_new_tokens=new_tokens, temperature=0.0, eos_token_ids=[-1],
                      pad_token_id=PAD, sampler="eager")
    return int(free_run.completion_ids[0, 2])


def assert_same_samples(ours, reference):
    assert torch.equal(ours.completion_ids, reference.completion_ids)
    assert torch.equal(ours.completion_mask, reference.completion_mask)
    assert torch.equal(ours.truncated, reference.truncated)
    torch.testing.assert_close(ours.logprobs, reference.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "llama", "qwen2"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_static_path_gives_the_eager_tokens_for_a_seed(arch, temperature, top_k, top_p):
    model = micro_model(arch)
    stop = stop_token_ending_some_rows(model)
    settings = dict(num_samples=4, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_token_ids=[stop], pad_token_id=PAD)
    eager_generator, static_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    eager = sample_with(model, PROMPTS, sampler="eager", generator=eager_generator, **settings)
    static = sample_with(model, PROMPTS, sampler="static", generator=static_generator, **settings)
    assert_same_samples(static, eager)
    lengths = eager.completion_lengths
    assert lengths.min() < lengths.max()  # rows stopped at different steps
    # The static path computes up to STOP_CHECK_EVERY - 1 steps past the last stop, and rewinds its
    # generator to where the eager path stopped drawing: the next call draws the same numbers too.
    assert torch.equal(static_generator.get_state(), eager_generator.get_state())


def test_static_path_logprobs_equal_the_training_forward():
    model = micro_model("gemma2")
    out = sample_with(model, PROMPTS, num_samples=3, max_new_tokens=10, temperature=0.8,
                 eos_token_ids=[stop_token_ending_some_rows(model)], pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(5), sampler="static")
    rows = [prompt + ids[:n].tolist() for prompt, ids, n in
            zip(out.prompt_ids, out.completion_ids, out.completion_lengths.tolist())]
    input_ids, attention_mask = left_pad(rows, PAD, torch.device("cpu"))
    with torch.no_grad():
        recomputed = token_logprobs(model, input_ids, attention_mask, temperature=0.8)
    for row, n in enumerate(out.completion_lengths.tolist()):
        torch.testing.assert_close(recomputed[row, -n:], out.logprobs[row, :n], atol=1e-5, rtol=0)


def test_static_path_on_the_tiny_model_reuses_its_buffers_and_matches_eager():
    """Two batches of the same shape in a row: the second reuses the first's KV buffers (as a CUDA graph
    needs), with nothing of the first left in them; chunks of rows, as sample() makes them."""
    from common.data import load_problems
    from common.model import load_model_and_tokenizer, stop_token_ids
    from common.prompts import encode_prompts
    from common.sampler import _KV_STORAGE

    model, tokenizer, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu", "float32")
    stop_ids = stop_token_ids(model, tokenizer)
    questions = [problem["question"] for problem in load_problems("data/synth_test.jsonl", limit=8)]
    caches = []
    for batch, temperature in ((questions[:4], 0.0), (questions[4:], 1.0)):
        prompt_ids = encode_prompts(tokenizer, batch)
        settings = dict(num_samples=2, max_new_tokens=40, temperature=temperature, eos_token_ids=stop_ids,
                        pad_token_id=tokenizer.pad_token_id, chunk_rows=4)
        eager = sample_with(model, prompt_ids, sampler="eager", generator=torch.Generator().manual_seed(0), **settings)
        static = sample_with(model, prompt_ids, sampler="static", generator=torch.Generator().manual_seed(0),
                             **settings)
        assert_same_samples(static, eager)
        assert eager.completion_lengths.min() < eager.completion_lengths.max()
        assert max(len(p) for p in prompt_ids) <= PROMPT_BUCKET  # one bucket: one buffer shape for both batches
        caches.append(list(_KV_STORAGE[model].caches.values()))
    assert len(caches[0]) == 1 and caches[0][0] is caches[1][0]


def test_kv_buffers_shrink_back_after_a_long_call_within_one_allocation():
    """A call needing fewer slots than an earlier one attends over its own slots alone, in a view at the
    start of the same allocation; the longer shape met again reuses its first view: the same tokens as
    the eager path every time."""
    from common.sampler import SLOT_MULTIPLE, _KV_STORAGE

    model = micro_model("llama")
    settings = dict(num_samples=2, temperature=1.0, eos_token_ids=[stop_token_ending_some_rows(model)],
                    pad_token_id=PAD)
    storages, slots_met = [], []
    for max_new_tokens in (40, 8, 40):
        static = sample_with(model, PROMPTS, max_new_tokens=max_new_tokens, sampler="static",
                             generator=torch.Generator().manual_seed(4), **settings)
        eager = sample_with(model, PROMPTS, max_new_tokens=max_new_tokens, sampler="eager",
                            generator=torch.Generator().manual_seed(4), **settings)
        assert_same_samples(static, eager)
        storages.append(_KV_STORAGE[model])
        slots_met.append(sorted(slots for _, slots in storages[-1].caches))
    # slots: PROMPT_BUCKET + max_new_tokens - 1, rounded up to a multiple of SLOT_MULTIPLE (16)
    assert SLOT_MULTIPLE == 16 and slots_met == [[112], [80, 112], [80, 112]]
    storage = storages[0]
    assert storages[1] is storage and storages[2] is storage  # one allocation
    assert {cache.layers[0].keys.data_ptr() for cache in storage.caches.values()} == {storage.flat[0][0].data_ptr()}


def test_static_path_refusals():
    model = micro_model("gemma2", sliding_window=16)
    settings = dict(max_new_tokens=14, temperature=0.0, eos_token_ids=[1], pad_token_id=PAD)
    with pytest.raises(ValueError, match="sliding window"):  # 5 + 14 tokens do not fit in a window of 16
        sample_with(model, PROMPTS, sampler="static", **settings)
    fits = sample_with(model, PROMPTS, sampler="static", **settings | dict(max_new_tokens=11))
    assert torch.equal(fits.completion_ids, sample_with(model, PROMPTS, sampler="eager",
                                                   **settings | dict(max_new_tokens=11)).completion_ids)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_with(model, PROMPTS, sampler="fast", **settings)


def test_compiled_path_on_the_cpu_with_lora():
    """torch.compile'd decode step (inductor on the CPU; CUDA graphs only on CUDA) over a LoRA model:
    the eager tokens, the compilation reported by the first call and not by the next; other row counts
    reuse it (rows and cache length are dynamic)."""
    from common.lora import apply_lora, lora_modules

    model = micro_model("gemma2")
    apply_lora(model, r=2, alpha=4, target_modules=("q_proj", "v_proj", "down_proj"))
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
    stop = stop_token_ending_some_rows(model)
    compile_seconds = []
    for num_samples in (4, 4, 2):
        settings = dict(num_samples=num_samples, max_new_tokens=12, temperature=1.0, eos_token_ids=[stop],
                        pad_token_id=PAD)
        eager = sample_with(model, PROMPTS, sampler="eager", generator=torch.Generator().manual_seed(3), **settings)
        compiled = sample_with(model, PROMPTS, sampler="compiled", generator=torch.Generator().manual_seed(3), **settings)
        assert_same_samples(compiled, eager)
        assert eager.compile_seconds == 0.0
        compile_seconds.append(compiled.compile_seconds)
    first, same_shape, other_rows = compile_seconds
    assert first > 0.2  # dynamo traces, inductor compiles (C++ on the CPU): at least a fraction of a second
    assert same_shape < 0.05 * first and other_rows < 0.05 * first


def test_one_off_seconds_hand_worked():
    from common.sampler import _one_off_seconds

    assert _one_off_seconds([5.0, 0.3, 0.01]) == pytest.approx(4.99 + 0.29)  # compilation, then a recording
    assert _one_off_seconds([0.015, 0.012, 0.01]) == 0.0  # within twice a steady step: noise
    assert _one_off_seconds([0.5, 0.4]) == pytest.approx(0.9)  # no third step to compare with


def test_auto_samples_eagerly_on_the_cpu():
    from common.sampler import _KV_STORAGE

    model = micro_model("qwen2")
    auto = sample_with(model, PROMPTS, max_new_tokens=5, temperature=0.0, eos_token_ids=[1], pad_token_id=PAD)
    eager = sample_with(model, PROMPTS, max_new_tokens=5, temperature=0.0, eos_token_ids=[1], pad_token_id=PAD,
                   sampler="eager")
    assert torch.equal(auto.completion_ids, eager.completion_ids)
    assert model not in _KV_STORAGE and auto.compile_seconds == 0.0  # no static buffers: the eager path ran

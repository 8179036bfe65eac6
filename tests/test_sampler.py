"""The shared sampler: masks, stop tokens, truncation, greedy = generate, top-k / top-p sets."""

import pytest
import torch

from common.sampler import filter_logits, left_pad
from tests.conftest import micro_model, sample_with

PROMPTS = [[2, 5, 9, 11, 4], [2, 7, 3], [2, 13, 6, 8]]  # different lengths: left padding matters
EOS = 1
PAD = 0


def test_filter_logits_hand_worked():
    # softmax([2, 1, 0, -1]) = [0.6439, 0.2369, 0.0871, 0.0321]
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    kept = lambda filtered: torch.isfinite(filtered[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=3)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_k=1)) == [0]
    assert kept(filter_logits(logits, top_p=0.7)) == [0, 1]  # 0.6439 < 0.7, so the second is needed
    assert kept(filter_logits(logits, top_p=0.6)) == [0]  # the first alone reaches 0.6
    assert kept(filter_logits(logits, top_p=0.95)) == [0, 1, 2]  # 0.6439 + 0.2369 = 0.8808 < 0.95
    assert kept(filter_logits(logits, top_k=2, top_p=0.95)) == [0, 1]
    assert kept(filter_logits(logits)) == [0, 1, 2, 3]


def test_left_pad():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], PAD, torch.device("cpu"))
    assert input_ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rows_are_prompts_times_samples():
    model = micro_model("gemma2")
    out = sample_with(model, PROMPTS, num_samples=4, max_new_tokens=5, temperature=1.0, eos_token_ids=[EOS],
                 pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert out.completion_ids.shape[0] == 12
    assert out.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert out.prompt_ids[5] == PROMPTS[1]


@pytest.mark.parametrize("arch", ["gemma2", "llama", "qwen2"])
def test_greedy_equals_generate(arch):
    """Token for token, with left padding, against transformers' own generate()."""
    model = micro_model(arch)
    new_tokens = 8
    ours = sample_with(model, PROMPTS, max_new_tokens=new_tokens, temperature=0.0, eos_token_ids=[EOS],
                  pad_token_id=PAD)
    input_ids, attention_mask = left_pad(PROMPTS, PAD, torch.device("cpu"))
    reference = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                               max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD,
                               top_k=None, top_p=None)
    reference = reference[:, input_ids.size(1):]
    for row in range(len(PROMPTS)):
        length = int(ours.completion_lengths[row])
        assert ours.completion_ids[row, :length].tolist() == reference[row, :length].tolist()


def test_stop_token_is_inside_the_mask_and_nothing_after():
    model = micro_model("gemma2")
    free_run = sample_with(model, PROMPTS, max_new_tokens=10, temperature=0.0, eos_token_ids=[63],
                      pad_token_id=PAD)
    # Declare the token that row 0 emits third a stop token: that row must end right there.
    stop = int(free_run.completion_ids[0, 2])
    first_stop = free_run.completion_ids[0].tolist().index(stop)
    out = sample_with(model, PROMPTS, max_new_tokens=10, temperature=0.0, eos_token_ids=[stop], pad_token_id=PAD)
    mask = out.completion_mask[0]
    assert mask[:first_stop + 1].tolist() == [1.0] * (first_stop + 1)  # the stop token counts
    assert mask[first_stop + 1:].sum() == 0
    assert int(out.completion_ids[0, first_stop]) == stop
    assert (out.completion_ids[0, first_stop + 1:] == PAD).all()
    assert (out.logprobs[0, first_stop + 1:] == 0).all()
    assert not bool(out.truncated[0])


def test_mask_is_not_built_from_pad_id_when_pad_equals_eos():
    """With pad == EOS (a common default), the EOS a row emits must still be in its mask."""
    model = micro_model("gemma2")
    free_run = sample_with(model, PROMPTS, max_new_tokens=6, temperature=0.0, eos_token_ids=[63], pad_token_id=PAD)
    stop = int(free_run.completion_ids[1, 1])
    out = sample_with(model, PROMPTS, max_new_tokens=6, temperature=0.0, eos_token_ids=[stop], pad_token_id=stop)
    first_stop = out.completion_ids[1].tolist().index(stop)
    assert out.completion_lengths[1] == first_stop + 1


def test_row_without_stop_token_is_truncated():
    model = micro_model("gemma2")
    out = sample_with(model, PROMPTS, max_new_tokens=4, temperature=1.0, eos_token_ids=[999], pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(0))
    assert out.truncated.all()
    assert out.completion_mask.sum(dim=1).tolist() == [4.0, 4.0, 4.0]


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (5, 0.3)])
def test_top_k_top_p_never_leave_the_kept_set(top_k, top_p):
    model = micro_model("gemma2")
    prompt = PROMPTS[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float() / 0.9
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, cumulative = set(), 0.0
    for rank, token in enumerate(order):  # the kept set, worked out by hand from the sorted probabilities
        if (top_k and rank >= top_k) or cumulative >= top_p:
            break
        kept.add(token)
        cumulative += float(probs[token])
    out = sample_with(model, [prompt], num_samples=300, max_new_tokens=1, temperature=0.9, top_k=top_k, top_p=top_p,
                 eos_token_ids=[EOS], pad_token_id=PAD, generator=torch.Generator().manual_seed(1))
    emitted = set(out.completion_ids[:, 0].tolist())
    assert emitted <= kept
    assert len(emitted) >= min(2, len(kept))  # sampling, not greedy


def test_chunking_and_seed_reproducibility():
    model = micro_model("llama")
    whole = sample_with(model, PROMPTS, num_samples=3, max_new_tokens=6, temperature=0.0, eos_token_ids=[EOS],
                   pad_token_id=PAD)
    chunked = sample_with(model, PROMPTS, num_samples=3, max_new_tokens=6, temperature=0.0, eos_token_ids=[EOS],
                     pad_token_id=PAD, chunk_rows=4)
    width = whole.completion_ids.size(1)
    assert torch.equal(chunked.completion_ids[:, :width], whole.completion_ids)
    first = sample_with(model, PROMPTS, num_samples=2, max_new_tokens=6, eos_token_ids=[EOS], pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(7))
    second = sample_with(model, PROMPTS, num_samples=2, max_new_tokens=6, eos_token_ids=[EOS], pad_token_id=PAD,
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.completion_ids, second.completion_ids)


@pytest.mark.parametrize("arch, temperature", [("gemma2", 1.0), ("gemma2", 0.7), ("llama", 1.3)])
def test_sampler_logprobs_equal_recomputed_token_logprobs(arch, temperature):
    """The old log-probs of a rollout equal the training forward's: the first policy ratio is 1."""
    from common.logprobs import token_logprobs

    model = micro_model(arch)
    out = sample_with(model, PROMPTS, num_samples=2, max_new_tokens=6, temperature=temperature, eos_token_ids=[EOS],
                 pad_token_id=PAD, generator=torch.Generator().manual_seed(5))
    # Rebuild each row as left-padded prompt + completion, then read the completion's log-probs.
    rows = [prompt + ids[:n].tolist() for prompt, ids, n in
            zip(out.prompt_ids, out.completion_ids, out.completion_lengths.tolist())]
    input_ids, attention_mask = left_pad(rows, PAD, torch.device("cpu"))
    with torch.no_grad():
        recomputed = token_logprobs(model, input_ids, attention_mask, temperature=temperature, chunk_size=5)
    for row, n in enumerate(out.completion_lengths.tolist()):
        torch.testing.assert_close(recomputed[row, -n:], out.logprobs[row, :n], atol=1e-5, rtol=1e-5)


def naive_multinomial_sample(model, prompts, num_samples, max_new_tokens, temperature, generator):
    """The plainest sampler: the whole sequence through the model at every step (no cache), every row
    in the batch to the end (stopped rows draw too, their tokens are thrown away), torch.multinomial."""
    sequences = [list(prompt) for prompt in prompts for _ in range(num_samples)]
    completions = [[] for _ in sequences]
    for _ in range(max_new_tokens):
        input_ids, attention_mask = left_pad(sequences, PAD, torch.device("cpu"))
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        probabilities = (logits[:, -1].float() / temperature).softmax(dim=-1)
        tokens = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1).tolist()
        for row, token in enumerate(tokens):
            if not completions[row] or completions[row][-1] != EOS:
                completions[row].append(token)
                sequences[row].append(token)
        if all(completion[-1] == EOS for completion in completions):
            break
    return completions


@pytest.mark.parametrize("arch,temperature", [("gemma2", 1.0), ("llama", 0.7)])
def test_sampled_tokens_equal_a_naive_multinomial_loop_with_the_same_seed(arch, temperature):
    """The KV cache, the prompt prefilled once per distinct prompt, stopped rows leaving the batch: none
    of it changes which tokens a seed gives."""
    torch.manual_seed(0)
    model = micro_model(arch)
    ours = sample_with(model, PROMPTS, num_samples=4, max_new_tokens=12, temperature=temperature, eos_token_ids=[EOS],
                  pad_token_id=PAD, generator=torch.Generator().manual_seed(3))
    reference = naive_multinomial_sample(model, PROMPTS, 4, 12, temperature, torch.Generator().manual_seed(3))
    lengths = ours.completion_lengths.tolist()
    assert [ours.completion_ids[row, :length].tolist() for row, length in enumerate(lengths)] == reference
    assert 0 < sum(ours.truncated.tolist()) < len(lengths)  # rows stopped at different steps, some never

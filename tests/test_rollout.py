"""Rollout layout: completion log-probs read at the right columns, zero-advantage rows dropped."""

import pytest
import torch

from common.logprobs import layout_logprobs
from common.rollout import rollout_batch
from tests.conftest import micro_model, sample_with

PROMPTS = [[2, 5, 9, 11, 4], [2, 7, 3], [2, 13, 6, 8]]
EOS, PAD = 1, 0


def sampled(model, temperature=1.0):
    return sample_with(model, PROMPTS, num_samples=2, max_new_tokens=7, temperature=temperature, eos_token_ids=[EOS, 17],
                  pad_token_id=PAD, generator=torch.Generator().manual_seed(2))


def test_layout_and_logprobs_match_the_sampler():
    model = micro_model("gemma2")
    samples = sampled(model, temperature=0.8)
    batch = rollout_batch(samples, None, PAD)
    assert batch.num_rows == 6 and batch.prompt_width == 5
    assert batch.num_tokens == int(samples.completion_mask.sum())
    for row in range(6):
        prompt = samples.prompt_ids[row]
        assert batch.input_ids[row, 5 - len(prompt):5].tolist() == prompt
        length = int(samples.completion_lengths[row])
        assert batch.input_ids[row, 5:5 + length].tolist() == samples.completion_ids[row, :length].tolist()
        assert batch.attention_mask[row].sum() == len(prompt) + length
    batch.plan_passes(4, 0, True, pack_length=12)
    assert sorted(torch.cat([rows for rows, _ in batch.passes]).tolist()) == list(range(6))
    with torch.no_grad():
        for micro in batch.micro_batches():
            logp = layout_logprobs(model, micro.layout, 0.8, chunk_size=3)[0]
            assert logp.shape == (len(micro.rows), batch.completion_width)
            torch.testing.assert_close(logp * micro.completion_mask, samples.logprobs[batch.rows[micro.rows]],
                                       atol=1e-5, rtol=1e-5)
        # the passes' results back in the rollouts' order: row i is sample row i
        torch.testing.assert_close(batch.logprobs(model, 0.8, chunk_size=3) * batch.completion_mask,
                                   samples.logprobs, atol=1e-5, rtol=1e-5)


def test_old_logprobs_equal_training_logprobs_exactly():
    """With no update in between, the stored old log-probs and the differentiable forward agree
    bit for bit: the first ratio of every iteration scheme is exactly 1."""
    model = micro_model("llama")
    batch = rollout_batch(sampled(model), None, PAD)
    batch.plan_passes(4, 0, True, pack_length=12)
    with torch.no_grad():
        old = batch.logprobs(model, 1.0, chunk_size=5)
    new = batch.in_row_order([layout_logprobs(model, layout, 1.0, chunk_size=5)[0] for _, layout in batch.passes])
    assert new.requires_grad
    assert torch.equal(torch.exp(new.detach() - old), torch.ones_like(old))


def test_rows_of_zero_advantage_groups_are_dropped():
    model = micro_model("gemma2")
    samples = sampled(model)
    keep = torch.tensor([True, True, False, False, True, True])  # the second prompt's group scored all equal
    batch = rollout_batch(samples, keep, PAD)
    assert batch.rows.tolist() == [0, 1, 4, 5]
    assert batch.num_tokens == int(samples.completion_mask[[0, 1, 4, 5]].sum())
    empty = rollout_batch(samples, torch.zeros(6, dtype=torch.bool), PAD)
    assert empty.num_rows == 0 and empty.num_tokens == 0


def test_rollout_batch_refuses_a_mask_that_is_not_zero_or_one():
    """The 0/1 check of the completion mask runs once per step, where the rollouts are laid out (the
    losses no longer read the mask's values: on a GPU that is a host sync per micro-batch)."""
    from common.sampler import SampleOutput

    samples = SampleOutput(prompt_ids=[[5, 6]], completion_ids=torch.tensor([[7, 1]]),
                           completion_mask=torch.tensor([[1.0, 0.5]]), logprobs=torch.zeros(1, 2),
                           truncated=torch.tensor([False]), texts=["x"], prompt_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        rollout_batch(samples, None, pad_token_id=0)

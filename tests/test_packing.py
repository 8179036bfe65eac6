"""Packed policy passes (common/packing.py): the same per-token log-probs, entropies and LoRA
gradients as padded rectangles and as each sequence run alone, on every architecture's micro model,
eager and sdpa, Gemma 2's sliding window crossed; bin packing, token budgets, the pack-length choice."""

import pytest
import torch

from common.logprobs import layout_logprobs
from common.lora import apply_lora, lora_parameters
from common.packing import (first_fit_decreasing, micro_batch_rows, packing_plan, pass_layout, token_budget_ranges,
                            to_device)
from common.rollout import RolloutBatch
from tests.conftest import MICRO_ARCHITECTURES, micro_arch_model

PAD = 0
# (prompt, completion) lengths: whole sequences from 2 to 200 tokens in one micro-batch.
SHAPES = [(1, 1), (3, 197), (5, 40), (2, 120), (10, 7), (1, 150), (4, 1), (6, 60)]


def rollouts_of(shapes, vocab_size=64, seed=0) -> RolloutBatch:
    """A RolloutBatch in the sampler's layout, [pads | prompt | completion | pads], random tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompt_width = max(p for p, _ in shapes)
    completion_width = max(c for _, c in shapes) + 3  # some columns of pads after the longest
    input_ids = torch.full((len(shapes), prompt_width + completion_width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros(len(shapes), completion_width)
    for row, (prompt, completion) in enumerate(shapes):
        tokens = torch.randint(3, vocab_size, (prompt + completion,), generator=generator)
        input_ids[row, prompt_width - prompt:prompt_width + completion] = tokens
        attention_mask[row, prompt_width - prompt:prompt_width + completion] = 1
        completion_mask[row, :completion] = 1
    return RolloutBatch(input_ids, attention_mask, completion_mask, prompt_width, torch.arange(len(shapes)), PAD)


def one_layout(batch: RolloutBatch, rows, packing: bool, pack_length):
    """The rows ``rows`` of ``batch`` as one micro-batch: packed into rows of at most ``pack_length``
    tokens (None: one row), or padded."""
    sequences, completion_lengths = batch.sequences(rows)
    return pass_layout(sequences, completion_lengths, batch.completion_width, pack_length, packing, batch.pad_token_id)


def alone_reference(model, batch: RolloutBatch, temperature: float):
    """Each row's completion log-probs and entropies from the model's own full logits, the row run
    alone without any padding: [N, completion_width], 0 past the end."""
    logp = torch.zeros(batch.num_rows, batch.completion_width)
    entropy = torch.zeros_like(logp)
    for row in range(batch.num_rows):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row, real]
        completion = int(batch.completion_mask[row].sum())
        log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0].double() / temperature, dim=-1)
        predicting = log_probs[len(ids) - completion - 1:-1]
        logp[row, :completion] = predicting.gather(1, ids[len(ids) - completion:, None]).squeeze(1).float()
        entropy[row, :completion] = -(predicting.exp() * predicting).sum(-1).float()
    return logp, entropy


def lora_model(arch, attention="eager", **overrides):
    torch.manual_seed(0)  # the same weights whatever ran before
    model = micro_arch_model(arch, max_position_embeddings=256, **overrides)
    if attention != "eager":
        model.set_attn_implementation(attention)
    apply_lora(model, 4, 8.0, "all-linear")
    for parameter in lora_parameters(model):  # B = 0 at initialisation: make the adapters act
        torch.nn.init.normal_(parameter, std=0.2)
    return model


def pass_results(model, batch: RolloutBatch, layout, weights):
    """Per-token log-probs and entropies of one micro-batch, and the LoRA gradients of a loss that
    weighs every token of both."""
    model.zero_grad(set_to_none=True)
    logp, entropy, _ = layout_logprobs(model, layout, 0.7, chunk_size=50, with_entropy=True)
    ((logp * weights).sum() + (entropy * weights.flip(1)).sum()).backward()
    # (gemma3: the vision tower's adapters get no gradient from text)
    return logp.detach(), entropy.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                             for p in lora_parameters(model)]


def assert_gradients_close(actual, expected):
    """To 1e-5 of the gradient's scale: the adapters' gradients here reach ~10, and a sum over hundreds
    of tokens in another order differs by fp32 rounding at that scale (a few 1e-6 absolute)."""
    for actual_grad, expected_grad in zip(actual, expected, strict=True):
        torch.testing.assert_close(actual_grad, expected_grad, atol=1e-5 * float(expected_grad.abs().max().clamp(min=1)),
                                   rtol=1e-5)


def check_packed_equals_padded(model, batch):
    weights = torch.randn(batch.num_rows, batch.completion_width, generator=torch.Generator().manual_seed(1))
    weights = weights * batch.completion_mask
    rows = slice(0, batch.num_rows)
    longest = int(batch.sequence_lengths.max())
    packed_layout = one_layout(batch, rows, packing=True, pack_length=longest)
    assert packed_layout.input_ids.size(0) < batch.num_rows  # several sequences share a row
    padded = pass_results(model, batch, one_layout(batch, rows, packing=False, pack_length=None), weights)
    packed = pass_results(model, batch, packed_layout, weights)
    one_row = pass_results(model, batch, one_layout(batch, rows, packing=True, pack_length=None), weights)
    with torch.no_grad():
        reference_logp, reference_entropy = alone_reference(model, batch, 0.7)
    torch.testing.assert_close(padded[0], reference_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1], reference_entropy, atol=1e-5, rtol=0)
    for other in (packed, one_row):
        torch.testing.assert_close(other[0], padded[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(other[1], padded[1], atol=1e-5, rtol=0)
        assert_gradients_close(other[2], padded[2])
    assert any(grad.abs().sum() > 0 for grad in padded[2])


@pytest.mark.parametrize("arch", MICRO_ARCHITECTURES)
def test_packed_equals_padded_and_alone_on_every_architecture(arch):
    check_packed_equals_padded(lora_model(arch), rollouts_of(SHAPES))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])  # Gemma 2 has no sdpa
def test_packed_equals_padded_with_sdpa(arch):
    check_packed_equals_padded(lora_model(arch, "sdpa"), rollouts_of(SHAPES))


def test_gemma2_sliding_window_crossed_inside_packed_rows():
    """A window of 16 with sequences of up to 200 tokens: the sliding layers must count the window
    in each sequence's own positions, and never reach into the previous sequence of the row."""
    model = lora_model("gemma2", sliding_window=16)
    assert "sliding_attention" in model.config.layer_types
    check_packed_equals_padded(model, rollouts_of(SHAPES))


def test_first_fit_decreasing():
    lengths = [5, 9, 2, 7, 3, 4]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for members in bins for i in members) == list(range(6))
    assert all(sum(lengths[i] for i in members) <= 10 for members in bins)
    # By hand: 9 -> bin 0; 7 -> bin 1; 5 -> bin 2; 4 -> bin 2 (9); 3 -> bin 1 (10); 2 fits nowhere -> bin 3
    assert bins == [[1], [3, 4], [0, 5], [2]]
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long: a row of its own
    assert first_fit_decreasing([3, 4, 1], None) == [[1, 0, 2]]


def test_layout_positions_restart_and_the_tail_is_a_block_of_its_own():
    sequences = [torch.tensor([7, 8, 9]), torch.tensor([5]), torch.tensor([4, 6])]
    layout = pass_layout(sequences, [2, 0, 1], width=3, pack_length=4, packing=True, pad_token_id=PAD)
    # FFD into rows of 4: [seq0 (3), seq1 (1)], [seq2 (2), pads]
    assert layout.input_ids.tolist() == [[7, 8, 9, 5], [4, 6, PAD, PAD]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert layout.attention_mask is None
    assert layout.predicting.tolist() == [0, 1, 4]  # seq0's tokens 8, 9 from positions 0, 1; seq2's 6 from 4
    assert layout.destination.tolist() == [0, 1, 6]
    assert layout.last_position.tolist() == [2, 3, 5]
    assert layout.real_tokens == 6 and layout.computed_positions == 8
    padded = pass_layout(sequences, [2, 0, 1], width=3, pack_length=None, packing=False, pad_token_id=PAD)
    assert padded.input_ids.tolist() == [[7, 8, 9], [5, PAD, PAD], [4, 6, PAD]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert padded.predicting.tolist() == [0, 1, 6]


def test_token_budget_ranges():
    lengths = [4, 4, 3, 9, 2, 2]
    assert token_budget_ranges(lengths, 4) == [slice(0, 4), slice(4, 6)]
    assert token_budget_ranges(lengths, 4, micro_batch_tokens=8) == [slice(0, 2), slice(2, 3), slice(3, 4),
                                                                      slice(4, 6)]
    assert token_budget_ranges(lengths, 4, micro_batch_tokens=100) == [slice(0, 6)]


def test_micro_batch_rows():
    lengths = [5, 9, 2, 7, 3, 4]
    # Padded: one sequence per row, consecutive sequences, by count or by tokens.
    assert micro_batch_rows(lengths, 4, 0, False, 10) == [[[0], [1], [2], [3]], [[4], [5]]]
    assert micro_batch_rows(lengths, 4, 12, False, 10) == [[[0]], [[1], [2]], [[3], [4]], [[5]]]
    # Packed: the step's rows by hand (test_first_fit_decreasing) [[1], [3, 4], [0, 5], [2]] of 9, 10, 9, 2
    # tokens, sorted longest first (ties in FFD order), then as many rows as the 2 x 9 = 18 positions of a
    # padded micro-batch hold, at the first row's length: 1 of 10, 2 of 9, the last row (18 // 2 = 9 of 2).
    assert micro_batch_rows(lengths, 2, 0, True, 10) == [[[3, 4]], [[1], [0, 5]], [[2]]]
    # Short rows: more rows than MICRO_BATCH_SIZE, no more positions (2 x 8 = 16: 2 rows of 8, then 5 of 2).
    assert micro_batch_rows([8, 2, 2, 2, 2, 2, 2], 2, 0, True, 2) == [[[0], [1]], [[2], [3], [4], [5], [6]]]
    assert micro_batch_rows([9, 3, 3, 3, 3, 3, 3], 2, 0, True, 9) == [[[0], [1, 2, 3]], [[4, 5, 6]]]
    assert micro_batch_rows([4, 4, 4, 2, 2, 2], 2, 0, True, 4) == [[[0], [1]], [[2], [3, 4]], [[5]]]
    # A budget of 12 tokens: rows of at most 10 (PACK_LENGTH) then micro-batches of at most 12 tokens.
    assert micro_batch_rows(lengths, 16, 12, True, 10) == [[[3, 4]], [[1]], [[0, 5], [2]]]
    # A budget below PACK_LENGTH bounds the rows too: rows of at most 8, [1] (9: over it, a row of its own),
    # [3], [0, 4], [5, 2] of 9, 7, 8, 6 tokens, sorted, each its own micro-batch (no two fit in 8).
    assert micro_batch_rows(lengths, 16, 8, True, 10) == [[[1]], [[0, 4]], [[3]], [[5, 2]]]
    # No pack length (a variable-length kernel): one row per micro-batch, of a padded micro-batch's tokens.
    assert micro_batch_rows(lengths, 2, 0, True, None) == [[[1, 3, 2]], [[0, 5, 4]]]
    assert micro_batch_rows([], 4, 0, True, 10) == []
    for packing, pack_length in ((False, None), (True, 10), (True, None)):
        for tokens in (0, 8, 100):
            rows = micro_batch_rows(lengths, 3, tokens, packing, pack_length)
            assert sorted(i for micro in rows for row in micro for i in row) == list(range(6))


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_the_step_packed_into_sorted_micro_batches_equals_padded(arch):
    """plan_passes: the step's sequences packed together, its rows sorted and cut into micro-batches of
    at most a padded micro-batch's 3 x longest positions, each micro-batch its rows' part of the batch:
    per row, the same log-probs and entropies as the padded micro-batches; summed over the step, the
    same gradients."""
    model = lora_model(arch)
    batch = rollouts_of(SHAPES * 2, seed=3)
    weights = torch.randn(batch.num_rows, batch.completion_width, generator=torch.Generator().manual_seed(1))
    weights = weights * batch.completion_mask
    results = {}
    longest = int(batch.sequence_lengths.max())
    for packing in (True, False):
        batch.plan_passes(3, 0, packing, longest)
        micro_batches, layouts = batch.micro_batches(), [layout for _, layout in batch.passes]
        model.zero_grad(set_to_none=True)
        logp = torch.zeros(batch.num_rows, batch.completion_width)
        entropy = torch.zeros_like(logp)
        for micro in micro_batches:
            micro_logp, micro_entropy, _ = layout_logprobs(model, micro.layout, 0.7, 50, with_entropy=True)
            ((micro_logp * weights[micro.rows]).sum() + micro_entropy.sum()).backward()
            logp[micro.rows] = micro_logp.detach()
            entropy[micro.rows] = micro_entropy.detach()
        grads = [parameter.grad.clone() for parameter in lora_parameters(model)]
        results[packing] = logp, entropy, grads, sum(layout.computed_positions for layout in layouts)
        if packing:
            assert len(micro_batches) < -(-batch.num_rows // 3)  # fewer micro-batches than padded
            assert all(layout.computed_positions <= 3 * longest and layout.input_ids.size(1) <= longest
                       for layout in layouts)  # never more than a padded micro-batch of 3 rows
    (logp, entropy, grads, computed), (padded_logp, padded_entropy, padded_grads, padded_computed) = \
        results[True], results[False]
    assert computed < padded_computed
    torch.testing.assert_close(logp, padded_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, padded_entropy, atol=1e-5, rtol=0)
    assert_gradients_close(grads, padded_grads)


def test_to_device_keeps_values_and_structure():
    layout = pass_layout([torch.tensor([7, 8, 9])], [2], 2, None, True, PAD)
    tree = {"layouts": [layout], "x": torch.arange(6.0).view(2, 3)}
    moved = to_device(tree, torch.device("cpu"))
    assert isinstance(moved["layouts"][0], type(layout)) and moved["layouts"][0].num_sequences == 1
    for name in ("input_ids", "position_ids", "predicting", "destination", "last_position"):
        assert torch.equal(getattr(moved["layouts"][0], name), getattr(layout, name))
    assert moved["layouts"][0].attention_mask is None
    assert torch.equal(moved["x"], tree["x"])


def test_packing_plan_picks_one_row_per_micro_batch_for_a_varlen_kernel(monkeypatch):
    """flash-attention is not installed here: the choice is simulated on the config."""
    model = micro_arch_model("llama")
    assert packing_plan(model, True, "auto")[:2] == (True, "auto")
    assert packing_plan(model, False, "auto")[:2] == (False, None)
    model.config._attn_implementation = "flash_attention_2"
    packing, length, line = packing_plan(model, True, "auto")
    assert (packing, length) == (True, None) and "one row per micro-batch" in line
    gemma2 = micro_arch_model("gemma2")
    gemma2.config._attn_implementation = "flash_attention_2"
    import common.packing as packing_module
    monkeypatch.setattr(packing_module.metadata, "version", lambda name: "2.5.9")
    assert packing_plan(gemma2, True, "auto")[:2] == (False, None)  # soft-capping needs flash-attn >= 2.6
    monkeypatch.setattr(packing_module.metadata, "version", lambda name: "2.6.3")
    assert packing_plan(gemma2, True, "auto")[:2] == (True, None)
    model.config._attn_implementation = "flex_attention"
    assert packing_plan(model, True, "auto")[0] is False

"""token_logprobs against the naive full-logits computation: values, entropies and gradients on
micro Gemma 2 / Llama / Qwen 2 models with left padding, soft-capping, and the memory bound with
Gemma's 256k vocabulary."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from common.logprobs import (_matmul_fp32_out, body_hidden_states, enable_gradient_checkpointing,
                             head_token_logprobs, sequence_logprobs, token_logprobs)
from tests.conftest import DEVICE, DEVICES, REPO_ROOT, micro_model

VOCAB_SIZE = 97
# "gemma2-capped": final_logit_softcapping = 2 and a head scaled so that logits reach well past 2,
# so the soft-cap (and its derivative) changes the result; the default cap of 30 is never reached
# by a random micro model's logits.
VARIANTS = ("gemma2", "gemma2-capped", "llama", "qwen2")
LENGTHS = (9, 6, 3)  # one unpadded row and two left-padded ones


def build_model(variant: str, seed: int = 0, **overrides):
    if variant == "gemma2-capped":
        model = micro_model("gemma2", VOCAB_SIZE, seed, final_logit_softcapping=2.0, **overrides)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(100.0)
        return model
    return micro_model(variant, VOCAB_SIZE, seed, **overrides)


@functools.lru_cache(maxsize=None)
def shared_model(variant: str):
    """One model per variant for the tests that never call backward (so never change it)."""
    return build_model(variant)


def left_padded_batch(lengths=LENGTHS, seed: int = 0):
    """input_ids (pad id 0) and attention_mask [len(lengths), max(lengths)], row i holding lengths[i]
    random tokens at its right end."""
    generator = torch.Generator().manual_seed(seed)
    total_length = max(lengths)
    input_ids = torch.zeros(len(lengths), total_length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, total_length - length:] = torch.randint(3, VOCAB_SIZE, (length,), generator=generator)
        attention_mask[row, total_length - length:] = 1
    return input_ids, attention_mask


def naive_logprobs_and_entropy(model, input_ids, attention_mask, temperature):
    """The reference: the model's own full [B, L, V] logits, log_softmax, gather."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = torch.log_softmax(logits / temperature, dim=-1)[:, :-1]
    token_logps = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logps, entropy


def assert_close(actual, expected, tolerance=1e-5):
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize(DEVICE, DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_naive_logprobs_at_every_position(variant, temperature, chunk_size, device):
    # All positions are compared, padding included: both paths run the same body on the same inputs.
    model = shared_model(variant) if device == "cpu" else build_model(variant).to(device)
    input_ids, attention_mask = (tensor.to(device) for tensor in left_padded_batch())
    logps = token_logprobs(model, input_ids, attention_mask, temperature=temperature, chunk_size=chunk_size)
    expected, _ = naive_logprobs_and_entropy(model, input_ids, attention_mask, temperature)
    assert logps.shape == (len(LENGTHS), max(LENGTHS) - 1) and logps.dtype is torch.float32
    assert_close(logps, expected)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
@pytest.mark.parametrize("variant", VARIANTS)
def test_entropy_matches_naive(variant, chunk_size):
    model = shared_model(variant)
    input_ids, attention_mask = left_padded_batch()
    logps, entropy = token_logprobs(model, input_ids, attention_mask, temperature=0.7, chunk_size=chunk_size,
                                    return_entropy=True)
    expected_logps, expected_entropy = naive_logprobs_and_entropy(model, input_ids, attention_mask, 0.7)
    assert_close(logps, expected_logps)
    assert_close(entropy, expected_entropy)


def test_softcapping_is_applied_like_the_model():
    model = shared_model("gemma2-capped")
    input_ids, attention_mask = left_padded_batch()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        capped_logits = model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids).logits
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids).last_hidden_state
        uncapped_logits = hidden @ model.get_output_embeddings().weight.T
        logps = token_logprobs(model, input_ids, attention_mask, temperature=1.3, chunk_size=4)
    assert capped_logits.abs().max() <= 2.0 < uncapped_logits.abs().max() / 5  # the cap binds

    def gathered(logits):
        return torch.log_softmax(logits / 1.3, -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    assert_close(logps, gathered(capped_logits))
    assert (logps - gathered(uncapped_logits)).abs().max() > 1.0


def trainable_grads(model) -> dict[str, torch.Tensor]:
    """Gradients by parameter name (a tied head weight appears once, as the embedding)."""
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def grads_of_objective(model, objective, compute_logps_and_entropy):
    """Gradients of sum(w1 * logps) and/or sum(w2 * entropy), fixed random weights w1, w2."""
    model.zero_grad(set_to_none=True)
    logps, entropy = compute_logps_and_entropy()
    generator = torch.Generator().manual_seed(1)
    logp_weights = torch.randn(logps.shape, generator=generator).to(logps.device)
    entropy_weights = torch.randn(entropy.shape, generator=generator).to(entropy.device)
    loss = {"logprobs": (logp_weights * logps).sum(),
            "entropy": (entropy_weights * entropy).sum(),
            "both": (logp_weights * logps).sum() + (entropy_weights * entropy).sum()}[objective]
    loss.backward()
    return trainable_grads(model)


def assert_grads_match_naive(model, objective, temperature=0.7, chunk_size=5):
    """Every trainable parameter's gradient equals the naive path's to 1e-5 relative to that
    gradient's largest entry: the two paths add the same products in different orders, so fp32
    rounding differs by ~1e-7 of the gradient's scale (which reaches ~100 with the scaled head)."""
    input_ids, attention_mask = left_padded_batch()
    chunked = grads_of_objective(model, objective, lambda: token_logprobs(
        model, input_ids, attention_mask, temperature=temperature, chunk_size=chunk_size, return_entropy=True))
    naive = grads_of_objective(model, objective, lambda: naive_logprobs_and_entropy(
        model, input_ids, attention_mask, temperature))
    assert chunked.keys() == naive.keys() and chunked
    for name in naive:
        scale = naive[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(chunked[name], naive[name], atol=1e-5 * max(1.0, scale), rtol=1e-5,
                                   msg=lambda message: f"{name}: {message}")
    return chunked


@pytest.mark.parametrize("objective", ["logprobs", "entropy", "both"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_naive_with_tied_head(variant, objective):
    model = build_model(variant)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    grads = assert_grads_match_naive(model, objective)
    assert "model.embed_tokens.weight" in grads  # the tied weight's grad: input embedding + head


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_naive_with_untied_head(variant):
    model = build_model(variant, tie_word_embeddings=False)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    grads = assert_grads_match_naive(model, "both", temperature=1.3, chunk_size=3)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= grads.keys()


@pytest.mark.parametrize(DEVICE, DEVICES)
@pytest.mark.parametrize("objective", ["logprobs", "entropy", "both"])
@pytest.mark.parametrize("variant", ["gemma2-capped", "llama"])
def test_head_gradients_match_naive_in_fp64_to_rounding(variant, objective, device):
    """In fp64 only rounding separates the two paths, which pins the backward's formulas (soft-cap
    derivative, entropy term, temperature) far below fp32's resolution. Compared where the head
    starts, at the body's output and the head weight: inside the body RMSNorm computes in fp32
    even in an fp64 model, which would blur everything upstream to fp32 resolution. No padding:
    transformers' fp64 eager attention turns fully-masked (padding) query rows into NaN."""
    model = build_model(variant, tie_word_embeddings=False).double().to(device)
    input_ids, attention_mask = (tensor.to(device) for tensor in left_padded_batch(lengths=(9, 9)))
    body_outputs = []

    def keep_body_output(module, args, output):
        output.last_hidden_state.retain_grad()
        body_outputs.append(output.last_hidden_state)

    model.get_decoder().register_forward_hook(keep_body_output)

    def head_grads(compute_logps_and_entropy):
        grads = grads_of_objective(model, objective, compute_logps_and_entropy)
        return body_outputs[-1].grad, grads["lm_head.weight"]

    chunked = head_grads(lambda: token_logprobs(model, input_ids, attention_mask, temperature=1.3, chunk_size=4,
                                                return_entropy=True))
    naive = head_grads(lambda: naive_logprobs_and_entropy(model, input_ids, attention_mask, 1.3))
    for chunked_grad, naive_grad in zip(chunked, naive):
        assert chunked_grad.dtype is torch.float64 and naive_grad.abs().max() > 0
        torch.testing.assert_close(chunked_grad, naive_grad, atol=1e-12, rtol=1e-10)


def test_frozen_head_gets_no_gradient_and_body_gradients_still_match():
    model = build_model("gemma2-capped")
    model.get_output_embeddings().weight.requires_grad_(False)  # tied: the input embedding too
    grads = assert_grads_match_naive(model, "both")
    assert model.get_output_embeddings().weight.grad is None
    assert "model.embed_tokens.weight" not in grads and grads


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_rows_equal_the_same_rows_unpadded(variant):
    model = shared_model(variant)
    input_ids, attention_mask = left_padded_batch()
    batched = token_logprobs(model, input_ids, attention_mask, chunk_size=4)
    for row, length in enumerate(LENGTHS):
        alone_ids = input_ids[row:row + 1, -length:]
        alone = token_logprobs(model, alone_ids, torch.ones_like(alone_ids), chunk_size=4)
        # Output t predicts token t + 1: the row's own predictions start at its first real token.
        assert_close(batched[row:row + 1, -(length - 1):], alone)


def test_no_grad_reference_pass():
    model = shared_model("gemma2")
    input_ids, attention_mask = left_padded_batch()
    with_grad = token_logprobs(model, input_ids, attention_mask, chunk_size=3)
    assert with_grad.requires_grad
    with torch.no_grad():
        logps, entropy = token_logprobs(model, input_ids, attention_mask, chunk_size=3, return_entropy=True)
    assert not logps.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(logps, with_grad.detach(), atol=0, rtol=0)


def test_bf16_model_gives_fp32_logprobs_and_bf16_gradients():
    model = build_model("gemma2").to(torch.bfloat16)
    input_ids, attention_mask = left_padded_batch()
    logps = token_logprobs(model, input_ids, attention_mask, chunk_size=5)
    assert logps.dtype is torch.float32
    expected, _ = naive_logprobs_and_entropy(model, input_ids, attention_mask, 1.0)
    # The naive path rounds its logits to bf16; this one does not, hence the loose tolerance.
    assert_close(logps, expected, tolerance=5e-2)
    logps.sum().backward()
    head_grad = model.get_output_embeddings().weight.grad
    assert head_grad.dtype is torch.bfloat16 and head_grad.abs().max() > 0


@pytest.mark.parametrize("variant", ["gemma2-capped", "llama"])
def test_from_position_gives_the_tail_of_the_full_logprobs_and_its_gradients(variant):
    """The head on the predictions from position s on only: the same values, entropies and gradients as
    slicing the full result (the body still sees every token)."""
    input_ids, attention_mask = left_padded_batch()
    start = 4

    def tail_and_grads(compute):
        model = build_model(variant)
        logps, entropy = compute(model)
        (logps.sum() + 0.5 * entropy.sum()).backward()
        return logps.detach(), entropy.detach(), {name: p.grad for name, p in model.named_parameters()}

    full = tail_and_grads(lambda model: [part[:, start:] for part in token_logprobs(
        model, input_ids, attention_mask, temperature=0.9, chunk_size=3, return_entropy=True)])
    tail = tail_and_grads(lambda model: token_logprobs(model, input_ids, attention_mask, temperature=0.9, chunk_size=3,
                                                       return_entropy=True, from_position=start))
    assert tail[0].shape == (len(LENGTHS), max(LENGTHS) - 1 - start)
    assert_close(tail[0], full[0])
    assert_close(tail[1], full[1])
    for name, grad in full[2].items():
        torch.testing.assert_close(tail[2][name], grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="from_position"):
        token_logprobs(build_model(variant), input_ids, attention_mask, from_position=max(LENGTHS))


def test_bf16_head_with_a_large_vocabulary_is_within_1e3_of_fp64():
    """A bf16 head of 32k entries multiplied as stored with fp32 accumulation: log-probs and gradients
    against the same bf16 values in fp64. Logits reach past the soft-cap (the head is scaled up), and the
    objective is a token mean, as the losses are. The gradients come back in bf16, so they are also held
    to twice bf16's own rounding of the fp64 ones: d loss / d logits rounded to bf16 (as the tensor cores
    take it) adds at most about that much again."""
    vocab_size, temperature, cap = 32768, 0.7, 5.0
    model = micro_model("gemma2", vocab_size, final_logit_softcapping=cap, tie_word_embeddings=False)
    model = model.to(torch.bfloat16)
    head_weight = model.get_output_embeddings().weight
    with torch.no_grad():
        head_weight.mul_(20.0)
    input_ids = torch.randint(3, vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = body_hidden_states(model, input_ids, torch.ones_like(input_ids))
    weights = torch.randn(3, 39, generator=torch.Generator().manual_seed(1)) / (3 * 39)

    hidden_leaf = hidden.clone().requires_grad_()
    logps = head_token_logprobs(model, hidden_leaf, input_ids, temperature, chunk_size=16)
    (logps * weights).sum().backward()
    assert logps.dtype is torch.float32 and hidden_leaf.grad.dtype is torch.bfloat16

    hidden_64 = hidden.double().requires_grad_()
    weight_64 = head_weight.detach().double().requires_grad_()
    logits = cap * torch.tanh(hidden_64[:, :-1] @ weight_64.T / cap) / temperature
    assert logits.abs().max() > 0.8 * cap / temperature  # well into the soft-cap's bend
    expected = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    (expected * weights.double()).sum().backward()

    assert (logps.double() - expected).abs().max() < 1e-3
    for grad, expected_grad in ((hidden_leaf.grad, hidden_64.grad), (head_weight.grad, weight_64.grad)):
        error = (grad.double() - expected_grad).abs().max()
        bf16_rounding = (expected_grad.bfloat16().double() - expected_grad).abs().max()
        assert error < 1e-3 and error <= 2 * bf16_rounding, (error, bf16_rounding)


def test_the_cuda_head_matmul_is_a_valid_call():
    """On CUDA a bf16 head is multiplied as stored, by torch.mm with out_dtype=torch.float32, which has no
    CPU kernel; its shape and dtype checks (on the meta device) accept the call as made, weight transposed."""
    hidden = torch.empty(5, 16, dtype=torch.bfloat16, device="meta")
    head_weight = torch.empty(1000, 16, dtype=torch.bfloat16, device="meta")
    logits = _matmul_fp32_out(hidden, head_weight.T)
    assert logits.shape == (5, 1000) and logits.dtype is torch.float32
    grad_hidden = _matmul_fp32_out(torch.empty(5, 1000, device="meta"), head_weight)  # fp32 grads, rounded to bf16
    assert grad_hidden.shape == (5, 16) and grad_hidden.dtype is torch.float32


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients_with_lora(arch):
    """Checkpointed decoder layers run twice (forward, and again in the backward), and the LoRA gradients
    are those of the plain pass, adapter dropout included (the recompute replays the forward's RNG)."""
    from common.lora import apply_lora, lora_modules

    def lora_grads(checkpointing: bool):
        model = micro_model(arch, VOCAB_SIZE)
        apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), dropout=0.1)
        for module in lora_modules(model).values():
            torch.nn.init.normal_(module.lora_B, std=0.1, generator=torch.Generator().manual_seed(2))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        layer_runs = []
        model.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(lambda *_: layer_runs.append(1))
        input_ids, attention_mask = left_padded_batch()
        torch.manual_seed(3)
        logps = token_logprobs(model, input_ids, attention_mask, chunk_size=4)
        logps[attention_mask[:, 1:].bool()].mean().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, len(layer_runs)

    plain, plain_runs = lora_grads(checkpointing=False)
    checkpointed, checkpointed_runs = lora_grads(checkpointing=True)
    assert (plain_runs, checkpointed_runs) == (1, 2)
    assert plain.keys() == checkpointed.keys() and len(plain) == 16
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_unsupported_logit_postprocessing_and_bad_arguments_raise():
    from transformers import AutoModelForCausalLM, CohereConfig

    cohere = AutoModelForCausalLM.from_config(CohereConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, bos_token_id=2, eos_token_id=1))  # logits *= logit_scale
    input_ids, attention_mask = left_padded_batch()
    with pytest.raises(NotImplementedError, match="cohere"):
        token_logprobs(cohere, input_ids, attention_mask)
    model = shared_model("llama")
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, input_ids, attention_mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, input_ids, attention_mask, chunk_size=0)


def test_sequence_logprobs_sums_masked_positions_only():
    token_logps = torch.tensor([[-1.0, -2.0, -float("inf")], [float("nan"), -0.5, -0.25]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(sequence_logprobs(token_logps, mask), torch.tensor([-3.0, -0.75]))
    torch.testing.assert_close(sequence_logprobs(token_logps, mask.bool()), torch.tensor([-3.0, -0.75]))


# Runs in a fresh process so that RSS is this computation's alone: torch's CPU allocator is
# invisible to tracemalloc, RSS is not. Writing 5 to /proc/self/clear_refs resets the peak RSS
# (VmHWM), so one process measures both paths. The fixed mmap threshold makes glibc return every
# freed buffer of 1 MB or more to the OS at once; glibc otherwise raises the threshold up to 32 MB
# as buffers are freed and keeps the freed chunk-sized buffers on its heap, and RSS would measure
# that caching rather than the tensors alive at once.
MEMORY_PROBE = r"""
import json
import torch
from common.logprobs import token_logprobs
from tests.conftest import micro_model

torch.set_num_threads(1)
model = micro_model("gemma2", vocab_size=256000, num_hidden_layers=1).train()
input_ids = torch.randint(3, 256000, (4, 64), generator=torch.Generator().manual_seed(0))
attention_mask = torch.ones_like(input_ids)

def memory_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024

def forward_backward(path, input_ids, attention_mask):
    if path == "naive":
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logps = torch.log_softmax(logits, -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    else:
        logps = token_logprobs(model, input_ids, attention_mask, chunk_size=32)
    logps.sum().backward()
    model.zero_grad(set_to_none=True)

increments = {}
for path in ("chunked", "naive"):
    forward_backward(path, input_ids[:1, :4], attention_mask[:1, :4])  # warm-up: kernels, thread pool
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline = memory_mb("VmRSS")
    forward_backward(path, input_ids, attention_mask)
    increments[path] = memory_mb("VmHWM") - baseline
print(json.dumps(increments))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_peak_memory_is_bounded_by_the_chunk_not_the_batch():
    # vocab 256,000 x hidden 16: a 16 MB head, and [4, 64, 256000] fp32 logits = 262 MB on the naive
    # path, several times over with soft-capping, log_softmax and the backward; one chunk of 32
    # positions is 33 MB, a few of which are alive at once.
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576"))
    assert result.returncode == 0, result.stderr[-3000:]
    increments = json.loads(result.stdout.splitlines()[-1])
    assert increments["naive"] > 500, increments
    assert increments["chunked"] < 0.25 * increments["naive"], increments


def test_compiled_epilogues_equal_the_eager_ones_with_gradients(monkeypatch):
    """The per-chunk epilogues as CUDA runs them (torch.compile: inductor, here its CPU backend) against
    the eager in-place ops the CPU runs: log-probs, entropies and every gradient to fp32 rounding (the
    fused kernels sum in another order), over chunks of two sizes (the last one shorter), with the soft-cap and T != 1 (T = 1 and no soft-cap
only drop operations). About a minute of CPU compiling."""
    import common.logprobs as logprobs

    torch._dynamo.reset()
    input_ids, attention_mask = left_padded_batch()
    results = {}
    for compiled in (False, True):
        monkeypatch.setattr(logprobs, "_compiles_epilogues", lambda device, compiled=compiled: compiled)
        model = build_model("gemma2-capped", tie_word_embeddings=False)
        outputs = token_logprobs(model, input_ids, attention_mask, temperature=0.7, chunk_size=5,
                                 return_entropy=True)
        loss = (outputs[0] * torch.linspace(-1, 1, outputs[0].numel()).view_as(outputs[0])).sum() + outputs[1].sum()
        loss.backward()
        results[compiled] = [output.detach() for output in outputs] + [
            parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    assert len(results[True]) == len(results[False]) > 2
    for compiled_value, eager_value in zip(results[True], results[False]):
        scale = max(1.0, eager_value.abs().max().item())
        torch.testing.assert_close(compiled_value, eager_value, atol=2e-6 * scale, rtol=1e-5)
    assert logprobs._compiled.cache_info().currsize == 2  # forward and backward epilogue, compiled


def test_no_divide_at_temperature_one():
    """At T = 1 (and no soft-cap: Llama) the forward and backward epilogues run no division: the pass
    over the [chunk, V] buffer that / T costs is skipped, not multiplied by 1."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountDivisions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_)
            return func(*args, **(kwargs or {}))

    model = build_model("llama")
    hidden = torch.randn(1, 6, 16, requires_grad=True)
    input_ids = torch.randint(0, VOCAB_SIZE, (1, 6))
    counts = {}
    for temperature in (1.0, 0.7):
        with CountDivisions() as counter:
            logps, entropy = head_token_logprobs(model, hidden, input_ids, temperature, chunk_size=4,
                                                 return_entropy=True)
            logps.sum().backward()
        counts[temperature] = counter.count
    # The entropy's / S is per position ([chunk]), the only division left at T = 1: one per chunk.
    assert counts[1.0] == 2 and counts[0.7] == 2 + 3 * 2

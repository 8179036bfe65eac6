"""Per-token log-probabilities (and entropies) of a causal LM without materialising [B, L, V] logits.

For input ids x of shape [B, L] the quantity every RL objective needs is

    logp[b, t] = log softmax(z[b, t] / T)[x[b, t + 1]],   t = 0 .. L - 2,

where z[b, t] = head(h[b, t]) are the model's next-token logits at position t
(after any post-processing the model applies, e.g. Gemma 2's soft-capping) and
T is the sampling temperature. The naive route, ``model(x).logits``, holds a
[B, L, V] tensor; with Gemma 2's V = 256,000 that is 1 GB in fp32 for a single
1024-token sequence, and log_softmax and its backward hold several more.

Here the transformer body runs once to give hidden states h [B, L, H] (these
exist anyway), and the output head is applied to chunks of ``chunk_size``
positions at a time inside a custom autograd Function:

* forward, per chunk: logits -> soft-cap -> / T -> log-sum-exp -> gather the
  target; what is kept for backward is the hidden states it was given
  ([B * (L - 1), H], small next to the logits) and one log-sum-exp (and
  entropy) per position;
* backward, per chunk: the chunk's logits are recomputed from those hidden
  states, turned into d loss / d logits, and multiplied into the gradients of
  the hidden states and (only when it requires grad) of the head weight, which
  is accumulated over chunks.

So forward and backward both hold O(chunk_size * V) floats for the head, never
O(B * L * V); the price is a second head matmul in backward.

Gradients, per position, with l = h W^T the head's logits, c = cap * tanh(l / cap)
the soft-capped ones (c = l without capping), s = c / T and p = softmax(s):

    d logp / d s_j  = [j = target] - p_j
    d H / d s_j     = -p_j (log p_j + H),   H = -sum_j p_j log p_j = logsumexp(s) - sum_j p_j s_j
    d s / d c       = 1 / T
    d c / d l       = 1 - tanh(l / cap)^2
    d l / d h = W,  d l / d W = h

Gemma 2 specifics, from transformers' Gemma2ForCausalLM: the final RMSNorm is part of the body
(model.model.norm), the sqrt(H) embedding scale applies to the input embeddings only (not to the
tied head), and the only step between body and logits besides lm_head is the soft-cap, applied
before the sampler's temperature.
"""

from __future__ import annotations

import functools

import torch

# Model types whose ForCausalLM.forward computes logits = lm_head(body(...).last_hidden_state)
# and nothing more (checked against transformers' modeling code). phi3: its fused qkv_proj and
# gate_up_proj are inside the body. gemma3 (the multimodal checkpoint): get_decoder() is its language
# model, and Gemma3ForConditionalGeneration.forward applies lm_head alone, with no soft-cap.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gemma3"})
# Model types that then soft-cap: logits = cap * tanh(logits / cap), cap = config.final_logit_softcapping.
_SOFTCAPPED_HEAD_MODEL_TYPES = frozenset({"gemma2", "gemma3_text"})


def _final_logit_softcap(model) -> float | None:
    """The soft-capping the model applies to its logits, or None; refuses models whose head does
    something else (Cohere's logit_scale, Granite's logits_scaling, ...), which would silently give
    wrong log-probs here."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type in _PLAIN_HEAD_MODEL_TYPES:
        return None
    if model_type in _SOFTCAPPED_HEAD_MODEL_TYPES:
        return config.final_logit_softcapping
    raise NotImplementedError(
        f"token_logprobs does not know how {model_type!r} post-processes its logits; supported model types: "
        f"{sorted(_PLAIN_HEAD_MODEL_TYPES | _SOFTCAPPED_HEAD_MODEL_TYPES)}")


# Head weight dtypes that torch.mm multiplies on CUDA with fp32 accumulation and an fp32 result
# (out_dtype=torch.float32; CUDA-only in torch 2.13: the CPU has no kernel for it).
_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)


def _head_operand(weight: torch.Tensor) -> torch.Tensor:
    """The head weight as the head's matmuls read it: as it is for a bf16/fp16 weight on CUDA (the
    tensor cores multiply it as stored, with fp32 accumulation and output: no copy); else in fp32
    (fp64 for an fp64 model): a copy of a bf16 head on the CPU or mps, once per pass, which gives the
    same numbers, every bf16 value being exact in fp32. The fp32 copy that CUDA no longer makes was
    vocab * hidden * 4 bytes, 2.4 GB for Gemma 2 2B, at every forward and every backward."""
    if weight.is_cuda and weight.dtype in _TENSOR_CORE_DTYPES:
        return weight
    return weight.to(torch.promote_types(weight.dtype, torch.float32))


def _matmul_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with ``b`` a head operand (or its transpose), accumulated and returned in fp32 (fp64 for
    fp64). ``a`` is cast to b's dtype first: for a bf16 operand that rounds it to bf16, as the tensor
    cores take it."""
    if b.dtype in _TENSOR_CORE_DTYPES:
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    return a.to(b.dtype) @ b


def _head_logits(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """The raw logits hidden @ W^T of one chunk, in fp32 (fp64 for an fp64 model) whatever the dtype of
    ``head_weight`` (a ``_head_operand``).

    Not bf16, even for a bf16 model, because bf16 keeps 8 significant bits: Gemma's logits of
    magnitude 16-30 would be rounded to multiples of 0.125, log-probs would be off by as much, and
    the log-sum-exp over 256k entries accumulates more rounding. Policy ratios and KL terms compare
    log-probs that differ by far less than that."""
    return _matmul_fp32_out(hidden, head_weight.T)


# The per-chunk epilogues: everything between a chunk's head matmul and its [chunk] results (forward)
# or its d loss / d logits (backward), with the model's operations in the model's order (soft-cap,
# then the sampler's / T). Eager, each op is one pass over the [chunk, V] fp32 buffer, done in place
# so that the chunk holds one such buffer (two with entropy or soft-cap in backward); that is 10-12
# passes, about 20 GB of memory traffic per 1024 x 256k chunk around a 1.5 ms matmul. On CUDA they are
# compiled (_epilogue), which fuses them into a few kernels that read the logits once or twice and,
# in forward, write nothing of size V. Under the compiler the logits are cloned first: the clone is
# fused away, and the graph then mutates no input (a mutated input is written back: one more pass).
def _forward_epilogue(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, temperature: float,
                      with_entropy: bool):
    """(log p(target), logsumexp(s), entropy or None), each [n], from a chunk's raw logits [n, V]
    (overwritten when eager), s = softcap(logits) / T."""
    if torch.compiler.is_compiling():
        logits = logits.clone()
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:  # no pass at all at T = 1
        logits.div_(temperature)
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)
    # logsumexp(s) = m + log S with S = sum exp(s - m), m = max s.
    row_max = logits.amax(-1, keepdim=True)
    shifted = logits.sub_(row_max)
    entropy = None
    if with_entropy:
        # H = logsumexp(s) - sum p s = log S - sum exp(s - m) (s - m) / S
        exp_shifted = shifted.exp()
        sum_exp = exp_shifted.sum(-1)
        entropy = sum_exp.log() - exp_shifted.mul_(shifted).sum(-1) / sum_exp
    else:
        sum_exp = shifted.exp_().sum(-1)
    logsumexp = row_max.squeeze(-1) + sum_exp.log()
    return target_logits - logsumexp, logsumexp, entropy


def _backward_epilogue(logits: torch.Tensor, targets: torch.Tensor, logsumexp: torch.Tensor,
                       entropy: torch.Tensor | None, grad_logprobs: torch.Tensor | None,
                       grad_entropies: torch.Tensor | None, softcap: float | None, temperature: float,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """d loss / d logits [n, V] in ``out_dtype``, from a chunk's raw logits recomputed (overwritten
    when eager) and the forward's log-sum-exp and entropy (see the module docstring's formulas)."""
    if torch.compiler.is_compiling():
        logits = logits.clone()
    tanh_of_logits = None
    if softcap is not None:
        tanh_of_logits = logits.div_(softcap).tanh_()  # the soft-cap's derivative is 1 - tanh^2
        logits = tanh_of_logits * softcap
    if temperature != 1.0:
        logits.div_(temperature)
    log_probs = logits.sub_(logsumexp[:, None])
    # d loss / d s_j = -p_j * (g_logp + g_H * (log p_j + H)), plus g_logp at the target.
    if grad_entropies is not None:
        grad_logits = log_probs.exp()
        coefficient = log_probs.add_(entropy[:, None]).mul_(grad_entropies[:, None])
        if grad_logprobs is not None:
            coefficient.add_(grad_logprobs[:, None])
        grad_logits.mul_(coefficient).neg_()
        del coefficient  # log_probs itself, updated in place: freed before the next chunk's
    else:
        grad_logits = log_probs.exp_().mul_(grad_logprobs[:, None]).neg_()
    if grad_logprobs is not None:
        grad_logits.scatter_add_(-1, targets[:, None], grad_logprobs[:, None])
    if temperature != 1.0:
        grad_logits.div_(temperature)  # d loss / d c
    if tanh_of_logits is not None:
        grad_logits.mul_(tanh_of_logits.square_().neg_().add_(1))  # d loss / d l
    return grad_logits.to(out_dtype)


def _compiles_epilogues(device: torch.device) -> bool:
    """Whether the epilogues run compiled: on CUDA, where inductor has Triton to write the fused
    kernels; the CPU and mps keep the eager in-place ops (tests/test_logprobs.py compares both)."""
    from torch.utils._triton import has_triton

    return device.type == "cuda" and has_triton()


@functools.cache
def _compiled(epilogue):
    # With dynamic left as None the first shape compiles static, a second (the last, shorter chunk) once
    # more with the row count symbolic, which then covers every chunk; fullgraph: a graph break would be a bug.
    return torch.compile(epilogue, fullgraph=True, dynamic=None)


def _epilogue(epilogue, device: torch.device):
    return _compiled(epilogue) if _compiles_epilogues(device) else epilogue


def head_logits(model, hidden_states: torch.Tensor) -> torch.Tensor:
    """The model's logits [..., V] of hidden states [..., H] (``body_hidden_states``) through the same
    head as token_logprobs: fp32 output (fp64 for an fp64 model), Gemma 2's soft-cap applied once in
    fp32, no temperature. What the sampler draws from, so that its log-probs are the trainer's."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("token_logprobs supports output heads without bias only")
    flat = hidden_states.reshape(-1, hidden_states.size(-1))
    logits = _head_logits(flat, _head_operand(head.weight))
    softcap = _final_logit_softcap(model)
    if softcap is not None:  # the ops of _forward_epilogue, in its order: the trainer's logits, bit for bit
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits.view(*hidden_states.shape[:-1], -1)


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log p(target) (and optionally entropy) of N positions from hidden states [N, H] and the head
    weight [V, H], chunk by chunk in forward and in backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, temperature, chunk_size, with_entropy):
        head_weight = _head_operand(weight)
        epilogue = _epilogue(_forward_epilogue, hidden.device)
        num_positions = hidden.shape[0]
        logprobs = hidden.new_empty(num_positions, dtype=torch.promote_types(weight.dtype, torch.float32))
        logsumexps = torch.empty_like(logprobs)
        entropies = torch.empty_like(logprobs) if with_entropy else None
        for start in range(0, num_positions, chunk_size):
            end = min(start + chunk_size, num_positions)
            # One call, the logits unnamed: the epilogue's in-place ops then free the chunk's [chunk, V]
            # buffer on return, before the next chunk's is allocated (else the peak holds two chunks:
            # measured 4.4 GB instead of 2.3 GB at V = 256k).
            logprob, logsumexp, entropy = epilogue(_head_logits(hidden[start:end], head_weight),
                                                   targets[start:end], softcap, temperature, with_entropy)
            logprobs[start:end], logsumexps[start:end] = logprob, logsumexp
            if with_entropy:
                entropies[start:end] = entropy
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, logsumexps, entropies)
        ctx.softcap, ctx.temperature, ctx.chunk_size = softcap, temperature, chunk_size
        return (logprobs, entropies) if with_entropy else logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropies=None):
        hidden, weight, targets, logsumexps, entropies = ctx.saved_tensors
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[:2]
        if grad_logprobs is None and grad_entropies is None:
            return None, None, None, None, None, None, None
        head_weight = _head_operand(weight)
        epilogue = _epilogue(_backward_epilogue, hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_head_weight = (torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                        device=weight.device) if needs_weight_grad else None)
        # The tensor cores take d loss / d logits rounded to the weight's dtype (bf16: a relative error
        # of at most 2^-9 per entry, unbiased); rounded so on every device, the CPU tests check what
        # CUDA computes. Rounded by the epilogue itself when only the hidden states need it (LoRA).
        grad_dtype = grad_head_weight.dtype if needs_weight_grad else weight.dtype
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            chunk = slice(start, end)
            grad_logits = epilogue(_head_logits(hidden[chunk], head_weight), targets[chunk], logsumexps[chunk],
                                   None if entropies is None else entropies[chunk],
                                   None if grad_logprobs is None else grad_logprobs[chunk],
                                   None if grad_entropies is None else grad_entropies[chunk],
                                   ctx.softcap, ctx.temperature, grad_dtype)
            if needs_hidden_grad:
                grad_hidden[chunk] = _matmul_fp32_out(grad_logits.to(weight.dtype), head_weight)
            if needs_weight_grad:  # the head trains: full fine-tuning only, never under LoRA
                grad_head_weight.addmm_(grad_logits.T, hidden[chunk].to(grad_head_weight.dtype))
            del grad_logits  # as in forward: one chunk's buffers at a time
        grad_weight = grad_head_weight.to(weight.dtype) if needs_weight_grad else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _check_arguments(temperature: float, chunk_size: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def body_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer body's last hidden states [B, L, H] (for Gemma 2 after the final RMSNorm):
    what the output head reads, and what a value head can read too.

    Without ``position_ids``, positions count the attended tokens, so a left-padded row gets the
    positions it would have unpadded."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state


def layout_logprobs(model, layout, temperature: float, chunk_size: int, with_entropy: bool = False):
    """The answer tokens' log-probs of one micro-batch's layout (common.packing.PassLayout, packed or
    padded, on the model's device) under ``model`` at ``temperature``: (logp [n, width], entropy
    [n, width] or None, the body's hidden states [R, L, H]), entry [i, j] that of answer token j of
    sequence i, 0 past its end; PPO's value head reads the same hidden states. Differentiable. The
    output head runs on the positions that predict answer tokens alone (layout.predicting), not on
    the prompts' or the pads'."""
    hidden_states = body_hidden_states(model, layout.input_ids, layout.attention_mask, layout.position_ids)
    result = head_token_logprobs(model, hidden_states, layout.input_ids, temperature, chunk_size, with_entropy,
                                 from_position=layout.predicting)
    logp, entropy = result if with_entropy else (result, None)
    return layout.per_token(logp), None if entropy is None else layout.per_token(entropy), hidden_states


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them from the
    forward: transformers' activation checkpointing (``activation_checkpointing_enable``, the new name
    of ``gradient_checkpointing_enable`` in transformers 5), non-reentrant, PyTorch's recommended
    variant, which needs no input that requires grad (the frozen embeddings under LoRA give none) and
    replays dropout with the forward's RNG state. It acts on training-mode forwards with autograd on:
    the policy pass through ``body_hidden_states``; the sampler (eval mode) and the no-grad passes
    are unaffected."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embeddings' output require grad, which only the reentrant variant
    # needs: without that, the backward stops at the first layer's adapters, as it does unchecked.
    model.disable_input_require_grads()


def head_token_logprobs(model, hidden_states: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                        chunk_size: int = 1024, return_entropy: bool = False,
                        from_position: int | torch.Tensor = 0):
    """token_logprobs from hidden states the caller already has (``body_hidden_states`` of
    ``input_ids``): the chunked output head alone, so that one body pass can feed both the
    log-probs and something else (PPO's value head). Same results and gradients as
    token_logprobs, [B, L-1-from_position]; for a tensor ``from_position``, [len(from_position)]."""
    _check_arguments(temperature, chunk_size)
    softcap = _final_logit_softcap(model)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("token_logprobs supports output heads without bias only")
    batch_size, length, hidden_size = hidden_states.shape
    if isinstance(from_position, torch.Tensor):
        # A set of positions, flat indices t of [B * L], none the last of its row: the head runs on
        # those alone (packed rows: the positions that predict answer tokens), target token t + 1.
        predicting_hidden = hidden_states.reshape(-1, hidden_size).index_select(0, from_position)
        targets = input_ids.reshape(-1).index_select(0, from_position + 1)
        return _ChunkedHeadLogprobs.apply(predicting_hidden, head.weight, targets, softcap, float(temperature),
                                          chunk_size, return_entropy)
    if not 0 <= from_position <= length - 1:
        raise ValueError(f"from_position must be in [0, {length - 1}] for sequences of {length}, got {from_position}")
    # The hidden state at position t predicts token t + 1; the last position predicts nothing here.
    predicting_hidden = hidden_states[:, from_position:-1].reshape(-1, hidden_size)
    targets = input_ids[:, from_position + 1:].reshape(-1)
    outputs = _ChunkedHeadLogprobs.apply(predicting_hidden, head.weight, targets, softcap, float(temperature),
                                         chunk_size, return_entropy)
    width = length - 1 - from_position
    if return_entropy:
        logprobs, entropy = outputs
        return logprobs.view(batch_size, width), entropy.view(batch_size, width)
    return outputs.view(batch_size, width)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024, position_ids: torch.Tensor | None = None,
                   return_entropy: bool = False, from_position: int = 0):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) under softmax(logits / temperature), [B, L-1].

    ``temperature`` divides the model's final (for Gemma 2, already soft-capped) logits, as the
    sampler does, so these are the log-probs of the distribution the tokens were drawn from.
    Every position is computed, padding included; callers mask. Computed and returned in fp32
    whatever the model's dtype (fp64 for an fp64 model). With ``return_entropy`` returns
    (logprobs, entropy), entropy [B, L-1] being that of the same per-position distribution.
    Both are differentiable w.r.t. the body's parameters and the head weight (tied or not); the
    head's peak memory grows with ``chunk_size * vocab``, not with ``B * L * vocab``.

    Without ``position_ids``, positions count the attended tokens, so a left-padded row gets the
    positions it would have unpadded.

    ``from_position`` s > 0 keeps only t >= s, [B, L-1-s]: the body still reads every token, but the
    head (a vocab x hidden matmul per position, forward and backward) runs on the predictions wanted
    alone, e.g. a completion's after its prompt, s = prompt width - 1.
    """
    # Refuse bad arguments and an unknown head before running the body.
    _check_arguments(temperature, chunk_size)
    _final_logit_softcap(model)
    hidden_states = body_hidden_states(model, input_ids, attention_mask, position_ids)
    return head_token_logprobs(model, hidden_states, input_ids, temperature, chunk_size, return_entropy,
                               from_position)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask[:, t] * token_logps[:, t], [B]: the log-probability of each row's masked tokens
    (e.g. a DPO response). Masked-out entries are dropped, not multiplied by 0, so a non-finite
    value there cannot turn the sum into NaN."""
    return torch.where(mask.bool(), token_logps, torch.zeros_like(token_logps)).sum(-1)

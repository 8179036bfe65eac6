"""Batched sampling with a KV cache: K completions for each of B prompts at once.

One hand-written loop instead of ``model.generate`` so every step is visible and
the log-prob of each sampled token comes out of the same softmax that sampled
it.  Rows are the B prompts each repeated K times (row = prompt * K + k), left
padded so every row's next token sits in the last column; position ids are
counted from each row's first real token (left padding would otherwise shift
them), and a row stops at its first stop token (EOS or the chat template's
end-of-turn).  The loop ends when every row has stopped.

Sampling draws, like ``torch.multinomial``, an Exp(1) variable per row and
token and keeps the argmax of p / E (the exponential race: the winner is token
j with probability p_j), for every row of the batch, stopped ones included, so
a seed gives the same tokens as sampling all rows to the end would.

Two paths, chosen by ``sample(..., sampler=)``, draw the same race, so a seed
gives the same tokens on both:

* ``eager`` (the reference, and the default on the CPU and mps): a growing
  ``DynamicCache``.  Each distinct prompt is run through the model once and its
  KV cache copied to its rows, and a row that has stopped leaves the batch (its
  cache and mask rows are dropped), so later steps compute only the rows still
  going.  That needs the host to know, at every token, which rows stopped.
* ``static`` / ``compiled`` (``auto`` picks ``compiled`` on CUDA, ``static`` there
  when the compiler has no GPU backend): the same prefill, with prompts left-padded
  to a multiple of PROMPT_BUCKET tokens, copied into KV buffers of a fixed size,
  [rows, kv heads, slots, head dim] with slots = bucketed width + max_new_tokens - 1
  rounded up to a multiple of SLOT_MULTIPLE, which the model reads through a 4D
  attention mask of the slots each row attends to.  Every decode step then has
  the same shapes: a stopped row keeps computing (on a pad token, its outputs
  masked out), and "have all rows stopped" is asked every STOP_CHECK_EVERY tokens
  instead of at each one.  A chunk of rows is padded with dummy rows (stopped from
  the start, drawing nothing from the race) to ``SamplingParams.chunk_rows``, so a
  run meets one row count for its rollouts and one for its evals; the buffers of
  every shape are views at the start of one allocation per layer (_KV_STORAGE),
  which grows to the largest shape met and never moves otherwise: a long prompt
  bucket is attended over only while it lasts.  The decode step reads the KV
  buffers un-repeated through ``gqa_decode_attention`` (Gemma 2, Llama, Qwen 2/3,
  Mistral), where transformers' eager and compiled sdpa attention would copy them
  to every query head.  ``compiled`` runs that step through
  ``torch.compile(mode="reduce-overhead")``, which on CUDA replays it as a CUDA
  graph: one launch per token instead of one per kernel.  Rows and cache length
  are marked dynamic, so one compilation serves every shape; each new shape still
  records its own graph.  A run that frees the KV buffers before every policy pass
  compiles the step without CUDA graphs (``SamplingParams.cuda_graphs``): the
  buffers' new address each step would record the graph again each step.  What
  the first two decode steps of a call take beyond the third (the compilation,
  the graph's warm-up and recording) is returned as ``SampleOutput.compile_seconds``,
  for a trainer to report apart from its step time.

On every path the logits come from the body's last hidden state through the
trainer's head (common.logprobs.head_logits: fp32 output, Gemma 2's soft-cap once
in fp32), so the sampler's log-probs are the trainer's up to the body's rounding.
The settings (samples, length, temperature, top-p, top-k, generator, rows per
chunk, path) travel as one SamplingParams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, StaticLayer

from common.errors import UserError
from common.logprobs import head_logits

# What a NaN or inf in the logits means in practice: weights that exploded (a learning rate far too large), or
# an fp16 model overflowing; one line a user can act on (common.errors), not a traceback.
NON_FINITE_LOGITS = ("the model's logits are not finite (NaN or inf) at some sampled position: its weights have "
                     "exploded (lower LR, and continue from the last good checkpoint) or fp16 overflows (DTYPE=float32)")


class NonFiniteLogitsError(UserError, ValueError):
    pass


SAMPLERS = ("auto", "eager", "static", "compiled")
# Prompts are left-padded to a multiple of this many tokens on the static path, so a run meets a few
# cache shapes (each one a CUDA graph to record), not one per batch.
PROMPT_BUCKET = 64
# The static path's KV slots are rounded up to a multiple of this: an odd slot count makes sdpa's
# memory-efficient kernel copy a padded mask, and the GEMMs over the slots prefer aligned lengths.
SLOT_MULTIPLE = 16
# The static path asks "have all rows stopped?" (a host-device sync) once every this many tokens;
# at most this many - 1 steps are computed after the last row stopped.
STOP_CHECK_EVERY = 8


@dataclass(frozen=True)
class SamplingParams:
    """How to sample, as one value (like vLLM's SamplingParams, transformers' GenerationConfig): built
    once from a script's constants and handed down unchanged to sample() and evaluate()."""
    num_samples: int = 1                    # completions per prompt
    max_new_tokens: int = 256               # completion length limit
    temperature: float = 1.0                # 0 = greedy
    top_p: float = 1.0                      # nucleus sampling (1.0 = off)
    top_k: int = 0                          # top-k sampling (0 = off)
    chunk_rows: int = 0                     # rows sampled together (0 = all); the static path pads a chunk to this
    sampler: str = "auto"                   # eager, static, compiled, or auto (see the module docstring)
    cuda_graphs: bool = True                # the compiled path replays its decode step as CUDA graphs; False
    #                                         where the KV buffers are freed between calls (release_static_cache)
    generator: torch.Generator | list[torch.Generator] | None = None  # the race's random source (None: the
    #                                         device's default one; a list: one per row, row_generators)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_samples < 1 or self.chunk_rows < 0:
            raise ValueError(f"num_samples must be >= 1 and chunk_rows >= 0, got {self.num_samples}, "
                             f"{self.chunk_rows}")

    def greedy(self) -> SamplingParams:
        """The same settings for a greedy evaluation: one sample per prompt at temperature 0."""
        return dataclasses.replace(self, num_samples=1, temperature=0.0, top_p=1.0, top_k=0, generator=None)


def row_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded with ``seeds`` (SamplingParams.generator as a list)."""
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def even_chunk_rows(num_rows: int, max_rows: int) -> int:
    """Rows per chunk when ``num_rows`` are sampled at most ``max_rows`` at a time (0 = all) in chunks
    of equal size, the last one padded: 128 rows at most 80 at a time are 2 chunks of 64, not 80 + 48."""
    if not max_rows or max_rows >= num_rows:
        return num_rows
    chunks = -(-num_rows // max_rows)
    return -(-num_rows // chunks)


@dataclass
class SampleOutput:
    prompt_ids: list[list[int]]      # [N] each row's prompt tokens, unpadded
    completion_ids: torch.Tensor     # [N, T] sampled tokens; pad after a row's stop token
    completion_mask: torch.Tensor    # [N, T] 1.0 on every sampled token up to and including the stop token
    logprobs: torch.Tensor           # [N, T] log-prob of each sampled token under the distribution it was drawn from; 0 outside the mask
    truncated: torch.Tensor          # [N] True where the row hit max_new_tokens without a stop token
    texts: list[str]                 # [N] decoded completions, special tokens removed
    prompt_index: torch.Tensor       # [N] which of the B prompts each row answers
    compile_seconds: float = 0.0     # time this call spent compiling and recording the decode step (compiled sampler)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1).long()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    Top-p keeps the smallest set of most likely tokens whose probability reaches
    top_p (Holtzman et al. 2019); the most likely token is always kept.
    """
    if top_k and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [N, width], sequences aligned to the right; ``width``
    defaults to the longest sequence."""
    width = width or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def gqa_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    """Attention of one new token per row against the un-repeated K/V of grouped-query attention.

    query [B, H, 1, D], key / value [B, KV, L, D] with H = KV * G: the query heads of KV head k are
    k * G ... k * G + G - 1 (transformers' repeat_kv), so q viewed as [B, KV, G, D] multiplies each KV
    head's keys once for its whole group. Eager attention expands K and V to [B, H, L, D] first, and
    under torch.compile sdpa does too: a copy of the whole cache per layer per token. The rest is
    eager attention's: scores * scaling, the soft-cap c tanh(s / c) (Gemma 2), the additive mask, a
    softmax in fp32 cast back. A multi-token query (a prefill) goes to the model's own eager attention.
    Returns (output [B, 1, H, D], weights [B, H, 1, L]), as every attention function does."""
    batch, heads, query_length, head_dim = query.shape
    if query_length != 1:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     **({"softcap": softcap} if softcap is not None else {}), **kwargs)
    kv_heads = key.size(1)
    if scaling is None:
        scaling = head_dim ** -0.5
    grouped_query = query.view(batch, kv_heads, heads // kv_heads, head_dim)
    weights = torch.matmul(grouped_query, key.transpose(2, 3)) * scaling  # [B, KV, G, L]
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask  # [B, 1, 1, L]: the same slots for every head
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value)  # [B, KV, G, D]
    return output.reshape(batch, 1, heads, head_dim), weights.reshape(batch, heads, 1, -1)


GQA_DECODE = "gqa_decode"
AttentionInterface.register(GQA_DECODE, gqa_decode_attention)
# The architectures whose attention layers the static path switches to GQA_DECODE for its decode steps.
GQA_DECODE_MODEL_TYPES = frozenset({"gemma2", "llama", "qwen2", "qwen3", "mistral"})


@contextlib.contextmanager
def _decode_attention(model):
    """The model's attention layers run GQA_DECODE inside, where its architecture is one of
    GQA_DECODE_MODEL_TYPES; its own attention again after."""
    original = model.config._attn_implementation
    if model.config.model_type in GQA_DECODE_MODEL_TYPES:
        model.config._attn_implementation = GQA_DECODE
    try:
        yield
    finally:
        model.config._attn_implementation = original


def _prefill(model, prompt_rows, pad_id, width=None):
    """Each distinct prompt through the model once, then its cache, mask and positions copied to each
    of its rows: (DynamicCache over the rows, next-token logits [N, V] in fp32, prompt mask [N, width],
    last positions [N, 1])."""
    device = next(model.parameters()).device
    distinct_prompts: dict[tuple[int, ...], int] = {}
    row_prompt = torch.tensor([distinct_prompts.setdefault(tuple(row), len(distinct_prompts)) for row in prompt_rows],
                              device=device)
    prompt_ids, prompt_mask = left_pad([list(prompt) for prompt in distinct_prompts], pad_id, device, width)
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    outputs = model.get_decoder()(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                                  use_cache=True)
    cache = outputs.past_key_values
    cache.batch_select_indices(row_prompt)
    # The head on the last position alone: no [N, L, vocab] tensor at prefill.
    logits = head_logits(model, outputs.last_hidden_state[:, -1])
    return cache, logits[row_prompt], prompt_mask[row_prompt], prompt_positions[row_prompt, -1:]


def _draw_tokens(logits, settings: SamplingParams, num_rows, batch_rows=None):
    """(next token, its log-prob) for each row of the fp32 ``logits`` [rows, V]: the argmax when
    temperature is 0, else the exponential race. The race is drawn for the batch's ``num_rows`` real
    rows, read at ``batch_rows`` (the rows still going) when given; rows past ``num_rows`` (the static
    path's dummy rows) draw nothing and take their argmax."""
    if settings.temperature == 0:
        next_token = logits.argmax(dim=-1)
        return next_token, logits.log_softmax(dim=-1).gather(-1, next_token[:, None]).squeeze(-1)
    log_dist = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p).log_softmax(dim=-1)
    # torch.multinomial(p, 1) is argmax(p / E), E ~ Exp(1) drawn for all its rows; drawn here for every
    # row, stopped ones too, the random stream (and so each seed's tokens) is what multinomial's was.
    race = torch.empty((log_dist.size(0) if batch_rows is None else num_rows, log_dist.size(-1)),
                       dtype=log_dist.dtype, device=log_dist.device)
    if isinstance(settings.generator, list):  # one generator per row (row_generators): each row its own stream
        for row, row_generator in enumerate(settings.generator):
            race[row].exponential_(generator=row_generator)
    else:
        race[:num_rows].exponential_(generator=settings.generator)
    race[num_rows:] = 1.0
    if batch_rows is not None:
        race = race[batch_rows]
    next_token = (log_dist.exp() / race).argmax(dim=-1)
    return next_token, log_dist.gather(-1, next_token[:, None]).squeeze(-1)


# inference_mode, not just no_grad: no autograd bookkeeping at all on the many small ops of a decode step
# (about 8% faster on the CPU). Its tensors cannot enter autograd later; sample() passes every one of them
# through torch.cat, whose results are ordinary tensors.
@torch.inference_mode()
def _sample_rows_eager(model, prompt_rows, settings: SamplingParams, stop_ids, pad_id):
    device = next(model.parameters()).device
    num_rows, max_new_tokens = len(prompt_rows), settings.max_new_tokens
    cache, logits, attention_mask, positions = _prefill(model, prompt_rows, pad_id)
    stop_ids_tensor = torch.tensor(stop_ids, device=device)
    body = model.get_decoder()

    completion_ids = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((num_rows, max_new_tokens), device=device)
    logprobs = torch.zeros((num_rows, max_new_tokens), device=device)
    truncated = torch.ones(num_rows, dtype=torch.bool, device=device)
    batch_rows = torch.arange(num_rows, device=device)  # the rows still in the batch, in batch order
    steps_taken = 0
    for step in range(max_new_tokens):
        if step:
            positions = positions + 1
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            hidden = body(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=positions,
                          past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            logits = head_logits(model, hidden)
        next_token, token_logprob = _draw_tokens(logits, settings, num_rows, batch_rows)
        completion_ids[batch_rows, step] = next_token
        logprobs[batch_rows, step] = token_logprob
        completion_mask[batch_rows, step] = 1.0
        steps_taken = step + 1
        finished = torch.isin(next_token, stop_ids_tensor)
        num_finished = int(finished.sum())
        if num_finished:
            truncated[batch_rows[finished]] = False
            if num_finished == len(batch_rows):
                break
            going = (~finished).nonzero().squeeze(-1)
            batch_rows, next_token, positions = batch_rows[going], next_token[going], positions[going]
            attention_mask = attention_mask[going]
            cache.batch_select_indices(going)
    # A token drawn from NaN or +inf logits has a NaN log-prob; torch.multinomial refused such
    # distributions, and so does this, once at the end rather than with a host sync at every step.
    if torch.isnan(logprobs).any():
        raise NonFiniteLogitsError(NON_FINITE_LOGITS)
    return (completion_ids[:, :steps_taken], completion_mask[:, :steps_taken], logprobs[:, :steps_taken],
            truncated, 0.0)


def _sliding_window(config) -> int | None:
    """The window of the model's sliding-window attention layers; None when every layer attends to all."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def _static_path_refusal(model, prompt_width: int, max_new_tokens: int) -> str | None:
    """Why the static path cannot sample these rows with this model, or None when it can."""
    device = next(model.parameters()).device
    if device.type not in ("cuda", "cpu"):
        return f"it runs on cuda or cpu, not {device.type}"
    attention = model.config._attn_implementation
    if attention not in ("eager", "sdpa", GQA_DECODE):
        return f"it builds its own attention masks, which {attention!r} attention does not take (eager, sdpa)"
    if max_new_tokens < 1:
        return "max_new_tokens < 1"
    # Its masks let every token see the whole row: the same as the eager path's sliding-window layers
    # as long as no row is longer than the window (4096 tokens for Gemma 2).
    window = _sliding_window(model.config)
    if window is not None and prompt_width + max_new_tokens > window:
        return (f"prompt ({prompt_width} tokens) + max_new_tokens ({max_new_tokens}) exceed the sliding window "
                f"({window})")
    return None


def _bucketed_width(prompt_width: int, max_new_tokens: int, window: int | None) -> int:
    """The prompt width rounded up to a multiple of PROMPT_BUCKET, short of the sliding window."""
    width = -(-prompt_width // PROMPT_BUCKET) * PROMPT_BUCKET
    return width if window is None else max(prompt_width, min(width, window - max_new_tokens))


class _KVStorage:
    """One model's static KV memory: per layer, one flat allocation for the keys and one for the values,
    and the Cache of each shape met, whose layers are views at the start of those allocations. A CUDA
    graph reads them at fixed addresses, so they outlive a call; a shape larger than any before
    reallocates them (and every shape's graph is recorded again), a smaller one, such as the next step's
    after a long prompt, is a view of as many slots as it needs."""

    def __init__(self, numels, dtype, device):
        self.dtype, self.device = dtype, device
        self.flat = [(torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device))
                     for n in numels]
        self.caches: dict[tuple, Cache] = {}

    def fits(self, numels, dtype, device) -> bool:
        return (dtype, device) == (self.dtype, self.device) and len(numels) == len(self.flat) and all(
            n <= keys.numel() for n, (keys, _) in zip(numels, self.flat))

    def cache(self, shapes, slots: int) -> Cache:
        key = (tuple(shapes), slots)
        if key not in self.caches:
            cache = Cache(layers=[StaticLayer(max_cache_len=slots) for _ in shapes])
            for layer, shape, (keys, values) in zip(cache.layers, shapes, self.flat):
                layer.dtype, layer.device = self.dtype, self.device
                layer.batch_size, layer.num_heads, _, layer.k_head_dim = shape
                layer.v_head_dim = layer.k_head_dim
                layer.keys, layer.values = (flat[:math.prod(shape)].view(shape) for flat in (keys, values))
                layer.cumulative_length = layer.cumulative_length.to(self.device)
                for buffer in (layer.keys, layer.values, layer.cumulative_length):
                    torch._dynamo.mark_static_address(buffer)
                for buffer in (layer.keys, layer.values):  # rows and length: one compilation for every shape
                    torch._dynamo.maybe_mark_dynamic(buffer, 0)
                    torch._dynamo.maybe_mark_dynamic(buffer, 2)
                layer.is_initialized = True
            self.caches[key] = cache
        return self.caches[key]


# model -> its _KVStorage (see there): the static path's KV buffers, one allocation per layer for K and V.
_KV_STORAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_kv_cache(model, prefilled: Cache, width: int, slots: int) -> Cache:
    """A cache of StaticLayer buffers [rows, kv heads, slots, head dim] holding the prefill's keys and
    values in their first ``width`` slots and zeros after them, positioned to write the next token at
    slot ``width``."""
    shapes = [(layer.keys.size(0), layer.keys.size(1), slots, layer.keys.size(3)) for layer in prefilled.layers]
    numels = [math.prod(shape) for shape in shapes]
    first = prefilled.layers[0].keys
    storage = _KV_STORAGE.get(model)
    if storage is None or not storage.fits(numels, first.dtype, first.device):
        if storage is not None and storage.fits([0] * len(numels), first.dtype, first.device):
            numels = [max(n, keys.numel()) for n, (keys, _) in zip(numels, storage.flat)]  # the largest met
        _KV_STORAGE.pop(model, None)
        storage = None  # the old buffers are freed before the new ones are allocated
        _KV_STORAGE[model] = _KVStorage(numels, first.dtype, first.device)
    cache = _KV_STORAGE[model].cache(shapes, slots)
    for layer, prefilled_layer in zip(cache.layers, prefilled.layers):
        for buffer, prefilled_buffer in ((layer.keys, prefilled_layer.keys), (layer.values, prefilled_layer.values)):
            buffer[:, :, :width] = prefilled_buffer
            buffer[:, :, width:].zero_()  # no stale value of an earlier call (a NaN there would leak through 0 * NaN)
        layer.cumulative_length.fill_(width)  # StaticLayer writes each new token at this slot, then counts it
    return cache


def release_static_cache(model) -> int:
    """Free the static path's KV buffers kept for ``model`` (the next static-path call allocates them
    again, at a new address: a CUDA graph would be recorded again, so the trainers that call it every step
    sample with SamplingParams.cuda_graphs=False); the bytes freed. The trainers call it before the policy
    pass when the memory plan says the two do not fit together."""
    kept = _KV_STORAGE.pop(model, None)
    if kept is None:
        return 0
    return sum(buffer.numel() * buffer.element_size() for pair in kept.flat for buffer in pair)


def _decode_step(model, cache: Cache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 slot_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits [N, V] (fp32, from the trainer's head) of one new token per row [N, 1] against
    the static cache. ``slot_mask`` [N, cache length] is True on the slots a row attends to: its
    prompt's real tokens and every token since, the one written now included; the model gets it as a
    4D additive mask, which it takes as is (transformers' masking_utils returns 4D masks unchanged)."""
    additive_mask = torch.zeros(slot_mask.shape, dtype=model.dtype, device=slot_mask.device)
    additive_mask.masked_fill_(~slot_mask, torch.finfo(model.dtype).min)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=additive_mask[:, None, None, :],
                                 position_ids=position_ids, past_key_values=cache,
                                 use_cache=True).last_hidden_state[:, -1]
    return head_logits(model, hidden)


@functools.cache
def _compiled_decode_step(cuda_graphs: bool):
    """``_decode_step`` compiled once per process and mode (created on first use: importing the compiler
    takes seconds); fullgraph: a graph break would silently split the step. mode="reduce-overhead" replays
    it as a CUDA graph on CUDA. Without ``cuda_graphs``, the default mode: the same fused kernels, launched
    one by one. That is for KV buffers freed before every policy pass (release_static_cache): they come
    back at a new address each step, and the KV is marked a static address without a guard
    (mark_static_address), so cudagraph trees would record the graph again at every step (issue 29,
    finding 9) and keep a pool the plan then no longer has room for; kernels take the new address as is."""
    return torch.compile(_decode_step, mode="reduce-overhead" if cuda_graphs else "default", fullgraph=True)


def _random_source(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The generator the race draws from: the one given, else the device's default one (what exponential_ uses)."""
    if generator is not None:
        return generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index]
    return torch.default_generator


def _synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _one_off_seconds(step_seconds: list[float]) -> float:
    """What the first two decode steps of a compiled call took beyond the third: torch.compile's
    compilation (a first call, or a guard that fails, as when the adapters are switched off) and, on
    CUDA, the graph's warm-up and recording (each new shape); all of their time without a third step.
    A step counts only when it took more than twice the third: less is noise (compiling takes seconds,
    a step milliseconds)."""
    if len(step_seconds) < 3:
        return sum(step_seconds)
    steady = step_seconds[2]
    return sum(seconds - steady for seconds in step_seconds[:2] if seconds > 2 * steady)


# no_grad rather than inference_mode: the KV buffers outlive the call and are written in place by the
# next one, and torch.compile traces ordinary tensors (HF's generate runs its compiled steps the same way).
@torch.no_grad()
def _sample_rows_static(model, prompt_rows, settings: SamplingParams, stop_ids, pad_id, compiled):
    device = next(model.parameters()).device
    num_rows, max_new_tokens = len(prompt_rows), settings.max_new_tokens
    # Dummy rows (the first prompt again: no extra prefill) up to the run's chunk size, at least 2 (a
    # dimension of size 1 would be specialised, and compiled again).
    rows = max(2, settings.chunk_rows, num_rows)
    width = _bucketed_width(max(len(row) for row in prompt_rows), max_new_tokens, _sliding_window(model.config))
    prefilled, logits, prompt_mask, positions = _prefill(model, prompt_rows + [prompt_rows[0]] * (rows - num_rows),
                                                         pad_id, width)
    # The last sampled token is never fed back: width + max_new_tokens - 1 slots are written at most.
    slots = -(-(width + max_new_tokens - 1) // SLOT_MULTIPLE) * SLOT_MULTIPLE
    cache = _static_kv_cache(model, prefilled, width, slots)
    del prefilled
    slot_mask = torch.zeros((rows, slots), dtype=torch.bool, device=device)
    slot_mask[:, :width] = prompt_mask.bool()
    decode_step = _compiled_decode_step(settings.cuda_graphs) if compiled else _decode_step
    step_seconds = []  # of the first three decode steps of a compiled call, for _one_off_seconds
    # Per-row generators (row_generators) are the call's own: nothing to rewind for a next call.
    random_source = (_random_source(settings.generator, device)
                     if settings.temperature > 0 and not isinstance(settings.generator, list) else None)
    states_after_draw = []
    stop_ids_tensor = torch.tensor(stop_ids, device=device)

    completion_ids = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((rows, max_new_tokens), device=device)
    logprobs = torch.zeros((rows, max_new_tokens), device=device)
    stopped = torch.arange(rows, device=device) >= num_rows  # the dummy rows, from the start
    steps_run = 0
    with _decode_attention(model):
        for step in range(max_new_tokens):
            if step:
                slot_mask[:, width + step - 1] = True  # the slot the token fed now is written to
                positions = positions + 1
                token_ids = next_token[:, None]
                if compiled:
                    for tensor in (token_ids, positions, slot_mask):  # rows, and the cache length: dynamic
                        torch._dynamo.maybe_mark_dynamic(tensor, 0)
                    torch._dynamo.maybe_mark_dynamic(slot_mask, 1)
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are no longer read
                timed = compiled and step <= 3
                start = _synchronized_clock(device) if timed else 0.0
                logits = decode_step(model, cache, token_ids, positions, slot_mask)
                if timed:
                    step_seconds.append(_synchronized_clock(device) - start)
            next_token, token_logprob = _draw_tokens(logits, settings, num_rows)
            if random_source is not None:
                states_after_draw.append(random_source.get_state())
            completion_ids[:, step] = next_token.masked_fill(stopped, pad_id)
            logprobs[:, step] = token_logprob.masked_fill(stopped, 0.0)
            completion_mask[:, step] = (~stopped).float()
            stopped = stopped | torch.isin(next_token, stop_ids_tensor)
            next_token = next_token.masked_fill(stopped, pad_id)  # a stopped row computes on, on a pad token
            steps_run = step + 1
            if steps_run % STOP_CHECK_EVERY == 0 and bool(stopped.all()):
                break
    # One host read for both: the longest completion, and whether a token was drawn from NaN or +inf logits.
    steps_taken, not_finite = torch.stack([completion_mask.sum(dim=1).max(),
                                           torch.isnan(logprobs).any().float()]).tolist()
    if not_finite:
        raise NonFiniteLogitsError(NON_FINITE_LOGITS)
    steps_taken = int(steps_taken)
    if random_source is not None and steps_run > steps_taken:
        # The eager path draws no more once every row has stopped: rewind the generator to that point,
        # so that the next call draws what it would draw after the eager path.
        random_source.set_state(states_after_draw[steps_taken - 1])
    return (completion_ids[:num_rows, :steps_taken], completion_mask[:num_rows, :steps_taken],
            logprobs[:num_rows, :steps_taken], ~stopped[:num_rows], _one_off_seconds(step_seconds))


@functools.cache
def _compiler_has_gpu_backend() -> bool:
    """Whether inductor can compile for the GPU here: it needs Triton, which Windows and some Linux
    installs lack, and a card Triton supports (compute capability 7.0 or more). torch's has_triton()
    checks both, as common/logprobs.py does; the package alone is not enough (issue 29, finding 5).
    Says once when not."""
    from torch.utils._triton import has_triton

    if has_triton():
        return True
    print("sampler: no Triton for this card (not installed, or compute capability below 7.0), so no GPU "
          "compiler: auto takes the static-cache path uncompiled")
    return False


def _auto_path(device: torch.device) -> str:
    """What ``auto`` samples with on ``device``: compiled on CUDA, static there without Triton, else eager."""
    if device.type != "cuda":
        return "eager"
    return "compiled" if _compiler_has_gpu_backend() else "static"


def _sample_rows(model, prompt_rows, settings: SamplingParams, stop_ids, pad_id):
    """One chunk of rows through the path ``settings.sampler`` names; ``auto`` takes the compiled static
    path on CUDA (static without Triton) when it can run these rows (else the eager one), and the eager
    path elsewhere."""
    device = next(model.parameters()).device
    if settings.sampler == "compiled" and device.type == "cuda" and not _compiler_has_gpu_backend():
        raise ValueError("sampler='compiled' needs Triton and a card of compute capability 7.0 or more; "
                         "use sampler='static' (the same path uncompiled)")
    path = _auto_path(device) if settings.sampler == "auto" else settings.sampler
    if path != "eager":
        refusal = _static_path_refusal(model, max(len(row) for row in prompt_rows), settings.max_new_tokens)
        if refusal is not None and settings.sampler != "auto":
            raise ValueError(f"sampler={settings.sampler!r} cannot sample here: {refusal}; use sampler='eager'")
        if refusal is not None:
            path = "eager"
    if path == "eager":
        return _sample_rows_eager(model, prompt_rows, settings, stop_ids, pad_id)
    return _sample_rows_static(model, prompt_rows, settings, stop_ids, pad_id, compiled=path == "compiled")


def sample(model, prompt_ids: list[list[int]], settings: SamplingParams, tokenizer=None,
           eos_token_ids: list[int] | None = None, pad_token_id: int | None = None) -> SampleOutput:
    """Sample ``settings.num_samples`` completions for each prompt (temperature 0 = greedy).

    ``prompt_ids`` are formatted, tokenized prompts (common.prompts.encode_prompts).
    ``eos_token_ids`` lists the stop tokens (common.model.stop_token_ids); a
    ``tokenizer`` supplies the defaults for them and for the pad id, and decodes
    ``texts``.  ``settings.chunk_rows`` bounds memory: the B * K rows are sampled
    in chunks of that many rows (even_chunk_rows makes them equal).  All paths
    give the same tokens for a seed (see the module docstring).

    ``settings.generator`` may be a list of generators, one per row (row_generators: row = prompt *
    num_samples + sample), each row then drawing from its own: its tokens depend on its generator's seed
    and its prompt alone, not on which rows share its batch or chunk, so an eval sharded across
    processes samples what one process would. It costs a draw call per row and token instead of one.
    """
    if eos_token_ids is None:
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("sample() needs eos_token_ids, or a tokenizer with an eos token")
        eos_token_ids = [tokenizer.eos_token_id]
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None else eos_token_ids[0]

    rows = [list(p) for p in prompt_ids for _ in range(settings.num_samples)]
    prompt_index = torch.arange(len(prompt_ids)).repeat_interleave(settings.num_samples)
    chunk = settings.chunk_rows or len(rows)
    starts = range(0, len(rows), chunk)
    chunk_settings = [settings] * len(starts)
    if isinstance(settings.generator, list):  # one per row: each chunk gets its rows' generators
        if len(settings.generator) != len(rows):
            raise ValueError(f"a generator per row needs {len(rows)} generators, got {len(settings.generator)}")
        chunk_settings = [dataclasses.replace(settings, generator=settings.generator[start:start + chunk])
                          for start in starts]
    parts = [_sample_rows(model, rows[start:start + chunk], part_settings, eos_token_ids, pad_token_id)
             for start, part_settings in zip(starts, chunk_settings)]
    width = max(p[0].size(1) for p in parts)

    def pad_right(tensor, value):
        return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)

    completion_ids = torch.cat([pad_right(p[0], pad_token_id) for p in parts])
    completion_mask = torch.cat([pad_right(p[1], 0.0) for p in parts])
    logprobs = torch.cat([pad_right(p[2], 0.0) for p in parts])
    truncated = torch.cat([p[3] for p in parts])
    texts = []
    if tokenizer is not None:  # one copy to the host for every row: [length, ids...] per row
        host_rows = torch.cat([completion_mask.sum(dim=1, keepdim=True).long(), completion_ids], dim=1).tolist()
        texts = [tokenizer.decode(row[1:1 + row[0]], skip_special_tokens=True) for row in host_rows]
    return SampleOutput(
        prompt_ids=rows,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        truncated=truncated,
        texts=texts,
        prompt_index=prompt_index,
        compile_seconds=sum(p[4] for p in parts),
    )

"""How much accelerator memory a run will take, from the model's config.json alone, before anything loads.

    plan = plan_memory("models/gemma-2-2b-it", quant="nf4", dtype="bfloat16", rows=128, samples_per_prompt=8,
                       prompt_tokens=200, max_new_tokens=256, micro_batch_size=16, lora_r=16,
                       lora_targets="all-linear", gradient_checkpointing=True)
    print(plan.table(gpu_gb=12))        # GB per item, the peak, and what would make it fit
    plan.fits(12), plan.advice(12), largest_generation_batch(plan, 12), check_fits(plan, 12)
    choose_sizes(plan, Sizes("auto", "auto", "auto", "auto"), Sizes(16, False, 0, 64), 12)  # MICRO_BATCH_SIZE=auto, ...

Only the config is read (AutoConfig: config.json and the architecture's defaults; for a Hub id that is
one small file, no weights). A step of an RL trainer holds, at its peak,

    weights + LoRA state + max(rollout, policy pass)

* weights: the linear layers of the body in the model's dtype, or in 4-bit NF4 (QUANT=nf4: half a byte
  per weight plus the double-quantized block scales, common/quant.py); embeddings, norms and an untied
  output head always in the dtype.
* LoRA state: r x (in + out) per adapted layer, fp32 weights, their gradients and AdamW's two moments:
  16 bytes per trained parameter.
* rollout (common/sampler.py): the KV cache, rows x (prompt + new tokens - 1) x layers x KV heads x
  head dim x 2 (keys, values) x dtype bytes, a sliding-window layer holding at most its window - 1 (eager
  path; the static path sizes every layer alike, prompts bucketed to PROMPT_BUCKET); plus what a decode
  step allocates: the [rows, vocab] logits and about five fp32 copies of them in the sampling race; or,
  at the prefill, one layer's activations over the distinct prompts. The static path's KV buffers stay
  allocated after the rollout (they are reused by the next one), so they count in the policy pass too,
  and so does the compiled path's CUDA-graph pool (graph_pool_bytes), which stays reserved. When the
  kept buffers are what does not fit, the trainers free them before each policy pass instead
  (release_static_kv: common.sampler.release_static_cache; the next rollout allocates them again, at a
  new address, so the decode step is compiled without CUDA graphs then, and there is no graph pool).
* policy pass (common/logprobs.py token_logprobs + backward), one micro-batch of rows x (prompt + new
  tokens): the activations autograd saves, enumerated below per decoder layer and checked against
  torch.autograd.graph.saved_tensors_hooks in tests/test_memory_plan.py; with gradient checkpointing
  only each layer's input, plus one layer recomputed during the backward. At the start of the backward
  the chunked head holds [chunk, vocab] fp32 buffers (logits, the soft-cap's tanh, d loss / d logits, and
  their cast to a bf16 head's dtype); on a CPU or mps a bf16 head is also copied to fp32. Then each
  layer's backward needs some more for the gradients it makes (layer_backward_bytes), and, checkpointed,
  its activations recomputed.
* a 4-bit model dequantizes one linear layer's weight at a time (bitsandbytes' matmul_4bit), inside the
  model's forward and backward.

These are live tensor bytes, what torch.cuda.max_memory_allocated reports; the CUDA context (a few hundred
MB) is outside them, and the caching allocator's fragmentation is what ALLOCATOR_HEADROOM keeps free.
Measured against the peak RSS growth of CPU runs in tests/test_memory_plan.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.quant import QUANTS

GB = 2 ** 30  # the tables' GB are GiB, as torch.cuda.mem_get_info counts and nvidia-smi reports (in MiB)
# Part of the GPU's memory a plan leaves unused: the CUDA caching allocator rounds blocks up and cannot
# always reuse a freed block for a larger tensor (PyTorch's CUDA memory notes; 5-10% is typical).
ALLOCATOR_HEADROOM = 0.10
FP32 = 4
# [rows, vocab] buffers alive together in a sampling step (common/sampler.py _draw_tokens, temperature
# > 0): the model's logits, their log-softmax, the exponential race, exp of the log-softmax and the
# ratio whose argmax wins; all fp32 but the logits.
SAMPLING_BUFFERS = 5
# The architectures whose layers the plan enumerates: those token_logprobs supports (common/logprobs.py).
PLANNED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3")
# Decoder-layer norms per model type: Gemma 2 and 3 put a norm before and after each sub-block.
_FOUR_NORM_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")
_QK_NORM_MODEL_TYPES = ("qwen3", "gemma3", "gemma3_text")  # RMSNorm on each query and key head
_GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a causal LM, read from its config."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_head: bool
    linears: dict  # attribute name -> (in_features, out_features), one decoder layer
    biased_linears: tuple  # attribute names whose layers have a bias
    norms_per_layer: int
    one_plus_weight_norms: bool  # Gemma's RMSNorm scales by (1 + weight), a fresh fp32 vector per call
    qk_norm: bool
    attention_softcap: bool
    final_softcap: bool
    eager_attention: bool  # eager attention saves the [rows, heads, L, L] scores; sdpa does not
    sliding_window: int | None
    sliding_layers: int

    @property
    def parameters(self) -> int:
        linear = sum(i * o for i, o in self.linears.values())
        return self.layers * linear + self.vocab * self.hidden * (1 if self.tied_head else 2)


def model_shape(config) -> ModelShape:
    """The ModelShape of a transformers config (of its language model, for a multimodal Gemma 3: its
    vision tower is not counted)."""
    from common.model import EAGER_ATTENTION_MODEL_TYPES

    model_type = config.model_type
    if model_type not in PLANNED_MODEL_TYPES:
        raise ValueError(f"the memory plan knows the layers of {', '.join(PLANNED_MODEL_TYPES)}, not {model_type!r}")
    text = config.get_text_config()
    hidden, intermediate = text.hidden_size, text.intermediate_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    if model_type == "phi3":  # fused projections (common/lora.py all_linear_targets)
        linears = {"qkv_proj": (hidden, (heads + 2 * kv_heads) * head_dim), "o_proj": (heads * head_dim, hidden),
                   "gate_up_proj": (hidden, 2 * intermediate), "down_proj": (intermediate, hidden)}
    else:
        linears = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
                   "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
                   "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                   "down_proj": (intermediate, hidden)}
    biased = ("q_proj", "k_proj", "v_proj") if model_type == "qwen2" or getattr(text, "attention_bias", False) else ()
    layer_types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    return ModelShape(
        model_type=model_type, hidden=hidden, intermediate=intermediate, layers=text.num_hidden_layers,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=text.vocab_size,
        tied_head=bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
        linears=linears, biased_linears=biased,
        norms_per_layer=4 if model_type in _FOUR_NORM_MODEL_TYPES else 2,
        one_plus_weight_norms=model_type in _GEMMA_MODEL_TYPES,
        qk_norm=model_type in _QK_NORM_MODEL_TYPES,
        attention_softcap=getattr(text, "attn_logit_softcapping", None) is not None,
        final_softcap=getattr(text, "final_logit_softcapping", None) is not None,
        eager_attention=model_type in EAGER_ATTENTION_MODEL_TYPES,  # as common.model.load_model picks it
        sliding_window=window if window and "sliding_attention" in layer_types else None,
        sliding_layers=layer_types.count("sliding_attention") if window else 0)


def dtype_bytes(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run that decide its memory (the trainers' constants of the same names)."""
    quant: str = "none"                     # QUANT: none or nf4
    dtype: str | torch.dtype = "bfloat16"   # the model's dtype (DTYPE once resolved: auto is bf16 on CUDA)
    device: str = "cuda"                    # cuda, cpu or mps (the head's fp32 copy, the sampler path)
    rows: int = 0                           # rollout rows sampled together (a GENERATION_BATCH_SIZE chunk; 0 = none)
    samples_per_prompt: int = 1             # G: rows per distinct prompt (the prefill runs each prompt once)
    prompt_tokens: int = 256                # the longest prompt, in tokens
    max_new_tokens: int = 256               # MAX_NEW_TOKENS (SFT, DPO: the longest answer)
    micro_batch_size: int = 1               # MICRO_BATCH_SIZE: sequences per forward and backward
    micro_batch_tokens: int = 0             # MICRO_BATCH_TOKENS: a micro-batch's token budget instead (0 = off)
    pack_length: int = 0                    # PACK_LENGTH as a number of tokens (0: auto, or padded rows)
    lora_r: int = 16                        # LORA_R
    lora_targets: tuple | str = "all-linear"  # LORA_TARGETS
    gradient_checkpointing: bool = False    # GRADIENT_CHECKPOINTING
    logprob_chunk_size: int = 1024          # LOGPROB_CHUNK_SIZE
    sampler: str = "auto"                   # SAMPLER: the static / compiled paths keep their KV buffers
    eval_rows: int = 0                      # prompts of an evaluation batch (EVAL_BATCH_SIZE), greedy, 1 sample
    eval_samples: int = 1                   # samples per eval prompt of a sampled eval (EVAL_NUM_SAMPLES at EVAL_TEMPERATURE > 0)
    eval_max_new_tokens: int | None = None  # the evaluation's MAX_NEW_TOKENS, when not max_new_tokens (SFT, DPO)
    head_on_prompt: bool = False            # the head runs on every position (SFT, DPO), not the completion's only
    entropy: bool = True                    # the policy pass computes entropies (GRPO, PPO; not SFT, DPO)
    release_static_kv: bool = False         # the static KV buffers are freed before each policy pass

    def __post_init__(self):
        if self.quant not in QUANTS:
            raise ValueError(f"unknown quant {self.quant!r}; one of {', '.join(QUANTS)}")
        dtype_bytes(self.dtype)

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def policy_tokens(self) -> int:
        """A micro-batch's tokens at most: MICRO_BATCH_SIZE sequences of the longest, or the token budget
        (a sequence longer than the budget alone)."""
        if self.micro_batch_tokens:
            return max(self.micro_batch_tokens, self.sequence_tokens)
        return self.micro_batch_size * self.sequence_tokens

    @property
    def policy_row_length(self) -> int:
        """The longest row of the policy pass: a padded row, or a packed row with PACK_LENGTH=auto, is
        the longest sequence; a numeric PACK_LENGTH longer than that packs several sequences per row,
        whose attention is counted at the row's length."""
        return max(self.pack_length, self.sequence_tokens)

    @property
    def policy_rows(self) -> int:
        """Rows of a micro-batch: its tokens in rows of policy_row_length (packed or padded alike, all
        sequences being the longest in the worst case)."""
        return -(-self.policy_tokens // self.policy_row_length)

    @property
    def policy_head_positions(self) -> int:
        """Positions of a micro-batch the output head runs on: head_positions per sequence of the longest."""
        return self.policy_tokens * self.head_positions // self.sequence_tokens

    @property
    def head_positions(self) -> int:
        """Positions per sequence the output head runs on: the completion's predictions (GRPO's and PPO's
        passes give token_logprobs from_position = the prompt's width - 1), or all but the last."""
        return self.sequence_tokens - 1 if self.head_on_prompt else self.max_new_tokens

    @property
    def static_kv_cache(self) -> bool:
        return self.sampler in ("static", "compiled") or (self.sampler == "auto" and self.device == "cuda")

    @property
    def cuda_graphs(self) -> bool:
        """The compiled static path, whose decode step replays CUDA graphs. auto takes it on CUDA where
        Triton runs on the card (common.sampler._compiler_has_gpu_backend: torch's has_triton()), else
        the static path uncompiled, with no graph pool (issue 29, finding 14); planned for CUDA from a
        machine without it, the card is assumed to have Triton. Not where the static KV is freed before
        each policy pass: the trainers then compile the step without CUDA graphs (SamplingParams.cuda_graphs,
        issue 29, finding 9), so no graph pool either."""
        if self.device != "cuda" or self.sampler not in ("compiled", "auto") or self.release_static_kv:
            return False
        from torch.utils._triton import has_triton

        return self.sampler == "compiled" or not torch.cuda.is_available() or has_triton()


def _targets(shape: ModelShape, lora_targets) -> tuple[str, ...]:
    if lora_targets == "all-linear" or list(lora_targets) == ["all-linear"]:
        return tuple(shape.linears)
    unknown = sorted(set(lora_targets) - set(shape.linears))
    if unknown:
        raise ValueError(f"LoRA targets {', '.join(unknown)} are not linear layers of {shape.model_type} "
                         f"({', '.join(shape.linears)})")
    return tuple(lora_targets)


def nf4_bytes(weights: int) -> int:
    """A linear layer's weight of ``weights`` values in NF4 with double quantization (QLoRA, Dettmers et
    al. 2023, section 3; bitsandbytes' Params4bit and QuantState): the 4-bit codes, two per byte; a uint8
    scale per block of 64 weights; an fp32 scale of those per 256 blocks; an fp32 offset and the 16- and
    256-entry fp32 code tables. About 0.516 bytes per weight."""
    blocks = math.ceil(weights / 64)
    return math.ceil(weights / 2) + blocks + math.ceil(blocks / 256) * FP32 + (1 + 16 + 256) * FP32


def weight_bytes(shape: ModelShape, settings: RunSettings) -> float:
    """The model's weights: the decoder layers' linears (NF4 or dtype), embeddings, head, norms, biases."""
    b = dtype_bytes(settings.dtype)
    per_layer = [i * o * b if settings.quant == "none" else nf4_bytes(i * o) for i, o in shape.linears.values()]
    norms = shape.layers * shape.norms_per_layer * shape.hidden + shape.hidden
    norms += shape.layers * 2 * shape.head_dim if shape.qk_norm else 0
    biases = shape.layers * sum(shape.linears[name][1] for name in shape.biased_linears)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_head else 2)
    return shape.layers * sum(per_layer) + (embeddings + norms + biases) * b


def lora_parameters(shape: ModelShape, settings: RunSettings) -> int:
    targets = _targets(shape, settings.lora_targets)
    return shape.layers * settings.lora_r * sum(sum(shape.linears[name]) for name in targets)


def kv_cache_bytes(shape: ModelShape, settings: RunSettings, rows: int) -> float:
    """Keys and values of ``rows`` rows: the last sampled token is never fed back, so prompt + new - 1
    positions (transformers' DynamicCache); on the static path the prompt is bucketed (up to
    PROMPT_BUCKET - 1 more slots, or fewer near a sliding window) and every layer holds them all."""
    from common.sampler import PROMPT_BUCKET

    b = dtype_bytes(settings.dtype)
    if settings.static_kv_cache:
        width = math.ceil(settings.prompt_tokens / PROMPT_BUCKET) * PROMPT_BUCKET
        positions = [width + settings.max_new_tokens - 1] * shape.layers
    else:
        length = settings.prompt_tokens + settings.max_new_tokens - 1
        # A sliding-window layer keeps the window's last tokens but one: the new token completes it.
        window = shape.sliding_window - 1 if shape.sliding_window else length
        positions = ([min(length, window)] * shape.sliding_layers
                     + [length] * (shape.layers - shape.sliding_layers))
    return rows * sum(positions) * shape.kv_heads * shape.head_dim * 2 * b


def dequantized_layer_bytes(shape: ModelShape, settings: RunSettings) -> float:
    """One 4-bit linear's weight dequantized to the compute dtype for its matmul (0 unquantized)."""
    if settings.quant != "nf4":
        return 0.0
    return max(i * o for i, o in shape.linears.values()) * dtype_bytes(settings.dtype)


def _score_bytes(shape: ModelShape, b: int) -> int:
    """Bytes saved per [query, key] entry per head by eager attention: the fp32 softmax (the model
    computes it in fp32), its cast back to a bf16 dtype, and the soft-cap's tanh output (Gemma 2)."""
    return FP32 + (b if b != FP32 else 0) + (b if shape.attention_softcap else 0)


def layer_activation_bytes(shape: ModelShape, settings: RunSettings, rows: int, length: int,
                           first_layer: bool = False) -> float:
    """What autograd saves in one decoder layer for ``rows`` sequences of ``length`` tokens, with LoRA on
    ``settings.lora_targets`` and frozen base weights (a frozen linear saves no input; an adapter saves
    its input and A·x). Per token:

      norms      each RMSNorm: its input in fp32 and 1 / rms (the first layer's input norm saves
                 nothing: the embeddings need no gradient); Gemma's norms also (1 + weight) in fp32
      attention  eager: q, k and v at the query heads (matmul's contiguous copies), the [heads, L]
                 scores (_score_bytes) and the output's copy o_proj reads. sdpa: q, k and v (at the
                 query heads when repeat_kv copies them, 1 < KV heads < heads), its fp32 log-sum-exp, its
                 output (which o_proj reads as it is) and its [L, L] mask: a batch with padding, as a
                 step's is (without, transformers passes no mask and the KV heads as they are); q/k
                 norms' inputs
      MLP        the gate's output, the activation's output and the up projection's (the product's inputs)
      adapters   each adapted layer's input (the norm's output for q/k/v and gate/up, the attention
                 output for o, the product for down) and A·x (r); in bf16, the cast copies of A and B.

    Exact (tests/test_memory_plan.py) when all of q, k and v are adapted, as by default, or with sdpa.
    Otherwise the first layer, where what needs no gradient is not kept (e.g. eager attention's q when
    only q is adapted), is counted as a later one: a little more than it saves."""
    b = dtype_bytes(settings.dtype)
    H, I, d = shape.hidden, shape.intermediate, shape.head_dim
    q_width, kv_width = shape.heads * d, shape.kv_heads * d
    targets = set(_targets(shape, settings.lora_targets))
    norms = shape.norms_per_layer - (1 if first_layer else 0)
    per_token = norms * (FP32 * H + FP32)
    constant = norms * FP32 * H if shape.one_plus_weight_norms else 0
    if shape.qk_norm:
        per_token += FP32 * (q_width + kv_width) + FP32 * (shape.heads + shape.kv_heads)
        constant += 2 * FP32 * d if shape.one_plus_weight_norms else 0
    if shape.eager_attention:
        per_token += 3 * q_width * b + shape.heads * length * _score_bytes(shape, b)
        per_token += q_width * b if targets & {"o_proj"} else 0
    else:
        copied = 1 < shape.kv_heads < shape.heads
        key, value = (q_width, q_width) if copied else (kv_width, kv_width)
        if shape.model_type == "phi3":
            # Phi-3 slices k and v from its fused qkv_proj output; a value not copied by repeat_kv is a
            # view, which keeps that whole output. And sdpa's output has the query's memory layout:
            # o_proj reads it as it is when the query is a view of q_proj's output (the others), but
            # Phi-3's partial rotary builds a new, head-major query (torch.cat), so o_proj copies it.
            value = q_width if copied else shape.linears["qkv_proj"][1]
            per_token += q_width * b if targets & {"o_proj"} else 0
        per_token += (2 * q_width + key + value) * b + FP32 * shape.heads + length * b
    per_token += 3 * I * b
    # Adapters that read the same tensor (q, k and v read the norm's output) save it once.
    per_token += H * b if targets & {"q_proj", "k_proj", "v_proj", "qkv_proj"} else 0
    per_token += H * b if targets & {"gate_proj", "up_proj", "gate_up_proj"} else 0
    per_token += I * b if "down_proj" in targets else 0
    per_token += len(targets) * settings.lora_r * b
    if b != FP32:
        constant += sum(sum(shape.linears[name]) for name in targets) * settings.lora_r * b
        # The first layer's q/k/v adapters read the embeddings' norm, which needs no gradient: A's cast
        # is not kept to back-propagate into it.
        attention_inputs = targets & {"q_proj", "k_proj", "v_proj", "qkv_proj"}
        constant -= len(attention_inputs) * settings.lora_r * H * b if first_layer else 0
    return rows * length * per_token + constant


def activation_bytes(shape: ModelShape, settings: RunSettings, checkpointing: bool) -> float:
    """The saved activations of one micro-batch's forward, at the start of its backward: every layer's
    (or, checkpointed, every layer's input), the rotary cos and sin, the final norm's input, and what the
    chunked head keeps per position it runs on (policy_head_positions): the hidden state, the target id,
    the log-sum-exp and the entropy, with the indices of the positions and of the per-token results.
    Rows are policy_rows of policy_row_length tokens: packed or padded, in the worst case all sequences
    are the longest."""
    b = dtype_bytes(settings.dtype)
    rows, length = settings.policy_rows, settings.policy_row_length
    tokens, positions = rows * length, settings.policy_head_positions
    if checkpointing:
        layers = shape.layers * tokens * shape.hidden * b
    else:
        layers = (layer_activation_bytes(shape, settings, rows, length, first_layer=True)
                  + (shape.layers - 1) * layer_activation_bytes(shape, settings, rows, length))
    final_norm = tokens * (FP32 * shape.hidden + FP32) + (FP32 * shape.hidden if shape.one_plus_weight_norms else 0)
    # The head's inputs gathered at its positions (common/packing.py's set), their target ids, log-sum-exp and
    # entropy, the positions' index (8 bytes) and the per-token layout's destination index and log-prob copy.
    head = positions * (shape.hidden * b + 8 + FP32 + (FP32 if settings.entropy else 0) + 8 + 8 + FP32)
    return layers + tokens * 2 * shape.head_dim * b + final_norm + head


def head_backward_bytes(shape: ModelShape, settings: RunSettings) -> float:
    """The chunked head's backward (common/logprobs.py): [chunk, vocab] fp32 logits, tanh of the soft-cap,
    d loss / d logits (in the logits' buffer without entropy) and its cast to a bf16 head's dtype; the
    gradient of the hidden states; off CUDA, a bf16 head's fp32 copy."""
    b = dtype_bytes(settings.dtype)
    positions = settings.policy_head_positions
    chunk = min(settings.logprob_chunk_size, positions)
    per_entry = FP32 * (1 + settings.entropy + shape.final_softcap) + (b if b != FP32 else 0)
    head_copy = 0
    if b != FP32 and settings.device != "cuda":
        # The head in fp32, and d loss / d logits, rounded to bf16, back in fp32 to multiply it.
        head_copy = shape.vocab * shape.hidden * FP32
        per_entry += FP32
    return chunk * shape.vocab * per_entry + positions * shape.hidden * b + head_copy


def graph_pool_bytes(shape: ModelShape, settings: RunSettings, rows: int) -> float:
    """The CUDA-graph pool of the compiled decode step of ``rows`` rows: the graph's intermediates live in
    a private pool, reserved from the first replay on and not handed back (max_memory_allocated does not
    see them; max_memory_reserved does). The pool reuses memory between layers, so it holds about one
    decode step's largest moment: the [rows, vocab] logits in the dtype and in fp32, and one layer's
    keys and values repeated to every query head (the traced graph's clone of expand in repeat_kv,
    rows x heads x slots x head dim x 2) where the model's decode attention repeats them: not for the
    architectures the sampler switches to its grouped-query decode attention (GQA_DECODE_MODEL_TYPES),
    none without grouped-query attention. Gemma 2 2B at 128 x 511 slots: 0.18 GiB of logits (0.68 GiB
    with the repeated K/V, within the 0.3-1 GB read in torch's cudagraph_trees.py)."""
    if not settings.cuda_graphs or rows == 0:
        return 0.0
    b = dtype_bytes(settings.dtype)
    slots = kv_cache_bytes(shape, settings, 1) / (shape.layers * shape.kv_heads * shape.head_dim * 2 * b)
    from common.sampler import GQA_DECODE_MODEL_TYPES  # the sampler's choice; imported late: it loads transformers

    repeats = shape.model_type not in GQA_DECODE_MODEL_TYPES and shape.heads > shape.kv_heads
    repeated = rows * shape.heads * slots * shape.head_dim * 2 * b if repeats else 0.0
    return rows * shape.vocab * (b + FP32) + repeated


def rollout_bytes(shape: ModelShape, settings: RunSettings, rows: int, samples_per_prompt: int) -> float:
    """The rollout of ``rows`` rows at its peak: the full KV cache with a decode step's buffers, or the
    prefill's (the prompt part of the cache, the distinct prompts' activations of one layer)."""
    if rows == 0:
        return 0.0
    b = dtype_bytes(settings.dtype)
    full = kv_cache_bytes(shape, settings, rows)
    # A decode step's buffers, at the larger of two moments. In the model: the previous step's [rows,
    # vocab] logits, the new ones (and the soft-cap's temporary), a 4-bit layer's dequantized weight, and
    # on the eager path a layer's keys (then values) grown by torch.cat before the old ones go. In the
    # sampler: the logits, their fp32 copy (unless fp32), and SAMPLING_BUFFERS - 1 more fp32 buffers.
    in_model = rows * shape.vocab * (3 if shape.final_softcap else 2) * b + dequantized_layer_bytes(shape, settings)
    in_model += 0 if settings.static_kv_cache else full / shape.layers / 2
    in_sampler = rows * shape.vocab * (b + (SAMPLING_BUFFERS - 1 + (b != FP32)) * FP32)
    decode = max(in_model, in_sampler)
    # The prefill runs each distinct prompt once: its cache, and one layer's activations at a time (the
    # eager scores in the dtype and in fp32, the MLP's three intermediates); then the cache is copied to
    # the rows (and on the static path into the static buffers, both alive).
    prompts, length = math.ceil(rows / samples_per_prompt), settings.prompt_tokens
    prompt_cache = length * shape.layers * shape.kv_heads * shape.head_dim * 2 * b
    scores = prompts * shape.heads * length * length * (2 * b + FP32) if shape.eager_attention else 0
    prefill = (prompts * prompt_cache + scores + prompts * length * (3 * shape.intermediate + 4 * shape.hidden) * b
               + dequantized_layer_bytes(shape, settings))
    copied = (prompts + rows) * prompt_cache + (full if settings.static_kv_cache else 0)
    return max(full + decode, prefill, copied)


def layer_backward_bytes(shape: ModelShape, settings: RunSettings, rows: int, length: int) -> float:
    """What one decoder layer's backward allocates beyond the saved tensors it frees as it goes, per
    token: the gradient coming in and the one it sends along the residual stream (2 x hidden), and one
    intermediate-sized gradient more than the MLP's backward frees, or, with eager attention, the fp32
    gradient of the [heads, L] scores, whichever is larger. Measured on the CPU at 0.9-1.0 times this
    (checkpointed runs of tests/test_memory_plan.py's sizes)."""
    b = dtype_bytes(settings.dtype)
    widest = max(shape.intermediate * b, shape.heads * length * FP32 if shape.eager_attention else 0)
    return rows * length * (widest + 2 * shape.hidden * b)


def policy_bytes(shape: ModelShape, settings: RunSettings, checkpointing: bool) -> float:
    """A micro-batch's forward and backward at its peak: the saved activations, plus the larger of the
    head's backward buffers (it runs first) and a layer's backward (with a 4-bit weight dequantized;
    checkpointed, with that layer's activations recomputed for it)."""
    rows, length = settings.policy_rows, settings.policy_row_length
    layer_backward = layer_backward_bytes(shape, settings, rows, length) + dequantized_layer_bytes(shape, settings)
    if checkpointing:
        layer_backward += layer_activation_bytes(shape, settings, rows, length)
    return activation_bytes(shape, settings, checkpointing) + max(head_backward_bytes(shape, settings), layer_backward)


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate of one run (bytes in the properties, GB in total_gb and the table) and what would
    make it fit in a given memory."""
    model: str
    shape: ModelShape
    settings: RunSettings

    def with_settings(self, **changes) -> MemoryPlan:
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, **changes))

    @property
    def weights(self) -> float:
        return weight_bytes(self.shape, self.settings)

    @property
    def lora_state(self) -> float:
        return lora_parameters(self.shape, self.settings) * 4 * FP32  # weights, gradients, two AdamW moments

    @property
    def _eval_settings(self) -> RunSettings:
        s = self.settings
        return s if s.eval_max_new_tokens is None else dataclasses.replace(s, max_new_tokens=s.eval_max_new_tokens)

    @property
    def kv_cache(self) -> float:
        s = self.settings
        return max(kv_cache_bytes(self.shape, s, s.rows),
                   kv_cache_bytes(self.shape, self._eval_settings, s.eval_rows * s.eval_samples))

    @property
    def rollout(self) -> float:
        s = self.settings
        return max(rollout_bytes(self.shape, s, s.rows, s.samples_per_prompt),
                   rollout_bytes(self.shape, self._eval_settings, s.eval_rows * s.eval_samples, s.eval_samples))

    @property
    def graph_pool(self) -> float:
        s = self.settings
        return max(graph_pool_bytes(self.shape, s, s.rows), graph_pool_bytes(self.shape, self._eval_settings, s.eval_rows))

    @property
    def kept_through_policy(self) -> float:
        """What the rollout leaves allocated through the policy pass: the static KV buffers (unless
        released) and the CUDA-graph pool."""
        s = self.settings
        kept_kv = self.kv_cache if s.static_kv_cache and not s.release_static_kv else 0.0
        return kept_kv + self.graph_pool

    @property
    def policy(self) -> float:
        return policy_bytes(self.shape, self.settings, self.settings.gradient_checkpointing) + self.kept_through_policy

    def release_static_kv_advice(self, gpu_gb: float | None) -> MemoryPlan | None:
        """The plan with the static KV buffers freed before each policy pass, when the buffers kept are
        what keeps this plan from fitting in ``gpu_gb`` (and freeing them makes it fit); else None."""
        s = self.settings
        if gpu_gb is None or not s.static_kv_cache or s.release_static_kv or not s.rows or self.fits(gpu_gb):
            return None
        released = self.with_settings(release_static_kv=True)
        return released if released.fits(gpu_gb) else None

    @property
    def total(self) -> float:
        return self.weights + self.lora_state + max(self.rollout, self.policy)

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def fits(self, gpu_gb: float) -> bool:
        """Whether the peak fits in ``gpu_gb``, ALLOCATOR_HEADROOM of it left free."""
        return self.total_gb <= gpu_gb * (1 - ALLOCATOR_HEADROOM)

    def advice(self, gpu_gb: float) -> list[str]:
        """What would make the run fit in ``gpu_gb`` ([] when it fits), each with its total: the settings
        among QUANT=nf4, GRADIENT_CHECKPOINTING=true and the largest GENERATION_BATCH_SIZE, MICRO_BATCH_SIZE
        and EVAL_BATCH_SIZE that fit that make it fit alone; when none does, one combination: both
        switches, then each size as large as fits with the sizes after it at 1."""
        if self.fits(gpu_gb):
            return []
        switches = {text: change for text, change, applies in (
            ("QUANT=nf4", {"quant": "nf4"}, self.settings.quant == "none"),
            ("GRADIENT_CHECKPOINTING=true", {"gradient_checkpointing": True}, not self.settings.gradient_checkpointing),
        ) if applies}
        sizes = {"GENERATION_BATCH_SIZE": "rows", "MICRO_BATCH_SIZE": "micro_batch_size",
                 "EVAL_BATCH_SIZE": "eval_rows"}
        alone = [(text, self.with_settings(**change)) for text, change in switches.items()]
        alone += [(f"{name}={size}", self.with_settings(**{field: size}))
                  for name, field in sizes.items() if (size := self._largest(field, gpu_gb))]
        advice = [f"{text} ({gb_text(plan.total_gb)} GB)" for text, plan in alone if plan.fits(gpu_gb)]
        if advice:
            return advice
        plan, applied = self, list(switches)
        for change in switches.values():
            plan = plan.with_settings(**change)
        fields = [field for field in sizes.values() if getattr(plan.settings, field)]
        smallest = {field: 1 for field in fields}
        if not plan.with_settings(**smallest).fits(gpu_gb):
            applied += [f"{name}=1" for name, field in sizes.items() if field in fields]
            return [f"nothing fits: {' and '.join(applied)} still need "
                    f"{gb_text(plan.with_settings(**smallest).total_gb)} GB; shorten MAX_NEW_TOKENS or the prompts, "
                    f"or take a smaller model"]
        for name, field in sizes.items():
            if field not in fields:
                continue
            del smallest[field]
            size = plan.with_settings(**smallest)._largest(field, gpu_gb)
            if size < getattr(plan.settings, field):
                plan, applied = plan.with_settings(**{field: size}), applied + [f"{name}={size}"]
        return [f"{' and '.join(applied)} ({gb_text(plan.total_gb)} GB)"]

    def _largest(self, field: str, gpu_gb: float) -> int:
        """The largest value of ``field`` (rows, micro_batch_size or eval_rows), at most its current one,
        with which the plan fits (0 if none): the peak grows with each, so a bisection finds it."""
        low, high = 0, getattr(self.settings, field)
        while low < high:
            middle = (low + high + 1) // 2
            if self.with_settings(**{field: middle}).fits(gpu_gb):
                low = middle
            else:
                high = middle - 1
        return low

    def table(self, gpu_gb: float | None = None) -> str:
        """The plan, one item per line in GB; with ``gpu_gb``, whether it fits and what would make it fit."""
        s, shape = self.settings, self.shape
        dtype = str(s.dtype).replace("torch.", "")
        micro = f"{s.policy_rows} x {s.policy_row_length} tokens"
        generated = [f"{s.rows} rows x {s.prompt_tokens}+{s.max_new_tokens}"] if s.rows else []
        if s.eval_rows:
            samples = f" x {s.eval_samples} samples" if s.eval_samples > 1 else ""
            generated.append(f"eval {s.eval_rows}{samples} x {s.prompt_tokens}+{self._eval_settings.max_new_tokens}")
        items = [
            (f"weights ({'4-bit NF4 linears, the rest in ' if s.quant == 'nf4' else ''}{dtype})", self.weights),
            (f"LoRA r={s.lora_r} ({lora_parameters(shape, s) / 1e6:.1f}M): fp32, gradients, AdamW moments",
             self.lora_state),
            (f"rollout: KV cache, {', '.join(generated) or 'no generation'} tokens", self.kv_cache),
            ("rollout: at its peak (KV cache, logits, sampling buffers)", self.rollout),
            (f"policy pass: activations, {micro}", activation_bytes(shape, s, False)),
            (f"policy pass: activations, {micro}, checkpointed", activation_bytes(shape, s, True)),
            (f"policy pass: chunked head's buffers (chunk {s.logprob_chunk_size})", head_backward_bytes(shape, s)),
            *([("rollout: CUDA-graph pool, reserved from the first replay on", self.graph_pool)] if self.graph_pool else []),
            (f"policy pass: at its peak, {'checkpointed' if s.gradient_checkpointing else 'not checkpointed'}"
             f"{' (+ kept KV cache)' if s.static_kv_cache and s.rows and not s.release_static_kv else ''}"
             f"{' (+ graph pool)' if self.graph_pool else ''}", self.policy),
            ("total: weights + LoRA + max(rollout, policy pass)", self.total),
        ]
        size = f"{shape.parameters / 1e9:.2f}B" if shape.parameters >= 1e9 else f"{shape.parameters / 1e6:.2f}M"
        lines = [f"memory plan of {self.model} ({shape.model_type}, {size} parameters), "
                 f"QUANT={s.quant}, {dtype}, {s.device}; GB = 2^30 bytes"]
        lines += [f"  {label:<66} {value / GB:8.3f} GB" for label, value in items]
        if gpu_gb is not None:
            verdict = "fits" if self.fits(gpu_gb) else "does NOT fit"
            lines.append(f"  {f'GPU: {gpu_gb:.2f} GB, {ALLOCATOR_HEADROOM:.0%} of it kept free for the allocator':<66} "
                         f"{verdict}")
            lines += [f"    fits with {advice}" if advice[0].isupper() else f"    {advice}"
                      for advice in self.advice(gpu_gb)]
        return "\n".join(lines)


def gb_text(gb: float) -> str:
    """A size in GB for a message: one decimal from 1 GB up, three significant digits below."""
    return f"{gb:.1f}" if gb >= 1 else f"{gb:.3g}"


class MemoryPlanError(UserError, RuntimeError):
    """A run that will not fit in the memory it has; the message says what would make it fit."""


def check_fits(plan: MemoryPlan, gpu_gb: float | None) -> None:
    """Refuse, before anything loads, a run whose plan does not fit in ``gpu_gb`` (None: no GPU to compare
    with, nothing is refused), in one line naming what would make it fit."""
    if gpu_gb is None or plan.fits(gpu_gb):
        return
    raise MemoryPlanError(f"the run needs about {gb_text(plan.total_gb)} GB and {gb_text(gpu_gb)} GB are free "
                          f"({ALLOCATOR_HEADROOM:.0%} kept for the allocator); it would fit with: "
                          f"{'; '.join(plan.advice(gpu_gb))} (an estimate: --GPU_MEMORY_GB=N plans for N GB)")


def plan_memory(model_path: str | Path, **settings) -> MemoryPlan:
    """The MemoryPlan of a run of ``model_path`` (a model directory, or a Hub id: only its config.json is
    fetched) with ``settings``, the fields of RunSettings. A missing directory is the trainers' error, with
    the download command (transformers would take it for a Hub id: "Repo id must be in the form ...")."""
    from transformers import AutoConfig

    from common.model import IncompleteModelError, ModelNotFoundError, looks_like_hub_id, missing_model_message

    if not Path(model_path).is_dir() and not looks_like_hub_id(model_path):
        raise ModelNotFoundError(missing_model_message(model_path))
    if Path(model_path).is_dir() and not (Path(model_path) / "config.json").is_file():
        raise IncompleteModelError(f"model directory {model_path} has no config.json")
    return MemoryPlan(str(model_path), model_shape(AutoConfig.from_pretrained(model_path)), RunSettings(**settings))


def largest_generation_batch(plan: MemoryPlan, gpu_gb: float) -> int:
    """GENERATION_BATCH_SIZE=auto: the largest number of rows sampled together, at most the plan's (a
    step's rows), with which the run fits in ``gpu_gb``; 0 when no number does (the policy pass or the
    evaluation alone does not fit: check_fits then says what would)."""
    return plan._largest("rows", gpu_gb)


# The cost model of choose_sizes: a step's policy pass, relative to one without checkpointing or fixed costs.
# Checkpointing runs each layer's forward again in the backward, a third of a forward and backward's work.
RECOMPUTE_COST = 1 / 3
# What a micro-batch costs beyond its tokens, in tokens of work: its forward and backward each read every
# weight (a few bytes per parameter) and launch every kernel however few its tokens, while a token costs
# about 4 flops per parameter (forward, and the backward to the inputs of a frozen base). On the cards this
# targets (~150 TFLOPS of bf16 against ~1 TB/s: a 4090, a 3060, a T4 alike) that is some 200-300 tokens.
MICRO_BATCH_FIXED_TOKENS = 256


@dataclass(frozen=True)
class Sizes:
    """MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, GENERATION_BATCH_SIZE and EVAL_BATCH_SIZE as a trainer
    sets them (each a value, or "auto") or as choose_sizes resolves them, and whether the sampler's static
    KV is freed before each policy pass (not a setting: the plan's choice)."""
    micro_batch_size: int | str       # sequences per micro-batch (DPO: pairs)
    gradient_checkpointing: bool | str
    generation_batch_size: int | str  # rows sampled together (0 = all of a step's)
    eval_batch_size: int | str        # prompts per eval batch
    release_static_kv: bool = False

    def or_else(self, fallback: Sizes) -> Sizes:
        """These sizes with each auto replaced by ``fallback``'s."""
        return Sizes(*(fallback_value if value == "auto" else value for value, fallback_value
                       in zip(dataclasses.astuple(self), dataclasses.astuple(fallback))))

    def choice_line(self, requested: Sizes, rows: int, where: str) -> str:
        """The one line saying what the settings left at auto (in ``requested``) resolved to ("" for none),
        ``where``: for which memory."""
        names = ("MICRO_BATCH_SIZE", "GRADIENT_CHECKPOINTING", "GENERATION_BATCH_SIZE", "EVAL_BATCH_SIZE")
        chosen = []
        for name, asked, value in zip(names, dataclasses.astuple(requested), dataclasses.astuple(self)):
            if asked != "auto":
                continue
            if name == "GENERATION_BATCH_SIZE":
                chunk = value or rows
                chunks = -(-rows // chunk) if rows else 0
                value = f"{chunk} (the step's {rows} rows in {chunks} chunk{'s' * (chunks > 1)})" if rows else "0"
            chosen.append(f"{name}={str(value).lower() if isinstance(value, bool) else value}")
        return f"auto {where}: {', '.join(chosen)}" if chosen else ""


def policy_cost(settings: RunSettings) -> float:
    """The cost model's time of a step's policy pass per token, relative to one without checkpointing
    or fixed costs: (1 + RECOMPUTE_COST with checkpointing) x (1 + MICRO_BATCH_FIXED_TOKENS / a
    micro-batch's tokens)."""
    return ((1 + RECOMPUTE_COST * settings.gradient_checkpointing)
            * (1 + MICRO_BATCH_FIXED_TOKENS / settings.policy_tokens))


def _planned(plan: MemoryPlan, sizes: Sizes, micro_batch_scale: int, evaluates: bool) -> MemoryPlan:
    """``plan`` (whose rows are a whole step's) with ``sizes``, all resolved."""
    rows = plan.settings.rows
    return plan.with_settings(micro_batch_size=micro_batch_scale * sizes.micro_batch_size,
                              gradient_checkpointing=sizes.gradient_checkpointing,
                              rows=min(rows, sizes.generation_batch_size or rows),
                              eval_rows=sizes.eval_batch_size if evaluates else 0,
                              release_static_kv=sizes.release_static_kv)


def choose_sizes(plan: MemoryPlan, requested: Sizes, fallback: Sizes, gpu_gb: float | None,
                 micro_batch_scale: int = 1, evaluates: bool = True) -> tuple[MemoryPlan, Sizes, str]:
    """The sizes a run uses: ``requested``'s, each auto resolved to the fastest that fits in ``gpu_gb``
    (the plan's rows are a whole step's; ``micro_batch_scale``: sequences per MICRO_BATCH_SIZE unit, 2 for
    DPO's pairs; ``evaluates``: whether the run evaluates). Returns (the plan with them, the sizes, the
    lines saying what was chosen: "" when nothing was). No memory to compare with (``gpu_gb`` None, a
    CPU): auto is ``fallback``'s, the trainer's sizes from before auto, so CPU runs are as they were.

    The fastest, by a simple cost model, in this order (a size at auto is never above ``fallback``'s: a run
    that fitted before runs as before):
      1. the fewest rollout chunks (GENERATION_BATCH_SIZE): decoding is bound by reading the weights and
         the KV cache once per token, whatever the rows, so two chunks take nearly twice one's time, and
         the rollout is most of a GRPO step; the rows are split evenly (common.sampler.even_chunk_rows);
      2. the cheapest policy pass (policy_cost): checkpointing costs RECOMPUTE_COST more, and each
         micro-batch MICRO_BATCH_FIXED_TOKENS more; so no checkpointing with the largest micro-batch that
         fits, unless checkpointing lets one so much larger fit that it is faster (e.g. at 512 tokens a
         sequence, 1 sequence without costs 1.5, 16 with checkpointing 1.375);
      3. the static KV kept through the policy pass rather than freed before it and allocated again
         (release_static_kv; the compiled decode step then runs without CUDA graphs, one launch per kernel),
         unless freeing it buys one of the above;
      4. the largest eval batch: evaluations are a small part of a run.
    When nothing fits, the plan is the smallest (checkpointing, sizes of 1), for check_fits to refuse it,
    naming QUANT=nf4 first where that would fit."""
    auto = {field.name for field in dataclasses.fields(Sizes) if getattr(requested, field.name) == "auto"}
    rows = plan.settings.rows
    said = requested if evaluates else dataclasses.replace(requested, eval_batch_size=0)  # the line's: no eval, no size
    if gpu_gb is None:
        sizes = requested.or_else(fallback)
        line = sizes.choice_line(said, rows, "without GPU memory to fit (--GPU_MEMORY_GB=N plans for N GB)")
        return _planned(plan, sizes, micro_batch_scale, evaluates), sizes, line
    smallest = requested.or_else(Sizes(1, True, 1 if rows else 0, 1))
    candidates = []
    for checkpointing in (False, True) if "gradient_checkpointing" in auto else (requested.gradient_checkpointing,):
        for release in (False, True) if plan.settings.static_kv_cache and rows else (False,):
            sizes = dataclasses.replace(smallest, gradient_checkpointing=checkpointing, release_static_kv=release)
            if "generation_batch_size" in auto and rows:
                every_row = dataclasses.replace(sizes, generation_batch_size=0)
                chunk = largest_generation_batch(_planned(plan, every_row, micro_batch_scale, evaluates), gpu_gb)
                sizes = dataclasses.replace(sizes, generation_batch_size=-(-rows // -(-rows // chunk)) if chunk else 1)
            if "micro_batch_size" in auto:
                widest = _planned(plan, dataclasses.replace(sizes, micro_batch_size=fallback.micro_batch_size),
                                  micro_batch_scale, evaluates)
                size = widest._largest("micro_batch_size", gpu_gb) // micro_batch_scale
                sizes = dataclasses.replace(sizes, micro_batch_size=max(1, size))
            if "eval_batch_size" in auto and evaluates:
                widest = _planned(plan, dataclasses.replace(sizes, eval_batch_size=fallback.eval_batch_size),
                                  micro_batch_scale, evaluates)
                sizes = dataclasses.replace(sizes, eval_batch_size=max(1, widest._largest("eval_rows", gpu_gb)))
            elif "eval_batch_size" in auto:
                sizes = dataclasses.replace(sizes, eval_batch_size=fallback.eval_batch_size)
            chosen = _planned(plan, sizes, micro_batch_scale, evaluates)
            if chosen.fits(gpu_gb):
                chunks = -(-rows // (chosen.settings.rows or 1)) if rows else 0
                candidates.append(((chunks, policy_cost(chosen.settings), release, -sizes.eval_batch_size),
                                   sizes, chosen))
    if not candidates:
        line = smallest.choice_line(said, rows, f"cannot fit {gb_text(gpu_gb)} GB, even at the smallest (the plan above)")
        return _planned(plan, smallest, micro_batch_scale, evaluates), smallest, line
    _, sizes, plan = min(candidates, key=lambda candidate: candidate[0])
    if rows and sizes.generation_batch_size >= rows:
        sizes = dataclasses.replace(sizes, generation_batch_size=0)
    lines = [sizes.choice_line(said, rows, f"for {gb_text(gpu_gb)} GB")]
    if sizes.release_static_kv:
        lines.append(f"memory plan: the static KV cache ({gb_text(plan.kv_cache / GB)} GB) does not fit beside the "
                     f"policy pass in {gb_text(gpu_gb)} GB: it is freed before each policy pass and allocated again "
                     f"by the next rollout; the compiled sampler then runs without CUDA graphs, which the new address "
                     f"would record again every step")
    return plan, sizes, "\n".join(line for line in lines if line)


def memory_cap_gb(gpu_memory_gb: float, total_bytes: int) -> float:
    """The cap, in GB of 2^30 bytes, that GPU_MEMORY_GB puts on a card of ``total_bytes``: at most the
    whole card. A card sold as "12 GB" counts 10^9-byte GB: an RTX 3060 has 11.7 of ours, so
    GPU_MEMORY_GB=12 there means the whole card (issue 29, finding 6); only a value beyond the card's
    size in 10^9-byte GB too is refused, in one line."""
    if gpu_memory_gb * 1e9 > total_bytes:
        raise MemoryPlanError(f"GPU_MEMORY_GB={gpu_memory_gb:g} is more than the GPU's {total_bytes / GB:.1f} GB "
                              f"({total_bytes / 1e9:.1f} GB of 10^9 bytes, as cards are sold)")
    return min(gpu_memory_gb, total_bytes / GB)


def free_gpu_memory_gb(device: torch.device) -> float | None:
    """The memory a run can still allocate on ``device``, in GB: a CUDA device's free memory; on a Mac
    (mps), Metal's recommended working set less what this process holds; None on a CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return free / GB
    if device.type == "mps" and torch.backends.mps.is_available():
        return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()) / GB
    return None


def llama_3_1_8b_config(**overrides):
    """Llama 3.1 8B's configuration, as its config.json on the Hub gives it (no download): hidden 4096, 32
    layers, 32 heads and 8 KV heads of 128, MLP 14336, vocabulary 128,256, an untied head, rope theta
    500,000 with Llama 3's frequency scaling. ``overrides``: e.g. the token ids of another tokenizer."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return LlamaConfig(**{**dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                 rope_parameters=rope, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
                          **overrides})

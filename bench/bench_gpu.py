"""GPU benchmark at Gemma 2 2B's or Llama 3.1 8B's size: sampling with the LoRA applied, a GRPO step
phase by phase, and its peak memory beside the memory plan's estimate.

    python bench/bench_gpu.py                                  # CUDA: Gemma 2 2B's shapes, 16 x 8 rows, 128 new tokens
    python bench/bench_gpu.py --GRADIENT_CHECKPOINTING=true     # the policy pass with checkpointed decoder layers
    python bench/bench_gpu.py --METHODS=eager,compiled          # fewer sampling methods (a compilation takes minutes)
    python bench/bench_gpu.py --DEVICE=cpu --NUM_PROMPTS=2 --NUM_SAMPLES_PER_PROMPT=2 --MAX_NEW_TOKENS=8 \\
        --METHODS=eager,generate                              # the CPU smoke run: a thin body (BODY=auto)

The 12 GB check (issue 15): one GRPO step of Llama 3.1 8B's shapes with a 4-bit base, checkpointed,
8 questions x 8 samples x 256 new tokens, LoRA r16 on the seven linear layers, the GPU capped at 12 GB
(the issue's target: a peak of at most 11.5 GB), after one untimed step (AdamW's moments then exist).
The prompts are lengthened to 128 tokens, a GSM8K question's under a chat template (the synthetic
ones are 30-40). The sampler is the eager one: the compiled sampler's static KV buffers (3 GB here)
stay allocated through the policy pass, which the plan puts at 12.1 GB in all, and compiling a 4-bit
model takes minutes. QUANT=nf4 needs bitsandbytes (pip install bitsandbytes==0.50.2; on a machine
without network, ../shared/GPU-NOTES.md says how to carry its wheel):

    PYTHONUNBUFFERED=1 python bench/bench_gpu.py --MODEL=llama-3.1-8b --QUANT=nf4 --GRADIENT_CHECKPOINTING=true \\
        --GPU_MEMORY_GB=12 --NUM_PROMPTS=8 --NUM_SAMPLES_PER_PROMPT=8 --MAX_NEW_TOKENS=256 --PROMPT_TOKENS=128 \\
        --SAMPLER=eager --METHODS= --WARMUP_STEPS=1 --STEPS=1
    python bench/bench_gpu.py --MODEL=llama-3.1-8b --QUANT=nf4 --GRADIENT_CHECKPOINTING=true --DEVICE=cpu \\
        --NUM_PROMPTS=2 --NUM_SAMPLES_PER_PROMPT=4 --MAX_NEW_TOKENS=6 --METHODS= --WARMUP_STEPS=0 --STEPS=1
                                                              # its CPU smoke run: a thin Llama, 4-bit

The model is built, not downloaded, and saved with the built-in tiny model's tokenizer (and its
token ids) in a temporary folder, then loaded back by common.model (with QUANT) as a real checkpoint
would be: by part 1 in this process, by run_train_grpo.py in part 2. MODEL=gemma-2-2b: a random
initialisation of Gemma 2 2B's exact configuration (hidden 2304, 26 layers, 8 heads and 4 key-value
heads of 256, MLP 9216, vocabulary 256,000, soft-capping 50 / 30, tied embeddings,
query_pre_attn_scalar 256, sliding window 4096), drawn on the device. MODEL=llama-3.1-8b: Llama 3.1
8B's (common.memory_plan.llama_3_1_8b_config: hidden 4096, 32 layers, 32 heads and 8 key-value heads
of 128, MLP 14336, vocabulary 128,256, an untied head, rope theta 500,000) with Llama's initialisation
(normal, std 0.02; norms 1), drawn one tensor at a time on the device and written in shards: its 16 GB
in bf16 never sit whole in memory, the GPU's or the host's, so a 12 GB card can build it too. On the
CPU (BODY=auto) the body is thin (2 layers, hidden 64) and everything else stays, the vocabulary
included. The prompts (the first NUM_PROMPTS questions of PROMPTS_FILE under the tokenizer's chat
template, lengthened to PROMPT_TOKENS) are written beside it as a TRAIN_FILE of text prompts, used as
given, with a gold answer each; both parts sample the same token ids. GPU_MEMORY_GB caps each part's
process (torch.cuda.set_per_process_memory_fraction) before its model loads.

1. Sampling: the same rows (each prompt repeated NUM_SAMPLES_PER_PROMPT times), temperature
   TEMPERATURE, through each of METHODS: our eager sampler, our compiled sampler (with the adapters,
   and with them switched off: the adapters' share of the decode), model.generate and
   model.generate(cache_implementation="static"). LoRA r=LORA_R on all seven linear layers, with B
   drawn at random (a fresh B = 0 would skip nothing, but a trained one is what runs). One untimed
   first call each (its time, compilation included, is reported apart), then the median of REPEATS
   calls. A random model almost never emits a stop token, so rows run to MAX_NEW_TOKENS: the worst
   case, and the same work for every method (the table says how many rows did). Peak GPU memory is
   read per call, from a reset at its start. The results file is written before the first method and
   again after each one, so a run stopped by a time limit keeps the methods measured. The model is then
   freed (and dynamo's caches with it) before part 2: a part 2 that fails or runs out of time keeps them.
2. A GRPO step: run_train_grpo.py itself, a subprocess (bench.run_trainer through
   bench/launch_trainer.py, which caps its GPU memory at GPU_MEMORY_GB), on the saved model and the
   prompts file, with this benchmark's settings as its constants (NUM_PROMPTS -> PROMPTS_PER_STEP,
   NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, SAMPLER, GRADIENT_CHECKPOINTING,
   MICRO_BATCH_SIZE, LOGPROB_CHUNK_SIZE, LORA_*, LR, GRAD_CLIP, QUANT, DTYPE, DEVICE, GPU_MEMORY_GB,
   SEED; WARMUP_STEPS + STEPS -> MAX_STEPS; every row sampled together, GENERATION_BATCH_SIZE=0, as the
   plan counts them) and its defaults for the rest: no KL, one iteration, token-mean loss, packed
   micro-batches, a fresh LoRA (B = 0, as a run starts). The phases are those it logs (generate_s,
   score_s, policy_s, optimizer_s, step_s; CUDA phases synchronized, compilation apart in compile_s),
   means of the STEPS steps after WARMUP_STEPS untimed ones; tokens/s counts the generated tokens for
   generation and the policy pass's real tokens (prompts and completions, policy_tokens) for the
   policy. The rewards are drawn at random (bench/random_reward.py): the text of a random model
   decodes to empty strings, so a reward computed from it is the same for every completion, every
   group would have zero advantage, and GRPO would drop them all: the policy pass would never run.
   Also reported: the mismatch between the sampler's log-probs and the policy pass's
   (logprob_mismatch_mean / max).

Peak GPU memory, in GB of 2^30 bytes (as the memory plan, torch.cuda.mem_get_info and nvidia-smi
count): torch.cuda.max_memory_allocated (live tensors) and torch.cuda.max_memory_reserved (what the
caching allocator holds, which also covers the CUDA-graph pool: allocations inside a graph replay are
not counted as allocated); for the GRPO step, the trainer's own peak_allocated_gb / peak_reserved_gb,
the step's peaks (reset at each step's start). Also reported: the graphs dynamo compiled (torch._dynamo's
unique_graphs counter) and the CUDA graphs recorded (each capture counted as it begins), in each
part's process. Compilation (our compiled sampler's SampleOutput.compile_seconds, generate's first
call, the trainer's compile_s) is reported apart from the times. A second table puts the memory plan
(common.memory_plan.plan_memory, for the same settings: the questions' longest prompt, the rows,
micro-batch, LoRA, QUANT, checkpointing and sampler) beside what the trainer's process measured: the
weights and the LoRA when the first rollout begins (launch_trainer.py), and the step's peak. Off CUDA
nothing is measured there ("-"): the plan is checked against the CPU's resident memory by
tests/test_memory_plan.py.
"""

import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

# Run as `python bench/bench_gpu.py`, Python puts bench/ on the path, not the repository root with common/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.config import configure  # noqa: E402
from common.quant import Quant  # noqa: E402

# ---------------------------------------------------------------- constants
MODEL: Literal["gemma-2-2b", "llama-3.1-8b"] = "gemma-2-2b"  # whose configuration the random model takes
QUANT: Quant = "none"  # none, or nf4: the base's linear layers in 4-bit NF4 (QLoRA; needs bitsandbytes)
GPU_MEMORY_GB: Annotated[float, ">= 0"] = 0.0  # cap of each part's GPU memory, in GB of 2^30 bytes (0 = none;
#   CUDA only), set before its model loads; the plan's verdict (and run_train_grpo.py's) is for it (or the free memory)
TOKENIZER_PATH = "models/tiny-gemma2-math"  # the tokenizer saved beside the random model
PROMPTS_FILE = "data/synth_test.jsonl"  # questions {"question", ...}; the first NUM_PROMPTS are used
PROMPT_TOKENS: Annotated[int, ">= 0"] = 0  # 0: the prompts as they are (30-40 tokens); N: each lengthened to N
#   tokens (its own tokens repeated before it), as a GSM8K prompt under a real chat template is
BODY = "auto"  # auto (the model's body on CUDA, a thin one elsewhere), full or thin
SHARD_GB: Annotated[float, "> 0"] = 2.0  # the random Llama's weights are written in files of about this size
NUM_PROMPTS = 16  # distinct prompts (questions per GRPO step)
NUM_SAMPLES_PER_PROMPT = 8  # completions per prompt (group size G)
MAX_NEW_TOKENS = 128  # limit of new tokens per row
TEMPERATURE = 1.0  # sampling temperature, and that of the log-probs
METHODS = ("eager", "compiled", "compiled_base", "generate", "generate_static")  # sampling methods to time
#   (empty: none, the GRPO step alone)
REPEATS = 3  # timed calls of each sampling method, after one untimed first call
SAMPLER = "auto"  # the GRPO step's sampler: auto (compiled on CUDA, eager elsewhere), eager, static, compiled
GRADIENT_CHECKPOINTING = False  # recompute the decoder layers' activations in the policy pass's backward
MICRO_BATCH_SIZE = 16  # sequences per forward/backward
LOGPROB_CHUNK_SIZE = 1024  # positions per chunk of the output head
LORA_R = 16  # adapter rank
LORA_ALPHA = 32.0  # adapter scale numerator
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # wrapped layers
LR = 2e-4  # AdamW learning rate of the LoRA
GRAD_CLIP = 1.0  # max global gradient norm
WARMUP_STEPS: Annotated[int, ">= 0"] = 1  # untimed GRPO steps first
STEPS: Annotated[int, ">= 1"] = 3  # timed GRPO steps
SEED = 0  # initialisation and sampling (the random rewards have their own seed: bench/random_reward.py)
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 where the card has it natively; V100/T4/RTX 20xx: fp16, loss scaled; else fp32), float32, bfloat16, float16
OUT_FILE = "logs/bench/gpu.json"  # where the results go

config = configure(globals())
# ---------------------------------------------------------------------------

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma2Config, GenerationConfig  # noqa: E402

from bench import (RANDOM_REWARD, compiled_graphs, count_cuda_graphs, markdown_table, run_trainer,  # noqa: E402
                   write_results)
from common.data import load_problems  # noqa: E402
from common.lora import apply_lora, disable_lora, lora_modules  # noqa: E402
from common.memory_plan import (FP32, GB, MemoryPlanError, free_gpu_memory_gb, llama_3_1_8b_config,  # noqa: E402
                                lora_parameters, memory_cap_gb, plan_memory)
from common.model import get_device, get_dtype, load_model_and_tokenizer, load_tokenizer, stop_token_ids  # noqa: E402
from common.prompts import encode_prompts  # noqa: E402
from common.quant import QuantizationUnavailable, check_quant  # noqa: E402
from common.sampler import SamplingParams, left_pad, sample  # noqa: E402

METHOD_NAMES = {"eager": "our eager sampler", "compiled": "our compiled sampler",
                "compiled_base": "our compiled sampler, adapters off", "generate": "model.generate",
                "generate_static": 'model.generate(cache_implementation="static")'}
# The trainer's metric of each phase (no reference or old log-prob pass: no KL, one iteration).
PHASES = {"generation": "generate_s", "scoring": "score_s", "policy": "policy_s", "optimizer": "optimizer_s"}
MODEL_NAMES = {"gemma-2-2b": "Gemma 2 2B", "llama-3.1-8b": "Llama 3.1 8B"}
# Gemma 2 2B's configuration (google/gemma-2-2b's config.json), and the body sizes that replace its own on the CPU.
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)
THIN_BODY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)

unknown = set(METHODS) - set(METHOD_NAMES)
if unknown:
    raise SystemExit(f"error: unknown METHODS {sorted(unknown)}; valid: {list(METHOD_NAMES)}")
if BODY not in ("auto", "full", "thin"):
    raise SystemExit(f"error: BODY must be auto, full or thin, got {BODY!r}")
device = get_device(DEVICE)
dtype = get_dtype(DTYPE, device)
thin = BODY == "thin" or (BODY == "auto" and device.type != "cuda")
try:
    check_quant(QUANT, device)  # here, not after 16 GB of random weights are drawn and written
except QuantizationUnavailable as error:
    raise SystemExit(f"error: {error}") from None
torch.manual_seed(SEED)


def synchronize() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def measured(record: dict):
    """Puts into ``record`` the seconds of the block, once the device is done, and its peak GPU memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize()
    start = time.perf_counter()
    yield
    synchronize()
    record["seconds"] = time.perf_counter() - start
    record["peak_gb"] = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    record["reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB if device.type == "cuda" else None


cuda_graphs = count_cuda_graphs() if device.type == "cuda" else None  # those part 1 records


def write_random_weights(model_config, folder: Path) -> int:
    """The weights of a random ``model_config`` (Llama's) written in ``folder`` as a sharded safetensors
    checkpoint, the way transformers initialises them (normal, std initializer_range; RMSNorm weights 1),
    one tensor at a time drawn on the device (a GPU draws 8B values in seconds, a CPU core about 0.15B a
    second), at most SHARD_GB of them on the host: 16 GB never sit whole in memory. The parameters."""
    start = time.perf_counter()
    with torch.device("meta"):  # names and shapes, no memory
        skeleton = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(SEED)
    shard, weight_map, total = {}, {}, 0

    def write_shard() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard.clear()

    for key, meta in skeleton.state_dict().items():
        tensor = torch.empty(meta.shape, dtype=dtype, device=device)
        if "norm" in key:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, model_config.initializer_range, generator=generator)
        shard[key] = tensor.cpu()
        total += tensor.numel()
        if sum(t.nbytes for t in shard.values()) >= SHARD_GB * GB:
            write_shard()
    if shard:
        write_shard()
    index = {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    skeleton.config.save_pretrained(folder)
    files = len(set(weight_map.values()))
    print(f"random weights: {total / 1e9:.3f}B parameters drawn on {device} and written in {files} safetensors "
          f"file{'s' if files > 1 else ''} in {time.perf_counter() - start:.1f} s")
    return total


def build_model(folder: Path) -> int:
    """Save in ``folder`` the random model of MODEL (or its thin-bodied variant) with the tiny model's
    tokenizer and token ids; its number of parameters (counted before any quantization packs them)."""
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    token_ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids)
    if MODEL == "llama-3.1-8b":
        parameters = write_random_weights(llama_3_1_8b_config(**(THIN_BODY if thin else {}), **token_ids), folder)
    else:
        model_config = Gemma2Config(**(GEMMA2_2B | THIN_BODY if thin else GEMMA2_2B), **token_ids)
        with torch.device(device):  # initialised where it runs: 2.6B parameters are slow to draw on the CPU
            random_model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation="eager")
        parameters = sum(p.numel() for p in random_model.parameters())
        random_model.save_pretrained(folder)
        del random_model
    GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return parameters


def lengthened(ids: list[int], length: int) -> list[int]:
    """``ids`` grown to ``length`` tokens by its own tokens after the first (BOS) repeated before them,
    so that it still ends as a prompt does (the template's opening of the model's turn)."""
    if len(ids) >= length:
        return ids
    body = ids[1:]
    return ids[:1] + (body * (length // len(body) + 1))[:length - len(ids)] + body


def capped_memory_gb() -> float | None:
    """Cap this process's GPU memory at GPU_MEMORY_GB (CUDA; None elsewhere, or without a cap)."""
    if not GPU_MEMORY_GB or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        cap_gb = memory_cap_gb(GPU_MEMORY_GB, total)
    except MemoryPlanError as error:
        raise SystemExit(f"error: {error}") from None
    torch.cuda.set_per_process_memory_fraction(cap_gb * GB / total, device)
    return cap_gb


def write_prompts(path: Path) -> list[list[int]]:
    """The first NUM_PROMPTS questions of PROMPTS_FILE under the tokenizer's chat template, lengthened to
    PROMPT_TOKENS, written to ``path`` as a TRAIN_FILE of text prompts used as given ({"prompt", "gold_answer"}:
    each prompt's text with its special tokens); their token ids as run_train_grpo.py reads them, which
    part 1 samples from too."""
    questions = [p["question"] for p in load_problems(PROMPTS_FILE, limit=NUM_PROMPTS)]
    rows = [{"prompt": tokenizer.decode(lengthened(ids, PROMPT_TOKENS) if PROMPT_TOKENS else ids), "gold_answer": "0"}
            for ids in encode_prompts(tokenizer, questions)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return encode_prompts(tokenizer, rows)


def time_sampling(model_dir: Path, sampling: dict, save) -> None:
    """Part 1: each of METHODS timed on the model of ``model_dir`` with a LoRA of random B, loaded here and
    freed on return (dynamo's compiled code and CUDA graphs with it); each method's results put in
    ``sampling`` and ``save``d as soon as they are measured, so a run stopped by a time limit (a first
    compiled call takes minutes) keeps the methods before."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = load_model_and_tokenizer(model_dir, str(device), DTYPE, QUANT)[0]
    print(f"loaded with QUANT={QUANT} in {time.perf_counter() - start:.1f} s")
    stop_ids = stop_token_ids(model, tokenizer)
    apply_lora(model, LORA_R, LORA_ALPHA, LORA_TARGETS)
    init_generator = torch.Generator(device="cpu").manual_seed(SEED)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=init_generator) * 0.01)
    model.eval()
    generate_ids, generate_mask = left_pad([ids for ids in prompt_ids for _ in range(NUM_SAMPLES_PER_PROMPT)],
                                           tokenizer.pad_token_id, device)

    def our_sampler(sampler: str, seed: int) -> tuple[int, float, int]:
        """(generated tokens, compile seconds, rows that ran to the limit) of one call of common.sampler.sample."""
        settings = SamplingParams(NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, sampler=sampler,
                                  generator=torch.Generator(device=device).manual_seed(seed))
        samples = sample(model, prompt_ids, settings, eos_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id)
        return int(samples.completion_mask.sum()), samples.compile_seconds, int(samples.truncated.sum())

    @torch.no_grad()
    def hf_generate(seed: int, **cache) -> tuple[int, float, int]:
        """The same for model.generate (top_k and top_p spelled out: unset, they come from generation_config)."""
        torch.manual_seed(seed)
        output = model.generate(input_ids=generate_ids, attention_mask=generate_mask, max_new_tokens=MAX_NEW_TOKENS,
                                do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id, **cache)
        completions = output[:, generate_ids.size(1):]
        is_stop = torch.isin(completions, torch.tensor(stop_ids, device=device)).long()
        # A token is real when no stop token came before it (the first stop token itself counts).
        real = (is_stop.cumsum(dim=1) - is_stop == 0)
        return int(real.sum()), 0.0, int((is_stop.sum(dim=1) == 0).sum())

    def compiled_without_adapters(seed: int) -> tuple[int, float, int]:
        with disable_lora(model):
            return our_sampler("compiled", seed)

    runs = {"eager": lambda seed: our_sampler("eager", seed), "compiled": lambda seed: our_sampler("compiled", seed),
            "compiled_base": compiled_without_adapters, "generate": hf_generate,
            "generate_static": lambda seed: hf_generate(seed, cache_implementation="static")}
    for method in METHODS:
        first, timed = {}, []
        with measured(first):
            _, compile_seconds, _ = runs[method](SEED)
        for repeat in range(REPEATS):
            record = {}
            with measured(record):
                record["tokens"], _, record["rows_at_limit"] = runs[method](SEED + 1 + repeat)
            timed.append(record)
        seconds = statistics.median(r["seconds"] for r in timed)
        tokens = statistics.median(r["tokens"] for r in timed)
        sampling[method] = {"first_call_s": first["seconds"], "compile_s": compile_seconds, "calls": timed,
                            "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                            "peak_gb": max((r["peak_gb"] or 0.0) for r in timed) if device.type == "cuda" else None,
                            "reserved_gb": (max(first["reserved_gb"], *(r["reserved_gb"] for r in timed))
                                            if device.type == "cuda" else None),
                            "rows_at_limit": min(r["rows_at_limit"] for r in timed)}
        save()


def free_part_1() -> None:
    """What part 1 left on the GPU given back before the trainer's process needs it."""
    torch._dynamo.reset()  # compiled code and cudagraph trees hold the model's buffers and graph pools
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gigabytes(value) -> str:
    return "-" if value is None else f"{value:.2f}"


tokenizer = load_tokenizer(TOKENIZER_PATH)
with tempfile.TemporaryDirectory(prefix="bench_gpu-") as folder:
    model_dir, train_file = Path(folder) / "model", Path(folder) / "prompts.jsonl"
    model_dir.mkdir()
    prompt_ids = write_prompts(train_file)
    num_rows = len(prompt_ids) * NUM_SAMPLES_PER_PROMPT
    parameters = build_model(model_dir)
    # The plan of the run, from the saved config.json alone, as the trainers make it before loading.
    plan = plan_memory(model_dir, quant=QUANT, dtype=dtype, device=device.type, rows=num_rows,
                       samples_per_prompt=NUM_SAMPLES_PER_PROMPT, prompt_tokens=max(map(len, prompt_ids)),
                       max_new_tokens=MAX_NEW_TOKENS, micro_batch_size=MICRO_BATCH_SIZE, lora_r=LORA_R,
                       lora_targets=LORA_TARGETS, gradient_checkpointing=GRADIENT_CHECKPOINTING,
                       logprob_chunk_size=LOGPROB_CHUNK_SIZE, sampler=SAMPLER)
    plan = dataclasses.replace(plan, model=f"a random {'thin-bodied ' if thin else ''}{MODEL_NAMES[MODEL]}")
    if device.type == "cuda":  # what drawing the weights left in the allocator's cache goes before the cap
        gc.collect()
        torch.cuda.empty_cache()
    cap_gb = capped_memory_gb()
    print(plan.table(cap_gb or GPU_MEMORY_GB or free_gpu_memory_gb(device)))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    prompt_lengths = sorted(len(ids) for ids in prompt_ids)
    results = {
        "device": str(device), "device_name": device_name, "model": MODEL, "quant": QUANT, "cap_gb": cap_gb,
        "dtype": str(dtype), "thin_body": thin, "parameters": parameters, "rows": num_rows,
        "prompt_tokens": prompt_lengths, "sampling": {},
        "memory_plan_gb": {"weights": plan.weights / GB, "lora_state": plan.lora_state / GB,
                           "kv_cache": plan.kv_cache / GB, "graph_pool": plan.graph_pool / GB,
                           "rollout": plan.rollout / GB, "policy": plan.policy / GB, "total": plan.total_gb}}
    # Written now and after each sampling method: what was measured is kept if a later part fails or runs
    # out of time.
    out = write_results(OUT_FILE, "gpu", config, results)
    if METHODS:
        time_sampling(model_dir, results["sampling"], lambda: write_results(OUT_FILE, "gpu", config, results))
    sampling = results["sampling"]
    free_part_1()
    results.update(sampling_compiled_graphs=compiled_graphs(),
                   sampling_cuda_graphs_recorded=cuda_graphs["recorded"] if cuda_graphs else None)
    out = write_results(OUT_FILE, "gpu", config, results)
    # Part 2: run_train_grpo.py's step on the same model and prompts.
    settings = dict(MODEL_PATH=model_dir, TRAIN_FILE=train_file, PROMPTS_PER_STEP=len(prompt_ids),
                    NUM_SAMPLES_PER_PROMPT=NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS=MAX_NEW_TOKENS,
                    TEMPERATURE=TEMPERATURE, SAMPLER=SAMPLER, GENERATION_BATCH_SIZE=0,
                    GRADIENT_CHECKPOINTING=GRADIENT_CHECKPOINTING, MICRO_BATCH_SIZE=MICRO_BATCH_SIZE,
                    LOGPROB_CHUNK_SIZE=LOGPROB_CHUNK_SIZE, LORA_R=LORA_R, LORA_ALPHA=LORA_ALPHA,
                    LORA_TARGETS=LORA_TARGETS, LR=LR, GRAD_CLIP=GRAD_CLIP, QUANT=QUANT, DTYPE=DTYPE, DEVICE=DEVICE,
                    GPU_MEMORY_GB=cap_gb or GPU_MEMORY_GB, SEED=SEED, MAX_STEPS=WARMUP_STEPS + STEPS,
                    REWARD=RANDOM_REWARD)
    try:
        trainer = run_trainer(settings, folder, "bench_gpu", {"GPU_MEMORY_CAP_GB": cap_gb or GPU_MEMORY_GB})
    except SystemExit as error:
        raise SystemExit(f"{error}\nthe GRPO step (part 2) failed; the plan's peak for it: {plan.total_gb:.2f} GB "
                         f"(its table is above); part 1's results are in {out}") from None

steps, report = trainer.steps[WARMUP_STEPS:], trainer.report
# Means, not medians: the phases then add up to about the step (step_s, compilation excluded).
phase_seconds = {name: statistics.mean(step[key] for step in steps) for name, key in PHASES.items()}
step_seconds = statistics.mean(step["step_s"] for step in steps)
step_peak = max(step["peak_allocated_gb"] for step in steps) if device.type == "cuda" else None
step_reserved = max(step["peak_reserved_gb"] for step in steps) if device.type == "cuda" else None
generated_tokens = statistics.mean(step["completion_len"] for step in steps) * num_rows
policy_tokens = statistics.mean(step["policy_tokens"] for step in steps)
step_compile_s = sum(step["compile_s"] for step in steps)
mismatch = [steps[-1]["logprob_mismatch_mean"], steps[-1]["logprob_mismatch_max"]]

rows = [[f"sampling: {METHOD_NAMES[m]}", f"{r['seconds']:.3f}", f"{r['tokens_per_s']:,.0f}",
         f"{r['first_call_s']:.1f}" + (f" (compile {r['compile_s']:.1f})" if r["compile_s"] else ""),
         gigabytes(r["peak_gb"]), gigabytes(r["reserved_gb"])] for m, r in sampling.items()]
phase_tokens = {"generation": generated_tokens, "policy": policy_tokens}  # what a phase's tokens/s counts


def phase_rate(name: str) -> str:
    return f"{phase_tokens[name] / phase_seconds[name]:,.0f}" if name in phase_tokens else ""


# The trainer logs the step's peaks, not each phase's.
rows += [[f"GRPO step: {name}" + (f" ({SAMPLER} sampler)" if name == "generation" else ""),
          f"{phase_seconds[name]:.3f}", phase_rate(name), "", "", ""] for name in PHASES]
rows.append(["GRPO step: whole step", f"{step_seconds:.3f}", "", f"compile {step_compile_s:.1f}" if step_compile_s
             else "", gigabytes(step_peak), gigabytes(step_reserved)])
prompt_range = "-".join(dict.fromkeys(str(n) for n in (prompt_lengths[0], prompt_lengths[-1])))  # 31-35, or 128
print(f"\n{'thin-bodied ' if thin else ''}{MODEL_NAMES[MODEL]} shapes, random init ({parameters / 1e9:.3f}B "
      f"parameters), {dtype}{', 4-bit NF4 linears' if QUANT == 'nf4' else ''}, on {device_name or device}"
      f"{f', capped at {cap_gb:.2f} GB' if cap_gb else ''}; LoRA r={LORA_R} on "
      f"{len(LORA_TARGETS)} linear layers; {num_rows} rows ({len(prompt_ids)} prompts of {prompt_range} tokens x "
      f"{NUM_SAMPLES_PER_PROMPT}), "
      f"{MAX_NEW_TOKENS} new tokens, temperature {TEMPERATURE}; micro-batch {MICRO_BATCH_SIZE}, gradient "
      f"checkpointing {'on' if GRADIENT_CHECKPOINTING else 'off'}; sampling: medians of {REPEATS} calls, GRPO step "
      f"(run_train_grpo.py's): means of {STEPS} steps after {WARMUP_STEPS}:\n")
print(markdown_table(["what", "seconds", "tokens/s", "first call s", "peak allocated GB", "peak reserved GB"], rows))
compiled = {"sampling": results["sampling_compiled_graphs"], "grpo_step": report["compiled_graphs"]}
recorded = ({"sampling": results["sampling_cuda_graphs_recorded"], "grpo_step": report["cuda_graphs_recorded"]}
            if device.type == "cuda" else None)
print(f"\nCompiled graphs (dynamo): {compiled['sampling']} sampling, {compiled['grpo_step']} in the trainer's process; "
      f"CUDA graphs recorded: " + (f"{recorded['sampling']} sampling, {recorded['grpo_step']} in the trainer's process."
                                   if recorded else "- (no CUDA)."))
# The plan beside what the trainer's process measured: the weights and the LoRA before the first rollout
# (AdamW's moments and the gradients do not exist yet), and the step's peak.
memory = {"weights and LoRA, at the first rollout": (
              (plan.weights + lora_parameters(plan.shape, plan.settings) * FP32) / GB,
              report["allocated_at_first_rollout_gb"]),
          "GRPO step: the plan's total, the step's peak": (plan.total_gb, step_peak)}


def ratio(estimate: float, measured_gb) -> str:
    return "" if measured_gb is None else f"{estimate / measured_gb:.2f}"


print()
print(markdown_table(["memory, GB = 2^30 bytes", "plan GB", "measured GB", "plan / measured"],
                     [[what, f"{estimate:.2f}", gigabytes(measured_gb), ratio(estimate, measured_gb)]
                      for what, (estimate, measured_gb) in memory.items()]))
if device.type == "cuda":
    print(f"\nStep peak (run_train_grpo.py's peak_allocated_gb): {step_peak:.2f} GB"
          + (f" under a cap of {cap_gb:.2f} GB" if cap_gb else "") + f"; the plan: {plan.total_gb:.2f} GB.")
else:
    print(f"\nMeasured peaks: torch.cuda.max_memory_allocated, on CUDA only ('-' on {device.type}: the plan is checked "
          f"against the CPU's resident memory by tests/test_memory_plan.py).")
if sampling:
    at_limit = {m: r["rows_at_limit"] for m, r in sampling.items()}
    print(f"Rows that ran to {MAX_NEW_TOKENS} tokens without a stop token, per sampling method: {at_limit} of "
          f"{num_rows} (a random model almost never stops: every method decodes about "
          f"{num_rows * MAX_NEW_TOKENS:,} tokens).")
print(f"GRPO step rewards drawn at random (bench/random_reward.py: a random model's text is empty, so text rewards "
      f"would drop every group); {policy_tokens:.0f} real tokens (prompts and completions) in the policy pass per step.")
print(f"Sampler vs policy-pass log-probs of the trained tokens (last step): mean |diff| {mismatch[0]:.2e}, "
      f"max {mismatch[1]:.2e}.")
results.update({
    "steps": steps, "phase_seconds": phase_seconds, "step_seconds": step_seconds, "step_peak_gb": step_peak,
    "step_reserved_gb": step_reserved, "step_compile_s": step_compile_s, "generated_tokens": generated_tokens,
    "policy_tokens": policy_tokens, "logprob_mismatch_mean_max": mismatch, "trainer": report,
    "compiled_graphs": compiled, "cuda_graphs_recorded": recorded,
    "memory_plan_vs_measured_gb": {what: {"plan": estimate, "measured": measured_gb}
                                   for what, (estimate, measured_gb) in memory.items()}})
out = write_results(OUT_FILE, "gpu", config, results)
print(f"results in {out}")

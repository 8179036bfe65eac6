"""Sampling throughput: the shared sampler (common/sampler.py) against transformers' model.generate.

    python bench/bench_sampling.py                      # tiny model, the demo's GRPO batch: 16 x 8 rows, 40 new tokens
    python bench/bench_sampling.py --NUM_PROMPTS=8      # a smaller batch: 8 prompts x 8 samples
    python bench/bench_sampling.py --MODEL_PATH=models/gemma-2-2b-it --MAX_NEW_TOKENS=256 \\
        --PROMPTS_FILE=data/gsm8k_test.jsonl

Both sample the same rows (each of the first NUM_PROMPTS questions of PROMPTS_FILE repeated
NUM_SAMPLES_PER_PROMPT times, left-padded) at the same temperature, top-k and top-p, with the same
stop tokens, the same limit of new tokens and the same seed per repeat. generate gets do_sample,
top_k and top_p spelled out (unset, they would come from the model's generation_config) and no
min_new_tokens. Tokens are counted alike for both: each row's real tokens, up to and including its
stop token. One call of each warms up untimed; the REPEATS timed calls then alternate between the
two, so that load from other processes falls on both alike.
"""

import statistics
import sys
import time
from pathlib import Path

# Run as `python bench/bench_sampling.py`, Python puts bench/ on the path, not the repository root with common/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.config import configure  # noqa: E402

# ---------------------------------------------------------------- constants
MODEL_PATH = "models/tiny-gemma2-math"  # local model directory
PROMPTS_FILE = "data/synth_test.jsonl"  # questions {"question", ...}; the first NUM_PROMPTS are used
NUM_PROMPTS = 16  # distinct prompts per call (the demo's PROMPTS_PER_STEP)
NUM_SAMPLES_PER_PROMPT = 8  # completions per prompt (the demo's group size); all rows go in one batch
MAX_NEW_TOKENS = 40  # limit of new tokens per row (the demo's)
TEMPERATURE = 1.0  # sampling temperature (0 = greedy)
TOP_P = 1.0  # nucleus sampling (1.0 = off)
TOP_K = 0  # top-k sampling (0 = off)
REPEATS = 10  # timed calls of each, after one untimed warm-up call
SEED = 0  # repeat i of both uses seed SEED + i
DEVICE = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
DTYPE = "auto"  # auto (bf16 on CUDA, else fp32), float32, bfloat16
OUT_FILE = "logs/bench/sampling.json"  # where the results go

config = configure(globals())
# ---------------------------------------------------------------------------

from bench import markdown_table, write_results  # noqa: E402
from common.data import load_problems  # noqa: E402
from common.model import load_model_and_tokenizer, stop_token_ids  # noqa: E402
from common.prompts import encode_prompts  # noqa: E402
from common.sampler import SamplingParams, left_pad, sample  # noqa: E402

model, tokenizer, device = load_model_and_tokenizer(MODEL_PATH, DEVICE, DTYPE)
stop_ids = stop_token_ids(model, tokenizer)
prompt_ids = encode_prompts(tokenizer, [p["question"] for p in load_problems(PROMPTS_FILE, limit=NUM_PROMPTS)])
input_ids, attention_mask = left_pad([ids for ids in prompt_ids for _ in range(NUM_SAMPLES_PER_PROMPT)],
                                     tokenizer.pad_token_id, device)
if TEMPERATURE > 0:
    generate_sampling = {"do_sample": True, "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P}
else:
    generate_sampling = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}


def shared_sampler(seed: int) -> int:
    """Sample with common/sampler.py; returns the number of real generated tokens."""
    settings = SamplingParams(NUM_SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K,
                              generator=torch.Generator(device=device).manual_seed(seed))
    samples = sample(model, prompt_ids, settings, eos_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id)
    return int(samples.completion_mask.sum())


@torch.no_grad()
def hf_generate(seed: int) -> int:
    """Sample with model.generate; returns the number of real generated tokens."""
    torch.manual_seed(seed)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                            eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, **generate_sampling)
    completions = output[:, input_ids.size(1):]
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=device)).long()
    # A token is real when no stop token came before it (the first stop token itself counts).
    return int((is_stop.cumsum(dim=1) - is_stop == 0).sum())


methods = {"shared sampler (common/sampler.py)": shared_sampler, "model.generate": hf_generate}
for run in methods.values():
    run(SEED)
tokens = {name: [] for name in methods}
seconds = {name: [] for name in methods}
for repeat in range(REPEATS):
    for name, run in methods.items():
        start = time.perf_counter()
        tokens[name].append(run(SEED + repeat))
        seconds[name].append(time.perf_counter() - start)

# Per call, then the median: a call slowed down by another process's burst does not drag the figure.
results = {name: {"tokens": tokens[name], "seconds": seconds[name],
                  "tokens_per_s": statistics.median(n / t for n, t in zip(tokens[name], seconds[name]))}
           for name in methods}
sampler_result, generate_result = results.values()
speedup = sampler_result["tokens_per_s"] / generate_result["tokens_per_s"]
print(f"\n{input_ids.size(0)} rows ({NUM_PROMPTS} prompts x {NUM_SAMPLES_PER_PROMPT} samples), "
      f"up to {MAX_NEW_TOKENS} new tokens, temperature {TEMPERATURE}, on {device}; medians of {REPEATS} calls each:\n")
print(markdown_table(
    ["method", "tokens per call", "seconds per call", "tokens/s"],
    [[name, f"{statistics.median(r['tokens']):.0f}", f"{statistics.median(r['seconds']):.3f}",
      f"{r['tokens_per_s']:,.0f}"] for name, r in results.items()]))
print(f"\nshared sampler / generate: {speedup:.2f}x tokens/s")
out = write_results(OUT_FILE, "sampling", config, {"device": str(device), "rows": input_ids.size(0),
                                                   "methods": results, "speedup": speedup})
print(f"results in {out}")

"""Run a training script in this process, as `python SCRIPT --NAME=value ...` would, for the benchmarks
(bench.run_trainer): they time the trainer's own step and read its metrics file; this adds what only
its process can tell, and can put forced completions in place of the sampler.

    python bench/launch_trainer.py --REPORT_FILE=r.json run_train_grpo.py --MAX_STEPS=3 ...
    python bench/launch_trainer.py --GSM8K_LIKE=true run_train_grpo.py --MAX_NEW_TOKENS=256 ...

The launcher's constants come before the script's path, the script's after it. The script runs with
runpy (run_name "__main__", sys.argv its path and arguments): its step, its layouts, its loss, its
metrics are its own. Only common.rollout.sample_rollouts, which the script imports after its
constants, is wrapped: on CUDA, the memory allocated when the first rollout begins (the weights and
the LoRA, before AdamW's moments exist) goes into the report.

GSM8K_LIKE replaces the sampler by forced completions with a GSM8K-like spread of lengths, for the
policy pass's layouts (packed against padded): random tokens, lengths uniform from GSM8K_MIN_TOKENS to
MAX_NEW_TOKENS, a tenth of the rows at MAX_NEW_TOKENS (truncated), drawn from the run's sampling
generator (two runs of one SEED get the same completions). The sampler's log-probs are 0 (no sampler
ran): the logged log-prob mismatch means nothing then, and IMPORTANCE_CORRECTION=tis would weigh by
the trainer's probabilities. It times the pass, not the learning: use a reward that gives groups an
advantage (bench/random_reward.py).

REPORT_FILE gets, when the script ends or fails: the process's peak resident memory (ru_maxrss,
Linux and macOS; None on Windows, which has no resource module), the graphs dynamo compiled and the
CUDA graphs recorded (bench.count_cuda_graphs), and the memory allocated at the first rollout (CUDA).
GPU_MEMORY_CAP_GB caps the process's GPU memory (torch.cuda.set_per_process_memory_fraction) before
the script loads anything: a step that needs more fails with an out-of-memory error.
"""

import json
import runpy
import sys
import time
from pathlib import Path

# Run as `python bench/launch_trainer.py`, Python puts bench/ on the path, not the repository root with common/.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from common.config import configure  # noqa: E402

# ---------------------------------------------------------------- constants
GSM8K_LIKE = False  # forced completions of GSM8K-like lengths instead of sampled ones
GSM8K_MIN_TOKENS = 40  # the shortest forced completion (at most MAX_NEW_TOKENS)
GPU_MEMORY_CAP_GB = 0.0  # cap of the process's GPU memory, GB of 2^30 bytes (0 = none; CUDA only)
REPORT_FILE = ""  # where the report goes, JSON ("" = nowhere)

# The launcher's arguments end at the script's path (the first argument that is not --NAME=value).
script_at = next((i for i, arg in enumerate(sys.argv[1:], 1) if not arg.startswith("--")), None)
if script_at is None:
    raise SystemExit("usage: python bench/launch_trainer.py [--NAME=value ...] SCRIPT.py [--NAME=value ...]")
config = configure(globals(), argv=sys.argv[1:script_at], quiet=True)
# ---------------------------------------------------------------------------

import common.rollout  # noqa: E402
from bench import compiled_graphs, count_cuda_graphs  # noqa: E402
from common.prompts import encode_prompts  # noqa: E402
from common.sampler import SampleOutput  # noqa: E402

FIRST_RANDOM_TOKEN = 3  # forced tokens are drawn above the tiny tokenizer's pad (0), EOS (1) and BOS (2)

cuda = torch.cuda.is_available()
cuda_graphs = count_cuda_graphs() if cuda else None
report = {"peak_rss_bytes": None, "compiled_graphs": 0, "cuda_graphs_recorded": None,
          "allocated_at_first_rollout_gb": None}


def gsm8k_like_rollouts(model, tokenizer, prompt_format, batch, settings):
    """What common.rollout.sample_rollouts returns for ``batch``, the completions forced (see above)."""
    start = time.perf_counter()
    prompts = encode_prompts(tokenizer, batch, prompt_format)
    rows, limit = len(prompts) * settings.num_samples, settings.max_new_tokens
    seed = torch.randint(2 ** 62, (1,), generator=settings.generator, device=settings.generator.device)
    generator = torch.Generator().manual_seed(int(seed))
    lengths = torch.randint(min(GSM8K_MIN_TOKENS, limit), limit + 1, (rows,), generator=generator)
    lengths[torch.randperm(rows, generator=generator)[:rows // 10]] = limit
    completion_mask = (torch.arange(limit) < lengths[:, None]).float()
    completion_ids = torch.randint(FIRST_RANDOM_TOKEN, model.get_input_embeddings().num_embeddings, (rows, limit),
                                   generator=generator).masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(settings.num_samples)
    samples = SampleOutput(prompt_ids=[prompts[i] for i in prompt_index.tolist()], completion_ids=completion_ids,
                           completion_mask=completion_mask, logprobs=torch.zeros(rows, limit),
                           truncated=lengths == limit, texts=tokenizer.batch_decode(completion_ids,
                                                                                   skip_special_tokens=True),
                           prompt_index=prompt_index)
    return samples, [batch[i] for i in prompt_index.tolist()], time.perf_counter() - start


def first_rollout_memory(sample_rollouts):
    """``sample_rollouts``, noting on CUDA the memory allocated when the first call begins."""
    def wrapped(model, tokenizer, prompt_format, batch, settings):
        if cuda and report["allocated_at_first_rollout_gb"] is None:
            report["allocated_at_first_rollout_gb"] = torch.cuda.memory_allocated() / 2 ** 30
        return sample_rollouts(model, tokenizer, prompt_format, batch, settings)
    return wrapped


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far: ru_maxrss, in KiB on Linux, in bytes on macOS."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_report() -> None:
    report.update(peak_rss_bytes=peak_rss_bytes(), compiled_graphs=compiled_graphs(),
                  cuda_graphs_recorded=cuda_graphs["recorded"] if cuda else None)
    Path(REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


if GPU_MEMORY_CAP_GB and cuda:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, GPU_MEMORY_CAP_GB * 2 ** 30 / total))
common.rollout.sample_rollouts = first_rollout_memory(gsm8k_like_rollouts if GSM8K_LIKE
                                                      else common.rollout.sample_rollouts)
script = sys.argv[script_at]
sys.argv = sys.argv[script_at:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    if REPORT_FILE:
        write_report()

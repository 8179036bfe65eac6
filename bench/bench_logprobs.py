"""Log-prob memory: token_logprobs (common/logprobs.py) against the naive full-logits path.

    python bench/bench_logprobs.py                        # 4 x 512 tokens, vocabulary 256,000, on the CPU
    python bench/bench_logprobs.py --BATCH_SIZE=16        # a whole GRPO batch: the naive path needs ~40 GB

The model is a Gemma 2 with Gemma 2's vocabulary (256,000) and final soft-capping but a tiny
body (hidden size 64, random init, fp32): the output head is what dominates memory, as it does
for the real model's log-probs. Both paths compute log p(x[t+1] | x[..t]) of BATCH_SIZE x SEQ_LEN
tokens and backpropagate a GRPO-like loss, -mean(log-prob x the row's advantage):

  chunked: token_logprobs, the output head applied CHUNK_SIZE positions at a time, forward and backward;
  naive:   model(input_ids).logits -> / temperature -> log_softmax -> gather, as most trainers do.

Each path runs in a fresh process (this script again, with --MEASURE=chunked or naive), so
neither's peak can hide in the other's. Peak memory is the process's high-water mark during
forward + backward minus what it held just before (model, inputs): on Linux the kernel's VmHWM,
reset to the current size before the pass (/proc/self/clear_refs); on CUDA
torch.cuda.max_memory_allocated. A small warm-up pass precedes the measured one. The parent then
compares the log-probs and every parameter's gradient between the two processes.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/bench_logprobs.py`, Python puts bench/ on the path, not the repository root with common/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.config import configure  # noqa: E402

# ---------------------------------------------------------------- constants
VOCAB_SIZE = 256000  # output vocabulary (Gemma 2's)
HIDDEN_SIZE = 64  # hidden size of the tiny body
NUM_LAYERS = 2  # decoder layers (Gemma 2 alternates sliding-window and full attention)
BATCH_SIZE = 8  # sequences; the naive path holds [BATCH_SIZE, SEQ_LEN, VOCAB_SIZE] fp32 tensors: ~17 GB at 8 x 512
SEQ_LEN = 512  # tokens per sequence
CHUNK_SIZE = 1024  # positions per output-head chunk of token_logprobs (its default)
TEMPERATURE = 1.0  # the log-probs are of softmax(logits / TEMPERATURE)
SEED = 0  # weights, token ids and advantages
DEVICE = "auto"  # auto (cuda if available, else cpu), cuda or cpu
MEASURE = "both"  # both: each path in a fresh process, then compare; chunked or naive: measure that path here
TENSORS_FILE = ""  # with MEASURE=chunked or naive: where to save the log-probs and gradients for the comparison
OUT_FILE = "logs/bench/logprobs.json"  # where the results go (MEASURE=both)

config = configure(globals())
# ---------------------------------------------------------------------------

PATHS = {"naive": "naive: logits -> log_softmax -> gather", "chunked": f"token_logprobs (chunk {CHUNK_SIZE})"}


def current_and_peak_bytes() -> tuple[int, int]:
    """(resident, high-water mark) of this process, from /proc/self/status (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak(device: torch.device) -> int:
    """Start a new high-water mark from what is held now; returns what is held now (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    return current_and_peak_bytes()[0]


def peak_since_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return current_and_peak_bytes()[1]


def measure_one_path(path: str, device: torch.device) -> dict:
    """Forward + backward of one path on the whole batch; peak memory, seconds, and the tensors saved."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from common.logprobs import token_logprobs

    model_config = Gemma2Config(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=4 * HIDDEN_SIZE,
                                num_hidden_layers=NUM_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=SEQ_LEN,
                                sliding_window=SEQ_LEN, tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation="eager").to(device)
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=generator).to(device)
    advantages = torch.randn(BATCH_SIZE, generator=generator).to(device)

    def logprobs_of(ids: torch.Tensor) -> torch.Tensor:
        attention_mask = torch.ones_like(ids)
        if path == "chunked":
            return token_logprobs(model, ids, attention_mask, temperature=TEMPERATURE, chunk_size=CHUNK_SIZE)
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
        return (logits / TEMPERATURE).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    def forward_backward(ids: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logprobs = logprobs_of(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_done = time.perf_counter()
        (-(logprobs * advantages[:ids.size(0), None]).mean()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return logprobs.detach(), forward_done - start, time.perf_counter() - forward_done

    forward_backward(input_ids[:1, :64])  # warm-up: first-call costs stay out of the timing
    model.zero_grad(set_to_none=True)
    held_before = reset_peak(device)
    logprobs, forward_seconds, backward_seconds = forward_backward(input_ids)
    peak_bytes = peak_since_reset(device) - held_before
    if TENSORS_FILE:
        torch.save({"logprobs": logprobs.cpu(),
                    "grads": {name: p.grad.cpu() for name, p in model.named_parameters()}}, TENSORS_FILE)
    return {"peak_bytes": peak_bytes, "forward_s": forward_seconds, "backward_s": backward_seconds}


def run_in_fresh_process(path: str, tensors_file: Path) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], f"--MEASURE={path}", f"--TENSORS_FILE={tensors_file}"]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"error: the {path} process exited {finished.returncode}:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


if DEVICE == "auto":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
else:
    device = torch.device(DEVICE)
if device.type not in ("cpu", "cuda"):
    raise SystemExit(f"error: DEVICE must be auto, cuda or cpu, got {DEVICE!r}")
if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
    raise SystemExit("error: the CPU peak is read from Linux's /proc/self/status; elsewhere use --DEVICE=cuda")
if MEASURE in PATHS:
    print(json.dumps(measure_one_path(MEASURE, device)))
    raise SystemExit(0)
if MEASURE != "both":
    raise SystemExit(f"error: MEASURE must be both, chunked or naive, got {MEASURE!r}")

from bench import markdown_table, write_results  # noqa: E402

with tempfile.TemporaryDirectory() as scratch:
    measured = {path: run_in_fresh_process(path, Path(scratch) / f"{path}.pt") for path in PATHS}
    naive_tensors, chunked_tensors = (torch.load(Path(scratch) / f"{path}.pt", weights_only=True)
                                      for path in ("naive", "chunked"))
logprob_difference = float((naive_tensors["logprobs"] - chunked_tensors["logprobs"]).abs().max())
grad_difference = max(float((naive_tensors["grads"][name] - grad).abs().max())
                      for name, grad in chunked_tensors["grads"].items())
largest_grad = max(float(grad.abs().max()) for grad in naive_tensors["grads"].values())
peak_ratio = measured["chunked"]["peak_bytes"] / measured["naive"]["peak_bytes"]

print(f"\nlog-probs of {BATCH_SIZE} x {SEQ_LEN} tokens, vocabulary {VOCAB_SIZE:,}, forward + backward on {device}:\n")
print(markdown_table(
    ["path", "peak memory (GB)", "forward (s)", "backward (s)"],
    [[PATHS[path], f"{m['peak_bytes'] / 1e9:.2f}", f"{m['forward_s']:.2f}", f"{m['backward_s']:.2f}"]
     for path, m in measured.items()]))
print(f"\npeak memory of token_logprobs: {100 * peak_ratio:.1f}% of naive; max |difference|: "
      f"log-probs {logprob_difference:.2e}, gradients {grad_difference:.2e} (largest gradient {largest_grad:.2e})")
out = write_results(OUT_FILE, "logprobs", config, {
    "device": str(device), "paths": measured, "peak_ratio": peak_ratio,
    "max_abs_diff_logprobs": logprob_difference, "max_abs_diff_grads": grad_difference,
    "max_abs_grad": largest_grad})
print(f"results in {out}")

"""Measure the CPU memory of GRPO's phases for tests/test_memory_plan.py, in a process of its own:

    python tests/memory_probe.py '{"model_dir": ..., "quant": "nf4", "rows": 32, ...}'

prints one JSON line: the peak resident memory above the process's memory before the model loaded,
in bytes, of the rollout (the sampler with its KV cache) and of the policy pass (token_logprobs with
entropy, backward, AdamW step over the micro-batches), each measured on a second step (the optimizer's
state then exists, as in every step but the first), and of the weights after loading.

The peak is the kernel's high-water mark of resident memory (VmHWM), reset before each phase
(/proc/PID/clear_refs, "5"). Run with MALLOC_MMAP_THRESHOLD_=4096 (the test sets it), every allocation
of a page or more gets pages of its own and returns them when freed, so resident memory follows the
live tensors as torch.cuda.max_memory_allocated follows them on a GPU.
"""

import gc
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.logprobs import layout_logprobs
from common.logprobs import enable_gradient_checkpointing  # noqa: E402
from common.lora import apply_lora, lora_parameters  # noqa: E402
from common.model import load_model  # noqa: E402
from common.rollout import rollout_batch  # noqa: E402
from common.sampler import SamplingParams, sample  # noqa: E402


def status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Run:
    """A model loaded as a trainer loads it, with its LoRA and AdamW, and GRPO's two phases."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.model = load_model(settings["model_dir"], torch.device("cpu"), getattr(torch, settings["dtype"]),
                                settings["quant"])
        # On a CPU transformers maps the weights from the file (resident only where read); a GPU holds a
        # copy of them all. Copied here, they are resident as they would be there.
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                tensor.data = tensor.data.clone()

    def start(self) -> None:
        settings, model = self.settings, self.model
        apply_lora(model, settings["lora_r"], 2.0 * settings["lora_r"], settings["lora_targets"])
        if settings["gradient_checkpointing"]:
            enable_gradient_checkpointing(model)
        self.optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
        # Prompts of different lengths, as a step's questions are: the batch is left-padded to the longest,
        # and the attention runs with a padding mask (without one, sdpa needs no copy of the KV heads).
        self.prompts = [torch.randint(3, model.config.vocab_size, (settings["prompt_tokens"] - i,)).tolist()
                        for i in range(settings["rows"] // settings["samples_per_prompt"])]

    def rollout(self):
        self.model.eval()
        # The stop token is one past the vocabulary, never sampled: every row runs to the end, the worst case.
        settings = SamplingParams(self.settings["samples_per_prompt"], self.settings["max_new_tokens"],
                                  temperature=1.0, sampler="eager", generator=torch.Generator().manual_seed(0))
        return sample(self.model, self.prompts, settings, eos_token_ids=[self.model.config.vocab_size], pad_token_id=0)

    def policy_pass(self, samples) -> None:
        self.model.train()
        rollouts = rollout_batch(samples, None, 0)
        self.optimizer.zero_grad(set_to_none=True)
        rollouts.plan_passes(self.settings["micro_batch_size"], 0, False, None)
        for _, layout in rollouts.passes:
            logprobs, entropy, _ = layout_logprobs(self.model, layout, 1.0, self.settings["logprob_chunk_size"],
                                                   with_entropy=True)
            (-(logprobs.mean() + 0.01 * entropy.mean())).backward()
        self.optimizer.step()


def main(settings: dict) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # A first run loads every library, kernel and cache a step touches; what it leaves once freed is the baseline.
    warm_up = Run(settings)
    warm_up.start()
    warm_up.policy_pass(warm_up.rollout())
    del warm_up
    gc.collect()
    baseline = status_kb("VmRSS")
    run = Run(settings)
    weights = status_kb("VmRSS") - baseline
    run.start()
    run.policy_pass(run.rollout())  # the first step allocates AdamW's moments
    reset_peak()
    samples = run.rollout()
    rollout_peak = status_kb("VmHWM") - baseline
    reset_peak()
    run.policy_pass(samples)
    policy_peak = status_kb("VmHWM") - baseline
    return {"weights": weights * 1024, "rollout": rollout_peak * 1024, "policy": policy_peak * 1024}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

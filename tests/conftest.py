"""Shared fixtures: micro models (random init, a few thousand parameters) and paths.

Unit tests never need the trained tiny model; scripts' smoke tests run on a
micro model saved to disk with the tiny model's tokenizer, so they exercise the
real loading code in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = REPO_ROOT / "models" / "tiny-gemma2-math"

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Equivalence tests run on the CPU and, where there is one, on CUDA: parametrize(DEVICE, DEVICES). The
# CUDA cases carry the `cuda` marker (`pytest -m cuda` runs those alone: bench/gpu_check.py's part 1)
# and are skipped without CUDA. Defined once: a second, unmarked DEVICES here used to win, and
# `pytest -m cuda` then ran only the tests marked cuda as a whole (issue 29, finding 1).
DEVICE = "device"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the CUDA case of an equivalence test (pytest -m cuda; bench/gpu_check.py)")


def micro_config(arch: str = "gemma2", vocab_size: int = 64, **overrides):
    """A transformers config for a micro model of ``arch`` (gemma2, llama or qwen2)."""
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True)
    if arch == "gemma2":
        config = Gemma2Config(**common, query_pre_attn_scalar=8, sliding_window=128,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              attn_implementation="eager")
    elif arch == "llama":
        config = LlamaConfig(**common, attn_implementation="eager")
    elif arch == "qwen2":
        config = Qwen2Config(**common, attn_implementation="eager")
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def micro_model(arch: str = "gemma2", vocab_size: int = 64, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(micro_config(arch, vocab_size, **overrides),
                                             attn_implementation="eager")
    return model.eval()


def save_micro_model_dir(out: Path, **overrides) -> Path:
    """A micro Gemma 2 saved in ``out`` like a real model, with the built-in tiny model's tokenizer."""
    from transformers import GenerationConfig

    from common.model import load_tokenizer

    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model = micro_model("gemma2", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=[tokenizer.eos_token_id, end_of_turn], **overrides)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, end_of_turn],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> Path:
    """A micro Gemma 2 saved like a real model, with the built-in tiny model's tokenizer."""
    return save_micro_model_dir(tmp_path_factory.mktemp("micro-gemma2"))


def run_script(args: list[str], timeout: int = 300, cwd: Path = REPO_ROOT, check: bool = True
               ) -> subprocess.CompletedProcess:
    """Run a top-level script as a user would; fail with its output if it fails (unless not ``check``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


# Every architecture the tests cover, by model_type; gemma3 is the multimodal checkpoint (a SigLIP
# vision tower beside the language model), the others are text-only causal LMs.
MICRO_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gemma3")


def micro_arch_config(arch: str, vocab_size: int = 64, **overrides):
    """A transformers config for a micro model of any of MICRO_ARCHITECTURES (hidden 16, 2 layers,
    2 heads of 8, 1 key-value head), eager attention; ``overrides`` set config attributes (of the
    language model's config for gemma3)."""
    from transformers import AutoConfig

    text = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True)
    if arch in ("gemma2", "gemma3_text", "gemma3"):
        text.update(query_pre_attn_scalar=8, sliding_window=128)
    if arch == "gemma2":
        text.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if arch == "gemma3":
        # Image tokens get the last ids; the vision tower sees 28x28 images in 4 patches.
        config = AutoConfig.for_model(
            "gemma3", text_config={**text, **overrides},
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
            image_token_index=vocab_size - 1, tie_word_embeddings=True)
        config._attn_implementation = "eager"
        return config
    if arch not in MICRO_ARCHITECTURES:
        raise ValueError(f"no micro config for {arch!r}; one of {MICRO_ARCHITECTURES}")
    config = AutoConfig.for_model(arch, **text)
    config._attn_implementation = "eager"
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def micro_arch_model(arch: str, vocab_size: int = 64, seed: int = 0, **overrides):
    """A randomly initialised micro model of ``arch`` (see micro_arch_config), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(micro_arch_config(arch, vocab_size, **overrides),
                                             attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def micro_arch_dir(tmp_path_factory):
    """``micro_arch_dir(arch)``: the directory of a micro model of ``arch`` saved like a real model, with
    the built-in tiny model's tokenizer and its stop tokens (made once per session and arch)."""
    from transformers import GenerationConfig

    from common.model import load_tokenizer

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            tokenizer = load_tokenizer(TINY_MODEL_DIR)
            stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
            model = micro_arch_model(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids)
            model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                                       bos_token_id=tokenizer.bos_token_id)
            made[arch] = tmp_path_factory.mktemp(f"micro-{arch}")
            model.save_pretrained(made[arch])
            tokenizer.save_pretrained(made[arch])
        return made[arch]

    return make


def sample_with(model, prompt_ids, tokenizer=None, eos_token_ids=None, pad_token_id=None, **settings):
    """common.sampler.sample with its SamplingParams given as keywords (num_samples, max_new_tokens,
    temperature, top_p, top_k, chunk_rows, sampler, generator): the tests vary them one at a time."""
    from common.sampler import SamplingParams, sample

    return sample(model, prompt_ids, SamplingParams(**settings), tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                  pad_token_id=pad_token_id)

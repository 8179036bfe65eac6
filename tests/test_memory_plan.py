"""common/memory_plan.py and plan_memory.py against independent references: the bytes of a loaded model's
tensors (weights, 4-bit or not), the tensors autograd saves in a policy pass (saved_tensors_hooks), the
KV cache a forward returns, and the peak resident memory of GRPO's phases measured in a process of its own
(tests/memory_probe.py); then the advice and GENERATION_BATCH_SIZE=auto against a search by hand."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common.logprobs import layout_logprobs
from common.lora import apply_lora
from common.memory_plan import (ALLOCATOR_HEADROOM, GB, MemoryPlan, MemoryPlanError, RunSettings, activation_bytes,
                                check_fits, kv_cache_bytes, largest_generation_batch, llama_3_1_8b_config, model_shape,
                                plan_memory, policy_bytes)
from common.model import EAGER_ATTENTION_MODEL_TYPES, load_model
from common.packing import pass_layout
from dpo.pairs import PairBatch, pair_logprobs
from common.quant import is_quantized
from tests.conftest import REPO_ROOT, run_script

CPU = torch.device("cpu")


def small_config(arch: str, kv_heads: int = 2, **overrides):
    """A config of ``arch`` with distinct sizes (hidden 48, MLP 80, 4 heads of 12, 3 layers), so that a
    term counted with the wrong size shows."""
    extra = {"gemma2": dict(query_pre_attn_scalar=12, sliding_window=256, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0),
             "gemma3_text": dict(query_pre_attn_scalar=12, sliding_window=256)}.get(arch, {})
    return AutoConfig.for_model(arch, **{**dict(vocab_size=96, hidden_size=48, intermediate_size=80,
                                                num_hidden_layers=3, num_attention_heads=4,
                                                num_key_value_heads=kv_heads, head_dim=12, max_position_embeddings=256,
                                                pad_token_id=0, bos_token_id=2, eos_token_id=1,
                                                tie_word_embeddings=arch not in ("llama", "phi3")),
                                             **extra, **overrides})


def model_of(config, dtype=torch.float32):
    """A random model of ``config`` with the attention common.model.load_model gives it."""
    torch.manual_seed(0)
    attention = "eager" if config.model_type in EAGER_ATTENTION_MODEL_TYPES else "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(dtype)


def tensor_bytes(model) -> int:
    """The bytes of the model's weights as stored: every parameter's storage once, and a 4-bit layer's
    scales and code tables (bitsandbytes' QuantState)."""
    storages = {parameter.untyped_storage().data_ptr(): parameter.untyped_storage().nbytes()
                for parameter in model.parameters()}
    for module in model.modules():
        if is_quantized(module):
            state = module.weight.quant_state
            for tensor in (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("quant, dtype", [("none", "float32"), ("none", "bfloat16"), ("nf4", "float32")])
def test_weights_are_the_bytes_of_the_loaded_model(arch, quant, dtype, tmp_path):
    # Sizes that are multiples of bitsandbytes' blocks of 64, as real models' are.
    config = small_config(arch, hidden_size=128, intermediate_size=192, head_dim=32, vocab_size=320)
    model_of(config).save_pretrained(tmp_path)
    model = load_model(tmp_path, CPU, getattr(torch, dtype), quant)
    plan = plan_memory(tmp_path, quant=quant, dtype=dtype, device="cpu")
    assert plan.weights == tensor_bytes(model)


@pytest.mark.parametrize("arch, dtype, kv_heads, targets", [
    ("llama", "float32", 2, "all-linear"),
    ("llama", "bfloat16", 1, ("q_proj", "v_proj")),
    ("qwen2", "bfloat16", 2, "all-linear"),
    ("mistral", "float32", 4, ("k_proj", "o_proj", "down_proj")),
    ("gemma", "bfloat16", 2, "all-linear"),
    ("gemma2", "float32", 2, "all-linear"),
    ("gemma2", "bfloat16", 4, ("q_proj", "k_proj", "v_proj", "gate_proj")),
    ("gemma3_text", "bfloat16", 2, "all-linear"),
    ("qwen3", "float32", 2, "all-linear"),
    ("phi3", "float32", 1, "all-linear"),
    ("phi3", "bfloat16", 2, ("qkv_proj", "gate_up_proj")),
])
def test_saved_activations_are_what_autograd_saves(arch, dtype, kv_heads, targets):
    config = small_config(arch, kv_heads)
    model = model_of(config, getattr(torch, dtype))
    apply_lora(model, r=4, alpha=8, target_modules=targets)
    model.train()
    rows, length = 3, 20
    input_ids = torch.randint(3, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # a left-padded row, as a step's rows are
    frozen = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved, kept = {}, []

    def pack(tensor):
        kept.append(tensor)  # alive until the count is done, so no address is reused
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    completion = 12  # the head runs on the completion's predictions, as in the trainers' passes (padded layout)
    layout = pass_layout([ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)], [completion] * rows,
                         completion, None, False, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layout_logprobs(model, layout, 1.0, chunk_size=7, with_entropy=True)
    settings = RunSettings(dtype=dtype, device="cpu", micro_batch_size=rows, prompt_tokens=length - completion,
                           max_new_tokens=completion, lora_r=4, lora_targets=targets)
    assert activation_bytes(model_shape(config), settings, checkpointing=False) == sum(saved.values())


def test_saved_activations_of_a_pass_over_every_position_without_entropy():
    """SFT's and DPO's pass, planned with the head on every position (all but the first token is an
    answer's here), no entropy: DPO's pair_logprobs, padded."""
    config = small_config("qwen2")
    model = model_of(config)
    apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    model.train()
    input_ids = torch.randint(3, config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(0))
    frozen = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved, kept = {}, []

    def pack(tensor):
        kept.append(tensor)
        if tensor.untyped_storage().data_ptr() not in frozen:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded row, as a batch of answers of different lengths has
    sequences = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    layout = pass_layout(sequences, [len(sequence) - 1 for sequence in sequences], 14, None, False, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        pair_logprobs(model, PairBatch(layout, torch.ones(2, 14)), chunk_size=7)
    settings = RunSettings(dtype="float32", device="cpu", micro_batch_size=2, prompt_tokens=5, max_new_tokens=10,
                           lora_r=4, head_on_prompt=True, entropy=False)
    # Within 0.1%: the plan counts each row at the longest (28 positions for 25), and not the ~100 bytes
    # of DPO's sequence sums (the answer mask torch.where keeps).
    planned = activation_bytes(model_shape(config), settings, checkpointing=False)
    assert planned == pytest.approx(sum(saved.values()), rel=1e-3)


def test_the_eager_kv_cache_is_what_a_forward_keeps():
    # Gemma 2 with a sliding window shorter than the rows: its sliding layers keep only the window.
    config = small_config("gemma2", sliding_window=24)
    model = model_of(config)
    rows, prompt, new = 5, 20, 14
    with torch.no_grad():
        cache = model(input_ids=torch.randint(3, 90, (rows, prompt + new - 1)), use_cache=True).past_key_values
    kept = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    settings = RunSettings(dtype="float32", device="cpu", sampler="eager", prompt_tokens=prompt, max_new_tokens=new)
    assert kv_cache_bytes(model_shape(config), settings, rows) == kept
    assert kept < rows * (prompt + new - 1) * 3 * 2 * 12 * 2 * 4  # the window did shorten some layers


# Two GRPO-like runs, measured. Gemma 2 (eager attention, soft-capping, tied head, vocabulary 32k, 4 layers)
# in fp32, not checkpointed: the head's backward buffers set its peak. Llama (sdpa, untied head, vocabulary
# 4k, 6 layers) with 4-bit layers, checkpointed: a layer's recomputation and backward set it. Hidden 256:
# peaks of 30-200 MB, far above what the allocator adds (well under 1 MB with the setting below).
MEASURED_RUNS = {
    "gemma2 fp32": dict(arch="gemma2", vocab_size=32000, layers=4, quant="none", gradient_checkpointing=False,
                        rows=16, prompt_tokens=32, max_new_tokens=32, micro_batch_size=8, logprob_chunk_size=256),
    "llama nf4 checkpointed": dict(arch="llama", vocab_size=4096, layers=6, quant="nf4", gradient_checkpointing=True,
                                   rows=32, prompt_tokens=64, max_new_tokens=32, micro_batch_size=16,
                                   logprob_chunk_size=1024),
}


@pytest.mark.parametrize("run", list(MEASURED_RUNS))
def test_the_estimate_is_within_15_percent_of_the_measured_peak(run, tmp_path):
    settings = dict(MEASURED_RUNS[run])
    arch, vocab_size, layers = settings.pop("arch"), settings.pop("vocab_size"), settings.pop("layers")
    config = small_config(arch, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                          num_attention_heads=8, head_dim=32, vocab_size=vocab_size, max_position_embeddings=512)
    model_of(config).save_pretrained(tmp_path)
    settings.update(dtype="float32", samples_per_prompt=4, lora_r=8, lora_targets="all-linear")
    # Every allocation of a page or more in pages of its own, returned when it is freed: resident memory
    # then follows the live tensors (tests/memory_probe.py).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "memory_probe.py"),
                             json.dumps({"model_dir": str(tmp_path), **settings})],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    plan = plan_memory(tmp_path, device="cpu", sampler="eager", **settings)
    persistent = plan.weights + plan.lora_state  # the weights alone: test_weights_are_the_bytes_of_the_loaded_model
    estimates = {"rollout": persistent + plan.rollout, "policy": persistent + plan.policy}
    for phase, estimate in estimates.items():
        assert abs(estimate / measured[phase] - 1) < 0.15, (phase, estimate / 2**20, measured[phase] / 2**20)
    assert abs(plan.total / max(measured["rollout"], measured["policy"]) - 1) < 0.15


LLAMA_8B = model_shape(llama_3_1_8b_config())
# The 12 GB run: 8 questions x 8 samples x 256 new tokens, LoRA r16 on every linear layer, bf16.
LLAMA_8B_RUN = RunSettings(dtype="bfloat16", device="cuda", rows=64, samples_per_prompt=8, prompt_tokens=128,
                           max_new_tokens=256, micro_batch_size=8, lora_r=16, lora_targets="all-linear")


def test_llama_8b_in_bf16_does_not_fit_12_gb_and_the_advice_does():
    plan = MemoryPlan("llama-3.1-8b", LLAMA_8B, LLAMA_8B_RUN)
    assert 14.9 < plan.weights / GB < 15.0  # 8.03B parameters in bf16: the 16.1 GB (10^9 bytes)
    assert not plan.fits(12)
    advice = plan.advice(12)
    assert advice and advice[0].startswith("QUANT=nf4 and GRADIENT_CHECKPOINTING=true")  # neither fits alone
    fitted = plan.with_settings(quant="nf4", gradient_checkpointing=True)
    if "MICRO_BATCH_SIZE=" in advice[0]:
        size = int(advice[0].split("MICRO_BATCH_SIZE=")[1].split()[0])
        assert fitted.with_settings(micro_batch_size=size).fits(12)
        assert not fitted.with_settings(micro_batch_size=size + 1).fits(12)
    else:
        assert fitted.fits(12)
    with pytest.raises(MemoryPlanError, match=r"^the run needs about \d+\.\d GB and 12\.0 GB are free .* would fit "
                                              r"with: QUANT=nf4 and GRADIENT_CHECKPOINTING=true"):
        check_fits(plan, 12)
    check_fits(plan, None)  # no GPU to compare with: nothing refused


def test_each_setting_advised_alone_fits_and_is_the_largest():
    plan = MemoryPlan("llama-3.1-8b", LLAMA_8B, LLAMA_8B_RUN).with_settings(quant="nf4", eval_rows=64)
    gpu_gb = 16
    advice = plan.advice(gpu_gb)
    assert advice, "the plan is meant not to fit as it is"
    fields = {"GENERATION_BATCH_SIZE": "rows", "MICRO_BATCH_SIZE": "micro_batch_size", "EVAL_BATCH_SIZE": "eval_rows"}
    for item in advice:
        setting = item.split(" (")[0]
        name, value = setting.split("=")
        if name in fields:
            size = int(value)
            assert plan.with_settings(**{fields[name]: size}).fits(gpu_gb)
            assert not plan.with_settings(**{fields[name]: size + 1}).fits(gpu_gb)
        else:
            assert setting == "GRADIENT_CHECKPOINTING=true"
            assert plan.with_settings(gradient_checkpointing=True).fits(gpu_gb)


def test_generation_batch_auto_is_the_largest_chunk_of_rows_that_fits():
    plan = MemoryPlan("llama-3.1-8b", LLAMA_8B, LLAMA_8B_RUN).with_settings(
        quant="nf4", gradient_checkpointing=True, micro_batch_size=4, rows=256, max_new_tokens=512)
    gpu_gb = 14
    by_hand = max(rows for rows in range(1, 257) if plan.with_settings(rows=rows).fits(gpu_gb))
    assert 1 < by_hand < 256
    assert largest_generation_batch(plan, gpu_gb) == by_hand
    assert largest_generation_batch(plan, 4) == 0  # the weights alone do not fit


def test_unknown_architectures_and_settings_are_refused():
    with pytest.raises(ValueError, match="the memory plan knows the layers of .*, not 'gpt2'"):
        model_shape(AutoConfig.for_model("gpt2"))
    with pytest.raises(ValueError, match="unknown quant 'int8'"):
        RunSettings(quant="int8")
    with pytest.raises(ValueError, match="LoRA targets c_attn are not linear layers of llama"):
        MemoryPlan("m", LLAMA_8B, RunSettings(lora_targets=("c_attn",))).lora_state


def test_plan_memory_reads_config_json_alone_and_names_what_would_fit(tmp_path):
    llama_3_1_8b_config().save_pretrained(tmp_path)  # config.json only: no weights, no tokenizer
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
    common = [f"--MODEL_PATH={tmp_path}", "--DEVICE=cuda", "--GPU_MEMORY_GB=12", "--PROMPTS_PER_STEP=8",
              "--PROMPT_TOKENS=128", "--EVAL_BATCH_SIZE=0"]
    refused = run_script(["plan_memory.py", *common, "--MICRO_BATCH_SIZE=8", "--GRADIENT_CHECKPOINTING=false",
                          "--GENERATION_BATCH_SIZE=0"], check=False)
    assert refused.returncode == 1
    assert "weights (bfloat16)" in refused.stdout and "does NOT fit" in refused.stdout
    assert refused.stderr.strip().startswith("error: the run needs about")
    assert "QUANT=nf4 and GRADIENT_CHECKPOINTING=true" in refused.stderr
    fits = run_script(["plan_memory.py", *common, "--QUANT=nf4", "--GRADIENT_CHECKPOINTING=true",
                       "--MICRO_BATCH_SIZE=4", "--GENERATION_BATCH_SIZE=auto"])
    assert "weights (4-bit NF4 linears, the rest in bfloat16)" in fits.stdout
    assert "does not fit beside the policy pass" not in fits.stdout  # 12 GB hold the static KV through it
    assert verdict(fits.stdout).endswith("fits")
    # In 11.5 GB, 64 rows fit once the static KV is freed before the policy pass (the graph pool stays reserved).
    fits = run_script(["plan_memory.py", *common, "--GPU_MEMORY_GB=11.5", "--QUANT=nf4",
                       "--GRADIENT_CHECKPOINTING=true", "--MICRO_BATCH_SIZE=4", "--GENERATION_BATCH_SIZE=auto"])
    assert "the static KV cache (3.0 GB) does not fit beside the policy pass in 11.5 GB" in fits.stdout
    assert "auto for 11.5 GB: GENERATION_BATCH_SIZE=64 (the step's 64 rows in 1 chunk)" in fits.stdout
    assert verdict(fits.stdout).endswith("fits")


def verdict(stdout: str) -> str:
    """The plan's line saying whether it fits the GPU."""
    return next(line for line in stdout.splitlines() if line.lstrip().startswith("GPU:"))


# ------------------------------------------------------------------ the trainers' plans

def dpo_pairs(path, count: int):
    """``count`` preference pairs written as make_dpo_pairs.py writes them."""
    problems = [json.loads(line) for line in open("data/synth_train.jsonl").read().splitlines()[:count]]
    path.write_text("".join(json.dumps({"question": p["question"], "chosen": f"Answer: {p['gold_answer']}",
                                        "rejected": "Answer: 0"}) + "\n" for p in problems))
    return path


def trainer_run(script: str, model_dir, tmp_path) -> list[str]:
    """A one-step run of ``script`` on ``model_dir``, small settings, its files in ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    folders = [f"--LOG_DIR={tmp_path}", "--MAX_STEPS=1", "--DEVICE=cpu", "--EVAL_EVERY=0", "--LORA_R=2"]
    if script == "run_sft.py":
        return [script, f"--MODEL_PATH={model_dir}", f"--OUT_DIR={tmp_path / 'sft'}", "--BATCH_SIZE=2", *folders]
    folders.append(f"--CHECKPOINT_DIR={tmp_path}")
    if script == "run_train_dpo.py":
        return [script, f"--MODEL_PATH={model_dir}", f"--TRAIN_FILE={dpo_pairs(tmp_path / 'pairs.jsonl', 4)}",
                "--BATCH_SIZE=2", "--MICRO_BATCH_SIZE=1", *folders]
    return [script, f"--MODEL_PATH={model_dir}", "--TRAIN_FILE=data/synth_train.jsonl", "--NUM_PROMPTS=4",
            "--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=2", "--MAX_NEW_TOKENS=4", *folders]


@pytest.mark.parametrize("script", ["run_train_grpo.py", "run_train_ppo.py", "run_train_dpo.py", "run_sft.py"])
def test_every_trainer_prints_its_plan_and_refuses_a_run_that_will_not_fit_before_loading(
        script, micro_model_dir, tmp_path):
    result = run_script([*trainer_run(script, micro_model_dir, tmp_path), "--GPU_MEMORY_GB=0.00001"], check=False)
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"memory plan of {micro_model_dir}" in result.stdout and "does NOT fit" in result.stdout
    assert result.stderr.strip().startswith("error: the run needs about"), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Loading weights" not in result.stderr  # refused before the weights load
    assert run_script(trainer_run(script, micro_model_dir, tmp_path / "fits") + ["--GPU_MEMORY_GB=1"]).returncode == 0


def test_a_refused_run_fits_with_each_setting_it_names(tmp_path):
    """The advice of a refused GRPO run, each item applied alone: the run is then planned to fit, and runs."""
    run = trainer_run("run_train_grpo.py", "models/tiny-gemma2-math", tmp_path) + [
        "--MAX_NEW_TOKENS=32", "--NUM_SAMPLES_PER_PROMPT=4", "--MICRO_BATCH_SIZE=8", "--LORA_R=16",
        "--GRADIENT_CHECKPOINTING=false", "--GENERATION_BATCH_SIZE=0"]  # sizes of its own: auto would fit
    table = run_script([*run, "--GPU_MEMORY_GB=0.00001", "--RUN_NAME=table"], check=False).stdout  # refused, cheap
    total_gb = float(next(line for line in table.splitlines() if line.lstrip().startswith("total:")).split()[-2])
    gpu = f"--GPU_MEMORY_GB={total_gb}"  # the total itself: 10% short of the allocator's headroom
    refused = run_script([*run, gpu, "--RUN_NAME=refused"], check=False)
    assert refused.returncode == 1 and "Loading weights" not in refused.stderr
    advice = refused.stderr.split("it would fit with: ")[1].split(" (an estimate")[0].split("; ")
    settings = [item.split(" (")[0] for item in advice]
    assert "GRADIENT_CHECKPOINTING=true" in settings and any(s.startswith("MICRO_BATCH_SIZE=") for s in settings)
    for number, setting in enumerate(settings):
        if setting.startswith("QUANT"):
            continue  # a 4-bit tiny model: tests/test_quant.py
        fits = run_script([*run, gpu, f"--{setting}", f"--RUN_NAME=fix{number}"])
        assert "does NOT fit" not in fits.stdout and "step 1/1" in fits.stdout


def test_generation_batch_size_auto_samples_the_most_rows_that_fit(tmp_path):
    """With checkpointing the rollout is the peak: auto samples the step's rows in chunks, the largest the
    plan fits, found by a search over the plan made here with the same settings."""
    from common.model import load_tokenizer
    from common.prompts import configure_prompts, encode_prompts

    tokenizer = load_tokenizer("models/tiny-gemma2-math")
    questions = [json.loads(line) for line in open("data/synth_train.jsonl").read().splitlines()[:8]]
    longest = max(len(ids) for ids in encode_prompts(tokenizer, questions, configure_prompts(tokenizer)))
    plan = plan_memory("models/tiny-gemma2-math", dtype=torch.float32, device="cpu", rows=64, samples_per_prompt=8,
                       prompt_tokens=longest, max_new_tokens=256, micro_batch_size=1, lora_r=2,
                       lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                       gradient_checkpointing=True, logprob_chunk_size=1024, sampler="auto")
    assert plan.rollout > plan.policy
    gpu_gb = (plan.weights + plan.lora_state + (plan.rollout + plan.policy) / 2) / GB / 0.9
    chunk = max(rows for rows in range(1, 65) if plan.with_settings(rows=rows).fits(gpu_gb))
    assert 1 < chunk < 64
    result = run_script([*trainer_run("run_train_grpo.py", "models/tiny-gemma2-math", tmp_path), "--NUM_PROMPTS=8",
                         "--PROMPTS_PER_STEP=8", "--NUM_SAMPLES_PER_PROMPT=8", "--MAX_NEW_TOKENS=256",
                         "--MICRO_BATCH_SIZE=1", "--GRADIENT_CHECKPOINTING=true", f"--GPU_MEMORY_GB={gpu_gb}"])
    even = -(-64 // -(-64 // chunk))  # the step's rows in equal chunks
    assert f"GENERATION_BATCH_SIZE={even} (the step's 64 rows in {-(-64 // chunk)} chunks)" in result.stdout
    assert "step 1/1" in result.stdout


def gemma_2_2b_shape():
    """Gemma 2 2B's shape, from its configuration (bench/bench_gpu.py's GEMMA2_2B; importing that script
    would run it)."""
    from transformers import Gemma2Config

    return model_shape(Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                    num_attention_heads=8, num_key_value_heads=4, head_dim=256))


def test_the_graph_pool_and_the_static_kv_are_counted_through_the_policy_pass():
    """Gemma 2 2B, 128 rows x (200 -> 256 bucketed + 256 new - 1 = 511 slots): the static KV (26 layers x 4
    KV heads x 256 x 2 x bf16) stays through the policy pass on the static paths; the compiled path's graph
    pool (the [128, 256000] logits in bf16 and fp32, and one layer's K, V repeated to 8 heads) too;
    neither on the eager path."""
    shape = gemma_2_2b_shape()
    settings = dict(dtype="bfloat16", rows=128, samples_per_prompt=8, prompt_tokens=200, max_new_tokens=256,
                    micro_batch_size=16, device="cuda")
    compiled, static, eager = (MemoryPlan("gemma-2-2b", shape, RunSettings(sampler=sampler, **settings))
                               for sampler in ("compiled", "static", "eager"))
    kv = 128 * 511 * 26 * 4 * 256 * 2 * 2
    pool = 128 * 256000 * (2 + 4)  # the sampler's grouped-query decode attention repeats no K/V for Gemma 2
    assert compiled.kv_cache == static.kv_cache == kv  # 6.5 GiB
    assert compiled.graph_pool == pool and 0.15 * GB < pool < 0.2 * GB
    phi3 = dataclasses.replace(shape, model_type="phi3")  # an architecture whose decode attention repeats them
    assert (MemoryPlan("phi3", phi3, RunSettings(sampler="compiled", **settings)).graph_pool
            == pool + 128 * 8 * 511 * 256 * 2 * 2)
    assert static.graph_pool == eager.graph_pool == 0
    policy_alone = policy_bytes(shape, eager.settings, False)
    assert compiled.policy == policy_alone + kv + pool
    assert static.policy == policy_alone + kv and eager.policy == policy_alone
    auto = MemoryPlan("gemma-2-2b", shape, RunSettings(sampler="auto", **settings))
    assert auto.graph_pool == pool  # auto compiles on CUDA
    assert "CUDA-graph pool" in compiled.table() and "CUDA-graph pool" not in eager.table()
    released = compiled.with_settings(release_static_kv=True)
    # The KV is freed, and the step compiled without CUDA graphs (issue 29, finding 9): no pool either.
    assert released.graph_pool == 0 and released.policy == policy_alone
    assert auto.with_settings(release_static_kv=True).graph_pool == 0


def test_auto_counts_no_graph_pool_on_a_card_without_triton(monkeypatch):
    """On CUDA without Triton for the card (Windows; compute capability below 7.0) auto samples on the
    static path uncompiled: its KV is counted, no graph pool (issue 29, finding 14); compiled still is."""
    import torch.utils._triton

    shape = gemma_2_2b_shape()
    settings = dict(dtype="bfloat16", rows=128, samples_per_prompt=8, prompt_tokens=200, max_new_tokens=256,
                    micro_batch_size=16, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    auto, static, compiled = (MemoryPlan("gemma-2-2b", shape, RunSettings(sampler=sampler, **settings))
                              for sampler in ("auto", "static", "compiled"))
    assert auto.graph_pool == 0 and auto.policy == static.policy and auto.kv_cache == static.kv_cache > 0
    assert compiled.graph_pool > 0
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert MemoryPlan("gemma-2-2b", shape, RunSettings(sampler="auto", **settings)).graph_pool == compiled.graph_pool


def test_the_static_kv_is_released_only_when_it_is_what_does_not_fit():
    shape = gemma_2_2b_shape()
    plan = MemoryPlan("gemma-2-2b", shape, RunSettings(dtype="bfloat16", rows=128, samples_per_prompt=8,
                                                       prompt_tokens=200, max_new_tokens=256, micro_batch_size=16,
                                                       sampler="compiled", gradient_checkpointing=True))
    released = plan.with_settings(release_static_kv=True)
    assert released.total < plan.total and plan.policy > plan.rollout  # the kept KV makes the policy pass the peak
    between = (released.total_gb + plan.total_gb) / 2 / (1 - ALLOCATOR_HEADROOM)
    assert not plan.fits(between) and released.fits(between)
    assert plan.release_static_kv_advice(between) == released
    assert plan.release_static_kv_advice(plan.total_gb / (1 - ALLOCATOR_HEADROOM) + 0.1) is None  # it fits as it is
    assert plan.release_static_kv_advice(released.total_gb * 0.5) is None  # freeing it is not enough
    assert plan.with_settings(sampler="eager").release_static_kv_advice(between) is None  # no static KV to free


def test_release_static_cache_frees_the_sampler_buffers_and_the_next_call_allocates_them_again(micro_model_dir):
    from common.model import load_model, load_tokenizer
    from common.sampler import _KV_STORAGE, SamplingParams, release_static_cache, sample

    model = load_model(micro_model_dir, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(micro_model_dir)
    prompts = [tokenizer("2 + 2 =").input_ids, tokenizer("3 + 4 =").input_ids]

    def draw():
        return sample(model, prompts, SamplingParams(num_samples=2, max_new_tokens=5, sampler="static",
                                                     generator=torch.Generator().manual_seed(0)), tokenizer=tokenizer)

    first = draw()
    expected = sum(keys.numel() * 4 + values.numel() * 4 for keys, values in _KV_STORAGE[model].flat)
    assert release_static_cache(model) == expected > 0 and model not in _KV_STORAGE
    assert release_static_cache(model) == 0
    second = draw()
    assert model in _KV_STORAGE and torch.equal(first.completion_ids, second.completion_ids)  # the same tokens from new buffers


def packed_saved_bytes(model, sequences, completion, pack_length) -> tuple[int, tuple]:
    """Bytes autograd saves in the policy pass of ``sequences`` packed into rows of ``pack_length``
    (frozen weights aside), and the layout's shape."""
    layout = pass_layout(sequences, [completion] * len(sequences), completion, pack_length, True, 0)
    frozen = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved, kept = {}, []

    def pack(tensor):
        kept.append(tensor)
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layout_logprobs(model, layout, 1.0, chunk_size=7, with_entropy=True)
    return sum(saved.values()), tuple(layout.input_ids.shape)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])  # eager and sdpa attention
@pytest.mark.parametrize("pack_length", [20, 60])  # a sequence per row, or the three in one row
def test_saved_activations_of_packed_rows_are_what_autograd_saves(arch, pack_length):
    """Three sequences of 20 tokens packed (common/packing.py): the plan counts its rows of
    PACK_LENGTH tokens, attention at the row's length, and the head on the completions alone.

    In rows of one sequence each the third is one token short, as a step's lengths differ: its row
    ends in a pad, so transformers builds the block mask that sdpa saves and the plan counts. Rows
    that every sequence fills exactly leave transformers no mask to build: sdpa then saves less, and
    the plan is an upper bound."""
    config = small_config(arch, 2)
    model = model_of(config)
    apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    model.train()
    rows, prompt, completion = 3, 8, 12
    sequences = [torch.randint(3, config.vocab_size, (prompt + completion,), generator=torch.Generator().manual_seed(i))
                 for i in range(rows)]
    settings = RunSettings(dtype="float32", device="cpu", micro_batch_size=rows, prompt_tokens=prompt,
                           max_new_tokens=completion, lora_r=4, lora_targets="all-linear",
                           pack_length=0 if pack_length == 20 else pack_length)
    planned = activation_bytes(model_shape(config), settings, checkpointing=False)
    ragged = sequences[:2] + [sequences[2][1:]] if pack_length == 20 else sequences
    saved, shape = packed_saved_bytes(model, ragged, completion, pack_length)
    assert shape == (rows * 20 // pack_length, pack_length) == (settings.policy_rows, settings.policy_row_length)
    assert planned == saved
    if pack_length == 20:
        exact, _ = packed_saved_bytes(model, sequences, completion, pack_length)
        assert exact == saved if arch == "gemma2" else exact < saved  # eager keeps its scores either way


def test_a_token_budget_is_planned_as_its_tokens():
    shape = model_shape(small_config("llama", 2))
    by_rows = RunSettings(device="cpu", micro_batch_size=4, prompt_tokens=30, max_new_tokens=70)
    by_tokens = RunSettings(device="cpu", micro_batch_size=16, micro_batch_tokens=400, prompt_tokens=30,
                            max_new_tokens=70)
    assert (by_tokens.policy_rows, by_tokens.policy_head_positions) == (4, 4 * 70)
    assert activation_bytes(shape, by_tokens, False) == activation_bytes(shape, by_rows, False)
    too_small = RunSettings(device="cpu", micro_batch_tokens=10, prompt_tokens=30, max_new_tokens=70)
    assert too_small.policy_rows == 1 and too_small.policy_tokens == 100  # a longer sequence goes alone


def test_gpu_memory_gb_12_is_the_whole_of_a_12_gb_card():
    """A "12 GB" card (an RTX 3060: 11.7 GiB as torch counts it) takes GPU_MEMORY_GB=12 as the whole card,
    not as more than it has (issue 29, finding 6; bench/bench_gpu.py caps its parts with it); 13 is refused."""
    from common.memory_plan import memory_cap_gb

    card = int(11.7 * GB)
    assert memory_cap_gb(12, card) == pytest.approx(11.7) and memory_cap_gb(8, card) == 8
    with pytest.raises(MemoryPlanError, match=r"^GPU_MEMORY_GB=13 is more than the GPU's 11\.7 GB \(12\.6 GB of 10\^9"):
        memory_cap_gb(13, card)

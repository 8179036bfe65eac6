"""MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, GENERATION_BATCH_SIZE and EVAL_BATCH_SIZE at auto
(common.memory_plan.choose_sizes): the defaults fit the users' cards, the choice is the cost model's best
among every combination that fits, a CPU run keeps the sizes from before auto, and plan_memory.py and a
trainer choose alike."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, Gemma2Config

from common.memory_plan import (MemoryPlan, MemoryPlanError, RunSettings, Sizes, check_fits, choose_sizes,
                                llama_3_1_8b_config, model_shape, plan_memory, policy_cost)
from common.model import load_tokenizer
from common.prompts import configure_prompts, encode_prompts
from tests.conftest import REPO_ROOT, run_script

AUTO = Sizes("auto", "auto", "auto", "auto")
GRPO_BEFORE_AUTO = Sizes(16, False, 0, 64)  # run_train_grpo.py's sizes off a GPU


def gemma_2_2b_config():
    """Gemma 2 2B Instruct's config.json, from its public values (bench/bench_gpu.py's GEMMA2_2B)."""
    return Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
                        tie_word_embeddings=True)


def grpo_plan(config, quant: str) -> MemoryPlan:
    """plan_memory.py's plan at the GRPO defaults on a CUDA card: 16 questions x 8 samples, 256 + 256 tokens."""
    return MemoryPlan("model", model_shape(config), RunSettings(
        quant=quant, dtype="bfloat16", device="cuda", rows=128, samples_per_prompt=8, prompt_tokens=256,
        max_new_tokens=256, lora_r=16))


@pytest.mark.parametrize("model, config, quant, gpu_gb", [
    ("gemma-2-2b-it", gemma_2_2b_config, "none", 22.5), ("llama-3.1-8b", llama_3_1_8b_config, "nf4", 11.2)])
def test_plan_memory_fits_the_defaults_on_the_users_cards(model, config, quant, gpu_gb, tmp_path):
    config().save_pretrained(tmp_path)  # config.json alone, as the Hub gives it
    result = run_script(["plan_memory.py", f"--MODEL_PATH={tmp_path}", "--DEVICE=cuda", f"--QUANT={quant}",
                         f"--GPU_MEMORY_GB={gpu_gb}"])
    verdict = next(line for line in result.stdout.splitlines() if line.lstrip().startswith("GPU:"))
    assert verdict.endswith("fits") and "NOT" not in verdict
    choice = [line for line in result.stdout.splitlines() if line.startswith("auto for")]
    assert len(choice) == 1 and choice[0].startswith(f"auto for {gpu_gb} GB: MICRO_BATCH_SIZE=")
    _, sizes, line = choose_sizes(grpo_plan(config(), quant), AUTO, GRPO_BEFORE_AUTO, gpu_gb)
    assert line.splitlines()[0] == choice[0]  # the script's choice is the function's


@pytest.mark.parametrize("config, quant, gpu_gb", [
    (gemma_2_2b_config, "none", 22.5), (gemma_2_2b_config, "none", 11.2), (llama_3_1_8b_config, "nf4", 11.2),
    (llama_3_1_8b_config, "nf4", 22.5)])
def test_the_choice_is_the_cost_models_best_of_every_combination_that_fits(config, quant, gpu_gb):
    """A search by hand over every combination of checkpointing, freeing the static KV, micro-batch (1-16),
    rollout chunks (1-128 rows, split evenly) and eval batch (1-64): none that fits beats the choice by
    the order choose_sizes states (fewest chunks, cheapest policy pass, KV kept, largest eval batch)."""
    base = grpo_plan(config(), quant)
    plan, sizes, _ = choose_sizes(base, AUTO, GRPO_BEFORE_AUTO, gpu_gb)
    assert plan.fits(gpu_gb)
    chosen_chunks = -(-128 // plan.settings.rows)
    chosen = (chosen_chunks, policy_cost(plan.settings), sizes.release_static_kv, -sizes.eval_batch_size)
    for checkpointing in (False, True):
        for release in (False, True):
            for chunks in range(1, chosen_chunks + 1):
                rows = -(-128 // chunks)
                for micro in range(1, 17):
                    candidate = base.with_settings(gradient_checkpointing=checkpointing, release_static_kv=release,
                                                   rows=rows, micro_batch_size=micro, eval_rows=1)
                    if candidate.fits(gpu_gb):
                        eval_rows = candidate.with_settings(eval_rows=64)._largest("eval_rows", gpu_gb)
                        assert (chunks, policy_cost(candidate.settings), release, -eval_rows) >= chosen
    assert sizes.micro_batch_size <= 16 and sizes.eval_batch_size <= 64


def test_a_run_that_fits_at_the_sizes_before_auto_keeps_them():
    plan, sizes, line = choose_sizes(grpo_plan(gemma_2_2b_config(), "none"), AUTO, GRPO_BEFORE_AUTO, 80)
    assert sizes == GRPO_BEFORE_AUTO and plan.total_gb < 80 * 0.9
    assert line == ("auto for 80.0 GB: MICRO_BATCH_SIZE=16, GRADIENT_CHECKPOINTING=false, "
                    "GENERATION_BATCH_SIZE=128 (the step's 128 rows in 1 chunk), EVAL_BATCH_SIZE=64")


def test_sizes_given_are_kept_and_only_auto_ones_chosen():
    requested = Sizes(2, "auto", 0, 8)
    plan, sizes, line = choose_sizes(grpo_plan(gemma_2_2b_config(), "none"), requested, GRPO_BEFORE_AUTO, 22.5)
    assert (sizes.micro_batch_size, sizes.generation_batch_size, sizes.eval_batch_size) == (2, 0, 8)
    assert plan.settings.micro_batch_size == 2 and plan.settings.rows == 128 and plan.settings.eval_rows == 8
    assert line.splitlines()[0] == f"auto for 22.5 GB: GRADIENT_CHECKPOINTING={str(sizes.gradient_checkpointing).lower()}"


def test_without_gpu_memory_auto_is_the_sizes_from_before_auto():
    """A CPU run (no GPU memory to plan for) samples, trains and evaluates as before auto: the demos'
    results do not move."""
    plan, sizes, line = choose_sizes(grpo_plan(gemma_2_2b_config(), "none"), AUTO, GRPO_BEFORE_AUTO, None)
    assert sizes == GRPO_BEFORE_AUTO
    assert (plan.settings.micro_batch_size, plan.settings.gradient_checkpointing, plan.settings.rows,
            plan.settings.eval_rows) == (16, False, 128, 64)
    assert line.startswith("auto without GPU memory to fit")
    dpo = dataclasses.replace(grpo_plan(gemma_2_2b_config(), "none"), settings=RunSettings(rows=0))
    plan, sizes, _ = choose_sizes(dpo, Sizes("auto", "auto", 0, "auto"), Sizes(4, False, 0, 64), None,
                                  micro_batch_scale=2, evaluates=False)
    assert sizes == Sizes(4, False, 0, 64) and plan.settings.micro_batch_size == 8 and plan.settings.eval_rows == 0


def test_an_architecture_without_a_plan_resolves_auto_to_the_sizes_from_before_auto(tmp_path, capsys):
    from common.run_setup import check_memory

    AutoConfig.for_model("gpt2").save_pretrained(tmp_path)
    sizes = check_memory(tmp_path, torch.device("cpu"), 1.0, AUTO, GRPO_BEFORE_AUTO, rows=32, dtype="auto")
    assert sizes == GRPO_BEFORE_AUTO
    out = capsys.readouterr().out
    assert "no memory plan:" in out and "auto without a memory plan: MICRO_BATCH_SIZE=16" in out


def test_when_nothing_fits_without_it_the_refusal_names_quant_nf4_first():
    plan, sizes, line = choose_sizes(grpo_plan(llama_3_1_8b_config(), "none"), AUTO, GRPO_BEFORE_AUTO, 11.2)
    assert sizes == Sizes(1, True, 1, 1) and not plan.fits(11.2)  # the smallest run, refused
    assert line.startswith("auto cannot fit 11.2 GB, even at the smallest (the plan above): MICRO_BATCH_SIZE=1, "
                           "GRADIENT_CHECKPOINTING=true, GENERATION_BATCH_SIZE=1 (the step's 128 rows in 128 chunks)")
    with pytest.raises(MemoryPlanError, match=r"it would fit with: QUANT=nf4 "):
        check_fits(plan, 11.2)


def test_plan_memory_and_the_trainer_make_the_same_choice(micro_model_dir, tmp_path):
    """In a memory where the sizes from before auto do not fit, run_train_grpo.py and plan_memory.py, given
    the same settings (and the trainer's longest prompt), print the same choice, and the trainer runs with it."""
    tokenizer = load_tokenizer(micro_model_dir)
    questions = [json.loads(line) for line in (REPO_ROOT / "data/synth_train.jsonl").read_text().splitlines()[:4]]
    longest = max(len(ids) for ids in encode_prompts(tokenizer, questions, configure_prompts(tokenizer)))
    settings = ["--PROMPTS_PER_STEP=2", "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=32", "--LORA_R=2",
                "--DEVICE=cpu"]
    base = plan_memory(micro_model_dir, dtype=torch.float32, device="cpu", rows=8, samples_per_prompt=4,
                       prompt_tokens=longest, max_new_tokens=32, lora_r=2,
                       lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    smallest, before_auto = (choose_sizes(base, sizes, sizes, 1e6, evaluates=False)[0]
                             for sizes in (Sizes(1, True, 1, 1), GRPO_BEFORE_AUTO))
    gpu = f"--GPU_MEMORY_GB={(smallest.total_gb + before_auto.total_gb) / 2 / 0.9:.6f}"
    trainer = run_script(["run_train_grpo.py", f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                          "--NUM_PROMPTS=4", "--EVAL_EVERY=0", "--MAX_STEPS=1", f"--CHECKPOINT_DIR={tmp_path}",
                          f"--LOG_DIR={tmp_path}", gpu, *settings])
    planner = run_script(["plan_memory.py", f"--MODEL_PATH={micro_model_dir}", "--EVAL_BATCH_SIZE=0", gpu,
                          f"--PROMPT_TOKENS={longest}", *settings])
    choices = [[line for line in result.stdout.splitlines() if line.startswith("auto for")]
               for result in (trainer, planner)]
    assert len(choices[0]) == 1 and choices[0] == choices[1]
    assert "MICRO_BATCH_SIZE=16," not in choices[0][0] or "GRADIENT_CHECKPOINTING=true" in choices[0][0]
    assert "step 1/1" in trainer.stdout

"""Model soups: the maths of common/soup.py against merged weights and hand-worked algebra,
the refusals, and model_soup.py end to end (eval_math.py, export_lora.py, further training)."""

import json

import pytest
import torch

from common.checkpoint import (CheckpointError, load_checkpoint, load_lora_checkpoint, model_fingerprint,
                               restore_lora, save_checkpoint)
from common.data import load_problems
from common.lora import apply_lora, lora_config, lora_modules, lora_parameters, lora_state_dict, merge_lora
from common.model import load_model_and_tokenizer
from common.peft_io import read_peft_adapter, save_peft_adapter
from common.soup import (check_ingredients, delta_soup, factor_soup, lora_scaling, normalise_weights,
                         soup_lora)
from common.synth import make_problems, normalise_question
from tests.conftest import REPO_ROOT, TINY_MODEL_DIR, micro_model, run_script

TARGETS = ("q_proj", "v_proj")


def randomise_lora(model, seed: int) -> None:
    """Random A and non-zero B, so that every ingredient has an update of its own."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator))
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


def ingredient(seed: int, r: int = 4, alpha: float = 8.0, targets=TARGETS, use_rslora: bool = False,
               base_path: str = "models/micro", **model_overrides) -> dict:
    """A checkpoint dict (the keys the soup reads) of a LoRA on the seed-0 micro model."""
    model = micro_model(**model_overrides)
    apply_lora(model, r, alpha, targets, use_rslora=use_rslora)
    randomise_lora(model, seed)
    return {"lora": lora_state_dict(model), "lora_config": lora_config(model),
            "base_model": {"path": base_path, "fingerprint": model_fingerprint(model)}}


def merged_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Base weight + the checkpoint's update, per LoRA layer, as the model computes it."""
    model = micro_model()
    restore_lora(model, checkpoint)
    merge_lora(model)
    return {name: module.base.weight.detach().double() for name, module in lora_modules(model).items()}


def updates(state: dict, scaling: float) -> dict[str, torch.Tensor]:
    """ΔW = s · B · A per layer, in float64."""
    return {key.removesuffix(".lora_A"): scaling * state[key.replace("lora_A", "lora_B")].double()
            @ state[key].double() for key in state if key.endswith(".lora_A")}


def test_delta_soup_stacks_along_the_rank_with_the_weights_folded_into_b():
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])  # rank 1, scaling 2
    a2, b2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # rank 2, scaling 1
    states = [{"l.lora_A": a1, "l.lora_B": b1}, {"l.lora_A": a2, "l.lora_B": b2}]
    soup = delta_soup(states, [0.25, 0.75], [2.0, 1.0], scaling_out=0.5)
    assert torch.equal(soup["l.lora_A"], torch.cat([a1, a2]))
    # Each B_i is scaled by w_i times s_i over the soup's scaling: 0.25 x 2 / 0.5 = 1, 0.75 x 1 / 0.5 = 1.5.
    assert torch.equal(soup["l.lora_B"], torch.cat([b1, 1.5 * b2], dim=1))
    expected = 0.25 * 2.0 * b1 @ a1 + 0.75 * 1.0 * b2 @ a2
    torch.testing.assert_close(0.5 * soup["l.lora_B"] @ soup["l.lora_A"], expected, rtol=0, atol=1e-6)


def test_factor_soup_is_the_weighted_mean_of_each_factor():
    states = [{"l.lora_A": torch.tensor([[1.0, 3.0]])}, {"l.lora_A": torch.tensor([[5.0, -1.0]])}]
    assert torch.equal(factor_soup(states, [0.75, 0.25])["l.lora_A"], torch.tensor([[2.0, 2.0]]))


def test_delta_soup_merged_weights_are_the_weighted_mean_of_the_ingredients():
    # Different ranks, alphas and scaling conventions: delta soups them exactly all the same.
    checkpoints = [ingredient(1, r=2, alpha=4.0), ingredient(2, r=4, alpha=16.0),
                   ingredient(3, r=3, alpha=6.0, use_rslora=True)]
    weights = normalise_weights([1.0, 2.0, 5.0], 3)
    state, config = soup_lora(checkpoints, weights, "delta")
    assert config["r"] == 9 and config["alpha"] == 4.0 and config["use_rslora"] is False
    soup = merged_weights({**checkpoints[0], "lora": state, "lora_config": config})
    ingredients = [merged_weights(checkpoint) for checkpoint in checkpoints]
    for name, weight in soup.items():
        mean = sum(w * merged[name] for w, merged in zip(weights, ingredients))
        assert (weight - mean).abs().max() < 1e-6, name
        assert (weight - ingredients[0][name]).abs().max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("average", ["delta", "factors"])
def test_a_soup_of_one_is_that_ingredient(average):
    checkpoint = ingredient(1, use_rslora=True)
    state, config = soup_lora([checkpoint], [1.0], average)
    assert config == checkpoint["lora_config"]
    assert state.keys() == checkpoint["lora"].keys()
    assert all(torch.equal(state[key], checkpoint["lora"][key]) for key in state)


def test_zero_weight_ingredients_are_left_out_of_the_soup():
    checkpoints = [ingredient(1), ingredient(2), ingredient(3)]
    state, config = soup_lora(checkpoints, [0.5, 0.0, 0.5], "delta")
    expected, _ = soup_lora([checkpoints[0], checkpoints[2]], [0.5, 0.5], "delta")
    assert config["r"] == 8 and all(torch.equal(state[key], expected[key]) for key in state)


def test_factors_differ_from_delta_by_the_covariance_of_the_factors():
    first, second = ingredient(1), ingredient(2)
    scaling = lora_scaling(first["lora_config"])
    delta_state, delta_config = soup_lora([first, second], [0.5, 0.5], "delta")
    factor_state, factor_config = soup_lora([first, second], [0.5, 0.5], "factors")
    assert (delta_config["r"], factor_config["r"]) == (8, 4)
    delta = updates(delta_state, lora_scaling(delta_config))
    factors = updates(factor_state, scaling)
    for layer in delta:
        (a1, b1), (a2, b2) = ((c["lora"][f"{layer}.lora_A"].double(), c["lora"][f"{layer}.lora_B"].double())
                              for c in (first, second))
        # (B1A1 + B2A2)/2 - (B1 + B2)(A1 + A2)/4 = (B1 - B2)(A1 - A2)/4
        expected = scaling / 4 * (b1 - b2) @ (a1 - a2)
        torch.testing.assert_close(delta[layer] - factors[layer], expected, rtol=0, atol=1e-6)
        assert expected.abs().max() > 1e-2  # the two averages really differ here


def test_factors_differ_from_delta_by_the_weighted_covariance_for_any_weights():
    checkpoints = [ingredient(seed) for seed in (1, 2, 3)]
    weights = [0.5, 0.3, 0.2]
    scaling = lora_scaling(checkpoints[0]["lora_config"])
    delta_state, delta_config = soup_lora(checkpoints, weights, "delta")
    factor_state, _ = soup_lora(checkpoints, weights, "factors")
    delta, factors = updates(delta_state, lora_scaling(delta_config)), updates(factor_state, scaling)
    for layer in delta:
        a = [c["lora"][f"{layer}.lora_A"].double() for c in checkpoints]
        b = [c["lora"][f"{layer}.lora_B"].double() for c in checkpoints]
        a_mean, b_mean = sum(w * x for w, x in zip(weights, a)), sum(w * x for w, x in zip(weights, b))
        # Σ w_i B_i A_i - B̄ Ā = Σ w_i (B_i - B̄)(A_i - Ā)
        covariance = sum(w * (b_i - b_mean) @ (a_i - a_mean) for w, a_i, b_i in zip(weights, a, b))
        torch.testing.assert_close(delta[layer] - factors[layer], scaling * covariance, rtol=0, atol=1e-6)


def test_weights_are_normalised_and_negative_ones_refused():
    assert normalise_weights([3.0, 1.0], 2) == [0.75, 0.25]
    with pytest.raises(ValueError, match=r"must be >= 0, got \[-1.0\]"):
        normalise_weights([2.0, -1.0], 2)
    with pytest.raises(ValueError, match="sum to 0"):
        normalise_weights([0.0, 0.0], 2)
    with pytest.raises(ValueError, match="3 weights for 2 checkpoints"):
        normalise_weights([1.0, 1.0, 1.0], 2)


@pytest.mark.parametrize("other, average, differences", [
    (dict(hidden_size=32), "delta", ["base model hidden_size: 32 here, 16 in a.pt"]),
    (dict(base_path="models/other"), "delta", ["base model path", "models/other"]),
    (dict(targets=("q_proj", "k_proj")), "delta", ["LoRA target_modules: ['k_proj', 'q_proj'] here"]),
    (dict(r=2), "factors", ["(AVERAGE=factors)", "LoRA r: 2 here, 4 in a.pt"]),
    (dict(alpha=4.0), "factors", ["LoRA alpha: 4.0 here, 8.0 in a.pt"]),
])
def test_mismatched_ingredients_are_refused_naming_what_differs(other, average, differences):
    with pytest.raises(CheckpointError, match="b.pt cannot be souped with a.pt") as caught:
        check_ingredients({"a.pt": ingredient(1), "b.pt": ingredient(2, **other)}, average)
    for difference in differences:
        assert difference in str(caught.value)


def test_a_missing_layer_is_refused_by_name():
    incomplete = ingredient(2)
    layer = "model.layers.1.self_attn.v_proj"
    del incomplete["lora"][f"{layer}.lora_A"], incomplete["lora"][f"{layer}.lora_B"]
    with pytest.raises(CheckpointError, match=f"missing layer: {layer} \\(present in a.pt\\)"):
        check_ingredients({"a.pt": ingredient(1), "b.pt": incomplete}, "delta")


def test_different_ranks_soup_with_delta_and_unknown_averages_are_refused():
    check_ingredients({"a.pt": ingredient(1, r=2), "b.pt": ingredient(2, r=4, alpha=3.0)}, "delta")
    with pytest.raises(ValueError, match="AVERAGE must be one of delta, factors"):
        check_ingredients({"a.pt": ingredient(1)}, "median")


def test_the_dev_split_is_disjoint_from_train_and_test_and_matches_the_generator():
    splits = {name: load_problems(REPO_ROOT / "data" / f"synth_{name}.jsonl") for name in ("train", "test", "dev")}
    questions = {name: {normalise_question(p["question"]) for p in problems} for name, problems in splits.items()}
    assert len(questions["dev"]) == 500
    assert not questions["dev"] & (questions["train"] | questions["test"])
    regenerated = make_problems(500, seed=2, exclude=questions["train"] | questions["test"])
    assert [p["question"] for p in regenerated] == [p["question"] for p in splits["dev"]]


# ------------------------------------------------------------------ model_soup.py end to end

@pytest.fixture(scope="module")
def ingredient_files(micro_model_dir, tmp_path_factory):
    """Three checkpoints of LoRAs on the micro model, as a trainer writes them."""
    directory = tmp_path_factory.mktemp("ingredients")
    paths = []
    for seed in (1, 2, 3):
        model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
        apply_lora(model, 4, 8.0, TARGETS)
        randomise_lora(model, seed)
        paths.append(save_checkpoint(directory / f"lora_epoch0_step{seed}.pt", model, micro_model_dir,
                                     config={"SEED": seed}, step=seed))
    return paths


def soup_script(ingredient_files, out, *settings):
    return run_script(["model_soup.py", f"--CKPTS={','.join(str(path) for path in ingredient_files)}",
                       "--DEV_LIMIT=3", "--TEST_LIMIT=3", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu", f"--OUT={out}",
                       *settings])


@pytest.fixture(scope="module")
def uniform_soup(ingredient_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("soup") / "uniform.pt"
    return out, soup_script(ingredient_files, out)


def test_model_soup_writes_the_delta_soup_and_its_table(uniform_soup, ingredient_files, micro_model_dir):
    out, result = uniform_soup
    checkpoint = load_checkpoint(out)
    expected, config = soup_lora([load_checkpoint(path) for path in ingredient_files], [1 / 3] * 3, "delta")
    assert checkpoint["lora_config"] == config and config["r"] == 12
    assert all(torch.equal(checkpoint["lora"][key], expected[key]) for key in expected)
    assert checkpoint["base_model"]["path"] == str(micro_model_dir) and checkpoint["step"] == 0
    assert checkpoint["extra"]["soup"]["weights"] == [1 / 3] * 3
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert [row["path"] for row in summary["ingredients"]] == [str(path) for path in ingredient_files]
    assert summary["soup"]["rank"] == 12 and summary["soup"]["test_accuracy"] is not None
    assert "soup (uniform, delta, r=12)" in result.stdout and "dev acc" in result.stdout


def test_model_soup_greedy_recipe_tries_each_further_ingredient(ingredient_files, tmp_path):
    out = tmp_path / "greedy.pt"
    result = soup_script(ingredient_files, out, "--RECIPE=greedy", "--AVERAGE=factors")
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    # The micro model scores 0 everywhere: every trial ties, and a tie is kept.
    assert [trial["kept"] for trial in summary["greedy_trials"]] == [True, True]
    assert [row["weight"] for row in summary["ingredients"]] == [1 / 3] * 3
    assert load_checkpoint(out)["lora_config"]["r"] == 4 and "soup (greedy, factors, r=4)" in result.stdout


def test_model_soup_refuses_mismatched_ingredients(ingredient_files, micro_model_dir, tmp_path):
    model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    apply_lora(model, 4, 8.0, ("q_proj", "k_proj"))
    other = save_checkpoint(tmp_path / "other.pt", model, micro_model_dir, config={})
    with pytest.raises(AssertionError, match="cannot be souped with") as caught:
        soup_script([ingredient_files[0], other], tmp_path / "soup.pt")
    assert "LoRA target_modules: ['k_proj', 'q_proj'] here, ['q_proj', 'v_proj']" in str(caught.value)
    with pytest.raises(AssertionError, match="goes with --RECIPE=weighted"):
        soup_script(ingredient_files, tmp_path / "soup.pt", "--WEIGHTS=1,2,3")


def test_the_soup_loads_in_eval_math(uniform_soup, micro_model_dir, tmp_path):
    out, _ = uniform_soup
    result = run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", f"--LORA_CKPT={out}",
                         "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=3", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu",
                         f"--OUT_FILE={tmp_path / 'eval.jsonl'}"])
    assert "loaded LoRA" in result.stdout and "Total: 3" in result.stdout


def test_the_soup_exports_to_peft(uniform_soup, micro_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    out, _ = uniform_soup
    peft_dir = tmp_path / "peft"
    run_script(["export_lora.py", f"--LORA_CKPT={out}", f"--PEFT_DIR={peft_dir}"])
    assert json.loads((peft_dir / "adapter_config.json").read_text())["r"] == 12
    model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    load_lora_checkpoint(model, out)
    base, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    input_ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(base, peft_dir)(input_ids).logits,
                                   model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_training_continues_from_the_soup(uniform_soup, micro_model_dir):
    out, _ = uniform_soup
    model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    load_lora_checkpoint(model, out)
    before = {name: tensor.clone() for name, tensor in lora_state_dict(model).items()}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    input_ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    after = lora_state_dict(model)
    # Every factor of every rank-12 layer is trainable and moved.
    assert all(not torch.equal(after[name], before[name]) for name in before)


def test_peft_adapters_are_compared_on_the_base_they_name(tmp_path):
    """A PEFT adapter records no fingerprint: beside a .pt checkpoint only its layers are compared; two
    adapters are compared on their base_model_name_or_path."""
    model = micro_model()
    restore_lora(model, ingredient(1))
    adapters = {}
    for name in ("org/base", "org/other"):
        save_peft_adapter(model, tmp_path / name, name)
        adapters[name] = read_peft_adapter(tmp_path / name)
    check_ingredients({"a.pt": ingredient(2), "adapter": adapters["org/base"]}, "delta")
    with pytest.raises(CheckpointError, match="base model: org/other here, org/base in adapter"):
        check_ingredients({"adapter": adapters["org/base"], "other": adapters["org/other"]}, "delta")


def test_a_peft_adapter_directory_is_an_ingredient(ingredient_files, micro_model_dir, tmp_path):
    """An ingredient and its own PEFT export, souped half and half: the update is that ingredient's."""
    model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    load_lora_checkpoint(model, ingredient_files[0])
    save_peft_adapter(model, tmp_path / "adapter", micro_model_dir)
    out = tmp_path / "soup.pt"
    soup_script([ingredient_files[0], tmp_path / "adapter"], out)
    soup, original = load_checkpoint(out), load_checkpoint(ingredient_files[0])
    expected = updates(original["lora"], lora_scaling(original["lora_config"]))
    got = updates(soup["lora"], lora_scaling(soup["lora_config"]))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("trainer", ["run_train_grpo.py", "run_train_ppo.py"])
def test_a_trainer_starts_a_run_from_the_soup(uniform_soup, micro_model_dir, tmp_path, trainer):
    out, _ = uniform_soup
    run_script([trainer, f"--MODEL_PATH={micro_model_dir}", "--TRAIN_FILE=data/synth_train.jsonl",
                "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=4", "--PROMPTS_PER_STEP=2",
                "--NUM_SAMPLES_PER_PROMPT=3", "--MAX_NEW_TOKENS=6", "--MAX_STEPS=1", "--EVAL_EVERY=0",
                "--DEVICE=cpu", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=from-soup",
                f"--INIT_LORA={out}"])
    trained, soup = load_checkpoint(tmp_path / "from-soup" / "lora_epoch0_step1.pt"), load_checkpoint(out)
    # The soup's layout, not LORA_R's, and its weights (moved by at most one step of lr 2e-5).
    assert trained["lora_config"] == soup["lora_config"] and trained["step"] == 1
    for key, tensor in soup["lora"].items():
        torch.testing.assert_close(trained["lora"][key], tensor, atol=1e-4, rtol=0)


def test_model_soup_evaluates_on_a_4bit_base_and_writes_the_same_soup(tmp_path):
    """QUANT=nf4: the ingredients and the soup evaluated on the 4-bit tiny model (the adapter path, no merge),
    accuracies close to the fp32 base's, and the soup written the very adapter QUANT=none writes."""
    pytest.importorskip("bitsandbytes")
    ingredients = []
    for seed in (1, 2):  # small random updates: the tiny model keeps its accuracy (about half right)
        model, _, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu")
        apply_lora(model, 4, 8.0, TARGETS)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in lora_modules(model).values():
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * 0.1)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
        ingredients.append(save_checkpoint(tmp_path / f"lora_epoch0_step{seed}.pt", model, TINY_MODEL_DIR,
                                           config={}, step=seed))
    runs = {}
    for quant in ("none", "nf4"):
        out = tmp_path / f"soup-{quant}.pt"
        result = run_script(["model_soup.py", f"--CKPTS={','.join(map(str, ingredients))}", "--DEV_FILE=None",
                             "--TEST_LIMIT=128", "--BATCH_SIZE=128", "--MAX_NEW_TOKENS=40", "--DEVICE=cpu",
                             f"--OUT={out}", f"--QUANT={quant}"])
        runs[quant] = result.stdout, load_checkpoint(out), json.loads(out.with_suffix(".summary.json").read_text())
    stdout, soup, summary = runs["nf4"]
    fp32_stdout, fp32_soup, fp32_summary = runs["none"]
    assert "(cpu, torch.float32, linear layers in 4-bit NF4)" in stdout and "4-bit" not in fp32_stdout
    assert "soup on test: Total: 128" in stdout and summary["config"]["QUANT"] == soup["config"]["QUANT"] == "nf4"
    # The soup is computed from the checkpoints alone: the same adapter whatever base evaluated it, and its
    # base fingerprint (embeddings and norms, not 4-bit) lets it load on the full-precision base.
    assert soup["lora_config"] == fp32_soup["lora_config"] and soup["lora_config"]["r"] == 8
    assert all(torch.equal(soup["lora"][key], fp32_soup["lora"][key]) for key in fp32_soup["lora"])
    assert soup["base_model"]["fingerprint"] == fp32_soup["base_model"]["fingerprint"]
    # Each ingredient's and the soup's accuracy on the 4-bit base is within 10 points of the fp32 base's.
    accuracies = [row["test_accuracy"] for row in summary["ingredients"]] + [summary["soup"]["test_accuracy"]]
    fp32_accuracies = [row["test_accuracy"] for row in fp32_summary["ingredients"]] + [
        fp32_summary["soup"]["test_accuracy"]]
    assert min(fp32_accuracies) > 0.3, fp32_stdout  # competent, so "close" means something
    assert all(abs(nf4 - fp32) <= 0.10 for nf4, fp32 in zip(accuracies, fp32_accuracies)), (accuracies,
                                                                                           fp32_accuracies)

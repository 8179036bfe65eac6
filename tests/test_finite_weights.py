"""No checkpoint of exploded weights (issue 30, item 3): the check (common.checkpoint.exploded_weights), a
run that stops instead of saving, and every script that reads a checkpoint refusing one in one line."""

import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import (WEIGHT_BOUND, CheckpointError, exploded_weights, load_checkpoint, save_checkpoint,
                               weights_to_check)
from common.lora import apply_lora, lora_state_dict
from common.peft_io import PEFT_WEIGHTS_FILE, save_peft_adapter
from common.run import RunError, TrainingRun
from tests.conftest import TINY_MODEL_DIR, micro_model, run_script
from tests.test_distributed import launch

LAYER = "model.layers.0.self_attn.q_proj"


def lora_with(entry: float, where: str = "lora_B") -> dict:
    """A healthy-looking LoRA of two layers (entries of 0.1) with one entry of ``where`` in LAYER set."""
    lora = {f"{layer}.{kind}": torch.full((4, 8), 0.1) for layer in (LAYER, "model.layers.1.mlp.up_proj")
            for kind in ("lora_A", "lora_B")}
    lora[f"{LAYER}.{where}"][2, 3] = entry
    return lora


# ------------------------------------------------------------------ the check
def test_a_healthy_adapter_passes_and_the_bound_itself_is_allowed():
    assert exploded_weights(weights_to_check(lora_with(0.1), {})) is None
    assert exploded_weights(weights_to_check(lora_with(-WEIGHT_BOUND), {})) is None  # |entry| <= bound
    assert exploded_weights(weights_to_check(lora_with(2.5), {}), bound=3.0) is None


def test_a_nan_an_inf_and_an_entry_over_the_bound_are_named_with_their_tensor():
    assert exploded_weights(weights_to_check(lora_with(float("nan")), {})) == f"a NaN in LoRA B of {LAYER}"
    assert exploded_weights(weights_to_check(lora_with(float("-inf"), "lora_A"), {})) == f"an inf in LoRA A of {LAYER}"
    assert exploded_weights(weights_to_check(lora_with(-3e29), {})) == f"an entry of size 3e+29 in LoRA B of {LAYER}"
    over_three = exploded_weights(weights_to_check(lora_with(4.0), {}), bound=3.0)
    assert over_three == f"an entry of size 4 in LoRA B of {LAYER}"


def test_the_nan_is_reported_before_a_larger_entry_and_the_others_are_counted():
    lora = lora_with(1e30)
    lora["model.layers.1.mlp.up_proj.lora_A"][0, 0] = float("nan")
    lora["model.layers.1.mlp.up_proj.lora_B"][0, 0] = 5e4
    assert exploded_weights(weights_to_check(lora, {})) == (
        "a NaN in LoRA A of model.layers.1.mlp.up_proj (and 2 more tensor(s) likewise)")


def test_a_critic_in_extra_is_checked_and_what_is_not_a_float_tensor_is_not():
    extra = {"critic": {"value_head.weight": torch.tensor([[0.1, float("inf")]]), "steps": torch.tensor([10 ** 9])},
             "critic_features": "adapter", "skipped_updates": 3}
    assert exploded_weights(weights_to_check(lora_with(0.1), extra)) == "an inf in critic's value_head.weight"
    extra["critic"]["value_head.weight"][0, 1] = 0.2
    assert exploded_weights(weights_to_check(lora_with(0.1), extra)) is None  # the int64 10^9 is no weight


# ------------------------------------------------------------------ loading refuses
def saved_lora(tmp_path, entry: float, extra: dict | None = None):
    model = micro_model()
    apply_lora(model, r=2, alpha=4, target_modules=("q_proj",))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B[1, 0] = entry
    return model, save_checkpoint(tmp_path / "ckpt.pt", model, "m", {}, extra=extra)


@pytest.mark.parametrize("entry, found", [(float("nan"), "a NaN"), (4e29, "an entry of size 4e+29")])
def test_a_checkpoint_with_exploded_weights_is_refused_in_one_line_naming_the_file(tmp_path, entry, found):
    _, path = saved_lora(tmp_path, entry)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused: ") and f"{found} in LoRA B of {LAYER};" in message
    assert "earlier checkpoint" in message and "lower LR" in message and "\n" not in message
    assert load_checkpoint(saved_lora(tmp_path, 0.5)[1])["step"] == 0  # a healthy one loads


def test_a_checkpoint_whose_critic_holds_a_nan_is_refused(tmp_path):
    _, path = saved_lora(tmp_path, 0.0, extra={"critic": {"value_head.bias": torch.tensor([float("nan")])}})
    with pytest.raises(CheckpointError, match="a NaN in critic's value_head.bias"):
        load_checkpoint(path)


def test_a_peft_adapter_folder_with_a_nan_is_refused_naming_its_weights_file(tmp_path):
    model, _ = saved_lora(tmp_path, 0.5)
    folder = save_peft_adapter(model, tmp_path / "adapter", "m")
    assert load_checkpoint(folder)["lora_config"]["r"] == 2
    weights = load_file(folder / PEFT_WEIGHTS_FILE)
    weights[f"base_model.model.{LAYER}.lora_A.weight"][0, 0] = float("nan")
    save_file(weights, folder / PEFT_WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=rf"{PEFT_WEIGHTS_FILE}: refused: .*a NaN in LoRA A of {LAYER};"):
        load_checkpoint(folder)


# ------------------------------------------------------------------ a save refuses
def run_saving(model, tmp_path, extra=dict, save=None):
    """What TrainingRun._stop_if_exploded reads of a run: its tracked state, folder and config (one process)."""
    return types.SimpleNamespace(_state={"model": model, "save": save, "extra": extra}, run_dir=tmp_path,
                                 config={"LR": 1e30, "GRAD_CLIP": 1.0, "CRITIC_LR": 1e-3})


def test_a_save_of_a_healthy_adapter_goes_on_and_one_of_a_nan_critic_stops_naming_critic_lr(tmp_path):
    model = micro_model()
    apply_lora(model, r=2, alpha=4, target_modules=("q_proj",))
    critic = {"value_head.weight": torch.zeros(1, 16)}
    run = run_saving(model, tmp_path, extra=lambda: {"critic": critic})
    TrainingRun._stop_if_exploded(run, 4)  # returns: nothing exploded
    critic["value_head.weight"][0, 5] = float("nan")
    with pytest.raises(RunError) as stopped:
        TrainingRun._stop_if_exploded(run, 5)
    assert str(stopped.value) == (
        "step 5: not saved: the weights exploded (a NaN in critic's value_head.weight; a healthy run's stay far "
        "below 1e+04); lower LR or CRITIC_LR (LR=1e+30: AdamW moves each weight by about LR a step, whatever "
        "GRAD_CLIP=1.0); no checkpoint of it was written")


def test_a_whole_model_save_checks_every_weight(tmp_path):
    """run_sft.py with LORA_R=0 saves the whole model: every parameter is checked."""
    model = micro_model()
    run = run_saving(model, tmp_path, save=lambda step: tmp_path)
    TrainingRun._stop_if_exploded(run, 1)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 2e5
    with pytest.raises(RunError, match=r"an entry of size 2e\+05 in model.layers.1.mlp.up_proj.weight;"):
        TrainingRun._stop_if_exploded(run, 2)


# ------------------------------------------------------------------ the scripts, for real
@pytest.fixture(scope="module")
def exploded_run(tmp_path_factory):
    """The issue's run: LR=1e30, a checkpoint every step. Step 1's groups all have zero advantage (no update,
    its checkpoint is good); step 2's update puts ~4e29 in LoRA B, and its save stops the run."""
    out = tmp_path_factory.mktemp("exploded")
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                         "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=16", "--MAX_STEPS=3", "--EVAL_EVERY=0",
                         "--DEVICE=cpu", "--LR=1e30", "--SAVE_EVERY=1", f"--CHECKPOINT_DIR={out}",
                         f"--LOG_DIR={out}", "--RUN_NAME=boom"], check=False)
    return out, result


def test_a_run_whose_weights_explode_stops_in_one_line_naming_lr_and_keeps_the_good_checkpoint(exploded_run):
    out, result = exploded_run
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: step 2: not saved: the weights exploded (an entry of size")
    assert f"in LoRA B of {LAYER}" in errors[0] and "lower LR (LR=1e+30" in errors[0]
    assert errors[0].endswith(f"the last good checkpoint, {out / 'boom' / 'lora_epoch0_step1.pt'}, is kept")
    assert sorted(path.name for path in (out / "boom").iterdir()) == ["lora_epoch0_step1.pt"]  # no temporary, no lock
    kept = load_checkpoint(out / "boom" / "lora_epoch0_step1.pt")  # loads: its weights pass the check
    assert exploded_weights(weights_to_check(kept["lora"], {})) is None


@pytest.fixture(scope="module")
def nan_checkpoint(exploded_run):
    """The good step-1 checkpoint of the exploded run, with one NaN in a LoRA B."""
    good = exploded_run[0] / "boom" / "lora_epoch0_step1.pt"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["lora"][f"{LAYER}.lora_B"][0, 0] = float("nan")
    path = exploded_run[0] / "nan.pt"
    torch.save(checkpoint, path)
    return good, path


def assert_refused_in_one_line(result, path):
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {path}: refused: its weights exploded in training (a NaN in LoRA B of {LAYER}; a healthy adapter's "
        f"entries stay far below 1e+04): use an earlier checkpoint of its run, or train again with a lower LR")


def test_eval_math_refuses_a_nan_checkpoint(nan_checkpoint):
    _, path = nan_checkpoint
    assert_refused_in_one_line(run_script(["eval_math.py", f"--MODEL_PATH={TINY_MODEL_DIR}", f"--LORA_CKPT={path}",
                                           "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=2", "--DEVICE=cpu"],
                                          check=False), path)


def test_model_soup_refuses_a_nan_ingredient(nan_checkpoint, tmp_path):
    good, path = nan_checkpoint
    result = run_script(["model_soup.py", f"--CKPTS={good},{path}", f"--OUT={tmp_path / 'soup.pt'}",
                         "--DEV_FILE=None", "--TEST_FILE=None", "--DEVICE=cpu"], check=False)
    assert_refused_in_one_line(result, path)
    assert not (tmp_path / "soup.pt").exists()


def test_export_lora_refuses_a_nan_checkpoint(nan_checkpoint, tmp_path):
    _, path = nan_checkpoint
    result = run_script(["export_lora.py", f"--LORA_CKPT={path}", f"--PEFT_DIR={tmp_path / 'adapter'}"], check=False)
    assert_refused_in_one_line(result, path)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("setting", ["RESUME", "INIT_LORA"])
def test_a_trainer_refuses_to_resume_or_start_from_a_nan_checkpoint(nan_checkpoint, tmp_path, setting):
    _, path = nan_checkpoint
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--DEVICE=cpu", f"--{setting}={path}",
                         f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", "--RUN_NAME=again"], check=False)
    assert_refused_in_one_line(result, path)


def test_weights_that_explode_between_saves_end_the_run_in_one_line_at_the_next_sampling(tmp_path):
    """No save between: step 2's update explodes the weights, step 3's rollouts meet NaN logits. One line
    naming LR (common.sampler.NonFiniteLogitsError, a UserError), after the health line, no traceback."""
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                         "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=16", "--MAX_STEPS=4", "--EVAL_EVERY=0",
                         "--DEVICE=cpu", "--LR=1e30", "--SAVE_EVERY_MINUTES=0", f"--CHECKPOINT_DIR={tmp_path}",
                         f"--LOG_DIR={tmp_path}", "--RUN_NAME=boom"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the model's logits are not finite (NaN or inf) at some sampled position: its weights "
                      "have exploded (lower LR, and continue from the last good checkpoint) or fp16 overflows "
                      "(DTYPE=float32)"]
    assert any(line.startswith("health: exploding updates") and "LR" in line for line in result.stdout.splitlines())


def test_under_torchrun_every_rank_stops_at_the_same_save_and_nothing_is_written(tmp_path):
    """Two ranks (gloo): each checks its copy of the weights, the verdicts are reduced, and both stop with
    the line, at the first save after the explosion, rather than one rank waiting on the other's collective."""
    with pytest.raises(AssertionError) as failed:
        launch(["run_train_grpo.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=2",
                "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=16", "--MAX_STEPS=3", "--EVAL_EVERY=0",
                "--DEVICE=cpu", "--LR=1e30", "--SAVE_EVERY=1", f"--CHECKPOINT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}",
                "--RUN_NAME=boom"], processes=2)
    stderr = str(failed.value).split("--- stderr\n", 1)[1]
    # torchrun prefixes "[rank1]: ", and ends the other rank once one has exited: one line or two, the same.
    errors = {line.split("error: ", 1)[1] for line in stderr.splitlines() if "error: " in line}
    assert len(errors) == 1
    error = errors.pop()
    assert ": not saved: the weights exploded (" in error and "lower LR (LR=1e+30" in error
    stopped_at = int(error.split()[1].rstrip(":"))
    assert sorted(path.name for path in (tmp_path / "boom").iterdir()) == [
        f"lora_epoch0_step{step}.pt" for step in range(1, stopped_at)]

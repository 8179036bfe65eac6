"""LoRA end to end through the scripts: SFT in LoRA mode -> checkpoint -> eval and export, and a PEFT
adapter directory back in."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from common.checkpoint import load_checkpoint, load_lora_checkpoint
from common.model import load_model_and_tokenizer
from tests.conftest import run_script


@pytest.fixture(scope="module")
def lora_checkpoint(micro_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sft-lora")
    run_script(["run_sft.py", f"--MODEL_PATH={micro_model_dir}", f"--OUT_DIR={out_dir}", "--MAX_STEPS=2",
                "--BATCH_SIZE=4", "--EVAL_LIMIT=2", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu", "--LORA_R=4",
                "--LORA_TARGETS=q_proj,v_proj", "--LR=0.05", "--LOGPROB_CHUNK_SIZE=16",
                f"--LOG_DIR={out_dir}", "--RUN_NAME=log"])
    return out_dir / "lora_epoch0_step2.pt"


def test_sft_lora_mode_writes_a_checkpoint(lora_checkpoint, micro_model_dir):
    checkpoint = load_checkpoint(lora_checkpoint)
    assert checkpoint["step"] == 2 and checkpoint["config"]["LORA_R"] == 4
    assert checkpoint["lora_config"]["target_modules"] == ["q_proj", "v_proj"]
    assert checkpoint["base_model"]["path"] == str(micro_model_dir)
    # Training moved B away from zero (it starts at zero).
    assert any(name.endswith("lora_B") and tensor.abs().sum() > 0 for name, tensor in checkpoint["lora"].items())


def test_eval_math_with_lora_checkpoint(lora_checkpoint, micro_model_dir, tmp_path):
    out_file = tmp_path / "eval.jsonl"
    result = run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", f"--LORA_CKPT={lora_checkpoint}",
                         "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=3", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu",
                         f"--OUT_FILE={out_file}"])
    assert "loaded LoRA" in result.stdout and "Total: 3" in result.stdout


def test_export_peft_and_merged(lora_checkpoint, micro_model_dir, tmp_path):
    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    run_script(["export_lora.py", f"--LORA_CKPT={lora_checkpoint}", f"--PEFT_DIR={peft_dir}",
                f"--MERGED_DIR={merged_dir}"])
    if os.name != "nt":  # the mode any new file gets, not safetensors' private 0o600
        umask = os.umask(0)
        os.umask(umask)
        for path in (peft_dir / "adapter_model.safetensors", merged_dir / "model.safetensors"):
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    model, tokenizer, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    load_lora_checkpoint(model, lora_checkpoint)
    input_ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        expected = model(input_ids).logits
        merged, _, _ = load_model_and_tokenizer(merged_dir, "cpu")
        assert not any("lora" in name for name in merged.state_dict())
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)

    peft = pytest.importorskip("peft")
    base, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(base, peft_dir)(input_ids).logits
    torch.testing.assert_close(via_peft, expected, atol=1e-5, rtol=1e-5)
    adapter_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]


def test_export_refuses_nothing_to_do(lora_checkpoint):
    with pytest.raises(AssertionError, match="nothing to do"):
        run_script(["export_lora.py", f"--LORA_CKPT={lora_checkpoint}"])


def test_the_peft_export_names_its_base_so_auto_peft_loads_it(lora_checkpoint, micro_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    run_script(["export_lora.py", f"--LORA_CKPT={lora_checkpoint}", f"--PEFT_DIR={tmp_path / 'given'}",
                "--BASE_MODEL_ID=org/micro-gemma2"])
    assert json.loads((tmp_path / "given" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/micro-gemma2"
    # No Hub id known for the micro model: its absolute path, with a warning, so it loads from anywhere here.
    result = run_script(["export_lora.py", f"--LORA_CKPT={lora_checkpoint}", f"--PEFT_DIR={tmp_path / 'local'}"])
    assert "warning: no Hub id known" in result.stdout
    config = json.loads((tmp_path / "local" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(micro_model_dir.resolve())
    model, _, _ = load_model_and_tokenizer(micro_model_dir, "cpu")
    load_lora_checkpoint(model, lora_checkpoint)
    auto_model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "local", attn_implementation="eager")
    input_ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(auto_model.eval()(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def bf16_right_padded_base(micro_model_dir, tmp_path_factory):
    """The micro model stored in bf16, with a tokenizer that pads on the right and has no pad token, as many
    base models ship."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16-base")
    AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.bfloat16).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir, padding_side="right")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(out)
    return out


def test_the_merged_export_keeps_the_base_dtype_and_tokenizer(lora_checkpoint, bf16_right_padded_base, tmp_path):
    from transformers import AutoTokenizer

    merged_dir = tmp_path / "merged"
    run_script(["export_lora.py", f"--LORA_CKPT={lora_checkpoint}", f"--MODEL_PATH={bf16_right_padded_base}",
                f"--MERGED_DIR={merged_dir}"])
    checkpoint = load_checkpoint(lora_checkpoint)
    scaling = checkpoint["lora_config"]["alpha"] / checkpoint["lora_config"]["r"]
    layer = "model.layers.0.self_attn.q_proj"
    with safe_open(merged_dir / "model.safetensors", framework="pt") as merged, \
            safe_open(bf16_right_padded_base / "model.safetensors", framework="pt") as base:
        assert {merged.get_tensor(key).dtype for key in merged.keys()} == {torch.bfloat16}
        # W + s·B·A, summed in fp32 and stored in the base's bf16.
        expected = (base.get_tensor(f"{layer}.weight").float()
                    + scaling * checkpoint["lora"][f"{layer}.lora_B"] @ checkpoint["lora"][f"{layer}.lora_A"])
        assert torch.equal(merged.get_tensor(f"{layer}.weight"), expected.to(torch.bfloat16))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None


def test_eval_takes_a_peft_adapter_directory(lora_checkpoint, micro_model_dir, tmp_path):
    """The adapter exported from a checkpoint evaluates exactly as the checkpoint does."""
    run_script(["export_lora.py", f"--LORA_CKPT={lora_checkpoint}", f"--PEFT_DIR={tmp_path / 'adapter'}"])
    outputs = {}
    for name, adapter in (("checkpoint", lora_checkpoint), ("peft", tmp_path / "adapter")):
        run_script(["eval_math.py", f"--MODEL_PATH={micro_model_dir}", f"--LORA_CKPT={adapter}",
                    "--EVAL_FILE=data/synth_test.jsonl", "--EVAL_LIMIT=3", "--MAX_NEW_TOKENS=6", "--DEVICE=cpu",
                    f"--OUT_FILE={tmp_path / name}.jsonl"])
        outputs[name] = [json.loads(line)["output"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert outputs["peft"] == outputs["checkpoint"] and len(outputs["peft"]) == 3

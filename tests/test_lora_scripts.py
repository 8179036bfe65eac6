"""LoRA end to end through the scripts: SFT in LoRA mode -> checkpoint -> eval and export."""

import json

import pytest
import torch

from common.checkpoint import load_checkpoint, load_lora_checkpoint
from common.model import load_model_and_tokenizer
from tests.conftest import run_script


@pytest.fixture(scope="module")
def lora_checkpoint(micro_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sft-lora")
    run_script(["run_sft.py", f"--MODEL_PATH={micro_model_dir}", f"--OUT_DIR={out_dir}", "--MAX_STEPS=2",
                "--BATCH_SIZE=4", "--EVAL_LIMIT=2", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu", "--LORA_R=4",
                "--LORA_TARGETS=q_proj,v_proj", "--LR=0.05", "--CHUNK_SIZE=16",
                f"--LOG_FILE={out_dir / 'log.jsonl'}"])
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
                         "--TEST_FILE=data/synth_test.jsonl", "--LIMIT=3", "--MAX_NEW_TOKENS=4", "--DEVICE=cpu",
                         f"--OUT_FILE={out_file}"])
    assert "loaded LoRA" in result.stdout and "Total: 3" in result.stdout


def test_export_peft_and_merged(lora_checkpoint, micro_model_dir, tmp_path):
    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    run_script(["export_lora.py", f"--LORA_CKPT={lora_checkpoint}", f"--PEFT_DIR={peft_dir}",
                f"--MERGED_DIR={merged_dir}"])
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

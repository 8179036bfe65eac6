"""Device and dtype choice, loading a model directory, and the error for a missing one."""

import pytest
import torch

from common.model import (ModelNotFoundError, get_device, get_dtype, load_model_and_tokenizer,
                          load_tokenizer, stop_token_ids)
from tests.conftest import TINY_MODEL_DIR


def test_dtype_auto_is_fp32_on_cpu_and_names_parse():
    assert get_dtype("auto", torch.device("cpu")) is torch.float32
    assert get_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert get_dtype("float32", torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="unknown DTYPE"):
        get_dtype("float8", torch.device("cpu"))


def test_device_choice():
    assert get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert get_device("auto").type in ("cpu", "mps")
        with pytest.raises(RuntimeError, match="cuda"):
            get_device("cuda")


def test_missing_model_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        load_model_and_tokenizer(tmp_path / "gemma-2-2b-it", "cpu")
    message = str(error.value)
    assert "hf download google/gemma-2-2b-it --local-dir models/gemma-2-2b-it" in message
    assert "models/tiny-gemma2-math" in message and "make_tiny_model.py" in message


def test_tiny_model_loads_from_disk_like_gemma():
    model, tokenizer, device = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu", "auto")
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert model.config._attn_implementation == "eager"  # Gemma 2's soft-capping needs eager attention
    assert model.config.final_logit_softcapping is not None
    assert not model.training and device.type == "cpu"
    assert next(model.parameters()).dtype is torch.float32
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert set(stop_token_ids(model, tokenizer)) == {tokenizer.eos_token_id, end_of_turn}
    # One token per digit: numbers are read digit by digit.
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def test_tokenizer_without_pad_token_gets_eos_as_pad(tmp_path):
    tokenizer = load_tokenizer(TINY_MODEL_DIR)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token_id == reloaded.eos_token_id


@pytest.mark.parametrize("arch, warned", [("gemma2", True), ("llama", False)])
def test_gemma_2_in_float16_is_warned_of(arch, warned, tmp_path, capsys):
    """Gemma 2 in fp16 (a T4) may overflow as Gemma 3 does (issue 29, finding 10): one warning line naming
    DTYPE; fp32 and bf16 loads and other architectures say nothing."""
    from common.model import load_model
    from tests.conftest import micro_model

    micro_model(arch).save_pretrained(tmp_path)
    load_model(tmp_path, torch.device("cpu"), torch.float32)
    assert "warning" not in capsys.readouterr().out
    load_model(tmp_path, torch.device("cpu"), torch.float16)
    out = capsys.readouterr().out
    assert ("warning: gemma2 in float16 may overflow" in out and "DTYPE=float32" in out) == warned
    assert ("warning" in out) == warned

"""common/peft_io.py against PEFT itself: our export loads in PEFT (PeftModel and, with the base named,
AutoPeftModelForCausalLM), and an adapter PEFT wrote loads here (LORA_CKPT, INIT_LORA, soup
ingredients) and gives PEFT's logits, on micro models of several architectures."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

from common.checkpoint import load_checkpoint, resolve_checkpoint, restore_lora
from common.lora import LoRAStateError, all_linear_targets, apply_lora, lora_config, lora_modules, lora_state_dict
from common.model import base_model_name
from common.peft_io import PeftAdapterError, read_peft_adapter, save_peft_adapter
from tests.conftest import micro_arch_model, micro_model

peft = pytest.importorskip("peft")

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEARS = ATTENTION_LINEARS + ("gate_proj", "up_proj", "down_proj")
# Row 0 is left-padded (pad id 0), row 1 fills the width.
INPUT_IDS = torch.tensor([[0, 0, 5, 9, 12, 7, 33], [3, 8, 11, 4, 6, 10, 50]])
ATTENTION_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Non-zero A and B: the adapter then changes the model's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * scale)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * scale)


@pytest.mark.parametrize("alpha, written", [(32.0, "32"), (12.5, "12.5")])
def test_a_whole_alpha_is_written_as_an_integer(alpha, written, tmp_path):
    """The trainers' LORA_ALPHA is a float (32.0); Ollama's adapter import reads lora_alpha into an
    unsigned integer (ollama/ollama convert/convert.go, AdapterParameters) and refuses "32.0"."""
    model = micro_model("gemma2")
    apply_lora(model, r=4, alpha=alpha, target_modules=("q_proj",))
    save_peft_adapter(model, tmp_path, "base")
    text = (tmp_path / "adapter_config.json").read_text()
    assert f'"lora_alpha": {written},' in text
    assert json.loads(text)["lora_alpha"] == alpha


@pytest.mark.parametrize("arch, targets, use_rslora, dropout", [
    ("gemma2", ALL_LINEARS, True, 0.1),
    ("llama", ("q_proj", "v_proj"), False, 0.0),
    ("qwen2", ATTENTION_LINEARS, False, 0.0),
])
def test_peft_loads_the_exported_adapter(arch, targets, use_rslora, dropout, tmp_path):
    from peft import PeftModel

    model = micro_model(arch)
    base_logits = logits_of(model)
    apply_lora(model, r=4, alpha=8, target_modules=targets, dropout=dropout, use_rslora=use_rslora)
    randomize_adapters(model)
    ours = logits_of(model)
    assert not torch.allclose(ours, base_logits, atol=1e-3)

    out_dir = tmp_path / "adapter"
    save_peft_adapter(model, out_dir, base_model_name_or_path="models/base")

    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == dropout
    assert config["target_modules"] == sorted(targets) and config["use_rslora"] is use_rslora
    assert config["base_model_name_or_path"] == "models/base"
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["inference_mode"] is True
    assert config["modules_to_save"] is None

    with safe_open(out_dir / "adapter_model.safetensors", framework="pt") as weights:
        keys = set(weights.keys())
        expected_keys = {f"base_model.model.model.layers.{layer}.{'self_attn' if name in ATTENTION_LINEARS else 'mlp'}"
                         f".{name}.lora_{kind}.weight" for layer in (0, 1) for name in targets for kind in "AB"}
        assert keys == expected_keys
        q_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
        assert weights.get_slice(q_key.format("A")).get_shape() == [4, 16]
        assert weights.get_slice(q_key.format("B")).get_shape() == [16, 4]
        assert all(weights.get_tensor(key).dtype == torch.float32 for key in keys)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(micro_model(arch), out_dir)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    peft_model.eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, targets, use_rslora", [
    ("llama", ["q_proj", "v_proj"], False),
    ("qwen3", "all-linear", True),
    ("gemma2", "all-linear", False),
    ("phi3", "all-linear", False),  # fused qkv_proj and gate_up_proj
    ("gemma3", ["q_proj", "o_proj", "down_proj"], False),  # the multimodal checkpoint: its vision tower's q_proj too
])
def test_an_adapter_peft_wrote_loads_here_and_gives_peft_logits(arch, targets, use_rslora, tmp_path):
    from peft import LoraConfig, get_peft_model

    # With init_lora_weights=False B is random too, so the adapter changes the logits.
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(micro_arch_model(arch), peft_config).eval()
    expected = logits_of(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    model = micro_arch_model(arch)
    assert not torch.allclose(logits_of(model), expected, atol=1e-3)
    checkpoint = load_checkpoint(tmp_path / "adapter")
    assert resolve_checkpoint(tmp_path / "adapter") == tmp_path / "adapter"
    expected_targets = all_linear_targets(micro_arch_model(arch)) if targets == "all-linear" else sorted(targets)
    assert checkpoint["lora_config"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": expected_targets,
                                         "use_rslora": use_rslora}
    restore_lora(model, checkpoint, where="adapter")
    torch.testing.assert_close(logits_of(model), expected, atol=1e-5, rtol=0)
    if arch == "phi3":
        assert expected_targets == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_read_after_save_is_the_same_adapter(tmp_path):
    model = micro_model("qwen2")
    apply_lora(model, r=2, alpha=4, target_modules=["k_proj", "up_proj"], dropout=0.05, use_rslora=True)
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path, "Qwen/Qwen2.5-0.5B")
    checkpoint = read_peft_adapter(tmp_path)
    assert checkpoint["lora_config"] == lora_config(model)
    assert checkpoint["base_model"] == {"path": "Qwen/Qwen2.5-0.5B", "fingerprint": None}
    assert checkpoint["step"] == 0 and checkpoint["optimizer"] is None
    state = lora_state_dict(model)
    assert checkpoint["lora"].keys() == state.keys()
    assert all(torch.equal(checkpoint["lora"][key], state[key]) for key in state)


def test_an_adapter_for_another_base_shape_is_refused(tmp_path):
    model = micro_model("llama")
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    save_peft_adapter(model, tmp_path, "base")
    wider = micro_model("llama", intermediate_size=48, hidden_size=24, head_dim=12)
    with pytest.raises(LoRAStateError, match="q_proj.lora_A: expected shape"):
        restore_lora(wider, load_checkpoint(tmp_path))


@pytest.mark.parametrize("option, value, name", [
    ("use_dora", True, "use_dora=True"),
    ("bias", "lora_only", "bias='lora_only'"),
    ("rank_pattern", {"q_proj": 8}, "rank_pattern={'q_proj': 8}"),
])
def test_peft_options_we_do_not_implement_are_refused_by_name(option, value, name, tmp_path):
    model = micro_model("llama")
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    save_peft_adapter(model, tmp_path, "base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    with pytest.raises(PeftAdapterError, match=f"uses {name}, which this project's LoRA does not implement"):
        load_checkpoint(tmp_path)


def test_auto_peft_model_loads_an_export_that_names_its_base(tmp_path):
    """The base has no Hub id here: the export names it by its absolute path, which AutoPeftModelForCausalLM
    then loads from any working directory."""
    base_dir = tmp_path / "base"
    micro_model("llama").save_pretrained(base_dir)
    name, source = base_model_name(base_dir)
    assert (name, source) == (str(base_dir.resolve()), "the local path")
    model = micro_model("llama")
    apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter", name)
    auto_model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", attn_implementation="eager")
    auto_model.eval()
    torch.testing.assert_close(logits_of(auto_model), logits_of(model), atol=1e-5, rtol=0)

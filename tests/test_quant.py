"""QUANT=nf4 (common/quant.py, common/model.py load_model): 4-bit NF4 base layers with double quantization,
checked against independent references: the NF4 code table of the QLoRA paper, a float layer holding the
dequantized weights (forward, LoRA gradients, gradient checkpointing), the 4-bit base without adapters
(disable_lora), and PEFT's own LoRA on a 4-bit base for the exported adapter."""

import sys

import pytest
import torch
from torch import nn

from common.checkpoint import load_checkpoint, restore_lora, save_checkpoint
from common.lora import LoRALinear, apply_lora, disable_lora, lora_modules, lora_state_dict, merge_lora
from common.logprobs import enable_gradient_checkpointing, token_logprobs
from common.model import load_model
from common.peft_io import save_peft_adapter
from common.quant import (QuantizationUnavailable, check_quant, is_quantized, keep_trainable_layout,
                          require_bitsandbytes)
from tests.conftest import DEVICE, DEVICES, REPO_ROOT, run_script, sample_with, save_micro_model_dir

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory):
    """The micro Gemma 2 with every linear layer's input a multiple of 64 wide, as in every real model:
    bitsandbytes 0.50.2's AVX512 CPU kernel (backends/cpu/ops.py, dequantize_4bit) reads rows whose
    width is not a multiple of the 64-weight block with the wrong block scales."""
    return save_micro_model_dir(tmp_path_factory.mktemp("micro-gemma2-64"), hidden_size=64, intermediate_size=128,
                                head_dim=32, query_pre_attn_scalar=32)

CPU = torch.device("cpu")
# The 16 NF4 levels, Dettmers et al. 2023 (QLoRA), appendix E: quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
BLOCK = 64  # weights per absmax scale
# Row 0 is left-padded (pad id 0), row 1 fills the width.
INPUT_IDS = torch.tensor([[0, 0, 5, 9, 12, 7, 33, 40, 8], [3, 8, 11, 4, 6, 10, 50, 21, 17]])
ATTENTION_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]])


def dequantized(layer) -> torch.Tensor:
    """The float weight a 4-bit layer computes with, [out, in]."""
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def float_copy_of(model_4bit, model_path) -> nn.Module:
    """The same model with every 4-bit layer replaced by a float nn.Linear holding its dequantized weight."""
    model = load_model(model_path, CPU, torch.float32)
    with torch.no_grad():
        for name, module in model_4bit.named_modules():
            if is_quantized(module):
                model.get_submodule(name).weight.copy_(dequantized(module))
    return model


def set_adapters(model, seed: int = 1, scale: float = 0.1) -> None:
    """Non-zero A and B, the same for the same layer names in any model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * scale)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * scale)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits


def lora_gradients(model, checkpointing: bool = False) -> dict[str, torch.Tensor]:
    """d loss / d (A, B) of every adapter for a loss mixing the log-probs and entropies of the policy pass."""
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    logprobs, entropy = token_logprobs(model, INPUT_IDS, ATTENTION_MASK, chunk_size=5, return_entropy=True)
    weights = torch.linspace(-1.0, 1.0, logprobs.numel()).view_as(logprobs)
    ((logprobs * weights).sum() + 0.1 * entropy.sum()).backward()
    return {f"{name}.{kind}": getattr(module, kind).grad.clone()
            for name, module in lora_modules(model).items() for kind in ("lora_A", "lora_B")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_stores_the_body_linears_in_4_bits_and_the_rest_in_the_model_dtype(micro_arch_dir, dtype):
    model = load_model(micro_arch_dir("llama"), CPU, dtype, quant="nf4")  # an untied head, unlike Gemma's
    reference = load_model(micro_arch_dir("llama"), CPU, dtype)
    quantized = {name for name, module in model.named_modules() if is_quantized(module)}
    linears = {name for name, module in reference.named_modules() if isinstance(module, nn.Linear)}
    assert quantized == linears - {"lm_head"}
    for name in quantized:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.compute_dtype == dtype
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantization
        # Two 4-bit codes per byte, one 8-bit scale per block of 64 (the scales quantized in blocks of 256).
        assert layer.weight.numel() * 2 == reference.get_submodule(name).weight.numel()
        assert layer.weight.quant_state.absmax.dtype == torch.uint8
        assert layer.weight.quant_state.blocksize == BLOCK and layer.weight.quant_state.state2.blocksize == 256
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == dtype
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert not model.training


def test_nf4_weights_are_the_nearest_nf4_level_times_each_block_scale(micro_model_dir):
    model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    reference = load_model(micro_model_dir, CPU, torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    weight = reference.model.layers[0].mlp.down_proj.weight.detach().reshape(-1, BLOCK)
    blocks = dequantized(layer).reshape(-1, BLOCK)
    # The block's scale as stored (8-bit, double quantized): its largest |value| is the level +-1 times it.
    scale = blocks.abs().amax(dim=1, keepdim=True)
    distances = (blocks / scale)[:, :, None].sub(NF4_CODE).abs()
    assert distances.amin(dim=-1).max() < 1e-6  # every value sits on a level
    # ... the level nearest to weight / (the block's absmax), the absmax kept to within its 8-bit rounding.
    true_scale = weight.abs().amax(dim=1, keepdim=True)
    assert (scale / true_scale - 1).abs().max() < 0.02
    nearest = (weight / true_scale)[:, :, None].sub(NF4_CODE).abs().argmin(dim=-1)
    assert torch.equal(distances.argmin(dim=-1), nearest)
    assert (blocks - weight).abs().max() <= 0.16 * true_scale.max()  # half the widest gap between levels


@pytest.mark.parametrize(DEVICE, DEVICES)
def test_a_4bit_layer_computes_with_its_dequantized_weight_and_lora_gradients_match(micro_model_dir, device):
    model = load_model(micro_model_dir, torch.device(device), torch.float32, quant="nf4")
    quantized = model.model.layers[1].mlp.up_proj
    float_layer = nn.Linear(quantized.in_features, quantized.out_features, bias=False, device=device)
    with torch.no_grad():
        float_layer.weight.copy_(dequantized(quantized))
    torch.manual_seed(0)
    wrapped_4bit = LoRALinear(quantized, r=4, alpha=8).to(device)
    wrapped_float = LoRALinear(float_layer, r=4, alpha=8).to(device)
    with torch.no_grad():
        wrapped_float.lora_A.copy_(wrapped_4bit.lora_A)
        for wrapped in (wrapped_4bit, wrapped_float):
            wrapped.lora_B.copy_(torch.linspace(-0.3, 0.3, wrapped.lora_B.numel()).view_as(wrapped.lora_B))
    x = torch.randn(3, 7, quantized.in_features).to(device)
    outputs, gradients = [], []
    for wrapped in (wrapped_4bit, wrapped_float):
        inputs = x.clone().requires_grad_()
        output = wrapped(inputs)
        (output * torch.cos(output)).sum().backward()
        outputs.append(output.detach())
        gradients.append((inputs.grad, wrapped.lora_A.grad, wrapped.lora_B.grad))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for ours, expected in zip(*gradients):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert wrapped_4bit.lora_A.dtype == wrapped_4bit.lora_B.dtype == torch.float32  # fp32 masters


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_lora_gradients_through_4bit_layers_equal_those_of_float_layers_with_the_dequantized_weights(
        micro_arch_dir, arch):
    model_4bit = load_model(micro_arch_dir(arch), CPU, torch.float32, quant="nf4")
    model_float = float_copy_of(model_4bit, micro_arch_dir(arch))
    for model in (model_4bit, model_float):
        apply_lora(model, r=4, alpha=8, target_modules="all-linear")
        set_adapters(model)
    torch.testing.assert_close(logits_of(model_4bit), logits_of(model_float), rtol=1e-5, atol=1e-5)
    ours, expected = lora_gradients(model_4bit), lora_gradients(model_float)
    assert ours.keys() == expected.keys() and len(ours) == 2 * 7 * 2
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)
        assert ours[name].abs().max() > 0, name  # a gradient reached every adapter, through the 4-bit layers


def test_gradient_checkpointing_through_4bit_layers_gives_the_same_gradients(micro_model_dir):
    gradients = []
    for checkpointing in (False, True):
        model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
        apply_lora(model, r=4, alpha=8, target_modules="all-linear")
        set_adapters(model)
        gradients.append(lora_gradients(model, checkpointing))
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_disable_lora_gives_the_4bit_base_and_sampling_matches_the_training_logprobs(micro_model_dir):
    model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    base_logits = logits_of(model)
    apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    set_adapters(model)
    assert not torch.allclose(logits_of(model), base_logits, atol=1e-3)
    with disable_lora(model):
        assert torch.equal(logits_of(model), base_logits)
    out = sample_with(model, [[2, 5, 9, 12], [2, 7]], num_samples=2, max_new_tokens=6, eos_token_ids=[1],
                 pad_token_id=0, generator=torch.Generator().manual_seed(0), sampler="eager")
    prompt_width = 4
    rows = [[0] * (prompt_width - len(p)) + p for p in out.prompt_ids]
    input_ids = torch.cat([torch.tensor(rows), out.completion_ids], dim=1)
    attention_mask = torch.cat([(torch.tensor(rows) != 0).long(), out.completion_mask.long()], dim=1)
    with torch.no_grad():
        recomputed = token_logprobs(model, input_ids, attention_mask)[:, prompt_width - 1:]
    mask = out.completion_mask.bool()
    torch.testing.assert_close(recomputed[mask], out.logprobs[mask], rtol=1e-5, atol=1e-5)


def test_merging_into_a_4bit_base_is_refused_and_changes_nothing(micro_model_dir):
    model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    set_adapters(model)
    before = logits_of(model)
    with pytest.raises(RuntimeError, match="cannot merge LoRA into a 4-bit base layer"):
        merge_lora(model)
    assert not any(module.merged for module in lora_modules(model).values())
    assert torch.equal(logits_of(model), before)


def test_nf4_without_bitsandbytes_is_one_clear_error(micro_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(QuantizationUnavailable, match=r"QUANT=nf4 needs bitsandbytes, which is not installed: "
                                                      r"pip install bitsandbytes==0\.50\.2"):
        load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    check_quant("none", CPU)  # QUANT=none never needs it
    assert load_model(micro_model_dir, CPU, torch.float32).model.layers[0].mlp.up_proj.__class__ is nn.Linear


def test_nf4_without_accelerate_is_one_clear_error_and_requirements_txt_pins_it(micro_model_dir, monkeypatch):
    """transformers' 4-bit loader needs accelerate: a fresh requirements.txt install plus bitsandbytes
    has it (pinned at the version these tests run with), and an install without it gets one line."""
    import importlib.metadata
    import re

    from common.quant import ACCELERATE_REQUIREMENT

    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M))
    assert f"accelerate=={pins['accelerate']}" == ACCELERATE_REQUIREMENT
    assert pins["accelerate"] == importlib.metadata.version("accelerate")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(QuantizationUnavailable, match=r"QUANT=nf4 needs accelerate, which is not installed: "
                                                      r"pip install accelerate==1\.16\.0"):
        load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    monkeypatch.undo()
    assert is_quantized(load_model(micro_model_dir, CPU, torch.float32, quant="nf4").model.layers[0].mlp.up_proj)


def test_nf4_on_a_device_bitsandbytes_does_not_support_is_refused(monkeypatch):
    monkeypatch.setattr(require_bitsandbytes(), "supported_torch_devices", {"cpu", "cuda"})
    with pytest.raises(QuantizationUnavailable, match=r"QUANT=nf4 on mps: bitsandbytes .* does not support it"):
        check_quant("nf4", torch.device("mps"))
    check_quant("nf4", CPU)
    with pytest.raises(ValueError, match="unknown QUANT 'int8'"):
        check_quant("int8", CPU)


def test_4bit_layers_keep_the_layout_autograd_differentiates(micro_model_dir):
    model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)


def test_peft_loads_the_qlora_export_on_a_4bit_base_with_the_same_logits(micro_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    set_adapters(model)
    ours = logits_of(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(micro_model_dir))

    # The base as a PEFT user loads it: transformers' own 4-bit loading, PEFT's own LoRA layers.
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(micro_model_dir, quantization_config=config, device_map={"": "cpu"},
                                                dtype=torch.float32, attn_implementation="eager")
    # On a CPU with AVX512-BF16, bitsandbytes would compute this eval-mode base in bf16 (its packed CPU
    # layout); ours keeps the trainable fp32 layout. The same kernel on both sides compares the adapters.
    keep_trainable_layout(base)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert isinstance(peft_model.base_model.model.model.layers[0].mlp.down_proj, peft.tuners.lora.bnb.Linear4bit)
    torch.testing.assert_close(logits_of(peft_model), ours, rtol=1e-5, atol=1e-5)


def test_a_qlora_checkpoint_restores_on_the_full_precision_base(micro_model_dir, tmp_path):
    model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    set_adapters(model)
    path = save_checkpoint(tmp_path / "lora.pt", model, micro_model_dir, config={"QUANT": "nf4"})
    full_precision = load_model(micro_model_dir, CPU, torch.float32)
    restore_lora(full_precision, load_checkpoint(path))  # the base's fingerprint reads no linear weight
    restored, saved = lora_state_dict(full_precision), lora_state_dict(model)
    assert restored.keys() == saved.keys() and all(torch.equal(restored[key], saved[key]) for key in saved)


def test_export_lora_writes_the_peft_adapter_of_a_4bit_base_and_refuses_to_merge_into_it(micro_model_dir,
                                                                                        tmp_path):
    model = load_model(micro_model_dir, CPU, torch.float32, quant="nf4")
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    checkpoint = save_checkpoint(tmp_path / "lora.pt", model, micro_model_dir, config={"QUANT": "nf4"})
    result = run_script(["export_lora.py", f"--LORA_CKPT={checkpoint}", f"--PEFT_DIR={tmp_path / 'adapter'}",
                         "--QUANT=nf4"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file(), result.stdout
    refused = run_script(["export_lora.py", f"--LORA_CKPT={checkpoint}", f"--MERGED_DIR={tmp_path / 'merged'}",
                          "--QUANT=nf4"], check=False)
    assert refused.returncode != 0 and not (tmp_path / "merged").exists()
    assert refused.stderr.strip().splitlines()[-1].startswith("error: MERGED_DIR with QUANT=nf4")

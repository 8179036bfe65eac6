"""Tests of common/lora.py on micro Gemma 2, Llama and Qwen 2 models (Qwen 2's q/k/v have biases).

Expected values come from hand computations (x Wᵀ + b + scaling · x Aᵀ Bᵀ) or from
a copy of the model taken before apply_lora (the PEFT export: tests/test_peft_io.py).
"""

import copy
import math

import pytest
import torch
from torch import nn

from common.lora import (
    LoRALinear,
    LoRAStateError,
    LoRAWeights,
    apply_lora,
    disable_lora,
    load_lora_state_dict,
    lora_config,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
    use_lora_weights,
)
from tests.conftest import DEVICE, DEVICES, micro_model

ARCHS = ["gemma2", "llama", "qwen2"]
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEARS = ATTENTION_LINEARS + ("gate_proj", "up_proj", "down_proj")
# The micro models: hidden 16, 2 heads of 8 for q, 1 key-value head of 8, MLP 32, 2 layers.
LINEAR_SHAPES = {"q_proj": (16, 16), "k_proj": (8, 16), "v_proj": (8, 16), "o_proj": (16, 16),
                 "gate_proj": (32, 16), "up_proj": (32, 16), "down_proj": (16, 32)}  # (out, in)

# Row 0 is left-padded (pad id 0), row 1 fills the width.
INPUT_IDS = torch.tensor([[0, 0, 5, 9, 12, 7, 33], [3, 8, 11, 4, 6, 10, 60]])
ATTENTION_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.1, lora_a_too: bool = False) -> None:
    """Non-zero B (and optionally A): the adapter then changes the model's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * scale)
            if lora_a_too:
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * scale)


def adapted_model(arch: str, r: int = 4, alpha: float = 8.0, targets=ATTENTION_LINEARS, **kwargs):
    """(model with LoRA and random non-zero B, deep copy of the model before apply_lora)."""
    model = micro_model(arch)
    base = copy.deepcopy(model)
    apply_lora(model, r=r, alpha=alpha, target_modules=targets, **kwargs)
    randomize_adapters(model)
    return model, base


# 1. A fresh adapter (B = 0) is the base model.

@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_computes_exactly_the_base_model(arch):
    model = micro_model(arch)
    base = copy.deepcopy(model)
    wrapped = apply_lora(model, r=4, alpha=8, target_modules=ALL_LINEARS)
    assert len(wrapped) == 2 * len(ALL_LINEARS)
    assert torch.equal(logits_of(model), logits_of(base))


def test_apply_lora_returns_the_sorted_full_names_and_keeps_eval_mode():
    model = micro_model("llama")
    wrapped = apply_lora(model, r=2, alpha=4, target_modules=["v_proj", "q_proj"], dropout=0.5)
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert list(lora_modules(model)) == wrapped
    assert all(not module.training for module in lora_modules(model).values())
    randomize_adapters(model)
    # Eval mode: dropout is off, so two passes agree.
    assert torch.equal(logits_of(model), logits_of(model))


# 2. Merging folds the update into the weights; unmerging takes it back out.

@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_the_adapter_path_and_unmerge_restores_the_base_weights(arch):
    model, base = adapted_model(arch, targets=ALL_LINEARS)
    adapter_logits = logits_of(model)
    assert not torch.allclose(adapter_logits, logits_of(base), atol=1e-3)

    merge_lora(model)
    assert all(module.merged for module in lora_modules(model).values())
    torch.testing.assert_close(logits_of(model), adapter_logits, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)

    unmerge_lora(model)
    base_weights = {name: module.weight for name, module in base.named_modules() if isinstance(module, nn.Linear)}
    for name, module in lora_modules(model).items():
        torch.testing.assert_close(module.base.weight, base_weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_of(model), adapter_logits, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)


def test_merged_weight_is_base_plus_scaled_b_times_a():
    layer = LoRALinear(nn.Linear(6, 5), r=3, alpha=6)
    nn.init.normal_(layer.lora_B)
    weight = layer.base.weight.detach().clone()
    expected = weight + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()  # alpha / r = 6 / 3
    torch.testing.assert_close(layer.delta_weight(), expected - weight)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, expected)


def test_merge_refuses_a_weight_tied_to_the_embeddings():
    model = micro_model("gemma2")  # tie_word_embeddings: lm_head.weight is embed_tokens.weight
    apply_lora(model, r=2, alpha=2, target_modules=["lm_head"])
    with pytest.raises(RuntimeError, match="shared with other layers: lm_head"):
        merge_lora(model)
    assert not lora_modules(model)["lm_head"].merged


# 3. disable_lora is the base model (the KL reference policy).

@pytest.mark.parametrize("arch", ARCHS)
def test_disable_lora_gives_the_base_model_and_restores_the_adapters(arch):
    model, base = adapted_model(arch)
    base_logits, adapter_logits = logits_of(base), logits_of(model)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)

    with disable_lora(model):
        assert torch.equal(logits_of(model), base_logits)
    assert torch.equal(logits_of(model), adapter_logits)

    with pytest.raises(KeyError):
        with disable_lora(model):
            raise KeyError("inside the block")
    assert all(module.enabled for module in lora_modules(model).values())
    assert torch.equal(logits_of(model), adapter_logits)


def test_lora_weights_start_as_the_base_model_and_switch_in_exactly():
    """A fresh LoRAWeights (B = 0) computes the base model; with its factors set, the switched-in
    model equals a copy whose own LoRA holds those factors; on exit (even by an exception) the
    layers' own factors return."""
    torch.manual_seed(0)
    model, base = adapted_model("gemma2")
    own_logits = logits_of(model)
    weights = LoRAWeights(model)
    assert [tuple(a.shape) for a in weights.lora_A] == [tuple(m.lora_A.shape) for m in lora_modules(model).values()]
    with use_lora_weights(model, weights):
        torch.testing.assert_close(logits_of(model), logits_of(base), atol=1e-6, rtol=0)

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module, lora_A, lora_B in zip(lora_modules(twin).values(), weights.lora_A, weights.lora_B):
            lora_B.normal_(std=0.1)
            module.lora_A.copy_(lora_A)
            module.lora_B.copy_(lora_B)
    with pytest.raises(KeyError):
        with use_lora_weights(model, weights):
            torch.testing.assert_close(logits_of(model), logits_of(twin), atol=1e-6, rtol=0)
            raise KeyError("inside the block")
    assert torch.equal(logits_of(model), own_logits)


def test_gradients_under_switched_weights_reach_those_weights_only():
    model, _ = adapted_model("llama")
    weights = LoRAWeights(model)
    with torch.no_grad():
        for lora_B in weights.lora_B:
            lora_B.normal_(std=0.1)
    with use_lora_weights(model, weights):
        output = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
    output.square().mean().backward()  # after the block: the graph kept the switched-in factors
    assert all(parameter.grad is None for parameter in lora_parameters(model))
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in weights.parameters())


def test_lora_weights_of_other_layers_or_a_merged_model_are_refused():
    model, _ = adapted_model("llama")
    other, _ = adapted_model("llama", targets=("q_proj", "v_proj"))
    with pytest.raises(LoRAStateError, match="k_proj"):
        with use_lora_weights(model, LoRAWeights(other)):
            pass
    weights = LoRAWeights(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        with use_lora_weights(model, weights):
            pass


def test_disable_lora_restores_each_layers_previous_state():
    model, _ = adapted_model("llama")
    layers = list(lora_modules(model).values())
    layers[0].enabled = False
    with disable_lora(model):
        assert not any(layer.enabled for layer in layers)
    assert [layer.enabled for layer in layers] == [False] + [True] * (len(layers) - 1)


def test_disabling_a_merged_model_is_refused():
    model, _ = adapted_model("gemma2")
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with disable_lora(model):
            pass
    layer = next(iter(lora_modules(model).values()))
    with pytest.raises(RuntimeError, match="merged"):
        layer.enabled = False
    assert all(module.enabled and module.merged for module in lora_modules(model).values())


def test_merging_inside_disable_lora_is_refused():
    model, _ = adapted_model("llama")
    with disable_lora(model):
        with pytest.raises(RuntimeError, match="disabled"):
            merge_lora(model)


def test_functions_that_need_lora_layers_refuse_a_plain_model():
    model = micro_model("llama")
    assert lora_modules(model) == {} and lora_parameters(model) == []
    for use in (merge_lora, lora_state_dict, lora_config):
        with pytest.raises(ValueError, match="apply_lora"):
            use(model)
    with pytest.raises(ValueError, match="apply_lora"):
        with disable_lora(model):
            pass


# 4. One layer against the formula.

@pytest.mark.parametrize(DEVICE, DEVICES)
@pytest.mark.parametrize("use_rslora, scaling", [(False, 12.0 / 4), (True, 12.0 / 2)])  # alpha / r, alpha / sqrt(r)
def test_lora_linear_matches_the_hand_computation(use_rslora, scaling, device):
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = LoRALinear(linear, r=4, alpha=12, use_rslora=use_rslora)
    assert layer.scaling == scaling
    nn.init.normal_(layer.lora_B)
    layer.to(device)
    x = torch.randn(3, 2, 6).to(device)
    weight, bias, lora_a, lora_b = linear.weight, linear.bias, layer.lora_A, layer.lora_B
    expected = x @ weight.T + bias + scaling * (x @ lora_a.T) @ lora_b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_dropout_applies_to_the_adapter_input_only_in_training():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = LoRALinear(linear, r=2, alpha=2, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.manual_seed(7)
        dropped = layer(x)
        torch.manual_seed(7)
        mask = torch.empty_like(x).bernoulli_(0.5) * 2.0  # what nn.Dropout(0.5) draws, scaled by 1 / (1 - p)
        expected = linear(x) + (x * mask) @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(dropped, expected)
        layer.eval()
        torch.testing.assert_close(layer(x), linear(x) + x @ layer.lora_A.T @ layer.lora_B.T)


def test_bf16_base_with_fp32_adapter():
    """fp32 masters, a bf16 adapter path: the output is the hand computation with A and B rounded to bf16,
    within bf16's rounding of the fp32 one, and the gradients reach the masters in fp32."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 4).to(torch.bfloat16)
    layer = LoRALinear(linear, r=2, alpha=4)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    output = layer(x)
    assert output.dtype == torch.bfloat16
    bf16_update = 2.0 * (x @ layer.lora_A.detach().bfloat16().T) @ layer.lora_B.detach().bfloat16().T
    torch.testing.assert_close(output, linear(x) + bf16_update)
    fp32_reference = linear(x).float() + 2.0 * (x.float() @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(output.float(), fp32_reference, atol=0.05, rtol=0.02)

    output.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    lora_A, lora_B = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    (2.0 * (x.float() @ lora_A.T) @ lora_B.T).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, lora_A.grad, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.lora_B.grad, lora_B.grad, atol=0.05, rtol=0.02)

    merged_weight = (linear.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert layer.base.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base.weight, merged_weight)


def test_bf16_adapter_path_makes_no_fp32_copy_of_the_activations():
    """Every op of a bf16 layer's forward and backward that touches a [tokens, features] tensor does so in
    bf16 (the only fp32 tensors are the r x in and out x r factors and their gradients)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fp32Activations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for tensor in [*args, *(result if isinstance(result, (tuple, list)) else [result])]:
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.dim() == 2 \
                        and tensor.size(0) == tokens:
                    self.seen.append(str(func))
            return result

    tokens = 64  # more than every dimension of the factors, so a [tokens, *] tensor is an activation
    layer = LoRALinear(nn.Linear(32, 48).to(torch.bfloat16), r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(tokens, 32, dtype=torch.bfloat16, requires_grad=True)
    with Fp32Activations() as mode:
        layer(x).sum().backward()
    assert mode.seen == []
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=2.0), dict(alpha=0), dict(dropout=1.0), dict(dropout=-0.1)])
def test_lora_linear_rejects_bad_settings(bad):
    settings = dict(r=2, alpha=4, dropout=0.0) | bad
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), **settings)


# 5. What trains.

@pytest.mark.parametrize("arch", ARCHS)
def test_only_the_adapters_train(arch):
    model = micro_model(arch)
    apply_lora(model, r=4, alpha=8, target_modules=ALL_LINEARS)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert {id(parameter) for parameter in lora_parameters(model)} == {
        id(parameter) for parameter in model.parameters() if parameter.requires_grad}
    assert len(lora_parameters(model)) == 2 * 2 * len(ALL_LINEARS)

    def backward():
        model.zero_grad(set_to_none=True)
        model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits.pow(2).mean().backward()

    backward()
    layers = lora_modules(model).values()
    # With B = 0 the gradient reaching A goes through B, so it is exactly zero; B's is not.
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in layers)
    assert all(torch.count_nonzero(layer.lora_A.grad) == 0 for layer in layers)
    for name, parameter in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):
            assert parameter.grad is None, name

    randomize_adapters(model)
    backward()
    assert all(layer.lora_A.grad.abs().sum() > 0 for layer in layers)


def test_lora_a_is_kaiming_uniform_like_peft():
    torch.manual_seed(0)
    model = micro_model("llama")
    apply_lora(model, r=4, alpha=8, target_modules=ALL_LINEARS)
    for name, layer in lora_modules(model).items():
        out_features, in_features = LINEAR_SHAPES[name.rsplit(".", 1)[-1]]
        assert layer.lora_A.shape == (4, in_features) and layer.lora_B.shape == (out_features, 4)
        assert torch.count_nonzero(layer.lora_B) == 0
        # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
        bound = 1 / math.sqrt(in_features)
        assert layer.lora_A.abs().max() <= bound
        # 64+ uniform draws all below half the bound: probability 2^-64.
        assert layer.lora_A.abs().max() > bound / 2
        assert layer.lora_A.device == layer.base.weight.device


# 6. Target names.

def test_no_matching_name_lists_the_linear_layers():
    model = micro_model("gemma2")
    with pytest.raises(ValueError) as error:
        apply_lora(model, r=2, alpha=2, target_modules=["query"])
    message = str(error.value)
    assert "query" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message
    assert lora_modules(model) == {}
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_a_misspelt_name_among_good_ones_is_an_error():
    model = micro_model("llama")
    with pytest.raises(ValueError, match="named vproj"):
        apply_lora(model, r=2, alpha=2, target_modules=["q_proj", "vproj"])
    assert lora_modules(model) == {}


def test_a_string_target_is_refused():
    with pytest.raises(TypeError, match="list of attribute names"):
        apply_lora(micro_model("llama"), r=2, alpha=2, target_modules="q_proj")


def test_lm_head_is_wrapped_only_when_named():
    model = micro_model("qwen2")
    assert "lm_head" not in apply_lora(model, r=2, alpha=2, target_modules=ALL_LINEARS)
    model = micro_model("qwen2")
    assert apply_lora(model, r=2, alpha=2, target_modules=["lm_head"]) == ["lm_head"]


def test_applying_twice_is_refused():
    model = micro_model("llama")
    apply_lora(model, r=2, alpha=2, target_modules=["q_proj"])
    with pytest.raises(RuntimeError, match="already has 2 LoRA layers"):
        apply_lora(model, r=2, alpha=2, target_modules=["v_proj"])


# 7. Saving and loading our own state.

def test_lora_state_dict_and_config():
    model, _ = adapted_model("qwen2", r=4, alpha=16, targets=["v_proj", "q_proj"], dropout=0.05, use_rslora=True)
    state = lora_state_dict(model)
    assert sorted(state) == sorted(f"model.layers.{layer}.self_attn.{proj}.lora_{kind}"
                                   for layer in (0, 1) for proj in ("q_proj", "v_proj") for kind in "AB")
    for key, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad, key
    assert state["model.layers.0.self_attn.v_proj.lora_A"].shape == (4, 16)
    assert state["model.layers.0.self_attn.v_proj.lora_B"].shape == (8, 4)
    assert lora_config(model) == {"r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj"],
                                  "dropout": 0.05, "use_rslora": True}


@pytest.mark.parametrize("arch", ARCHS)
def test_load_lora_state_dict_round_trip(arch):
    trained, _ = adapted_model(arch)
    trained_logits = logits_of(trained)
    state = lora_state_dict(trained)
    fresh = micro_model(arch)
    apply_lora(fresh, r=4, alpha=8, target_modules=ATTENTION_LINEARS)
    load_lora_state_dict(fresh, state)
    assert torch.equal(logits_of(fresh), trained_logits)
    for tensor in state.values():
        tensor.zero_()
    # Neither model shares storage with the state.
    assert torch.equal(logits_of(fresh), trained_logits)
    assert torch.equal(logits_of(trained), trained_logits)


def loaded_target():
    model = micro_model("llama")
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return model


def refusal_message(model, state) -> str:
    before = lora_state_dict(model)
    with pytest.raises(LoRAStateError) as error:
        load_lora_state_dict(model, state)
    after = lora_state_dict(model)
    assert all(torch.equal(before[key], after[key]) for key in before), "a refused load changed the model"
    return str(error.value)


def test_a_missing_key_is_refused():
    model = loaded_target()
    state = lora_state_dict(model)
    del state["model.layers.1.self_attn.v_proj.lora_B"]
    assert "missing: model.layers.1.self_attn.v_proj.lora_B" in refusal_message(model, state)


def test_an_unexpected_key_is_refused():
    model = loaded_target()
    state = lora_state_dict(model) | {"model.layers.0.mlp.up_proj.lora_A": torch.zeros(4, 16)}
    assert "unexpected: model.layers.0.mlp.up_proj.lora_A" in refusal_message(model, state)


def test_another_rank_is_refused_with_both_ranks():
    model = loaded_target()
    other = micro_model("llama")
    apply_lora(other, r=8, alpha=8, target_modules=["q_proj", "v_proj"])
    message = refusal_message(model, lora_state_dict(other))
    assert ("model.layers.0.self_attn.q_proj.lora_A: expected shape [4, 16], got [8, 16] "
            "(rank 8 in the checkpoint, 4 in the model)") in message
    assert ("model.layers.0.self_attn.v_proj.lora_B: expected shape [8, 4], got [8, 8] "
            "(rank 8 in the checkpoint, 4 in the model)") in message


def test_another_shape_is_refused():
    model = loaded_target()
    state = lora_state_dict(model) | {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 17)}
    message = refusal_message(model, state)
    assert "model.layers.0.self_attn.q_proj.lora_A: expected shape [4, 16], got [4, 17]" in message
    assert "rank" not in message


def test_all_differences_are_listed_together():
    model = loaded_target()
    state = lora_state_dict(model)
    del state["model.layers.0.self_attn.q_proj.lora_A"]
    state["model.layers.0.self_attn.k_proj.lora_A"] = torch.zeros(4, 16)
    state["model.layers.1.self_attn.q_proj.lora_B"] = torch.zeros(16, 2)
    message = refusal_message(model, state)
    assert "missing: model.layers.0.self_attn.q_proj.lora_A" in message
    assert "unexpected: model.layers.0.self_attn.k_proj.lora_A" in message
    assert "rank 2 in the checkpoint, 4 in the model" in message


def test_partial_loads_are_refused():
    model = loaded_target()
    with pytest.raises(ValueError, match="partial loads are refused"):
        load_lora_state_dict(model, lora_state_dict(model), strict=False)


def test_loading_into_a_merged_model_is_refused():
    model, _ = adapted_model("llama")
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        load_lora_state_dict(model, lora_state_dict(model))


"""4-bit base weights (QLoRA, Dettmers et al. 2023): the frozen linear layers stored as NF4.

``QUANT=nf4`` loads the base model through transformers' ``BitsAndBytesConfig``: every nn.Linear
of the body becomes a bitsandbytes ``Linear4bit`` whose weight is kept as 4-bit NormalFloat codes
(two per byte) with one absmax scale per block of 64 weights, the scales themselves quantized to
8 bits in blocks of 256 (double quantization):

    bytes per weight = 1/2 + 1/64 + 4 / (64 * 256) = 0.516        (bf16: 2, fp32: 4)

Each forward dequantizes the layer's weight to the model's dtype (the compute dtype) and multiplies
in it, so only the storage is 4-bit. The embeddings, the norms and the output head stay in the
model's dtype: transformers converts no module but nn.Linear and never the output embeddings.
transformers 5.23 with bitsandbytes 0.50.2 quantizes on the CPU too (device_map cpu), which is
what the tests run.

The hand-written LoRA (common/lora.py) wraps a Linear4bit like any nn.Linear (it is a subclass):
only ``base(x)`` changes, the adapters stay fp32 masters, and ``disable_lora`` still gives the
base model, here the 4-bit one, as the reference policy. The gradient reaches the adapters of
earlier layers through bitsandbytes' MatMul4Bit backward, d x = d y · dequant(W), so the LoRA
gradients are those of a float layer holding the dequantized weights. Merging into a 4-bit weight
is refused (LoRALinear.merge): W + B·A rounded back to 4 bits would lose most of the update.

bitsandbytes is an optional dependency: ``QUANT=nf4`` without it is one clear error.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from common.errors import UserError

QUANTS = ("none", "nf4")
# The annotation of a script's QUANT constant (common.config checks it at start-up).
Quant = Literal["none", "nf4"]
BITSANDBYTES_REQUIREMENT = "bitsandbytes==0.50.2"
# transformers' 4-bit loader refuses to run without accelerate (quantizer_bnb_4bit.validate_environment),
# with or without a device_map; requirements.txt pins it.
ACCELERATE_REQUIREMENT = "accelerate==1.16.0"


class QuantizationUnavailable(UserError, RuntimeError):
    """QUANT=nf4 asked for where it cannot run: bitsandbytes or accelerate missing, or a device bitsandbytes
    does not support."""


def require_bitsandbytes():
    """The bitsandbytes module, or QuantizationUnavailable saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise QuantizationUnavailable(f"QUANT=nf4 needs bitsandbytes, which is not installed: "
                                      f"pip install {BITSANDBYTES_REQUIREMENT} (or use QUANT=none)") from None
    return bitsandbytes


def check_quant(quant: str, device: torch.device) -> None:
    """Refuse, in one line, a QUANT that cannot run on ``device`` (before any weight is read)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown QUANT {quant!r}; use one of {', '.join(QUANTS)}")
    if quant == "none":
        return
    bitsandbytes = require_bitsandbytes()
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise QuantizationUnavailable(f"QUANT=nf4 needs accelerate, which is not installed: pip install "
                                      f"{ACCELERATE_REQUIREMENT} (it is in requirements.txt), or use QUANT=none") from None
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cuda", "cpu"})
    if device.type not in supported:
        raise QuantizationUnavailable(f"QUANT=nf4 on {device.type}: bitsandbytes {bitsandbytes.__version__} does not "
                                      f"support it (it runs on {', '.join(sorted(supported))}); use QUANT=none")


def quantization_config(quant: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``quant`` (None for "none"): NF4, double quantization,
    computing in ``dtype``, the model's dtype."""
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is stored quantized (a bitsandbytes 4-bit parameter carries its
    scales in ``quant_state``)."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def keep_trainable_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for inference. On a CPU with AVX512-BF16, a
    Linear4bit's first forward in eval mode without grad (a rollout) converts its weight to a packed
    layout, after which matmul_4bit takes an inference kernel (gemv_4bit) that autograd does not
    differentiate and that computes in bf16: the policy pass after the first rollout would get no
    gradient through the base layers (bitsandbytes 0.50.2: nn/modules.py Linear4bit.forward,
    autograd/_functions.py matmul_4bit). Training needs the layout every device shares."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

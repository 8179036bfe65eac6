"""DTYPE=auto per card (simulated CUDA devices) and fp16 dynamic loss scaling (common.run.LossScaler):
the scaled gradients equal the plain ones, an underflowing fp16 gradient survives, an overflow skips
the update through the non-finite guard and halves the scale, and a trainer runs end to end in fp16."""

from __future__ import annotations

import contextlib
import json
import types

import pytest
import torch

from common.model import auto_dtype, dtype_line, get_dtype
from common.run import LossScaler, TrainingRun
from tests.conftest import TINY_MODEL_DIR, run_script

# (name, compute capability, native bf16 per is_bf16_supported(including_emulation=False))
CARDS = {"NVIDIA H200": ((9, 0), True), "NVIDIA A100-SXM4-40GB": ((8, 0), True),
         "NVIDIA GeForce RTX 3060": ((8, 6), True), "Tesla T4": ((7, 5), False), "Tesla V100-SXM2-16GB": ((7, 0), False),
         "NVIDIA GeForce RTX 2080 Ti": ((7, 5), False), "Tesla P100-PCIE-16GB": ((6, 0), False)}


def simulate_card(monkeypatch, name, keyword=True):
    capability, native = CARDS[name]
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if keyword:
        # The default (including_emulation=True) says yes on every one of them: bf16 can be emulated.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                            native or including_emulation)
    else:  # a torch without the keyword: the capability decides
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


@pytest.mark.parametrize("keyword", [True, False])
@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", torch.bfloat16), ("NVIDIA A100-SXM4-40GB", torch.bfloat16), ("NVIDIA GeForce RTX 3060", torch.bfloat16),
    ("Tesla T4", torch.float16), ("Tesla V100-SXM2-16GB", torch.float16), ("NVIDIA GeForce RTX 2080 Ti", torch.float16),
    ("Tesla P100-PCIE-16GB", torch.float32)])
def test_auto_dtype_is_bf16_only_where_the_card_has_it_natively(monkeypatch, name, expected, keyword):
    simulate_card(monkeypatch, name, keyword)
    cuda = torch.device("cuda", 0)
    dtype, why = auto_dtype(cuda)
    assert dtype is expected and get_dtype("auto", cuda) is expected
    line = dtype_line("auto", cuda)
    assert line.startswith(f"DTYPE=auto: {str(expected).removeprefix('torch.')} on {name}")
    assert ("loss scaling" in line) == (expected is torch.float16)
    assert get_dtype("bfloat16", cuda) is torch.bfloat16  # an explicit DTYPE is never overridden


def test_auto_dtype_off_cuda_is_fp32():
    for device in ("cpu", "mps"):
        assert auto_dtype(torch.device(device)) == (torch.float32, f"float32 on {device}")


def fp16_model_gradient(scaler: LossScaler, master: torch.nn.Parameter, factor: float):
    """loss = sum(fp16(master) * factor) * factor: the fp16 activation gradient is factor^2, which
    flushes to zero in fp16 for factor = 1e-4 (1e-8 < fp16's smallest subnormal, 6e-8)."""
    optimizer = torch.optim.SGD([master], lr=1.0)
    loss = (master.half() * torch.tensor(factor, dtype=torch.float16)).sum().float() * factor
    scaler.backward(loss)
    scaler.unscale_gradients(optimizer)
    return optimizer


def test_loss_scaling_recovers_a_gradient_fp16_flushes_to_zero():
    cpu = torch.device("cpu")
    plain = torch.nn.Parameter(torch.ones(4))
    fp16_model_gradient(LossScaler(torch.bfloat16, cpu), plain, 1e-4)  # disabled: a plain backward
    assert torch.equal(plain.grad, torch.zeros(4))
    scaled = torch.nn.Parameter(torch.ones(4))
    scaler = LossScaler(torch.float16, cpu)
    assert scaler.enabled and scaler.scaler.get_scale() == 65536.0
    optimizer = fp16_model_gradient(scaler, scaled, 1e-4)
    # 1e-4 in fp16 is 1.0001659e-4 (and the power-of-2 scale is exact): the true gradient, unscaled.
    expected = torch.tensor(1e-4, dtype=torch.float16).float() * 1e-4
    torch.testing.assert_close(scaled.grad, expected.expand(4), rtol=1e-3, atol=0)
    scaler.step(optimizer)
    torch.testing.assert_close(scaled.detach(), (1 - expected).expand(4))


def test_an_overflow_skips_the_update_through_the_guard_and_halves_the_scale():
    """A gradient that overflows once scaled: the guard sees inf, counts the skip, the weights stay, and
    the scale halves; the next update, at the lower scale, goes through."""
    cpu = torch.device("cpu")
    run = types.SimpleNamespace(skipped_updates=0, loss_scaler=LossScaler(torch.float16, cpu))
    master = torch.nn.Parameter(torch.ones(4))
    optimizer = fp16_model_gradient(run.loss_scaler, master, 16.0)  # 65536 * 16 * 16 overflows fp16 (65504)
    grad_norm = float(torch.nn.utils.clip_grad_norm_([master], 1.0))
    assert not TrainingRun.update_is_finite(run, 1, grad_norm, 0.0)
    assert run.skipped_updates == 1 and run.loss_scaler.scaler.get_scale() == 32768.0
    assert torch.equal(master.detach(), torch.ones(4))
    optimizer.zero_grad(set_to_none=True)
    while True:  # what the trainer's next steps do: halve until it fits
        optimizer = fp16_model_gradient(run.loss_scaler, master, 16.0)
        grad_norm = float(torch.nn.utils.clip_grad_norm_([master], 1e9))
        if TrainingRun.update_is_finite(run, 2, grad_norm, 0.0):
            break
        optimizer.zero_grad(set_to_none=True)
    torch.testing.assert_close(master.grad, torch.full((4,), 256.0))  # 16 * 16, unscaled exactly
    run.loss_scaler.step(optimizer)
    assert torch.equal(master.detach(), torch.full((4,), -255.0))
    assert run.loss_scaler.scaler.get_scale() == 65536.0 / 2 ** run.skipped_updates


def test_disabled_scaler_is_a_plain_backward_and_step():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        scaler = LossScaler(dtype, cpu)
        weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        optimizer = torch.optim.SGD([weight], lr=0.5)
        scaler.backward((weight ** 2).sum())
        scaler.unscale_gradients(optimizer)
        assert torch.equal(weight.grad, torch.tensor([2.0, 4.0]))
        scaler.step(optimizer)
        assert torch.equal(weight.detach(), torch.tensor([0.0, 0.0])) and scaler.skip() == ""


def test_grpo_trains_an_fp16_model_with_loss_scaling(tmp_path):
    """The GRPO trainer end to end with DTYPE=float16 on the CPU (the tiny model, whose groups have
    advantages, so the policy pass runs): scaled backward, unscaled clipping, the scaler's step, and
    its state in the checkpoint."""
    result = run_script(["run_train_grpo.py", f"--MODEL_PATH={TINY_MODEL_DIR}", "--TRAIN_FILE=data/synth_train.jsonl",
                         "--EVAL_FILE=data/synth_test.jsonl", "--NUM_PROMPTS=8", "--PROMPTS_PER_STEP=4",
                         "--NUM_SAMPLES_PER_PROMPT=4", "--MAX_NEW_TOKENS=40", "--MAX_STEPS=1", "--EVAL_EVERY=0",
                         "--DEVICE=cpu", "--DTYPE=float16", "--SAMPLER=eager", f"--CHECKPOINT_DIR={tmp_path}",
                         f"--LOG_DIR={tmp_path}", "--RUN_NAME=fp16"])
    assert "DTYPE=float16" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "fp16.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1]
    assert any(line["grad_norm"] is not None for line in lines)  # an update ran (finite or skipped)
    checkpoint = torch.load(sorted((tmp_path / "fp16").glob("*.pt"))[-1], weights_only=True)
    assert checkpoint["extra"]["loss_scaler"]["scale"] <= 65536.0

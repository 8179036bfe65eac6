"""Checkpoints: exact round trip, atomic writes, refusing code and mismatched models."""

import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common.checkpoint as checkpoint_module
from common.checkpoint import (CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint,
                               load_lora_checkpoint, remove_stale_temporary_files, restore_lora,
                               restore_training_state, save_checkpoint)
from common.lora import LoRAStateError, apply_lora, lora_parameters
from tests.conftest import REPO_ROOT, micro_model

INPUT_IDS = torch.tensor([[2, 5, 9, 11, 4, 7]])


def trained_lora_model(arch="gemma2", r=4, targets=("q_proj", "v_proj")):
    model = micro_model(arch)
    apply_lora(model, r=r, alpha=8, target_modules=targets)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(2):
        loss = model(INPUT_IDS).logits.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = trained_lora_model()
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path / "run" / "lora_epoch0_step2.pt", model, "models/micro", {"LR": 1e-2},
                           optimizer=optimizer, epoch=0, step=2, generators={"sampler": generator})
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)),
                      float(torch.rand(1, generator=generator)))
    with torch.no_grad():
        expected_logits = model(INPUT_IDS).logits

    fresh = micro_model("gemma2")
    checkpoint = load_lora_checkpoint(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(INPUT_IDS).logits, expected_logits)
    fresh_optimizer = torch.optim.AdamW(lora_parameters(fresh), lr=1e-2)
    fresh_generator = torch.Generator()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_training_state(checkpoint, fresh_optimizer, generators={"sampler": fresh_generator})
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)),
            float(torch.rand(1, generator=fresh_generator))) == expected_draws
    saved_state, restored_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved_state.keys() == restored_state.keys()
    for index in saved_state:
        assert torch.equal(saved_state[index]["exp_avg"], restored_state[index]["exp_avg"])
        assert torch.equal(saved_state[index]["exp_avg_sq"], restored_state[index]["exp_avg_sq"])
    assert checkpoint["step"] == 2 and checkpoint["config"] == {"LR": 1e-2}
    assert checkpoint["lora_config"] == {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                         "dropout": 0.0, "use_rslora": False}


def test_torn_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = trained_lora_model()
    path = tmp_path / "lora_epoch0_step1.pt"
    save_checkpoint(path, model, "models/micro", {"version": 1}, step=1)

    def crash_before_rename(*args):
        raise OSError("simulated crash before rename")

    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.add_(1.0)
    monkeypatch.setattr(checkpoint_module.os, "replace", crash_before_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, model, "models/micro", {"version": 2}, step=1)
    monkeypatch.undo()
    previous = load_checkpoint(path)
    assert previous["config"] == {"version": 1}
    assert os.listdir(tmp_path) == [path.name]  # the temporary file is gone too


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_pickle_holding_code_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"lora": {}, "lora_config": {}, "payload": RunsCode()}, path)
    monkeypatch.chdir(tmp_path)  # where the payload would drop its marker file
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_checkpoint_for_another_model_is_refused(tmp_path):
    model, _ = trained_lora_model("llama")
    path = save_checkpoint(tmp_path / "c.pt", model, "models/llama-micro", {})
    with pytest.raises(CheckpointError) as error:
        load_lora_checkpoint(micro_model("gemma2"), path)
    assert "model_type: 'llama' in the checkpoint, 'gemma2' in the model" in str(error.value)
    assert "models/llama-micro" in str(error.value)


def test_checkpoint_with_another_lora_layout_is_refused(tmp_path):
    model, _ = trained_lora_model(r=4)
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "c.pt", model, "m", {}))
    other_rank = micro_model("gemma2")
    apply_lora(other_rank, r=8, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(CheckpointError, match="r: 4 in the checkpoint, 8 in the model"):
        restore_lora(other_rank, checkpoint)
    # A state whose tensors were tampered with to another rank is refused by the strict loader.
    checkpoint["lora_config"]["r"] = 8
    with pytest.raises(LoRAStateError, match="rank 4 in the checkpoint, 8 in the model"):
        restore_lora(other_rank, checkpoint)


def test_checkpoint_names_and_listing(tmp_path):
    assert checkpoint_path("checkpoints/grpo-1", 2, 30) == checkpoint_module.Path(
        "checkpoints/grpo-1/lora_epoch2_step30.pt")
    model, _ = trained_lora_model()
    for epoch, step in [(0, 5), (1, 20), (0, 10)]:
        save_checkpoint(checkpoint_path(tmp_path / "run", epoch, step), model, "m", {}, epoch=epoch, step=step)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        "lora_epoch0_step5.pt", "lora_epoch0_step10.pt", "lora_epoch1_step20.pt"]
    assert load_checkpoint(tmp_path / "run")["step"] == 20  # a run directory means its newest checkpoint
    with pytest.raises(FileNotFoundError, match="no lora_epoch"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_with_non_finite_values_is_refused_naming_the_file(tmp_path):
    model, _ = trained_lora_model()
    path = save_checkpoint(tmp_path / "nan.pt", model, "m", {})
    checkpoint = torch.load(path, weights_only=True)
    name = next(iter(checkpoint["lora"]))
    checkpoint["lora"][name][0, 0] = float("nan")
    torch.save(checkpoint, path)
    module, _, kind = name.rpartition(".")
    with pytest.raises(CheckpointError, match=rf"nan\.pt: refused: .*a NaN in LoRA {kind[-1]} of {module};"):
        load_checkpoint(path)


def test_a_base_of_the_same_shape_with_other_weights_is_refused(tmp_path):
    """The fingerprint hashes some weights: a LoRA trained on one base is refused on another base of the
    same configuration (another seed), which the configuration fields alone cannot tell apart."""
    model, _ = trained_lora_model()
    path = save_checkpoint(tmp_path / "a.pt", model, "m", {})
    other_base = micro_model("gemma2", seed=1)
    with pytest.raises(CheckpointError, match="weights_sample: the embedding and norm weights differ"):
        load_lora_checkpoint(other_base, path)
    same_base_in_bf16 = micro_model("gemma2", seed=0).to(torch.bfloat16)  # compared to bf16's rounding
    checkpoint = load_lora_checkpoint(same_base_in_bf16, path)
    assert checkpoint["base_model"]["fingerprint"]["weights_sample"]


@pytest.mark.parametrize("trained_in, loaded_in", [("bfloat16", "float16"), ("float16", "bfloat16"),
                                                   ("float32", "float16")])
def test_a_lora_trained_in_one_dtype_loads_on_the_same_base_in_another(tmp_path, trained_in, loaded_in):
    """Issue 29, finding 3: a LoRA trained in bf16 (an H100, a 3060) is evaluated, resumed or souped on
    an fp16 card (a T4). The tiny model from disk, as the scripts load it; another base is still refused."""
    from common.model import load_model_and_tokenizer
    from tests.conftest import TINY_MODEL_DIR

    trained, _, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu", trained_in)
    apply_lora(trained, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    path = save_checkpoint(tmp_path / "a.pt", trained, TINY_MODEL_DIR, {})
    loaded, _, _ = load_model_and_tokenizer(TINY_MODEL_DIR, "cpu", loaded_in)
    load_lora_checkpoint(loaded, path)
    with torch.no_grad():
        loaded.get_input_embeddings().weight.mul_(1.02)  # another fine-tune of the same base
    with pytest.raises(CheckpointError, match="weights_sample"):
        load_lora_checkpoint(loaded, path)


def test_a_checkpoint_from_before_the_weights_sample_is_compared_by_its_hash(tmp_path):
    """Its hash was taken as bf16: the same base in fp32 or bf16 matches it, another base does not."""
    model, _ = trained_lora_model()
    path = save_checkpoint(tmp_path / "old.pt", model, "m", {})
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["base_model"]["fingerprint"]["weights_sample"]
    torch.save(checkpoint, path)
    load_lora_checkpoint(micro_model("gemma2", seed=0).to(torch.bfloat16), path)
    with pytest.raises(CheckpointError, match="weights_hash: .* only in an fp32 or bf16 DTYPE"):
        load_lora_checkpoint(micro_model("gemma2", seed=1), path)


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / ".lora_epoch0_step5.pt.12345.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "lora_epoch0_step4.pt").write_bytes(b"kept")
    removed = remove_stale_temporary_files(tmp_path)
    assert [p.name for p in removed] == [".lora_epoch0_step5.pt.12345.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_epoch0_step4.pt"]


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    model, _ = trained_lora_model()
    path = save_checkpoint(tmp_path / "lora_epoch0_step1.pt", model, "m", {}, step=1)
    before = path.read_bytes()

    def full_disk(obj, file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: .*lora_epoch0_step1\.pt"):
        save_checkpoint(path, model, "m", {}, step=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_epoch0_step1.pt"]  # no temporary file left


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    model, optimizer = trained_lora_model()
    path = save_checkpoint(tmp_path / "lora_epoch0_step1.pt", model, "m", {}, optimizer=optimizer, step=1)
    before, size = path.read_bytes(), path.stat().st_size
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(OSError, match=r"No space left on device: .*lora_epoch0_step2\.pt \(0\.0 MB free, "
                                      r"the checkpoint needs about 0\.\d MB"):
        save_checkpoint(tmp_path / "lora_epoch0_step2.pt", model, "m", {}, optimizer=optimizer, step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]
    assert checkpoint_module._tensor_bytes(torch.load(path, weights_only=True)) <= size  # the estimate's base


def test_torchs_short_write_error_is_named_a_full_disk(tmp_path, monkeypatch):
    """torch 2.13's zip writer, out of space, raises a RuntimeError, not an OSError (seen on a 3 MB tmpfs)."""
    model, _ = trained_lora_model()
    path = save_checkpoint(tmp_path / "lora_epoch0_step1.pt", model, "m", {}, step=1)
    before = path.read_bytes()

    def short_write(obj, file):
        file.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 751040 vs 750928")

    monkeypatch.setattr(checkpoint_module.torch, "save", short_write)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(1, 1, 70_000))
    with pytest.raises(OSError, match=r"No space left on device: .*lora_epoch0_step2\.pt \(0\.1 MB free"):
        save_checkpoint(tmp_path / "lora_epoch0_step2.pt", model, "m", {}, step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


FILL_A_SMALL_DISK = '''
import os, sys, torch
sys.path.insert(0, {repo!r})
from common.checkpoint import atomic_torch_save
os.system("mount -t tmpfs -o size=3m none {folder}")
atomic_torch_save({{"w": torch.zeros(100_000)}}, "{folder}/first.pt")  # 0.4 MB
try:  # 1.6 MB of tensors (the estimate) and 2 MB of pickled bytes: a short write, past the check
    atomic_torch_save({{"w": torch.zeros(400_000), "blob": b"x" * 2_000_000}}, "{folder}/second.pt")
except OSError as error:
    print(error.strerror)
print(sorted(os.listdir("{folder}")), torch.load("{folder}/first.pt", weights_only=True)["w"].shape[0])
'''


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-rm", "true"], capture_output=True).returncode != 0, reason="needs an unprivileged mount namespace")
def test_a_real_full_disk_is_named_and_the_earlier_checkpoint_kept(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    script = FILL_A_SMALL_DISK.format(repo=str(REPO_ROOT), folder=folder)
    result = subprocess.run(["unshare", "-rm", sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stderr[-3000:]
    assert lines[0].startswith(f"No space left on device: {folder}/second.pt (")
    assert "the checkpoint needs about 1.6 MB" in lines[0]
    assert lines[1] == "['first.pt'] 100000"  # the earlier checkpoint intact, no temporary file


def test_a_resume_on_fewer_gpus_restores_the_random_states_of_those_present(monkeypatch, capsys):
    """Saved on 2 GPUs, resumed where 1 is visible (simulated): torch.cuda.set_rng_state_all raised
    IndexError (issue 29, finding 11); GPU 0's state is restored and the line says so."""
    from common.checkpoint import restore_rng_state, rng_state

    state = rng_state()
    state["cuda"] = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda new_state, device="cuda": restored.update({device: new_state}))

    def one_gpu(new_states):
        for device, new_state in enumerate(new_states):
            if device >= 1:
                raise IndexError("list index out of range")
            restored[device] = new_state

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_gpu)
    restore_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])
    assert "random states of 2 GPUs, 1 visible here: the first 1's restored" in capsys.readouterr().out

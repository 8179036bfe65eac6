"""Where a model comes from and what the exports say about it: MODEL_PATH as a Hub id (downloaded into
models/ with a record; a clear message offline), the base model name a PEFT adapter records, and the
dtype a merged export keeps. Nothing is downloaded: the Hub is replaced by a stand-in or switched off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from common.model import (DOWNLOAD_RECORD, ModelNotFoundError, base_model_name, download_model, looks_like_hub_id,
                          resolve_model_path, saved_dtype)
from tests.conftest import REPO_ROOT, micro_model


@pytest.mark.parametrize("name, expected", [
    ("Qwen/Qwen2.5-1.5B-Instruct", True),
    ("google/gemma-2-2b-it", True),
    ("models/gemma-2-2b-it", False),  # models/ is a local directory: a path, even when the model is absent
    ("/abs/models/x", False),
    ("./models/x", False),
    ("a/b/c", False),
    ("gemma-2-2b-it", False),
])
def test_hub_ids_and_paths(name, expected, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert looks_like_hub_id(name) is expected


def test_offline_a_hub_id_says_how_to_download_it(tmp_path):
    code = ("from common.model import load_model_and_tokenizer\n"
            "load_model_and_tokenizer('Qwen/Qwen2.5-1.5B-Instruct', 'cpu')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert ("ModelNotFoundError: MODEL_PATH Qwen/Qwen2.5-1.5B-Instruct is not a local directory, and as a Hub id "
            "it cannot be downloaded: HF_HUB_OFFLINE is set.") in result.stderr
    assert "hf download Qwen/Qwen2.5-1.5B-Instruct --local-dir models/Qwen2.5-1.5B-Instruct" in result.stderr
    assert not (tmp_path / "models").exists()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """snapshot_download replaced by a stand-in that writes a config.json and records its calls."""
    calls = []

    def snapshot_download(repo_id, local_dir, revision=None, token=None, allow_patterns=None):
        calls.append({"repo_id": repo_id, "local_dir": str(local_dir), "allow_patterns": allow_patterns})
        os.makedirs(local_dir, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
        return str(local_dir)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_id_is_downloaded_once_into_models_with_a_record(fake_hub, tmp_path):
    (tmp_path / "models").mkdir()
    assert resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct") == Path("models/Qwen2.5-1.5B-Instruct")
    assert resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct") == Path("models/Qwen2.5-1.5B-Instruct")  # no new download
    assert len(fake_hub) == 1 and fake_hub[0]["repo_id"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert "*.safetensors" in fake_hub[0]["allow_patterns"] and "*.bin" not in fake_hub[0]["allow_patterns"]
    record = json.loads((tmp_path / "models" / "Qwen2.5-1.5B-Instruct" / DOWNLOAD_RECORD).read_text())
    assert record == {"repo_id": "Qwen/Qwen2.5-1.5B-Instruct", "revision": None}
    assert base_model_name("models/Qwen2.5-1.5B-Instruct")[0] == "Qwen/Qwen2.5-1.5B-Instruct"


def test_a_directory_holding_another_repository_is_refused(fake_hub, tmp_path):
    local_dir = tmp_path / "models" / "Instruct"
    local_dir.mkdir(parents=True)
    (local_dir / DOWNLOAD_RECORD).write_text(json.dumps({"repo_id": "org-a/Instruct", "revision": None}))
    assert resolve_model_path("org-a/Instruct") == local_dir.relative_to(tmp_path)
    with pytest.raises(ModelNotFoundError, match="models/Instruct, which holds org-a/Instruct"):
        resolve_model_path("org-b/Instruct")
    assert fake_hub == []


def test_download_errors_say_what_to_do(monkeypatch, tmp_path):
    def unreachable(**kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelNotFoundError, match="could not download org/m to .*Name or service not known\n"
                                                 "  when online: hf download org/m --local-dir"):
        download_model("org/m", tmp_path / "m")
    assert not (tmp_path / "m" / DOWNLOAD_RECORD).exists()


def test_base_model_name_prefers_the_id_given_then_the_record_then_the_config(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"_name_or_path": "org/from-config"}))
    assert base_model_name(model_dir, "org/given") == ("org/given", "BASE_MODEL_ID")
    assert base_model_name(model_dir) == ("org/from-config", f"_name_or_path of {model_dir / 'config.json'}")
    (model_dir / DOWNLOAD_RECORD).write_text(json.dumps({"repo_id": "org/recorded", "revision": None}))
    assert base_model_name(model_dir) == ("org/recorded", str(model_dir / DOWNLOAD_RECORD))
    (model_dir / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/checkpoints/run3"}))
    (model_dir / DOWNLOAD_RECORD).unlink()
    assert base_model_name(model_dir) == (str(model_dir.resolve()), "the local path")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saved_dtype_is_the_dtype_on_disk(dtype, tmp_path):
    micro_model("llama").to(dtype).save_pretrained(tmp_path)
    assert saved_dtype(tmp_path) is dtype

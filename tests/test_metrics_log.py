"""LOGGER: the JSONL file always, TensorBoard event files read back with TensorBoard's own reader, and
wandb through a stand-in module (the real one needs an account or a network), or a clear message when
the package is missing."""

import json
import sys
import types

import pytest

from common.metrics_log import LoggerUnavailableError, MetricsLogger, parse_loggers

RECORDS = [{"step": 0, "eval/accuracy": 0.25}, {"step": 1, "reward": 0.5, "accuracy": 0.75, "note": "text"},
           {"step": 2, "reward": 1.5, "accuracy": 1.0}]


def test_parse_loggers_always_includes_jsonl():
    assert parse_loggers("jsonl") == ["jsonl"]
    assert parse_loggers("wandb,tensorboard") == ["jsonl", "tensorboard", "wandb"]
    assert parse_loggers(("tensorboard",)) == ["jsonl", "tensorboard"]
    with pytest.raises(LoggerUnavailableError, match="unknown LOGGER mlflow; choose from jsonl, tensorboard, wandb"):
        parse_loggers("jsonl,mlflow")


def test_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path / "run.jsonl", "jsonl,tensorboard", run_name="run") as logger:
        for record in RECORDS:
            logger.log(record)
    assert [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()] == RECORDS
    events = EventAccumulator(str(tmp_path / "tensorboard" / "run"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["accuracy", "eval/accuracy", "reward"]
    assert [(event.step, event.value) for event in events.Scalars("reward")] == [(1, 0.5), (2, 1.5)]
    assert [(event.step, event.value) for event in events.Scalars("eval/accuracy")] == [(0, 0.25)]


def test_wandb_gets_each_records_numbers_at_its_step(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", values, step)),
                                finish=lambda: calls.append(("finish",)))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return run

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(tmp_path / "run.jsonl", "wandb", run_name="demo", config={"LR": 1e-4}) as logger:
        logger.log(RECORDS[1])
    assert calls == [("init", {"name": "demo", "config": {"LR": 1e-4}, "dir": str(tmp_path)}),
                     ("log", {"reward": 0.5, "accuracy": 0.75}, 1), ("finish",)]


@pytest.mark.parametrize("logger, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_package_says_what_to_install(logger, package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail as if absent
    if package == "tensorboard":
        monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(LoggerUnavailableError, match=f"LOGGER={logger} needs the {package} package: "
                                                     f"`.venv/bin/pip install {package}`"):
        MetricsLogger(tmp_path / "run.jsonl", logger)


def test_other_ranks_log_nowhere(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # never imported off rank 0
    with MetricsLogger(tmp_path / "run.jsonl", "jsonl,tensorboard,wandb", is_main=False) as logger:
        logger.log(RECORDS[0])
    assert list(tmp_path.iterdir()) == []

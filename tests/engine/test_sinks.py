"""Metric sinks: metrics.jsonl always, TensorBoard and wandb on request, clear errors otherwise."""

import json
import sys
import types

import pytest

from vipo.engine.config import load_config
from vipo.engine.errors import ConfigError
from vipo.engine.sinks import MetricSinks

ROWS = [{"step": 1, "loss": 0.7, "accuracy": 0.5}, {"step": 2, "loss": 0.6, "accuracy": 0.75}]


def test_jsonl_always_and_appended_on_resume(tmp_path):
    with MetricSinks(tmp_path, []) as sinks:
        sinks.write(ROWS[0])
    with MetricSinks(tmp_path, [], append=True) as sinks:
        sinks.write(ROWS[1])
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ROWS
    with MetricSinks(tmp_path, []) as sinks:  # a fresh run starts a fresh file
        sinks.write(ROWS[1])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_other_ranks_write_nothing(tmp_path):
    with MetricSinks(tmp_path, ["tensorboard"], enabled=False) as sinks:
        sinks.write(ROWS[0])
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_gets_every_scalar_at_its_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricSinks(tmp_path, ["tensorboard"]) as sinks:
        for row in ROWS:
            sinks.write(row)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [(e.step, round(e.value, 6)) for e in loss] == [(1, 0.7), (2, 0.6)]
    assert [e.value for e in events.Scalars("train/accuracy")] == [0.5, 0.75]


def test_wandb_logs_by_step_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        id = "run123"

        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricSinks(tmp_path, ["wandb"], run_name="demo", config={"a": 1}) as sinks:
        sinks.write(ROWS[0])
    with MetricSinks(tmp_path, ["wandb"], append=True) as sinks:
        sinks.write(ROWS[1])
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["name"] == "demo" and inits[0]["id"] is None and inits[0]["config"] == {"a": 1}
    assert inits[1]["id"] == "run123" and inits[1]["resume"] == "allow"
    assert ("log", 2, {"train/loss": 0.6, "train/accuracy": 0.75}) in calls
    assert calls.count(("finish",)) == 2


def test_a_sink_that_is_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"wandb, which is not installed \(pip install 'vipo\[track\]'\)"):
        MetricSinks(tmp_path, ["wandb"])


def test_a_missing_sink_stops_the_trainer_before_it_builds_anything(tmp_path, monkeypatch):
    from vipo.engine import trainer as trainer_module
    from vipo.engine.config import load_config

    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None, as when not installed
    built = []
    monkeypatch.setattr(trainer_module, "build_adapter", lambda *a, **k: built.append(a))
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"wandb, which is not installed"):
        trainer_module.Trainer(cfg, progress=False)
    assert built == []


def test_report_to_is_checked_in_the_config():
    assert load_config(None, ["train.report_to=tensorboard,wandb"]).train.report_to == [
        "tensorboard",
        "wandb",
    ]
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ["train.report_to=mlflow"])

"""logger=mlflow and logger=wandb: local files only (MLflow's file store, W&B offline), what
reaches them (step metrics, the config, final test results) read back from their own files,
and one line naming the pip extra when the package is missing."""

from __future__ import annotations

import importlib.abc
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from app_helpers import ROOT, TINY, only_run, run_train
from mtl_clippy.errors import ConfigError
from mtl_clippy.loggers import instantiate_loggers, log_results

CONFIGS = ROOT / "configs"


def _logger_config(tmp_path: Path, choice: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"logger={choice}", *overrides])
    OmegaConf.update(cfg, "paths.log_dir", str(tmp_path / "outputs"), force_add=True)
    run = tmp_path / "outputs" / "runs" / "2026-01-01_00-00-00_000000_sb-clippy"
    OmegaConf.update(cfg, "paths.output_dir", str(run), force_add=True)
    return cfg, run


def _log_a_run(loggers: list) -> None:
    """What a run sends: the model's hyperparameters when fitting starts, metrics at two
    steps, then (log_results) the resolved config, whose task_weights differs from the
    model's, and the test results."""
    for lg in loggers:
        lg.log_hyperparams({"task_weights": [1.0, 1.0], "optimizer": {"lr": 0.1}})
        lg.log_metrics({"val/auc_mean": 0.61, "train/loss": 0.5}, step=5)
        lg.log_metrics({"val/auc_mean": 0.66, "train/loss": 0.4}, step=10)
    config = {"task_weights": None, "seed": 42, "optim": {"lr": 0.1, "_target_": "x.Clippy"}}
    log_results(loggers, config, {"auc_mean": 0.7, "auc_click": 0.72, "logloss_click": None}, 10)


def _mlflow_client(store: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"file:{store}")


def _mlflow_run(store: Path):
    client = _mlflow_client(store)
    experiment = client.get_experiment_by_name("mtl-clippy")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_mlflow_writes_metrics_config_and_final_results_to_a_local_file_store(tmp_path):
    pytest.importorskip("mlflow")
    cfg, run_dir = _logger_config(tmp_path, "mlflow")
    assert cfg.logger.mlflow.tracking_uri == f"file:{tmp_path}/outputs/mlruns"
    loggers = instantiate_loggers(cfg.logger, None)
    _log_a_run(loggers)
    client, run = _mlflow_run(tmp_path / "outputs" / "mlruns")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_dir.name and run.data.tags["run_dir"] == str(run_dir)
    history = client.get_metric_history(run.info.run_id, "val/auc_mean")
    assert [(m.step, m.value) for m in history] == [(5, 0.61), (10, 0.66)]
    final = {k: v for k, v in run.data.metrics.items() if k.startswith("final/")}
    assert final == {"final/auc_mean": 0.7, "final/auc_click": 0.72}
    params = run.data.params
    # the model's value stays; the config's other value of the same name is config/<name>
    assert params["task_weights"] == "[1.0, 1.0]" and params["config/task_weights"] == "None"
    assert params["optim/lr"] == "0.1" and params["seed"] == "42"
    assert Path(loggers[0].log_dir).is_relative_to(tmp_path / "outputs" / "mlruns")


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``): W&B's log format, a
    7-byte file header (``:W&B``, 0xBEE1, version) then blocks of 32 KiB of records, each
    with a 7-byte header (CRC, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _complete_wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished W&B run, once its exit record is in the file: W&B's
    writer (a process of its own) can still be writing when ``finish()`` returns (seen on a
    loaded machine: the file held only its header)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {path} after {timeout} s"
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_writes_an_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg, run_dir = _logger_config(tmp_path, "wandb")
    loggers = instantiate_loggers(cfg.logger, None)
    assert os.environ["WANDB_MODE"] == "offline"
    _log_a_run(loggers)
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = _complete_wandb_records(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == run_dir.name and run.project == "mtl-clippy"
    history = [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    auc = [(h["trainer/global_step"], h["val/auc_mean"]) for h in history if "val/auc_mean" in h]
    assert auc == [(5, 0.61), (10, 0.66)]
    (final,) = [h for h in history if "final/auc_mean" in h]
    assert final["final/auc_mean"] == 0.7 and final["final/auc_click"] == 0.72
    assert "final/logloss_click" not in final  # an undefined result is left out
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
    assert config["seed"] == 42 and config["optim"]["lr"] == 0.1


class _Hide(importlib.abc.MetaPathFinder):
    """Makes ``name`` look uninstalled, as on a machine without the extra."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


@pytest.mark.parametrize("choice", ["mlflow", "wandb"])
def test_a_tracker_without_its_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, choice):
    cfg, run_dir = _logger_config(tmp_path, choice)
    for name in [m for m in sys.modules if m == choice or m.startswith(choice + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Hide(choice), *sys.meta_path])
    with pytest.raises(ConfigError) as info:
        instantiate_loggers(cfg.logger, None)
    assert str(info.value) == (
        f"logger={choice} needs the {choice} package, which is not installed: "
        f"pip install -e '.[{choice}]' (from the repository folder)"
    )
    assert not run_dir.exists() and not (tmp_path / "outputs" / "mlruns").exists()


SITE_HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == "mlflow":
            raise ModuleNotFoundError(fullname, name=fullname)
sys.meta_path.insert(0, Hide())
"""


@pytest.mark.slow  # about 15 s: a command that builds its data before its loggers
def test_train_py_without_mlflow_says_which_extra_to_install(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE_HIDE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    res = run_train(
        [
            "logger=mlflow",
            *TINY,
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={tmp_path}/data",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "error: logger=mlflow needs the mlflow package, which is not installed: "
        "pip install -e '.[mlflow]' (from the repository folder)"
    )
    metrics = json.loads((only_run(tmp_path) / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "pip install -e '.[mlflow]'" in metrics["error"]


@pytest.mark.slow  # about 40 s on 2 cores: a real run with both trackers
def test_a_run_with_both_trackers_writes_its_results_to_each(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    res = run_train(
        [
            "logger=[mlflow,wandb]",
            *TINY,
            "trainer.max_epochs=1",
            "callbacks.progress_bar.refresh_rate=0",
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={tmp_path}/data",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = only_run(tmp_path)
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    _, run = _mlflow_run(tmp_path / "outputs" / "mlruns")
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.metrics["final/auc_mean"] == pytest.approx(test["auc_mean"])
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in _complete_wandb_records(path)
        if r.WhichOneof("record_type") == "history"
    ]
    (final,) = [h for h in history if "final/auc_mean" in h]
    assert final["final/auc_mean"] == pytest.approx(test["auc_mean"])


def test_mlflow_uses_the_users_tracking_uri(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    cfg, _ = _logger_config(tmp_path, "mlflow")
    assert cfg.logger.mlflow.tracking_uri == f"file:{store}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert cfg.logger.mlflow.tracking_uri == f"file:{tmp_path}/outputs/mlruns"


def test_a_resumed_run_logs_into_its_mlflow_run_again(tmp_path):
    """The interrupted run's MLflow run (its id kept in the run folder) gets the resumed
    run's metrics and ends FINISHED: one MLflow run, not a FAILED one and a new one."""
    pytest.importorskip("mlflow")
    cfg, run_dir = _logger_config(tmp_path, "mlflow")
    (first,) = instantiate_loggers(cfg.logger, None)
    first.log_metrics({"val/auc_mean": 0.61}, step=5)
    first.finalize("failed")  # the run stopped
    run_id = first.run_id
    assert (run_dir / "mlflow_run_id.txt").read_text().strip() == run_id
    again, _ = _logger_config(tmp_path, "mlflow", ("resume=true",))
    OmegaConf.update(again, "paths.output_dir", str(run_dir))
    assert again.logger.mlflow.resume is True
    (second,) = instantiate_loggers(again.logger, None)
    second.log_metrics({"val/auc_mean": 0.66}, step=10)
    second.finalize("success")
    client, run = _mlflow_run(tmp_path / "outputs" / "mlruns")  # the only run
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "val/auc_mean")
    assert [(m.step, m.value) for m in history] == [(5, 0.61), (10, 0.66)]
    # a new run in that folder (not resumed) is a new MLflow run
    (third,) = instantiate_loggers(cfg.logger, None)
    assert third.run_id != run_id


def test_wandb_is_quiet_and_says_in_one_line_where_the_offline_run_is(
    tmp_path, monkeypatch, capfd, caplog
):
    pytest.importorskip("wandb")
    import logging

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    cfg, run_dir = _logger_config(tmp_path, "wandb")
    with caplog.at_level(logging.INFO, logger="mtl_clippy.trackers"):
        (lg,) = instantiate_loggers(cfg.logger, None)
        lg.log_metrics({"val/auc_mean": 0.6}, step=1)
        lg.close()
    out, err = capfd.readouterr()
    said = (out + err).splitlines()
    assert not [line for line in said if line.startswith("wandb:")], said
    (where,) = [r.getMessage() for r in caplog.records if "W&B offline run" in r.getMessage()]
    (folder,) = run_dir.glob("wandb/offline-run-*")
    assert str(folder) in where and f"wandb sync {folder}" in where

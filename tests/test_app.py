"""The experiment app: configs compose, every model x optimizer runs, train.py and sweeps write
what the README promises, and user mistakes get one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from app_helpers import TINY, run_train
from mtl_clippy.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
OPTIMS = sorted(p.stem for p in (CONFIGS / "optim").glob("*.yaml"))


def test_model_and_optimizer_choices_are_the_documented_ones():
    assert set(MODELS) >= {"sb", "ncf", "lr", "mmoe", "omoe", "ple", "single_task", "aitm", "esmm"}
    assert set(OPTIMS) >= {"clippy", "adagrad", "adam"}


def _compose(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    # outside a Hydra run: point the run folder and the data cache at tmp folders
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path.parent / "data"), force_add=True)
    return cfg


@pytest.mark.parametrize("group, choices", [("model", MODELS), ("optim", OPTIMS)])
def test_every_config_composes_and_instantiates(group, choices, tmp_path):
    import hydra

    for choice in choices:
        cfg = _compose(tmp_path, [f"{group}={choice}"])
        assert cfg[group]["_target_"]
        target = hydra.utils.get_class(cfg[group]["_target_"])
        assert target is not None
    for choice in ("synthetic", "aliexpress"):
        cfg = _compose(tmp_path, [f"data={choice}"])
        assert cfg.data._target_ == "mtl_clippy.data.AliExpressDataModule"
    for choice in ("default", "cpu", "gpu", "ddp"):
        assert _compose(tmp_path, [f"trainer={choice}"]).trainer._target_.endswith("Trainer")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_optimizer_pair_runs(model, optim, data_root, monkeypatch):
    run = data_root / f"{model}-{optim}"
    run.mkdir()
    cfg = _compose(
        run,
        [
            f"model={model}",
            f"optim={optim}",
            *TINY,
            "trainer.fast_dev_run=true",
            "trainer.accelerator=cpu",
            "logger=none",
            "callbacks=none",
        ],
    )
    summary = train(cfg)
    assert summary["status"] == "completed"
    assert summary["steps"] == 1
    assert set(summary["test"]) >= {
        "auc_click",
        "auc_conversion",
        "logloss_click",
        "logloss_conversion",
    }
    on_disk = json.loads((run / "run" / "metrics.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["lr"] == cfg.optim.lr


def _event_scalars(event_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_py_single_run_writes_its_folder(tmp_path, data_root):
    res = run_train(
        [
            *TINY,
            "trainer.max_epochs=2",
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={data_root}/data",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("_sb-clippy")
    run = runs[0]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["model"] == "sb" and m["optim"] == "clippy"
    assert m["epochs"] >= 1 and m["steps"] > 0 and m["samples_per_s"] > 0
    assert 0.0 < m["test"]["auc_click"] < 1.0 and m["bayes"]["auc_click"] > 0.5
    assert (run / "checkpoints" / "best.ckpt").is_file() and (
        run / "checkpoints" / "last.ckpt"
    ).is_file()
    assert "test AUC" in res.stdout and str(run) in res.stdout
    scalars = _event_scalars(run / "tensorboard")
    assert {"train/loss", "val/auc_click", "val/auc_mean", "test/auc_conversion"} <= set(scalars)
    assert any(t.startswith("lr-") for t in scalars)
    assert len(scalars["val/auc_mean"]) == 2  # one per epoch
    assert not any(p.name.startswith("version_") for p in run.rglob("*"))


def test_sweep_runs_jobs_and_writes_results_table(tmp_path, data_root):
    res = run_train(
        [
            "-m",
            "model=sb,lr",
            "optim=clippy,adam",
            *TINY,
            "trainer.max_epochs=1",
            f"paths.data_dir={data_root}/data",
        ],
        cwd=tmp_path,  # outputs/ goes under the folder the command is started from
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 4
    assert (sweep / "report" / "report.md").is_file()  # the study report, built at sweep end
    # job folders: <n>_<the job's overrides>, so a folder says what its run is
    names = {frozenset(j.name.split("_", 1)[1].split(",")) for j in jobs}
    for model in ("sb", "lr"):
        for optim in ("clippy", "adam"):
            assert any(
                {f"model={model}", f"optim={optim}", "trainer.max_epochs=1"} <= n for n in names
            )
    df = pd.read_csv(sweep / "results.csv")
    assert len(df) == 4 and set(df["status"]) == {"completed"}
    assert {
        "model",
        "optim",
        "lr",
        "seed",
        "test_auc_click",
        "test_logloss_conversion",
        "best_val_auc_mean",
        "samples_per_s",
        "wall_time_s",
    } <= set(df.columns)
    assert set(zip(df["model"], df["optim"])) == {
        ("sb", "clippy"),
        ("sb", "adam"),
        ("lr", "clippy"),
        ("lr", "adam"),
    }
    assert "| model |" in (sweep / "results.md").read_text().replace("| job | model |", "| model |")
    for job in jobs:
        assert "train/loss" in _event_scalars(job / "tensorboard")


def test_failing_job_does_not_stop_the_sweep(tmp_path, data_root):
    # model=lr with sparse embeddings cannot be trained by Adam: that job fails, the other runs.
    res = run_train(
        [
            "-m",
            "model=lr",
            "model.sparse_embeddings=true",
            "optim=adam,adagrad",
            *TINY,
            "trainer.max_epochs=1",
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={data_root}/data",
        ],
        cwd=tmp_path,
    )
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    df = pd.read_csv(sweep / "results.csv").set_index("optim")
    assert df.loc["adam", "status"] == "failed" and "sparse" in df.loc["adam", "error"]
    assert df.loc["adagrad", "status"] == "completed"
    assert "1 not completed" in res.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["model=transformer"], "sb"),  # lists the available choices
        (["optim=lamb"], "clippy"),
        (["data=aliexpress", "data.data_dir=DIR"], "train.csv"),
        (["model.sparse_embeddings=true", "optim=adam"], "sparse"),
        (["optim.lr=-1"], "lr must be >= 0"),
    ],
)
def test_user_mistakes_get_one_clear_message(args, expected, tmp_path):
    args = [a.replace("DIR", str(tmp_path / "empty")) for a in args]
    (tmp_path / "empty").mkdir()
    res = run_train(
        [*args, *TINY, f"paths.log_dir={tmp_path}/outputs", f"paths.data_dir={tmp_path}/data"],
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode != 0
    assert expected in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_run_and_sweep_folders_are_unique_and_named(tmp_path):
    """Two runs or sweeps started in the same second get different folders."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["model=ncf", "optim=adam"], return_hydra_config=True
        )
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"]
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    assert "%f" in sweep_dir and "${mtl_clippy.pid:}" in sweep_dir  # microseconds + process
    assert (
        "${mtl_clippy.run_dir:" in run_dir
        and "${hydra:runtime.choices.model}-${hydra:runtime.choices.optim}" in run_dir
    )
    from mtl_clippy import resume

    assert resume.STAMP.endswith("%f")  # a new run folder's name ends in microseconds
    fresh = resume.run_dir(str(tmp_path), "ncf-adam", OmegaConf.create({"resume": False}))
    assert Path(fresh).parent == tmp_path / "runs" and Path(fresh).name.endswith("_ncf-adam")
    # the same pattern, resolved in two processes started together, gives two folders
    code = (
        "import datetime, os; from omegaconf import OmegaConf; import mtl_clippy.train;"
        "print(OmegaConf.create({'d': '${mtl_clippy.pid:}'}).d, datetime.datetime.now().strftime('%f'))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate()[0].strip() for p in procs]
    assert outs[0] != outs[1]


def test_precision_auto_follows_the_hardware(monkeypatch):
    import mtl_clippy.train as app

    assert app.resolve_precision("32-true", "cpu") == "32-true"  # explicit choices are kept
    monkeypatch.setattr(app, "cpu_has_native_bf16", lambda: True)
    assert app.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(app, "cpu_has_native_bf16", lambda: False)
    assert app.resolve_precision("auto", "cpu") == "32-true"

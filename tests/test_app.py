"""The experiment app: configs compose, every model x optimizer runs, train.py and sweeps write
what the README promises, and user mistakes get one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hydra
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from app_helpers import TINY, readme_run_listing, run_listing, run_train, unlisted
from mtl_clippy import build as builder
from mtl_clippy import loggers as loggers_mod
from mtl_clippy import run_checks, runtime
from mtl_clippy.summary import format_summary
from mtl_clippy.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
OPTIMS = sorted(p.stem for p in (CONFIGS / "optim").glob("*.yaml"))


def test_model_and_optimizer_choices_are_the_documented_ones():
    assert set(MODELS) >= {
        "sb",
        "ncf",
        "lr",
        "mmoe",
        "omoe",
        "ple",
        "single_task",
        "aitm",
        "esmm",
        "metaheac",
    }
    assert set(OPTIMS) >= {"clippy", "adagrad", "adam"}


def _compose(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    # outside a Hydra run: point the run folder and the data cache at tmp folders
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path.parent / "data"), force_add=True)
    return cfg


GROUPS = ("data", "model", "optim", "scheduler", "trainer", "logger", "callbacks", "experiment")
SAMPLE_DIR = ROOT / "tests" / "data" / "aliexpress_sample"


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_scheduler_and_norm_options_are_there():
    assert set(_choices("scheduler")) >= {"none", "cosine", "plateau", "warmup_cosine"}
    for model in MODELS:  # every model config says which normalisation it uses
        assert "norm" in OmegaConf.load(CONFIGS / "model" / f"{model}.yaml"), model


@pytest.fixture(scope="module")
def tiny_metadata(data_root, tmp_path_factory):
    """The metadata of the default data on TINY rows, for the models."""
    import mtl_clippy.train as app

    cfg = _compose(tmp_path_factory.mktemp("meta"), TINY)
    OmegaConf.update(cfg, "paths.data_dir", str(data_root / "data"))
    return app.build(cfg)[0].metadata


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes_and_instantiates(group, tmp_path, data_root, tiny_metadata):
    """Every choice of every config group composes, and the objects it describes are built
    (data module on tiny data, model, optimizer on the model's parameters, scheduler on that
    optimizer, callbacks, loggers into tmp_path, trainer); nothing is trained."""
    import lightning.pytorch as pl
    import torch

    import mtl_clippy.train as app

    base = [*TINY, f"paths.data_dir={data_root}/data"]
    meta = tiny_metadata
    seen: set[str] = set()  # a config group's sweep value, composed once for every experiment
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for choice in _choices(group):
            extra = (
                [f"data.data_dir={SAMPLE_DIR}"] if (group, choice) == ("data", "aliexpress") else []
            )
            cfg = _compose_here(
                tmp_path / choice, [f"{group}={choice}", *base, *extra], group == "experiment"
            )
            if group == "data":
                dm = builder.instantiate_config(cfg.data, "data")
                dm.prepare_data()
                dm.setup("fit")
                cat, num, labels = next(iter(dm.val_dataloader()))
                assert cat.shape[1] == len(dm.metadata.vocab_sizes) == 16, choice
                assert num.shape[1] == 63 and labels.shape[1] == len(dm.metadata.tasks)
            elif group in ("model", "optim", "scheduler"):
                _check_module(builder.build_module(cfg, meta), cfg, meta, torch)
            elif group == "experiment":
                _check_experiment(app, cfg, meta, tmp_path / choice, base, torch, seen)
            elif group == "trainer":
                run_checks.check_trainer_values(cfg.trainer)
                accelerator = cfg.trainer.accelerator
                if accelerator == "gpu" and not torch.cuda.is_available():
                    accelerator = "cpu"  # every other key is still checked by the Trainer
                trainer = hydra.utils.instantiate(
                    cfg.trainer,
                    accelerator=accelerator,
                    precision=runtime.resolve_precision(cfg.trainer.precision, accelerator),
                    logger=False,
                    callbacks=[],
                )
                assert isinstance(trainer, pl.Trainer)
                assert trainer.max_epochs == cfg.trainer.max_epochs
                assert trainer.world_size == cfg.trainer.devices * cfg.trainer.get("num_nodes", 1)
            elif group == "logger":
                loggers = loggers_mod.instantiate_loggers(cfg.logger, None)
                assert len(loggers) == len(cfg.logger or {}), choice
                for lg in loggers:
                    assert isinstance(lg, pl.loggers.Logger)
                    lg.log_metrics({"x": 1.0}, step=0)
                    lg.finalize("success")
                    assert Path(lg.log_dir).is_relative_to(tmp_path / choice)
            elif group == "callbacks":
                callbacks = builder.instantiate_callbacks(cfg.callbacks)
                assert len(callbacks) == len(cfg.callbacks or {}), choice
                assert all(isinstance(c, pl.Callback) for c in callbacks)
            else:  # pragma: no cover - a new group needs its own check here
                raise AssertionError(f"no instantiation check for config group {group}")


def _compose_here(tmp_path: Path, overrides: list[str], with_hydra: bool = False):
    """Compose inside an open ``initialize_config_dir`` (one per test: fast)."""
    cfg = compose(config_name="train", overrides=overrides, return_hydra_config=with_hydra)
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.log_dir", str(tmp_path), force_add=True)  # logger=mlflow's store
    return cfg


def _check_module(module, cfg, meta, torch) -> None:
    """The model runs forward, its optimizer holds its parameters and the scheduler drives
    that optimizer."""
    module.eval()
    cat = torch.zeros(4, len(meta.vocab_sizes), dtype=torch.long)
    with torch.no_grad():
        assert module(cat, torch.rand(4, 63)).shape == (4, len(meta.tasks))
    optimizer = module.build_optimizer()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters()}
    scheduler = module.build_scheduler(optimizer, total_steps=10)
    assert (scheduler is None) == (not cfg.get("scheduler"))
    if scheduler is not None:
        assert scheduler.optimizer is optimizer
        assert module.hparams["scheduler_interval"] == cfg.scheduler.get("interval", "epoch")


def _check_experiment(app, cfg, meta, tmp_path, base, torch, seen: set[str]) -> None:
    """An experiment (``cfg``, composed with its Hydra config) builds, and so does every value
    its sweep lists (a config group's value composed, any other value set on ``cfg``:
    composing is slow)."""
    import yaml

    experiment = cfg.hydra.runtime.choices.experiment
    if cfg.hydra.sweeper._target_.endswith("mtl_clippy_sweeper.OptunaSweeper"):
        # an Optuna study (experiment=tune_lr): its search spaces are checked in test_tune.py
        _check_module(builder.build_module(cfg, meta), cfg, meta, torch)
        return
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, f"experiment {experiment} is a sweep"
    _check_module(builder.build_module(cfg, meta), cfg, meta, torch)
    groups = {p.name for p in CONFIGS.iterdir() if p.is_dir()}
    for key, values in params.items():
        for value in str(values).split(","):
            if key in groups:
                if f"{key}={value}" in seen:
                    continue
                seen.add(f"{key}={value}")
                run = _compose_here(tmp_path, [f"experiment={experiment}", f"{key}={value}", *base])
            else:
                missing = object()
                assert OmegaConf.select(cfg, key, default=missing) is not missing, key
                run = cfg.copy()
                OmegaConf.update(run, key, yaml.safe_load(value))
                if not key.startswith("model."):  # the optimizer's check needs no big model
                    run.model = {"_target_": "mtl_clippy.models.LogisticRegression"}
            _check_module(builder.build_module(run, meta), run, meta, torch)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=lr", "model.norm=batch"], "model.norm: logistic regression has no hidden"),
        (
            ["model=mmoe", "model.norm=group"],
            "model.norm must be one of ['batch', 'layer', 'none']",
        ),
        (["model=sb", "model.embed_dim=0"], "model.embed_dim must be >= 1"),
        (
            ["model.sparse_embeddings=true", "trainer.gradient_clip_val=1.0"],
            "trainer.gradient_clip_val=1.0: Lightning's gradient clipping cannot take",
        ),
    ],
)
def test_bad_model_values_name_their_key(overrides, message, tmp_path, data_root):
    import mtl_clippy.train as app
    from mtl_clippy.errors import ConfigError

    cfg = _compose(tmp_path, [*overrides, *TINY])
    OmegaConf.update(cfg, "paths.data_dir", str(data_root / "data"))
    with pytest.raises(ConfigError) as err:
        app.build(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_readme_configuration_options_exist():
    """Every option the README's Configuration table names is a key of some choice of its
    group (a documented option that no config has cannot be set)."""
    import re

    table = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n\n")[2]
    named = re.findall(r"`((?:" + "|".join(GROUPS) + r")(?:\.\w+)+)`", table)
    assert len(named) > 10
    for option in named:
        group, *path = option.split(".")
        trees = [
            OmegaConf.to_container(OmegaConf.load(f)) for f in (CONFIGS / group).glob("*.yaml")
        ]

        def has(tree, path=path):
            for part in path:
                if not isinstance(tree, dict) or part not in tree:
                    return False
                tree = tree[part]
            return True

        assert any(has(t or {}) for t in trees), f"README names {option}, no {group} config has it"


def test_job_folder_names_leave_out_exactly_the_excluded_keys():
    """Every key that configs/hydra/default.yaml keeps out of a job folder's name exists (a
    key of the config or a config group), and is really left out; other overrides stay."""
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
        excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
        loader = GlobalHydra.instance().config_loader()
        tree = OmegaConf.to_container(cfg, resolve=False)
        for key in excluded:
            if "/" in key:
                parent, _, name = key.rpartition("/")
                assert name in loader.list_groups(parent), f"no config group {key}"
            else:
                node = tree
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"no key {key}"
                    node = node[part]
        values = {"resume": "true", "hydra/launcher": "basic"}
        overrides = [f"{k}={values.get(k, '/somewhere')}" for k in excluded if "hydra." not in k]
        named = compose(
            config_name="train",
            overrides=[*overrides, "seed=3", "model.norm=none"],
            return_hydra_config=True,
        ).hydra.job.override_dirname
    assert named == "model.norm=none,seed=3"


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


def test_val_metrics_describe_the_tested_checkpoint_when_early_stopping_ends_later(
    tmp_path, data_root
):
    """Early stopping ends a run some epochs after its best: metrics.json's ``val`` (and the
    printed table's val column) is the best epoch's validation, the one whose checkpoint is
    tested, and ``val_last`` the final epoch's. Checked against the CSV log of every
    validation. (On these 3,000 rows at lr 1 the first epoch is the best and patience 1
    stops the run after the second: seeded, so the same on every CPU.)"""
    cfg = _compose(
        tmp_path,
        [
            *TINY,
            "optim.lr=1.0",
            "trainer.max_epochs=4",
            "callbacks.early_stopping.patience=1",
            "trainer.accelerator=cpu",
            "logger=csv",
            "callbacks.progress_bar.refresh_rate=0",
        ],
    )
    OmegaConf.update(cfg, "paths.data_dir", str(data_root / "data"), force_add=True)
    summary = train(cfg)
    run = tmp_path / "run"
    logged = pd.read_csv(run / "csv" / "metrics.csv")
    per_epoch = logged.dropna(subset=["val/auc_mean"]).groupby("epoch").last()
    best_epoch, last_epoch = summary["best"]["epoch"], summary["epochs"] - 1
    assert best_epoch < last_epoch, (best_epoch, last_epoch)  # the case under test
    for key in ("auc_click", "auc_conversion", "auc_mean", "logloss_click"):
        assert summary["val"][key] == pytest.approx(per_epoch.loc[best_epoch, f"val/{key}"])
        assert summary["val_last"][key] == pytest.approx(per_epoch.loc[last_epoch, f"val/{key}"])
    assert summary["val"]["auc_mean"] == pytest.approx(summary["best"]["score"])
    assert summary["val"]["auc_mean"] > summary["val_last"]["auc_mean"]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["val"] == summary["val"] and on_disk["val_last"] == summary["val_last"]
    printed = format_summary(on_disk)  # what main() prints
    assert f"(epoch {best_epoch + 1} tested)" in printed
    assert f"{summary['val']['auc_click']:.4f}" in printed


@pytest.mark.filterwarnings(
    "ignore:Checkpoint directory .* exists and is not empty:UserWarning"
)  # a copied run resumes into its new folder, holding the copied checkpoints: Lightning's notices are the point of the test
@pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")
def test_a_copied_run_folder_resumed_keeps_its_best_checkpoint(tmp_path, data_root):
    """A run folder copied (or moved) and continued from its last.ckpt: the copy's best.ckpt
    and its score stay the record (Lightning's ModelCheckpoint drops them when the saved
    dirpath differs, and the first epoch after the resume became 'best-v1.ckpt', however
    worse). At lr 1 on these rows the first epoch is the best of three."""
    import shutil

    common = [*TINY, "optim.lr=1.0", "trainer.accelerator=cpu", "logger=none",
              "callbacks.progress_bar.refresh_rate=0"]  # fmt: skip
    first = _compose(tmp_path / "a", [*common, "trainer.max_epochs=2"])
    OmegaConf.update(first, "paths.data_dir", str(data_root / "data"), force_add=True)
    (tmp_path / "a").mkdir()
    before = train(first)
    assert before["best"]["epoch"] == 0
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    shutil.rmtree(tmp_path / "a")  # moved, not copied: the old paths are gone
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    again = _compose(
        tmp_path / "b", [*common, "trainer.max_epochs=3", f"ckpt_path={ckpts / 'last.ckpt'}"]
    )
    OmegaConf.update(again, "paths.data_dir", str(data_root / "data"), force_add=True)
    after = train(again)
    assert after["epochs"] == 3 and after["status"] == "completed"
    assert not list(ckpts.glob("best-v*.ckpt"))
    assert after["best"]["checkpoint"] == "checkpoints/best.ckpt"
    assert after["best"]["score"] >= before["best"]["score"]
    if after["best"]["epoch"] == 0:
        assert after["val"] == before["val"] and after["test"] == before["test"]


def test_the_best_record_moves_only_with_its_own_checkpoint_file(tmp_path):
    """RunCheckpoint takes a saved record from another dirpath only where the best file is
    found under the same name in its own: a checkpoint of another run (fine-tuning from it)
    starts a fresh record, as Lightning's class does."""
    from mtl_clippy.callbacks import RunCheckpoint

    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    state = {
        "monitor": "val/auc_mean", "best_model_score": torch.tensor(0.7),
        "best_model_path": str(old / "best.ckpt"), "current_score": torch.tensor(0.6),
        "dirpath": str(old), "best_k_models": {str(old / "best.ckpt"): torch.tensor(0.7)},
        "kth_best_model_path": str(old / "best.ckpt"), "kth_value": torch.tensor(0.7),
        "last_model_path": "",
    }  # fmt: skip
    fresh = RunCheckpoint(dirpath=new, filename="best", monitor="val/auc_mean", mode="max")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        fresh.load_state_dict(dict(state))  # no best.ckpt in new/: not this run's record
    assert fresh.best_model_score is None
    new.mkdir(parents=True)
    (new / "best.ckpt").write_bytes(b"x")
    moved = RunCheckpoint(dirpath=new, filename="best", monitor="val/auc_mean", mode="max")
    moved.load_state_dict(dict(state))
    assert float(moved.best_model_score) == pytest.approx(0.7)
    assert moved.best_model_path == str(new / "best.ckpt")
    assert list(moved.best_k_models) == [str(new / "best.ckpt")]


def test_without_best_and_last_checkpoints_the_final_weights_are_tested(tmp_path, data_root):
    """callbacks.model_checkpoint=null and last_checkpoint=null leave the every-N-steps
    checkpoint, which Lightning makes trainer.checkpoint_callback: its mid-run step (28 of
    30) was tested and reported as the last epoch. Now the final weights are tested, and
    metrics.json's val is their validation."""
    cfg = _compose(
        tmp_path,
        [*TINY, "trainer.max_epochs=3", "trainer.accelerator=cpu", "logger=none",
         "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
         "callbacks.step_checkpoint.every_n_train_steps=7",
         "callbacks.progress_bar.refresh_rate=0", "keep_checkpoints=all"],
    )  # fmt: skip
    OmegaConf.update(cfg, "paths.data_dir", str(data_root / "data"), force_add=True)
    summary = train(cfg)
    assert summary["steps"] == 30 and summary["status"] == "completed"
    assert list((tmp_path / "run" / "checkpoints").glob("step-*.ckpt"))  # it did save
    assert summary["best"]["checkpoint"] is None and summary["best"]["monitor"] is None
    assert "val_last" not in summary and summary["val"]["auc_mean"] is not None


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
    # <stamp>_<model>-<optim>_<overrides>: the overrides by their last key part, no paths
    assert len(runs) == 1 and runs[0].name.endswith(
        "_sb-clippy_train_rows-3000_test_rows-1500_batch_size-256_max_epochs-2"
    ), runs
    run = runs[0]
    # exactly the files README.md lists: the step checkpoint went when the run completed
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    extra, missing = unlisted(run_listing(run), readme_run_listing())
    assert (extra, missing) == ([], []), "README.md's run folder listing is not what a run writes"
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["model"] == "sb" and m["optim"] == "clippy"
    assert m["epochs"] >= 1 and m["steps"] > 0 and m["samples_per_s"] > 0
    assert 0.0 < m["test"]["auc_click"] < 1.0 and m["bayes"]["auc_click"] > 0.5
    assert (run / "checkpoints" / "best.ckpt").is_file()
    # last.ckpt holds the final epoch, whether or not that epoch was the best one
    # (ModelCheckpoint's own save_last writes it only when best.ckpt improves).
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (m["epochs"] - 1, m["steps"])
    assert "test AUC" in res.stdout and str(run) in res.stdout
    scalars = _event_scalars(run / "tensorboard")
    assert {"train/loss", "val/auc_click", "val/auc_mean", "test/auc_conversion"} <= set(scalars)
    assert "lr" in scalars and not any(t.startswith("lr-") for t in scalars)
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


@pytest.mark.slow  # about 13 s; the default suite's diverged-job sweep test covers a job that ends early
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
        (["optim=lion"], "clippy"),
        (["data=aliexpress", "data.data_dir=DIR"], "train.csv"),
        (["model.sparse_embeddings=true", "optim=adam"], "sparse"),
        (["optim.lr=-1"], "optim.lr: expected a finite number >= 0, got -1"),
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
    assert runtime.resolve_precision("32-true", "cpu") == "32-true"  # explicit choices are kept
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", "cpu") == "32-true"

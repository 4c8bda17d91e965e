"""Sweeps through Hydra's launchers: joblib (parallel on one machine), SLURM (config only),
and DDP jobs inside a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from app_helpers import ROOT, TINY, run_train

SMALL = [*TINY, "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0"]


def _sweep(tmp: Path) -> Path:
    sweeps = list((tmp / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps  # one sweep folder, whatever the launcher
    return sweeps[0]


def _job_pids(job: Path) -> set[str]:
    """Process ids that wrote the job's TensorBoard event files."""
    return {p.name.split(".")[-2] for p in (job / "tensorboard").glob("events.out.tfevents.*")}


@pytest.mark.slow  # about 22 s: two real jobs; the default suite composes every launcher config
def test_joblib_launcher_runs_the_jobs_in_parallel_processes(tmp_path):
    res = run_train(
        [
            "-m",
            "optim=clippy,adam",
            *SMALL,
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={tmp_path}/data",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = _sweep(tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 2
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
    # each job got its share of the cores (2 jobs at once: joblib limits its workers)
    import os

    cores = len(os.sched_getaffinity(0))
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["threads"] == max(1, cores // 2)
    pids = [_job_pids(job) for job in jobs]
    assert pids[0] and pids[1] and not pids[0] & pids[1]  # two worker processes
    df = pd.read_csv(sweep / "results.csv")
    assert sorted(df["optim"]) == ["adam", "clippy"] and set(df["status"]) == {"completed"}


@pytest.mark.parametrize("launcher", ["joblib", "parallel", "slurm"])
def test_launcher_configs_compose(launcher):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    if launcher == "slurm":
        assert target.endswith("SlurmLauncher")
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min > 0
        assert "${hydra.sweep.dir}" in str(cfg.hydra.launcher._get_node("submitit_folder")._value())
    else:
        assert target.endswith("JoblibLauncher")


@pytest.mark.slow
def test_ddp_jobs_inside_a_sweep_each_run_in_their_own_folder(tmp_path):
    """Lightning re-runs the command line for rank 1: in a sweep it must run that job only."""
    res = run_train(
        [
            "-m",
            "optim=clippy,adam",
            *SMALL,
            "trainer=ddp",
            "trainer.devices=2",
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={tmp_path}/data",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = _sweep(tmp_path)
    df = pd.read_csv(sweep / "results.csv")
    assert len(df) == 2 and set(df["status"]) == {"completed"}, df.get("error")
    for job in (p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()):
        assert (job / "train_ddp_process_1.log").is_file()

"""Resume after SIGKILL, determinism, and the pieces they rest on.

The end-to-end tests run ``python train.py`` in subprocesses: one uninterrupted run, one run
killed with SIGKILL in the middle of its second epoch and resumed with ``resume=true``; the
resumed run must end with exactly (bit for bit) the same validation and test metrics, in the
same folder and TensorBoard run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from app_helpers import only_run, read_metrics, run_train, start_and_kill
from mtl_clippy.callbacks import AtomicCheckpointIO
from mtl_clippy.data.datamodule import EpochBatchSampler
from mtl_clippy.resume import find_checkpoint, run_identity

# 2,700 training rows / 64 = 42 batches per epoch; a checkpoint every 25 steps puts step 50
# in the middle of the second epoch (its 9th batch). SharedBottom has dropout, so the random
# state matters as well as the data order and Clippy's accumulators.
ARGS = [
    "data.train_rows=3000",
    "data.test_rows=1500",
    "data.batch_size=64",
    "trainer.max_epochs=3",
    "callbacks.step_checkpoint.every_n_train_steps=25",
    "callbacks.progress_bar.refresh_rate=0",
]
BATCHES_PER_EPOCH = 42
KILL_AFTER = "step-0000050.ckpt"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_data")


def _args(tmp: Path, data_dir: Path, *extra: str) -> list[str]:
    return [*ARGS, f"paths.log_dir={tmp}/outputs", f"paths.data_dir={data_dir}", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    res = run_train(_args(tmp, data_dir), cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return read_metrics(only_run(tmp))


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_gives_identical_metrics(tmp_path, data_dir, uninterrupted):
    start_and_kill(_args(tmp_path, data_dir), tmp_path, KILL_AFTER)
    run = only_run(tmp_path)
    assert not (run / "metrics.json").exists() or read_metrics(run)["status"] != "completed"
    # The newest checkpoint is the step checkpoint, inside the second epoch.
    ckpt, _ = find_checkpoint(run)
    assert ckpt.name.startswith("step-")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] % BATCHES_PER_EPOCH != 0 and state["epoch"] >= 1

    res = run_train(_args(tmp_path, data_dir, "resume=true"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert only_run(tmp_path) == run  # the same folder, no new one
    resumed = read_metrics(run)
    assert resumed["status"] == "completed"
    assert resumed["resumed_from"].startswith(os.path.join("checkpoints", "step-"))
    assert resumed["steps"] == uninterrupted["steps"] == 3 * BATCHES_PER_EPOCH
    # Bit for bit: JSON floats round-trip exactly.
    assert resumed["test"] == uninterrupted["test"]
    assert resumed["val"] == uninterrupted["val"]
    assert resumed["best"]["val/auc_mean"] == uninterrupted["best"]["val/auc_mean"]
    assert resumed["best"]["epoch"] == uninterrupted["best"]["epoch"]
    assert (
        resumed["divergence"]["last_finite_loss"] == uninterrupted["divergence"]["last_finite_loss"]
    )
    # One TensorBoard run: event files of both processes in the one folder.
    assert [p.name for p in run.iterdir() if p.name == "tensorboard"] == ["tensorboard"]
    writers = {p.name.split(".")[-2] for p in (run / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 2  # the killed process and the resumed one
    # TensorBoard shows one continuous run: what the killed process logged after its
    # checkpoint is purged, so every step appears once and each epoch is validated once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] >= 3 * BATCHES_PER_EPOCH - 10
    assert len(acc.Scalars("val/auc_mean")) == 3
    assert not list(run.rglob("*.tmp*")), "a temporary file was left behind"


@pytest.mark.slow  # about 18 s; the default suite resumes a killed run to identical metrics
def test_resuming_a_completed_run_changes_nothing(tmp_path, data_dir):
    args = _args(tmp_path, data_dir, "trainer.max_epochs=1")
    assert run_train(args, cwd=tmp_path).returncode == 0
    run = only_run(tmp_path)
    before = (run / "metrics.json").read_text()
    res = run_train([*args, "resume=true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert only_run(tmp_path) == run
    assert (run / "metrics.json").read_text() == before


def test_resume_with_no_earlier_run_is_one_clear_error(tmp_path, data_dir):
    res = run_train(_args(tmp_path, data_dir, "resume=true"), cwd=tmp_path)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: resume=True: found no checkpoint"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path, data_dir, uninterrupted):
    again = tmp_path / "again"
    again.mkdir()
    assert run_train(_args(again, data_dir), cwd=again).returncode == 0
    repeat = read_metrics(only_run(again))
    assert repeat["test"] == uninterrupted["test"] and repeat["val"] == uninterrupted["val"]

    other = tmp_path / "other"
    other.mkdir()
    assert run_train(_args(other, data_dir, "seed=7"), cwd=other).returncode == 0
    different = read_metrics(only_run(other))
    assert different["test"]["auc_click"] != uninterrupted["test"]["auc_click"]
    assert different["test"]["logloss_click"] != uninterrupted["test"]["logloss_click"]


# ----------------------------------------------------------------------------- the pieces


def test_sampler_skips_the_finished_batches_of_the_resumed_epoch_only():
    full = EpochBatchSampler(1000, 64, shuffle=True, seed=3)
    full.set_epoch(2)
    expected = [b.tolist() for b in full]
    resumed = EpochBatchSampler(1000, 64, shuffle=True, seed=3)
    resumed.skip_batches(epoch=2, batches=5)
    resumed.set_epoch(2)
    assert [b.tolist() for b in resumed] == expected[5:]
    assert [b.tolist() for b in resumed] == expected  # the next pass is whole again
    other = EpochBatchSampler(1000, 64, shuffle=True, seed=3)
    other.skip_batches(epoch=1, batches=5)  # a different epoch: nothing skipped
    other.set_epoch(2)
    assert [b.tolist() for b in other] == expected


def test_find_checkpoint_takes_the_furthest_and_skips_damaged_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 84, "epoch": 1}, folder / "last.ckpt")
    io.save_checkpoint({"global_step": 100, "epoch": 2}, folder / "step-0000100.ckpt")
    io.save_checkpoint({"global_step": 126, "epoch": 2}, folder / "best.ckpt")
    assert find_checkpoint(tmp_path) == (folder / "step-0000100.ckpt", 100)
    # A newer file cut short (as by a kill during a plain write) is skipped with a warning.
    data = (folder / "step-0000100.ckpt").read_bytes()
    (folder / "step-0000110.ckpt").write_bytes(data[: len(data) // 2])
    assert find_checkpoint(tmp_path) == (folder / "step-0000100.ckpt", 100)
    assert find_checkpoint(tmp_path / "nothing") is None


def test_atomic_checkpoint_write_leaves_the_old_file_when_saving_fails(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot save this")

    with pytest.raises(RuntimeError):
        io.save_checkpoint({"global_step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_run_identity_ignores_how_a_run_starts():
    a = run_identity(["model=ncf", "optim.lr=0.1", "resume=true", "hydra.run.dir=x"])
    b = run_identity(["optim.lr=0.1", "model=ncf", "ckpt_path=/a/b.ckpt"])
    assert a == b == ["model=ncf", "optim.lr=0.1"]
    assert run_identity(["model=sb"]) != a


def test_resume_state_round_trips_every_random_generator():
    import random

    from mtl_clippy.callbacks import ResumeState

    cb = ResumeState()
    state = cb.state_dict()

    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()  # noqa: NPY002

    expected = draw()
    for _ in range(3):
        draw()
    cb.load_state_dict(state)
    assert draw() == expected


@pytest.mark.slow  # about 20 s; the default suite resumes a killed single run
def test_a_sweep_resumes_in_its_folder_and_keeps_finished_jobs(tmp_path, data_dir):
    sweep_args = [
        "-m",
        "optim=clippy,adam",
        *_args(tmp_path, data_dir, "trainer.max_epochs=1"),
    ]
    assert run_train(sweep_args, cwd=tmp_path).returncode == 0
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    # Job 1 "was killed": its results are gone, its checkpoints are left.
    before = (jobs[0] / "metrics.json").read_text()
    (jobs[1] / "metrics.json").unlink()
    res = run_train([*sweep_args, "resume=true", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((tmp_path / "outputs" / "multirun").iterdir()) == [sweep]
    assert sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()) == jobs
    assert (jobs[0] / "metrics.json").read_text() == before  # finished: left alone
    redone = read_metrics(jobs[1])
    assert redone["status"] == "completed" and redone["resumed_from"] == "checkpoints/last.ckpt"


def test_a_ckpt_path_that_is_not_a_checkpoint_is_a_config_error(tmp_path):
    from omegaconf import OmegaConf

    from mtl_clippy.errors import ConfigError
    from mtl_clippy.resume_point import resume_point as _resume_point

    cfg = OmegaConf.create({"ckpt_path": str(tmp_path / "nope.ckpt"), "resume": False})
    with pytest.raises(ConfigError, match="ckpt_path: no checkpoint file at"):
        _resume_point(cfg, tmp_path)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    cfg.ckpt_path = str(tmp_path / "junk.ckpt")
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        _resume_point(cfg, tmp_path)


@pytest.mark.filterwarnings(
    "ignore:Experiment logs directory .* exists and is not empty:UserWarning"
)  # resuming into the logger's own folder is what the test checks
def test_a_resumed_csv_logger_keeps_the_rows_before_the_checkpoint(tmp_path):
    import csv

    from omegaconf import OmegaConf

    from mtl_clippy.loggers import instantiate_loggers as _instantiate_loggers

    folder = tmp_path / "csv"
    folder.mkdir()
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss"])
        w.writeheader()
        w.writerows({"epoch": 0, "step": s, "train/loss": 1.0 / (s + 1)} for s in range(0, 80, 10))
    group = OmegaConf.create(
        {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path),
                 "name": "csv", "version": ""}}
    )  # fmt: skip
    (logger,) = _instantiate_loggers(group, 50)
    logger.log_metrics({"train/loss": 0.5, "val/auc": 0.7}, step=50)
    logger.save()
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30, 40, 50]
    assert rows[-1]["val/auc"] == "0.7" and rows[0]["val/auc"] == ""


def test_resuming_with_other_param_groups_is_one_line_and_keeps_the_run(tmp_path, data_dir):
    """A checkpoint's optimizer state has one entry per parameter group, loaded by position:
    resuming it with other ``param_groups`` is refused in one line naming the key, before
    fitting, and the resumed run's completed metrics.json stays as it was."""
    tiny = ["model.embed_dim=4", "test=false"]
    args = _args(tmp_path, data_dir, "trainer.max_epochs=1", "param_groups=clip_dense_only", *tiny)
    res = run_train(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    run = only_run(tmp_path)
    before = (run / "metrics.json").read_text()
    ckpt = run / "checkpoints" / "last.ckpt"
    again = _args(tmp_path, data_dir, "trainer.max_epochs=2", *tiny, f"ckpt_path={ckpt}")
    res = run_train(again, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: param_groups: the checkpoint "), res.stderr[-2000:]
    assert "default (" in lines[-1] and "embeddings (" in lines[-1]
    assert "param_groups=clip_dense_only" in lines[-1]
    assert "Traceback" not in res.stderr
    assert (run / "metrics.json").read_text() == before


def test_resume_on_a_finished_run_whose_summary_is_mistyped_is_one_config_line(tmp_path):
    """A completed run's metrics.json with a wrongly typed key is read as no summary at all:
    resume=true then looks for a checkpoint (none here: one ConfigError line), instead of
    returning the file and failing later with a ValueError traceback."""
    import json

    from omegaconf import OmegaConf

    from mtl_clippy.errors import ConfigError
    from mtl_clippy.resume_point import resume_point as _resume_point

    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "lr": "abc"}))
    cfg = OmegaConf.create(
        {"resume": str(tmp_path), "ckpt_path": None, "paths": {"log_dir": str(tmp_path)}}
    )
    with pytest.raises(ConfigError, match="found no checkpoint"):
        _resume_point(cfg, tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "lr": 0.1}))
    assert _resume_point(cfg, tmp_path).previous == {"status": "completed", "lr": 0.1}

"""Distributed data parallel on 2 CPU processes (gloo) against one process, end to end.

With the same global batch (2 ranks x 64 rows vs 1 process x 128 rows), the ranks' batches
together are the single process's batches (see EpochBatchSampler), DDP averages the ranks'
gradients into the global batch's gradient, and the metrics gather every rank's predictions:
the two runs must agree to float32 rounding. Dropout and batch normalisation are off, since
their per-rank statistics and masks legitimately differ from a single process's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app_helpers import DDP_COMMON, run_train, start_and_kill

COMMON = DDP_COMMON


def _run(tmp: Path, data_dir: Path, *extra: str) -> tuple[Path, dict]:
    res = run_train(
        [*COMMON, f"paths.log_dir={tmp}/outputs", f"paths.data_dir={data_dir}", *extra], cwd=tmp
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs  # one output folder, whatever the number of processes
    return runs[0], json.loads((runs[0] / "metrics.json").read_text())


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    data_dir = tmp_path / "data"
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    _, single = _run(tmp_path / "single", data_dir, "data.batch_size=128")
    run, ddp = _run(
        tmp_path / "ddp", data_dir, "trainer=ddp", "trainer.devices=2", "data.batch_size=64"
    )
    assert single["status"] == ddp["status"] == "completed"
    assert ddp["steps"] == single["steps"] == 2 * (2700 // 128)
    for split in ("val", "test"):
        assert set(ddp[split]) == set(single[split])
        for key, value in single[split].items():
            assert ddp[split][key] == pytest.approx(value, abs=1e-5), (split, key)
    # One set of checkpoints, written by rank 0 only; the second rank has its own log file.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / "train_ddp_process_1.log").is_file()
    csv_files = list(run.rglob("metrics.csv"))
    assert len(csv_files) == 1
    assert "final/auc_click" in csv_files[0].read_text().splitlines()[0]


@pytest.mark.slow
def test_ddp_run_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL to every process of a 2-rank run, then resume=true: the same numbers."""
    data_dir = tmp_path / "data"
    args = [
        "trainer=ddp",
        "trainer.devices=2",
        "data.batch_size=32",
        "trainer.max_epochs=2",
        "callbacks.step_checkpoint.every_n_train_steps=20",
    ]
    (tmp_path / "full").mkdir()
    _, full = _run(tmp_path / "full", data_dir, *args)

    killed = tmp_path / "killed"
    killed.mkdir()
    cmd = [*COMMON, f"paths.log_dir={killed}/outputs", f"paths.data_dir={data_dir}", *args]
    start_and_kill(cmd, killed, "step-0000060.ckpt")
    res = run_train([*cmd, "resume=true"], cwd=killed)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (killed / "outputs" / "runs").iterdir()
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["resumed_from"].startswith("checkpoints/step-")
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]

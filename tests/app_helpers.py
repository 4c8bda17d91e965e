"""Shared by the end-to-end tests: run `python train.py` in a subprocess on tiny data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Small enough for seconds per run, large enough for every split to hold both classes.
TINY = ["data.train_rows=3000", "data.test_rows=1500", "data.batch_size=256"]

# Runs compared across process counts (DDP against one process): float32, no dropout and no
# BatchNorm, so that nothing but the gradient's summation order can differ.
DDP_COMMON = [
    "data.train_rows=3000",
    "data.test_rows=1500",
    "trainer.max_epochs=2",
    "trainer.precision=32-true",
    "model.norm=none",
    "model.dropout=0",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
]


def run_train(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py ARGS` started from ``cwd`` (eager Clippy: no compilation per test)."""
    env = {**os.environ, "MTL_CLIPPY_DISABLE_FUSED": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_and_kill(args: list[str], cwd: Path, wait_for: str, timeout: float = 300) -> None:
    """Start `python train.py ARGS` in ``cwd`` and SIGKILL it, with every process it started
    (DDP ranks), as soon as a checkpoint named ``wait_for`` exists in one of its runs."""
    env = {**os.environ, "MTL_CLIPPY_DISABLE_FUSED": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the ranks it starts die with it
    )
    deadline = time.monotonic() + timeout
    try:
        while not list(cwd.glob(f"outputs/runs/*/checkpoints/{wait_for}")):
            if proc.poll() is not None:
                raise AssertionError(
                    "the run ended before it could be killed: "
                    + proc.stderr.read().decode()[-2000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {wait_for} within {timeout} s")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def only_run(tmp: Path) -> Path:
    """The one run folder under ``tmp/outputs/runs``."""
    runs = sorted((tmp / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run: Path) -> dict:
    """A run folder's ``metrics.json``."""
    return json.loads((run / "metrics.json").read_text())

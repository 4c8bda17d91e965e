"""Shared by the end-to-end tests: run `python train.py` in a subprocess on tiny data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Small enough for seconds per run, large enough for every split to hold both classes.
TINY = ["data.train_rows=3000", "data.test_rows=1500", "data.batch_size=256"]


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

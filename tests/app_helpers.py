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


def readme_run_listing() -> set[str]:
    """The files of a run folder as README.md lists them (the block under "writes its
    folder"): ``metrics.json``, ``checkpoints/best.ckpt``, ``tensorboard/events.out.tfevents.*``
    ... Entries are the lines indented by 4 (the folder's own) or 8 (a sub-folder's) spaces;
    deeper lines continue a description."""
    text = (ROOT / "README.md").read_text()
    block = text.split("\n```\noutputs/runs/", 1)[1].split("\n```", 1)[0]
    entries, folder = set(), None
    for line in block.splitlines()[1:]:
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent not in (4, 8):
            continue
        name = line.split()[0]
        if indent == 4:
            folder = name if name.endswith("/") else None
            if folder is None:
                entries.add(name)
        else:
            assert folder is not None, f"README.md: {name} is indented under no folder"
            entries.add(folder + name)
    return entries


def run_listing(run: Path) -> list[str]:
    """Every file under a run folder, relative to it (``checkpoints/best.ckpt``)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if not p.is_dir())


def unlisted(files: list[str], listed: set[str]) -> tuple[list[str], list[str]]:
    """(the files no README entry names, the README entries that name no file); an entry
    may end in ``*`` (``events.out.tfevents.*``)."""
    import fnmatch

    extra = [f for f in files if not any(fnmatch.fnmatchcase(f, e) for e in listed)]
    missing = sorted(e for e in listed if not any(fnmatch.fnmatchcase(f, e) for f in files))
    return extra, missing

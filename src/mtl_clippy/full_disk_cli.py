"""A full disk met by Hydra itself, outside the task: one line, exit status 2.

Hydra writes a run's ``.hydra/config.yaml`` (and a sweep's ``multirun.yaml``) before the task
function runs, so ``mtl_clippy.train.main`` never sees a full disk there: Hydra prints its own
report of two chained ``OSError`` tracebacks and exits with status 1. :func:`full_disk_exits`,
around ``hydra.main`` in ``train.py``, reports it the way the task reports every full disk:

    error: no space left on device while writing <run>/.hydra/config.yaml (<what to do>)

It also deletes what that failed start left, when that is provably nothing of value: a run
folder that holds nothing but Hydra's copies of the configuration (``.hydra/*.yaml``, which
every start writes anew) and empty ``.log`` files (created just before the disk refused
their content). A folder with anything else in it (a checkpoint, a ``metrics.json``, a log
with lines in it) is left as it is.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mtl_clippy.errors import reported


def _run_folder_of(path: str) -> Path:
    """The run (or sweep job) folder a file belongs to: the folder above its ``.hydra``
    folder, else its own folder."""
    file = Path(path)
    for parent in file.parents:
        if parent.name == ".hydra":
            return parent.parent
    return file.parent


def _left_by_start(folder: Path, path: Path) -> bool:
    """Whether ``path`` in ``folder`` is what a Hydra start writes before the task runs."""
    if path.is_symlink() or not path.is_file():
        return False
    parts = path.relative_to(folder).parts
    if len(parts) == 2 and parts[0] == ".hydra":
        return path.suffix == ".yaml"
    return len(parts) == 1 and path.suffix == ".log" and path.stat().st_size == 0


def remove_empty_start(folder: Path) -> bool:
    """Delete ``folder`` if all it holds is what a start that the full disk stopped left
    (see this module's docstring); True if deleted."""
    try:
        if not folder.is_dir() or folder.is_symlink():
            return False
        files = [p for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()]
        if not all(_left_by_start(folder, p) for p in files):
            return False
        for path in files:
            path.unlink()
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
            sub.rmdir()
        folder.rmdir()
    except OSError:
        return False
    return True


def _guarded(func: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        try:
            return func()
        except Exception as exc:
            full = reported(exc)
            if full is None:
                raise
            run_dir = None if full.into else _run_folder_of(full.path)
            full = reported(exc, run_dir) or full
            if run_dir is not None:
                remove_empty_start(run_dir)
            print(f"error: {full}", file=sys.stderr, flush=True)
            sys.exit(2)

    return run


@contextlib.contextmanager
def full_disk_exits() -> Iterator[None]:
    """Within the block, a full disk anywhere in Hydra's start (or a sweep's) ends the process
    with one line naming the file and status 2, instead of Hydra's report. Works by wrapping
    Hydra's ``run_and_report`` (its error printer); where a Hydra version has none, Hydra
    reports as usual."""
    try:
        import hydra._internal.utils as hydra_utils
    except ImportError:
        yield
        return
    original = getattr(hydra_utils, "run_and_report", None)
    if original is None:
        yield
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        return original(_guarded(func))

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


__all__ = ["full_disk_exits", "remove_empty_start"]

"""Lightning's CSV and TensorBoard loggers, with files that a full disk (or a kill) never
leaves half-written.

Lightning's writer appends the new rows of ``metrics.csv`` in place, rewrites the whole file
in place when a new column appears, and writes ``hparams.yaml`` in place: a write that fails
on a full disk leaves a file cut in the middle of a row (or, for a rewrite, without the rows
logged so far), and the error names no file. Here the rewrite and ``hparams.yaml`` go
through :func:`mtl_clippy.atomic.write_atomically` (a temporary file renamed into place), and
an append that fails is cut back to the rows that were there before it. A full disk raises
:class:`~mtl_clippy.errors.DiskFull` naming the file.

The TensorBoard logger writes its ``hparams.yaml`` the same way. Its event files are
appended to by TensorBoard's own writer thread: a full disk can cut the last record short,
which TensorBoard skips when it reads the file; the error, raised again at the logger's next
call, is named by ``mtl_clippy.errors.disk_full`` (the file its write had open). The thread's
own report of it (Python's "Exception in thread ..." traceback) is not printed, so that the
run's one line about the full disk is all a user sees; an event file that the full disk left
empty at its creation is deleted.

``logger=csv`` and ``logger=tensorboard`` (``configs/logger/``) use these classes; the files
and the options are Lightning's. :func:`instantiate_loggers` builds a run's loggers, resumed
ones continuing the curves of the run they resume.
"""

from __future__ import annotations

import contextlib
import csv
import os
import threading
from pathlib import Path
from typing import Any

import hydra
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig

from mtl_clippy.atomic import write_atomically
from mtl_clippy.errors import NO_ROOM, RUN_FOLDER_HINT, disk_full, errno_of
from mtl_clippy.trackers import check_installed


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer with the writes described in this module's docstring (on a
    local file system; elsewhere Lightning's own writes)."""

    def _local(self) -> bool:
        return isinstance(self._fs, LocalFileSystem)

    def log_hparams(self, params: dict[str, Any]) -> None:
        if not self._local():
            super().log_hparams(params)
            return
        self.hparams.update(params)
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        write_atomically(path, lambda tmp: save_hparams_to_yaml(str(tmp), self.hparams))

    def save(self) -> None:
        if not self.metrics or not self._local():
            super().save()
            return
        path = self.metrics_file_path
        keys_before = list(self.metrics_keys)
        new_keys = self._record_new_keys()
        try:
            if new_keys and os.path.isfile(path):
                self._rewrite_with_new_header(self.metrics_keys)
        except BaseException:
            # The file still has the old header: the new columns are not recorded, so that
            # the next save (Lightning's finalize) rewrites it again instead of appending rows
            # of more columns under it.
            self.metrics_keys = keys_before
            raise
        size = os.path.getsize(path) if os.path.isfile(path) else None
        try:
            with open(path, "a" if size is not None else "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                if size is None:
                    writer.writeheader()
                writer.writerows(self.metrics)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # back to the complete rows of before
                if size is None:
                    os.remove(path)
                    self.metrics_keys = keys_before  # no header written: ask again next time
                else:
                    os.truncate(path, size)
            full = disk_full(exc, path=path, folder=self.log_dir, hint=RUN_FOLDER_HINT)
            if full is not None and full is not exc:
                raise full from exc
            raise
        self.metrics = []

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        if not self._local():
            super()._rewrite_with_new_header(fieldnames)
            return
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))

        def write(tmp: Any) -> None:
            with open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)

        write_atomically(self.metrics_file_path, write)


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` writing through :class:`AtomicExperimentWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]


class TensorBoardLogger(_LightningTensorBoardLogger):
    """``lightning.pytorch.loggers.TensorBoardLogger`` whose ``hparams.yaml`` (written once,
    at the first save) is written whole or not at all, and whose writer thread's full disk is
    reported once, by the main thread (see this module's docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        quiet_full_disk_in_writer_threads()
        try:
            return super().experiment
        except Exception as exc:
            full = disk_full(exc, hint=RUN_FOLDER_HINT)
            if full is None:
                raise
            _remove_empty_event_files(self.log_dir)
            raise full from exc

    def save(self) -> None:
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        local = isinstance(self._fs, LocalFileSystem)
        if local and os.path.isdir(self.log_dir) and not os.path.isfile(path):
            write_atomically(path, lambda tmp: save_hparams_to_yaml(str(tmp), self.hparams))
        super().save()  # the event file; hparams.yaml exists now, so it is not written again


def _remove_empty_event_files(folder: str) -> None:
    """Delete the empty event files this process created in ``folder`` (their names end in
    ``.<pid>.<n>``): a writer that failed on a full disk before its first record."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            name = entry.name
            ours = name.startswith("events.out.tfevents.") and f".{os.getpid()}." in name
            if ours and entry.is_file(follow_symlinks=False) and entry.stat().st_size == 0:
                os.unlink(entry.path)


def quiet_full_disk_in_writer_threads() -> None:
    """Keep Python from printing the traceback of a TensorBoard writer thread that stopped on
    a full disk (``threading.excepthook``, for those threads and that error only). The writer
    keeps the error and raises it again at its next call in the main thread, where the run
    reports it in one line naming the event file; any other error is printed as usual."""
    if getattr(threading.excepthook, "_quiet_full_disk", False):  # installed already
        return
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another TensorBoard: its threads report as usual
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        err = args.exc_value
        writer = isinstance(args.thread, _AsyncWriterThread)
        if writer and isinstance(err, OSError) and errno_of(err) in NO_ROOM:
            return  # raised again, and reported, by the main thread
        previous(args)

    hook._quiet_full_disk = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def instantiate_loggers(group: DictConfig | None, step: int | None) -> list[Any]:
    """The loggers of a ``logger`` config group. Resuming from global step ``step``,
    TensorBoard hides what the killed run logged from that step on (``purge_step``) and the
    CSV file keeps the rows before it, so the resumed run's curves continue without overlap."""

    def make(node: DictConfig) -> Any:
        target = str(node["_target_"])
        check_installed(target)  # logger=mlflow / wandb without its package: one line
        if step is not None and target.endswith("CSVLogger"):
            return resumed_csv_logger(node, step)
        if step is not None and target.endswith("TensorBoardLogger"):
            return hydra.utils.instantiate(node, purge_step=step)
        return hydra.utils.instantiate(node)

    return [make(c) for c in (group or {}).values() if c and "_target_" in c]


def resumed_csv_logger(node: DictConfig, step: int) -> Any:
    """A CSV logger that keeps the rows logged before ``step``: Lightning's CSV writer deletes
    an existing metrics.csv when it starts, so the rows are read first and written again
    through the writer's public ``log_metrics`` / ``save``: every column of the old header
    (a name the header repeats, once, with the row's last cell of that name), empty cells
    empty, the text of every other cell as it was, except the step, which is written again
    as an integer (``4.0`` comes back as ``4``); cells beyond the header are dropped. The
    killed run's rows from ``step`` on go. Lightning writes none of these odd cases; they
    come only from a file edited by hand. Only global rank 0 writes
    (``rank_zero_only.rank``, set by the task)."""
    from mtl_clippy import distributed

    logger = hydra.utils.instantiate(node)
    path = Path(logger.log_dir) / "metrics.csv"
    header: list[str] = []
    rows: list[dict[str, str]] = []
    if path.is_file() and distributed.is_global_zero():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [k for k in reader.fieldnames or [] if k != "step"]
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) < step]
    writer = logger.experiment  # the writer starts here (and deletes the old file)
    if rows and distributed.is_global_zero():
        for row in rows:
            cells = {k: row.get(k) or "" for k in header}
            writer.log_metrics(cells, step=int(float(row["step"])))
        writer.save()  # ours: a full disk raises DiskFull and leaves no half-written row
    return logger


def log_results(loggers: list[Any], params: dict[str, Any], test: dict[str, Any] | None,
                step: int) -> None:  # fmt: skip
    """At the end of a completed run: every logger gets the run's config (``params``) and
    its test results as ``final/<metric>`` (TensorBoard in its hparams tab, the others as
    metrics of the last step ``step``), and is finalised."""
    final = {f"final/{k}": v for k, v in (test or {}).items() if v is not None}
    for lg in loggers:
        if isinstance(lg, _LightningTensorBoardLogger):  # the hparams tab, with the results
            lg.log_hyperparams(params, final)  # type: ignore[arg-type]
        else:
            lg.log_hyperparams(params)  # type: ignore[arg-type]
            if final:
                lg.log_metrics(final, step=step)
        lg.finalize("success")
        if hasattr(lg, "close"):  # logger=wandb: its run ends here (mtl_clippy.trackers)
            lg.close()


__all__ = [
    "AtomicExperimentWriter",
    "CSVLogger",
    "TensorBoardLogger",
    "instantiate_loggers",
    "log_results",
    "resumed_csv_logger",
]

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
which TensorBoard skips when it reads the file; the error, raised at the logger's next call,
is named by ``mtl_clippy.errors.disk_full`` (the file its write had open).

``logger=csv`` and ``logger=tensorboard`` (``configs/logger/``) use these classes; the files
and the options are Lightning's.
"""

from __future__ import annotations

import contextlib
import csv
import os
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from mtl_clippy.atomic import write_atomically
from mtl_clippy.errors import RUN_FOLDER_HINT, disk_full


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
        new_keys = self._record_new_keys()
        if new_keys and os.path.isfile(path):
            self._rewrite_with_new_header(self.metrics_keys)
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
    at the first save) is written whole or not at all."""

    def save(self) -> None:
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        local = isinstance(self._fs, LocalFileSystem)
        if local and os.path.isdir(self.log_dir) and not os.path.isfile(path):
            write_atomically(path, lambda tmp: save_hparams_to_yaml(str(tmp), self.hparams))
        super().save()  # the event file; hparams.yaml exists now, so it is not written again


__all__ = ["AtomicExperimentWriter", "CSVLogger", "TensorBoardLogger"]

"""Training throughput: samples per second over the training batches of every epoch."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class ThroughputMeter(pl.Callback):
    """Counts training samples and the wall time spent producing and training on them.

    The clock runs from the start of each training epoch (or the end of a validation pass)
    to the end of each training batch, so data loading is included and validation is not;
    ``samples_per_s`` is what a user sees from the training loop. Batch sizes are read from
    shapes, never tensor values: no device sync.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.train_time_s = 0.0
        self._last = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        self.train_time_s += now - self._last
        self._last = now
        self.samples += int(batch[0].shape[0]) * trainer.world_size

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.train_time_s if self.train_time_s > 0 else None

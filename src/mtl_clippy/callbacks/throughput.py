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

    It is the run's number for ``metrics.json`` only, not Lightning's
    ``lightning.pytorch.callbacks.ThroughputMonitor``, which measures something else: rates
    over a rolling window of batches (none before the window's 100 batches are full) that it
    writes to the loggers and nowhere else (so not with ``logger=none``), restarting at every
    ``fit`` (so a resumed run would report its last part only), with a
    ``torch.cuda.synchronize()`` after every batch on a GPU, ``train/``, ``validate/`` and
    ``test/`` rows added to ``metrics.csv`` and the TensorBoard files every
    ``log_every_n_steps`` (the evaluation rows at evaluation batch counts, not training
    steps), and a warning unless the module defines ``flops_per_batch``. Add it to
    ``callbacks`` for those logs; this meter leaves the logs alone.
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

    # Kept in checkpoints, so that a resumed run reports the throughput of the whole run.
    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "train_time_s": self.train_time_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples = int(state_dict["samples"])
        self.train_time_s = float(state_dict["train_time_s"])

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.train_time_s if self.train_time_s > 0 else None

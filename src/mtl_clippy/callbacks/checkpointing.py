"""Checkpoints that survive a kill and resume to the same numbers.

* ``StepCheckpoint``: a checkpoint every N optimizer steps, inside an epoch (the epoch-end
  checkpoints are ``ModelCheckpoint``'s ``last.ckpt`` / ``best.ckpt``).
* ``ResumeState``: what Lightning's checkpoint does not hold and an exact resume needs: the
  random number generators (dropout), and an early stop that was already decided.
* ``AtomicCheckpointIO``: every checkpoint is written to a temporary file in the same folder
  and renamed into place, so a kill during the write never leaves a truncated checkpoint.

The data order is restored by the data module's resumable train loader (see
``mtl_clippy.data.datamodule.ResumableDataLoader``), the optimizer state (Clippy's
accumulators) and the loops' progress by Lightning itself.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mtl_clippy.callbacks.divergence import check_pending_losses


class StepCheckpoint(ModelCheckpoint):
    """Keep the newest checkpoint taken every ``every_n_train_steps`` optimizer steps.

    Files are ``<dirpath>/step-<step>.ckpt``; only the newest is kept. The last batch of an
    epoch is skipped: the epoch-end checkpoint (after validation) covers it, and a checkpoint
    between the last batch and validation could not resume that epoch's validation.

    Before saving, the losses a :class:`~mtl_clippy.callbacks.DivergenceMonitor` has kept but
    not read yet (it reads them every 16 steps on a GPU) are checked: if one of those steps
    diverged, the monitor raises and no checkpoint is written, so a step checkpoint never holds
    weights from after a divergence.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, **kwargs: Any) -> None:
        if int(every_n_train_steps) < 1:
            raise ValueError(
                f"every_n_train_steps must be a positive number of steps, got {every_n_train_steps}"
            )
        kwargs.setdefault("filename", "step-{step:07d}")
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=int(every_n_train_steps),
            save_top_k=1,
            monitor=None,
            save_last=False,
            **kwargs,
        )

    @property
    def state_key(self) -> str:
        return "StepCheckpoint"

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        if trainer.global_step % self._every_n_train_steps == 0:  # a step it may save at
            check_pending_losses(trainer)  # raises TrainingDiverged: nothing saved
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class ResumeState(pl.Callback):
    """Saves and restores the random states (Python, NumPy, torch CPU and CUDA) with every
    checkpoint, and after a resume stops at once if early stopping had already decided to.
    """

    @property
    def state_key(self) -> str:
        return "ResumeState"

    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only, so checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global state is what we keep)
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                      int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
        }  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The killed run had already decided to stop after the epoch it checkpointed.
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, EarlyStopping) and cb.wait_count >= cb.patience > 0:
                trainer.should_stop = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, flushed to disk, then renamed."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

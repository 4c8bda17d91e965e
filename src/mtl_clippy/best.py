"""What ``metrics.json`` says about the best checkpoint, and the score a sweep optimises.

``best.ckpt`` is kept by ``callbacks.model_checkpoint.monitor``, which may be any metric the
run logs (``val/auc_mean`` by default, a validation log loss, ``train/loss``), or none (the
last epoch). Its record in metrics.json therefore names the metric and its value apart::

    "best": {"monitor": "val/logloss_click", "score": 0.4183, "val/auc_mean": 0.7012,
             "checkpoint": "checkpoints/best.ckpt", "epoch": 3}

``score`` is the monitored metric's value at the best checkpoint (null when no metric chose
it); ``val/auc_mean`` is always the mean validation AUC of that checkpoint's epoch (null
without validation, or where it was undefined), so a sweep's ``best_val_auc_mean`` column
never holds another metric's number. The mean AUC of an epoch other metrics chose is read
from the checkpoint itself: :class:`ValidationRecord` stores it with every checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from mtl_clippy import config_checks
from mtl_clippy import resume as resume_mod
from mtl_clippy.summary import split_metrics

#: The metric a sweep's ``best_val_auc_mean`` column and :func:`auc_at_best` report.
AUC_MEAN = "val/auc_mean"


def _finite(value: Any) -> float | None:
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class ValidationRecord(pl.Callback):
    """Keeps the epoch and the metrics (``val/...``) of the latest validation, in every
    checkpoint.

    Lightning runs checkpoint callbacks after all others, so a checkpoint taken after a
    validation holds that validation's metrics: metrics.json reads them from ``best.ckpt``,
    so that its ``val`` describes the tested checkpoint's epoch (not the last one, which
    early stopping makes a worse one) and its ``best["val/auc_mean"]`` is that epoch's mean
    AUC whichever metric chose the checkpoint. It changes nothing in training.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.step: int | None = None  #: the optimizer steps done at that validation
        self.auc_mean: float | None = None
        self.metrics: dict[str, float | None] = {}

    @property
    def state_key(self) -> str:
        return "ValidationRecord"

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:  # not an epoch of training
            return
        self.epoch = int(trainer.current_epoch)
        self.step = int(trainer.global_step)
        self.auc_mean = _finite(trainer.callback_metrics.get(AUC_MEAN))
        self.metrics = split_metrics(trainer.callback_metrics, "val")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, AUC_MEAN: self.auc_mean,
                "metrics": dict(self.metrics)}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = state_dict.get("epoch")
        self.step = state_dict.get("step")  # absent in older checkpoints
        self.auc_mean = state_dict.get(AUC_MEAN)
        self.metrics = dict(state_dict.get("metrics") or {})  # absent in older checkpoints


def summary(
    checkpoint_callback: Any,
    validation: bool,
    out_dir: Path,
    val: dict[str, Any],
    final_step: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """metrics.json's ``best`` (what chose the checkpoint, ``monitor``; the monitored value
    there, ``score``; that epoch's ``val/auc_mean``; the file and its epoch) and the
    validation metrics of the weights that are tested.

    ``val`` is the last validation's metrics and ``final_step`` the run's last optimizer
    step: without a checkpoint callback, or without a best checkpoint, the final weights are
    tested, and ``val`` is theirs (as it is for a checkpoint of the final step whose record
    holds no metrics, an older one). The second value is None where the tested checkpoint's
    validation is not known: its record holds no metrics, or another epoch's (a step
    checkpoint written between validations), and it is not the final step's.
    """
    monitor = config_checks.best_monitor(checkpoint_callback, validation)
    path = getattr(checkpoint_callback, "best_model_path", "") or ""
    watched = getattr(checkpoint_callback, "monitor", None)
    score = _finite(getattr(checkpoint_callback, "best_model_score", None)) if watched else None
    best: dict[str, Any] = {
        "monitor": monitor,
        "score": score,
        AUC_MEAN: None,
        "checkpoint": os.path.relpath(path, out_dir) if path else None,
    }
    if checkpoint_callback is None:
        best[AUC_MEAN] = val.get("auc_mean")
        return best, val
    if watched == AUC_MEAN:
        best[AUC_MEAN] = score
    if not path:
        return best, val
    ckpt = resume_mod.load_checkpoint(path)  # weights_only=True: runs no code
    best["epoch"] = ckpt.get("epoch")
    record = (ckpt.get("callbacks") or {}).get("ValidationRecord") or {}
    # the record is this checkpoint's own validation: the same epoch, and (where the record
    # has it) the same step: a checkpoint every N steps comes between two validations
    same_epoch = record.get("epoch") == ckpt.get("epoch") and (
        record.get("step") is None or record.get("step") == ckpt.get("global_step")
    )
    if same_epoch and watched != AUC_MEAN:
        best[AUC_MEAN] = _finite(record.get(AUC_MEAN))
    metrics = record.get("metrics")
    if same_epoch and isinstance(metrics, dict) and metrics:
        return best, {str(k): _finite(v) for k, v in sorted(metrics.items())}
    if final_step is not None and ckpt.get("global_step") == final_step:
        return best, val  # the final weights: the last validation is theirs
    return best, None


def score(best: dict[str, Any] | None) -> float | None:
    """What ``train.main`` returns to Hydra (a sweeper such as Optuna optimises it): the
    monitored metric's value at the best checkpoint, ``best["score"]``. Its direction is the
    checkpoint's ``mode``: higher is better for ``val/auc_mean`` (the default; an Optuna
    sweep sets ``direction: maximize``), lower for a loss. None where no metric chose the
    checkpoint (``monitor: null``, no validation rows), which a sweeper records as a failed
    trial."""
    return (best or {}).get("score")

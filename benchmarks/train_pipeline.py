"""The two training pipelines that ``bench_train.py`` and ``profile_step.py`` compare.

* :func:`run_peer`: our model of the published multitask library's training loop (MTReclib,
  ``main.py``, written from its structure, not its code): a per-row ``Dataset`` over the
  arrays of the file, ``DataLoader(batch_size=2048, shuffle=True, num_workers=4)`` with
  default collation, float32, ``Adam(lr=1e-3, weight_decay=1e-6)``, the model's sigmoid
  outputs and one ``BCELoss`` per task averaged, and the test split evaluated after every
  epoch (its predictions collected as Python lists, an AUC per task).
* :func:`run_ours`: ``python train.py model=sb optim=adam`` as the app builds it (the same
  config files, data module, LightningModule, callbacks, TensorBoard logger and
  checkpoints; ``mtl_clippy.build``), on the same file, with ``optim.weight_decay=1e-6`` and
  ``data.val_fraction=0`` so that it trains on the same rows, and the test split as its
  per-epoch validation, so that every epoch evaluates the same rows as the peer's.

Both use our ``SharedBottom`` (the same architecture, 17 fields embedded in 128, bottom 512-256,
towers 128-64, BatchNorm, dropout 0.2). Each returns the training samples per second (the
training batches, data loading included, evaluation excluded), the epoch wall time (the
evaluation included) and the test AUC per task after the last epoch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_auroc

from mtl_clippy import config_checks, runtime
from mtl_clippy.build import build, build_callbacks, build_trainer
from mtl_clippy.callbacks import AtomicCheckpointIO, ThroughputMeter
from mtl_clippy.loggers import instantiate_loggers
from mtl_clippy.models import SharedBottom

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2048


# ------------------------------------------------------------------------ the peer's loop


class RowDataset(Dataset):
    """The peer's dataset: the file's arrays in memory, one row per ``__getitem__``."""

    def __init__(self, categorical: np.ndarray, numerical: np.ndarray, labels: np.ndarray):
        self.categorical = np.ascontiguousarray(categorical, dtype=np.int64)
        self.numerical = np.ascontiguousarray(numerical, dtype=np.float32)
        self.labels = np.ascontiguousarray(labels, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (
            torch.from_numpy(self.categorical[i]),
            torch.from_numpy(self.numerical[i]),
            torch.from_numpy(self.labels[i]),
        )


def peer_test(model: torch.nn.Module, loader: DataLoader) -> tuple[float, ...]:
    """The peer's per-epoch test: predictions and labels gathered as lists, an AUC per task."""
    model.eval()
    predictions: list[list[list[float]]] = []
    labels: list[list[list[float]]] = []
    with torch.no_grad():
        for cat, num, y in loader:
            predictions.append(torch.sigmoid(model(cat, num)).tolist())
            labels.append(y.tolist())
    model.train()
    p = torch.tensor([r for b in predictions for r in b], dtype=torch.float64)
    t = torch.tensor([r for b in labels for r in b]).long()
    return tuple(float(binary_auroc(p[:, k], t[:, k])) for k in range(p.shape[1]))


def run_peer(dm: Any, seed: int, epochs: int = 1, workers: int = 4) -> dict[str, Any]:
    """The peer's training loop on the data module's train and test arrays (all train rows:
    the data module is built with ``val_fraction=0``)."""
    torch.manual_seed(seed)
    cat, num, y = dm._train
    tcat, tnum, ty = dm._test
    train = DataLoader(RowDataset(cat, num, y), batch_size=BATCH, shuffle=True, num_workers=workers)
    test = DataLoader(RowDataset(tcat, tnum, ty), batch_size=BATCH, shuffle=False,
                      num_workers=workers)  # fmt: skip
    model = SharedBottom(metadata=dm.metadata)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    samples, train_s, epoch_s, auc = 0, 0.0, 0.0, ()
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for c, x, lab in train:
            out = torch.sigmoid(model(c, x))
            losses = [F.binary_cross_entropy(out[:, k], lab[:, k]) for k in range(lab.shape[1])]
            loss = sum(losses) / len(losses)
            model.zero_grad()
            loss.backward()
            optimizer.step()
            samples += len(lab)
        t1 = time.perf_counter()
        auc = peer_test(model, test)
        t2 = time.perf_counter()
        train_s += t1 - t0
        epoch_s += t2 - t0
    return {"samples_per_s": samples / train_s, "epoch_s": epoch_s / epochs, "auc": auc}


# ------------------------------------------------------------------------------- ours


class EpochClock(pl.Callback):
    """Wall time of each training epoch, its validation included."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning validates at the end of the epoch's last batch, before this hook
        self.epochs.append(time.perf_counter() - self._t0)


def config(overrides: list[str]) -> Any:
    """The app's config (configs/train.yaml) with these command-line overrides."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def ours_overrides(rows: int, test_rows: int, cache_dir: str, precision: str, epochs: int,
                   seed: int, out: str) -> list[str]:  # fmt: skip
    return [
        "model=sb", "optim=adam", "optim.weight_decay=1e-6",
        f"data.train_rows={rows}", f"data.test_rows={test_rows}", "data.val_fraction=0",
        f"data.cache_dir={cache_dir}", f"trainer.max_epochs={epochs}",
        f"trainer.precision={precision}", f"seed={seed}", f"paths.output_dir={out}",
    ]  # fmt: skip


def build_ours(overrides: list[str], extra_callbacks: list[Any] = ()):
    """Data module, module and trainer exactly as ``train.py`` builds them from ``overrides``;
    the data module's test split is its validation split (evaluated every epoch)."""
    cfg = config(overrides)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm, module = build(cfg)
    dm.val_dataloader = dm.test_dataloader  # the peer evaluates the test split every epoch
    throughput, clock = ThroughputMeter(), EpochClock()
    loggers = instantiate_loggers(cfg.get("logger"), None)
    callbacks, _ = build_callbacks(cfg, [throughput, clock, *extra_callbacks], {}, bool(loggers))
    precision = runtime.precision_of(cfg.trainer)
    trainer = build_trainer(cfg, callbacks, loggers, precision, [AtomicCheckpointIO()])
    config_checks.check_batches(cfg, dm, trainer.world_size)
    return dm, module, trainer, throughput, clock, precision


def run_ours(rows: int, test_rows: int, cache_dir: str, precision: str, seed: int,
             epochs: int = 1) -> dict[str, Any]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        dm, module, trainer, throughput, clock, resolved = build_ours(
            ours_overrides(rows, test_rows, cache_dir, precision, epochs, seed, out)
        )
        trainer.fit(module, datamodule=dm)
        m = trainer.callback_metrics
        return {
            "samples_per_s": throughput.samples_per_s,
            "epoch_s": float(np.mean(clock.epochs)),
            "auc": (float(m["val/auc_click"]), float(m["val/auc_conversion"])),
            "precision": str(resolved),
        }


def datamodule(rows: int, test_rows: int, cache_dir: str, seed: int) -> Any:
    """The generated file (train and test) as the app reads it, all train rows for training."""
    from mtl_clippy.data import AliExpressDataModule

    dm = AliExpressDataModule(
        cache_dir=cache_dir, train_rows=rows, test_rows=test_rows, seed=seed, val_fraction=0
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm

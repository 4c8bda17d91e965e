"""Training throughput of SharedBottom + Clippy: our pipeline against the existing libraries'.

Run: ``python benchmarks/bench_train.py [--train-rows 300000] [--threads 2]``

On the same generated data (the built-in dataset, cached under ``data/``), one training epoch
of each variant, then the test AUC it reached:

* ``baseline``: the published multitask libraries' pipeline, written out here: a per-row
  ``Dataset`` over the arrays, ``DataLoader(batch_size=2048, shuffle=True)`` with default
  collation, a plain PyTorch loop, the same model and optimizer;
* ``ours fp32``: ``AliExpressDataModule`` (one gather per batch) + ``MultiTaskModule`` under
  Lightning's ``Trainer``;
* ``ours bf16-mixed``: the same with ``precision="bf16-mixed"`` (CPU autocast to bfloat16);
* ``ours sparse embeddings``: the embedding table with sparse gradients (Clippy updates only
  the rows in the batch);
* ``ours compile``: the backbone under ``torch.compile``;
* ``ours bf16 + sparse``: both.

Samples per second are counted over the training batches only (validation excluded, data
loading included). Also: LogisticRegression (one weight per categorical value, stored as an
embedding) against a dense one-hot implementation of the same model.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_auroc

from mtl_clippy.callbacks import ThroughputMeter
from mtl_clippy.data import AliExpressDataModule, DatasetMetadata
from mtl_clippy.models import LogisticRegression, MultiTaskModule, SharedBottom
from mtl_clippy.models.module import rank_scores
from mtl_clippy.optim import ClippyAdagrad

ROOT = Path(__file__).resolve().parents[1]
CLIPPY = dict(
    lr=0.1, variable_relative_threshold=0.5, absolute_threshold=1e-2, initial_accumulator_value=0.1
)
CLIPPY_CFG = {"_target_": "mtl_clippy.optim.ClippyAdagrad", "_partial_": True, **CLIPPY}


class RowDataset(Dataset):
    """The existing libraries' dataset: one row per ``__getitem__``, collated by PyTorch."""

    def __init__(self, categorical: np.ndarray, numerical: np.ndarray, labels: np.ndarray):
        self.categorical, self.numerical, self.labels = categorical, numerical, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.categorical[i].astype(np.int64), self.numerical[i], self.labels[i]


@torch.no_grad()
def test_auc(model: nn.Module, dm: AliExpressDataModule) -> tuple[float, float]:
    """AUC per task on the test split (150,000 rows, 434 conversions by default: the
    validation split's ~90 conversions make conversion-AUC differences under 0.03 noise)."""
    model.eval()
    logits, labels = [], []
    for cat, num, y in dm.test_dataloader():
        logits.append(model(cat, num).float())
        labels.append(y)
    model.train()
    lg, lb = torch.cat(logits), torch.cat(labels).long()
    # rank_scores: the logits' order in (0, 1), as the module's metrics rank them (torchmetrics
    # would apply a sigmoid, which in float32 ties every logit above ~17)
    return tuple(  # type: ignore[return-value]
        float(binary_auroc(rank_scores(lg[:, t]), lb[:, t])) for t in range(lg.shape[1])
    )


def run_baseline(dm: AliExpressDataModule, seed: int) -> dict:
    torch.manual_seed(seed)
    cat, num, y = dm._train
    n_fit = dm._n_fit
    loader = DataLoader(
        RowDataset(cat[:n_fit], num[:n_fit], y[:n_fit]), batch_size=2048, shuffle=True
    )
    model = SharedBottom(metadata=dm.metadata)
    opt = ClippyAdagrad(model.parameters(), **CLIPPY, foreach=False, fused=False)
    samples, t0 = 0, time.perf_counter()
    for c, x, lab in loader:
        opt.zero_grad(set_to_none=True)
        out = model(c, x)
        loss = F.binary_cross_entropy_with_logits(out, lab, reduction="none").mean(0).sum()
        loss.backward()
        opt.step()
        samples += len(lab)
    dt = time.perf_counter() - t0
    return {"samples_per_s": samples / dt, "auc": test_auc(model, dm)}


def run_ours(
    dm: AliExpressDataModule, seed: int, *, precision: str, sparse: bool, compile_: bool
) -> dict:
    pl.seed_everything(seed, verbose=False)
    module = MultiTaskModule(
        backbone={"_target_": "mtl_clippy.models.SharedBottom", "sparse_embeddings": sparse},
        metadata=dm.metadata,
        optimizer=CLIPPY_CFG,
    )
    if compile_:
        # compile a copy first, so that the timed epoch reuses the compiled code
        warm = copy.deepcopy(module.backbone)
        compiled = torch.compile(warm)
        cat, num, _ = next(iter(dm.train_dataloader()))
        compiled(cat, num).sum().backward()
        module.backbone = torch.compile(module.backbone)
    meter = ThroughputMeter()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[meter],
    )
    trainer.fit(module, datamodule=dm)
    return {"samples_per_s": meter.samples_per_s, "auc": test_auc(module, dm)}


def warm_up_compiled_optimizer(meta: DatasetMetadata) -> None:
    """Compile ClippyAdagrad's fused step for the shapes of the runs below (dense and sparse
    embeddings), so that no timed epoch includes compilation (done once per model and machine
    in real use, then cached on disk)."""
    for sparse in (False, True):
        model = SharedBottom(metadata=meta, sparse_embeddings=sparse)
        opt = ClippyAdagrad(model.parameters(), **CLIPPY)
        cat = torch.zeros(8, len(meta.vocab_sizes), dtype=torch.long)
        model(cat, torch.zeros(8, meta.n_numerical)).sum().backward()
        opt.step()


class DenseOneHotLR(nn.Module):
    """Logistic regression on an explicit one-hot matrix: what the embedding form avoids."""

    def __init__(self, meta: DatasetMetadata):
        super().__init__()
        self.offsets = torch.tensor(np.concatenate([[0], np.cumsum(meta.vocab_sizes)[:-1]]))
        self.n_values = int(sum(meta.vocab_sizes))
        self.linear = nn.Linear(self.n_values + meta.n_numerical, meta.n_tasks)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros(cat.shape[0], self.n_values)
        onehot.scatter_(1, cat + self.offsets, 1.0)
        return self.linear(torch.cat([onehot, num], dim=1))


def bench_lr(dm: AliExpressDataModule, steps: int = 30) -> tuple[float, float]:
    batches = [b for _, b in zip(range(steps + 3), dm.train_dataloader(), strict=False)]

    def rate(model: nn.Module) -> float:
        opt = ClippyAdagrad(model.parameters(), **CLIPPY)  # default path (compiled when possible)
        t0 = 0.0
        for i, (c, x, y) in enumerate(batches):
            if i == 3:
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(c, x), y).backward()
            opt.step()
        return steps * batches[0][0].shape[0] / (time.perf_counter() - t0)

    torch.manual_seed(0)
    return rate(LogisticRegression(metadata=dm.metadata)), rate(DenseOneHotLR(dm.metadata))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-rows", type=int, default=300_000)
    ap.add_argument("--test-rows", type=int, default=150_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cache-dir", default=str(ROOT / "data"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dm = AliExpressDataModule(
        cache_dir=args.cache_dir,
        train_rows=args.train_rows,
        test_rows=args.test_rows,
        seed=args.seed,
    )
    dm.prepare_data()
    dm.setup("fit")
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} "
        f"threads; {dm.metadata.extra['rows']['train']:,} training rows, batch 2048, one epoch each; "
        f"Bayes AUC click {dm.metadata.extra['bayes_auc']['click']:.4f}, conversion "
        f"{dm.metadata.extra['bayes_auc']['conversion']:.4f}"
    )
    warm_up_compiled_optimizer(dm.metadata)
    rows = [("baseline (per-row Dataset + DataLoader + plain loop)", run_baseline(dm, args.seed))]
    variants = [
        ("ours fp32", dict(precision="32-true", sparse=False, compile_=False)),
        ("ours bf16-mixed", dict(precision="bf16-mixed", sparse=False, compile_=False)),
        ("ours sparse embeddings", dict(precision="32-true", sparse=True, compile_=False)),
        ("ours compile", dict(precision="32-true", sparse=False, compile_=True)),
        ("ours bf16-mixed + sparse", dict(precision="bf16-mixed", sparse=True, compile_=False)),
    ]
    for name, kw in variants:
        rows.append((name, run_ours(dm, args.seed, **kw)))
    base = rows[0][1]["samples_per_s"]
    print("\n| pipeline | samples/s | vs baseline | test AUC click | test AUC conversion |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.2f}x | "
            f"{r['auc'][0]:.4f} | {r['auc'][1]:.4f} |"
        )
    ours_lr, dense_lr = bench_lr(dm)
    print(
        f"\nLogisticRegression (embedding form): {ours_lr:,.0f} samples/s; dense one-hot: "
        f"{dense_lr:,.0f} samples/s; ratio {ours_lr / dense_lr:.1f}x (target >= 20x)"
    )


if __name__ == "__main__":
    main()

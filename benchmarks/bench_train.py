"""Training throughput of SharedBottom + Adam: our pipeline against our model of the peer's.

Run: ``python benchmarks/bench_train.py [--rows 100000] [--test-rows 50000] [--repeats 3]``

On one generated file (``--rows`` train rows, ``--test-rows`` test rows, the built-in data's
layout, cached under ``--cache-dir``), one epoch per variant at batch 2048, 2 threads:

* ``peer``: our model of the published multitask library's training loop (MTReclib's
  ``main.py``, written from its structure in ``train_pipeline.py``, not its code, which is not
  available here): a per-row ``Dataset``, ``DataLoader(batch_size=2048, shuffle=True,
  num_workers=4)`` with default collation, float32, ``torch.optim.Adam(lr=1e-3,
  weight_decay=1e-6)``, one BCE per task on sigmoid outputs, the test split evaluated after
  the epoch;
* ``ours, defaults``: ``python train.py model=sb optim=adam`` as the app builds it (config
  files, data module, LightningModule, callbacks, TensorBoard logger, checkpoints), with
  ``trainer.precision=auto`` (bfloat16 autocast on a CPU that computes bfloat16 natively),
  ``optim.weight_decay=1e-6``, every train row trained on and the test split as the epoch's
  validation (so it evaluates the same rows as the peer, with its exact AUC metrics);
* ``ours, float32``: the same with ``trainer.precision=32-true``.

The same architecture (our ``SharedBottom``) and the same rows for all. The variants run in
turn, ``--repeats`` rounds after one untimed round (one-time costs: thread pools, oneDNN
kernels); each rate is the median over the rounds, each ratio the median of the ratios
within a round (the load of a shared machine drifts between rounds). Two rates:

* training samples/s: the training batches only (data loading included, the evaluation
  excluded), what ``metrics.json`` reports as ``samples_per_s``;
* epoch samples/s: training rows per second of the whole epoch, its test evaluation included.

Also (skip with ``--skip-lr``): LogisticRegression (one weight per categorical value, stored
as an embedding) against a dense one-hot implementation of the same model, ClippyAdagrad.

Each ratio is one of our pipelines against our model of the peer's pipeline on this machine,
not against the peer's own code.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_pipeline as tp
from mtl_clippy.data import DatasetMetadata
from mtl_clippy.models import LogisticRegression
from mtl_clippy.optim import ClippyAdagrad

VARIANTS = ("peer", "ours, defaults", "ours, float32")


def run(name: str, args: argparse.Namespace, dm: object) -> dict:
    if name == "peer":
        return tp.run_peer(dm, args.seed, workers=args.workers)
    precision = "auto" if name == "ours, defaults" else "32-true"
    return tp.run_ours(args.rows, args.test_rows, args.cache_dir, precision, args.seed)


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


def bench_lr(dm, steps: int = 30) -> tuple[float, float]:
    """LogisticRegression (one weight per categorical value, stored as an embedding) against a
    dense one-hot implementation of the same model, both with ClippyAdagrad."""
    batches = [b for _, b in zip(range(steps + 3), dm.train_dataloader(), strict=False)]
    clippy = dict(lr=0.1, variable_relative_threshold=0.5, absolute_threshold=1e-2,
                  initial_accumulator_value=0.1)  # fmt: skip

    def rate(model: nn.Module) -> float:
        opt = ClippyAdagrad(model.parameters(), **clippy)  # default path (compiled when possible)
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
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--test-rows", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4, help="the peer's DataLoader workers")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cache-dir", default=str(tp.ROOT / "data"))
    ap.add_argument("--skip-lr", action="store_true", help="skip the logistic-regression case")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dm = tp.datamodule(args.rows, args.test_rows, args.cache_dir, args.seed)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    print(
        f"{cpu}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}; "
        f"{args.rows:,} train rows, {args.test_rows:,} test rows, batch {tp.BATCH}, one epoch "
        f"per run, {args.repeats} interleaved rounds after a warm-up round"
    )
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats + 1):
        for name in VARIANTS:
            out = run(name, args, dm)
            torch.set_num_threads(args.threads)  # a fit may change it; keep every run equal
            if r:
                results[name].append(out)
            print(
                f"  round {r}{' (warm-up)' if not r else ''} {name}: "
                f"{out['samples_per_s']:,.0f} training samples/s, epoch {out['epoch_s']:.2f} s, "
                f"AUC {out['auc'][0]:.4f} / {out['auc'][1]:.4f}",
                flush=True,
            )
    base = results["peer"]
    med = {
        name: {
            "train": statistics.median(o["samples_per_s"] for o in rs),
            "epoch": statistics.median(args.rows / o["epoch_s"] for o in rs),
            # the ratio within each round (the machine's load drifts between rounds), median
            "train_x": statistics.median(
                o["samples_per_s"] / b["samples_per_s"] for o, b in zip(rs, base, strict=True)
            ),
            "epoch_x": statistics.median(
                b["epoch_s"] / o["epoch_s"] for o, b in zip(rs, base, strict=True)
            ),
            "auc": [statistics.median(o["auc"][k] for o in rs) for k in range(2)],
            "precision": rs[0].get("precision", "32-true (plain loop)"),
        }
        for name, rs in results.items()
    }
    print(
        "\n| pipeline | precision | training samples/s | vs peer model | epoch samples/s "
        "(test eval included) | vs peer model | test AUC click | test AUC conversion |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, m in med.items():
        print(
            f"| {name} | {m['precision']} | {m['train']:,.0f} | {m['train_x']:.2f}x "
            f"| {m['epoch']:,.0f} | {m['epoch_x']:.2f}x | {m['auc'][0]:.4f} | {m['auc'][1]:.4f} |"
        )
    print(
        "\nRatios: our pipeline (train.py's, built from the configs) against our model of the "
        "peer's pipeline (train_pipeline.run_peer), same machine, same file, same model and "
        "optimizer; not against the peer's own code."
    )
    if not args.skip_lr:
        ours_lr, dense_lr = bench_lr(dm)
        print(
            f"\nLogisticRegression (embedding form): {ours_lr:,.0f} samples/s; dense one-hot: "
            f"{dense_lr:,.0f} samples/s; ratio {ours_lr / dense_lr:.1f}x (target >= 20x)"
        )


if __name__ == "__main__":
    main()

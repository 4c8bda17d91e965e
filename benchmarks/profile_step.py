"""Where a training step of SharedBottom + Adam goes, next to what this CPU can compute.

Run: ``python benchmarks/profile_step.py [--rows 100000] [--test-rows 50000] [--threads 2]``

1. The CPU's peak: a plain ``torch.matmul`` of two large square matrices (float32, and
   bfloat16 where the CPU has it), ``--threads`` threads, median of repeats:
   ``2 n^3 / time``.
2. The FLOPs of one SharedBottom step at batch 2048, counted from the ``Linear`` layers of the
   model as it runs (``2 * batch * in * out`` forward, twice that backward: the gradients of
   the input and of the weight); the embedding gathers, BatchNorm, ReLU and dropout are
   memory-bound and counted as zero.
3. The floor: forward (with the loss), backward and ``Adam.step`` timed apart in a bare loop
   over batches already in memory, float32 and bfloat16 autocast; their FLOP/s as a
   fraction of the peak.
4. One epoch of the app's pipeline (``python train.py model=sb optim=adam`` as the app builds
   it, see ``train_pipeline.py``, evaluating the test split every epoch), every part timed
   in place: the batch gathers, the forward and loss, ``self.log``, the backward, the
   optimizer's update, each callback hook, the loggers, the validation pass and the
   checkpoints; "Lightning's loop" is the rest of the training time. Timers nest (a hook
   called inside the backward counts for the hook, not the backward). On a CPU every
   operation has finished when the Python call returns, so no synchronisation is needed.

The times are per training step (the epoch's time divided by its steps), so the rows add up
to the epoch; validation and checkpoints are per epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_pipeline as tp
from mtl_clippy.models import SharedBottom
from mtl_clippy.runtime import cpu_has_native_bf16

# ------------------------------------------------------------------------------ 1. peak


def peak_flops(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------- 2. FLOPs


def linear_flops(model: nn.Module, cat: torch.Tensor, num: torch.Tensor) -> int:
    """Forward FLOPs of the ``Linear`` layers of one forward pass."""
    total = 0

    def hook(module: nn.Linear, inputs: Any, output: Any) -> None:
        nonlocal total
        rows = inputs[0].numel() // inputs[0].shape[-1]
        total += 2 * rows * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(cat, num)
    for h in handles:
        h.remove()
    return total


# ----------------------------------------------------------------------------- 3. floor


def floor(dm: Any, bf16: bool, steps: int) -> dict[str, float]:
    """Median seconds of forward+loss, backward and Adam.step in a bare loop."""
    torch.manual_seed(0)
    model = SharedBottom(metadata=dm.metadata)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    batches = [b for _, b in zip(range(steps + 3), dm.train_dataloader(), strict=False)]
    parts: dict[str, list[float]] = defaultdict(list)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for i, (cat, num, y) in enumerate(batches):
        t0 = time.perf_counter()
        with autocast:
            logits = model(cat, num)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none").mean(0).sum()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= 3:
            parts["forward"].append(t1 - t0)
            parts["backward"].append(t2 - t1)
            parts["optimizer"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in parts.items()}


# ------------------------------------------------------------------- 4. the app's epoch


class Timers:
    """Exclusive wall time per name: a timer running inside another is subtracted from it."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [name, start, children's time]

    def wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [name, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.perf_counter() - frame[1]
                self.total[name] += spent - frame[2]
                if self._stack:
                    self._stack[-1][2] += spent

        return timed


class Instrument(pl.Callback):
    """Wraps the pipeline's parts in timers once the trainer has built them."""

    def __init__(self, timers: Timers) -> None:
        self.t = timers
        self.train_s = 0.0
        self.steps = 0
        self._epoch_t0 = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        t = self.t
        pl_module.training_step = t.wrap("forward + loss", pl_module.training_step)
        pl_module.log = t.wrap("self.log (3 per step)", pl_module.log)
        trainer.strategy.backward = t.wrap("backward", trainer.strategy.backward)
        lc = trainer._logger_connector
        lc.update_train_step_metrics = t.wrap(
            "loggers (per-step metrics)", lc.update_train_step_metrics
        )
        for logger in trainer.loggers:
            logger.log_metrics = t.wrap("loggers (per-step metrics)", logger.log_metrics)
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        val_loop.run = t.wrap("validation (per epoch)", val_loop.run)
        dm = trainer.datamodule
        make = dm.train_dataloader

        def train_dataloader() -> Any:
            loader = make()
            ds = loader.dataset
            ds.__class__ = type("Timed" + type(ds).__name__, (type(ds),), {
                "__getitem__": t.wrap("data (gather per batch)", type(ds).__getitem__)
            })  # fmt: skip
            return loader

        dm.train_dataloader = train_dataloader
        for cb in trainer.callbacks:
            if cb is self:
                continue
            for name in dir(pl.Callback):
                if name.startswith(("on_", "state_dict", "load_state")) or name == "setup":
                    if name == "setup" or getattr(type(cb), name, None) is getattr(
                        pl.Callback, name
                    ):
                        continue
                    phase = "per epoch" if "epoch" in name or "validation" in name or "fit" in name \
                        or "train_start" in name or "train_end" in name or "checkpoint" in name \
                        or "state_dict" in name else "per step"  # fmt: skip
                    setattr(cb, name, t.wrap(f"{type(cb).__name__} ({phase})", getattr(cb, name)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        step = opt.step

        def stepped(closure: Any = None, **kw: Any) -> Any:
            return step(closure=self.t.wrap("Lightning's closure", closure), **kw)

        opt.step = self.t.wrap("optimizer update", stepped)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # only the epoch counts (not the sanity check's validation, nor the fit's setup)
        self._before = dict(self.t.total)
        self._epoch_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the epoch's validation, checkpoints and end-of-epoch hooks
        self.epoch_s = time.perf_counter() - self._epoch_t0
        self.epoch = {k: v - self._before.get(k, 0.0) for k, v in self.t.total.items()}


def profile_app(rows: int, test_rows: int, cache: str, precision: str) -> dict[str, Any]:
    timers = Timers()
    inst = Instrument(timers)
    with tempfile.TemporaryDirectory(prefix="profile-step-") as out:
        dm, module, trainer, throughput, _clock, resolved = tp.build_ours(
            tp.ours_overrides(rows, test_rows, cache, precision, 1, 42, out), [inst]
        )
        trainer.fit(module, datamodule=dm)
    total = {k: v for k, v in inst.epoch.items() if v > 0}
    epoch = inst.epoch_s
    steps = inst.steps
    per_epoch = {k: v for k, v in total.items() if "per epoch" in k}
    per_step = {k: v for k, v in total.items() if k not in per_epoch}
    measured = sum(total.values())
    per_step["Lightning's loop (the rest)"] = epoch - measured
    return {
        "precision": str(resolved), "epoch_s": epoch, "steps": steps,
        "per_step": per_step, "per_epoch": per_epoch,
        "samples_per_s": throughput.samples_per_s,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--test-rows", type=int, default=50_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n", type=int, default=4096, help="matrix size of the peak matmul")
    ap.add_argument("--cache-dir", default=str(tp.ROOT / "data"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = cpu_has_native_bf16()
    dm = tp.datamodule(args.rows, args.test_rows, args.cache_dir, 42)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    print(f"{cpu}; {os.cpu_count()} CPUs, {args.threads} threads; torch {torch.__version__}; "
          f"native bfloat16: {bf16}")  # fmt: skip

    peaks = {"float32": peak_flops(torch.float32, args.n, 5)}
    if bf16:
        peaks["bfloat16"] = peak_flops(torch.bfloat16, args.n, 5)
    cat, num, _ = next(iter(dm.train_dataloader()))
    model = SharedBottom(metadata=dm.metadata)
    fwd = linear_flops(model, cat, num)
    step_flops = 3 * fwd
    print(f"\n## Peak matmul ({args.n} x {args.n}, {args.threads} threads) and one step's FLOPs\n")
    for k, v in peaks.items():
        print(f"- {k} matmul: {v / 1e9:,.0f} GFLOP/s")
    print(f"- one SharedBottom step at batch {cat.shape[0]}: {fwd / 1e9:.2f} GFLOP forward, "
          f"{step_flops / 1e9:.2f} GFLOP forward + backward (Linear layers)")  # fmt: skip
    for k, v in peaks.items():
        print(f"  - at the {k} peak: {step_flops / v * 1e3:.1f} ms per step, "
              f"{v / step_flops * cat.shape[0]:,.0f} samples/s at most")  # fmt: skip

    print("\n## The floor: a bare loop over batches in memory (median ms per step)\n")
    print(
        "| precision | forward + loss | backward | Adam.step | total | samples/s | "
        "fwd+bwd GFLOP/s | of its matmul peak |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, on in (("float32", False), ("bfloat16 autocast", True))[: 2 if bf16 else 1]:
        f = floor(dm, on, args.steps)
        tot = sum(f.values())
        rate = step_flops / (f["forward"] + f["backward"])
        peak = peaks["bfloat16" if on else "float32"]
        print(f"| {name} | {f['forward'] * 1e3:.1f} | {f['backward'] * 1e3:.1f} | "
              f"{f['optimizer'] * 1e3:.1f} | {tot * 1e3:.1f} | {cat.shape[0] / tot:,.0f} | "
              f"{rate / 1e9:,.0f} | {rate / peak:.1%} |")  # fmt: skip

    for precision in ("auto", "32-true")[: 2 if bf16 else 1]:
        r = profile_app(args.rows, args.test_rows, args.cache_dir, precision)
        steps, epoch = r["steps"], r["epoch_s"]
        print(f"\n## One epoch of the app's pipeline, precision {r['precision']}: {epoch:.2f} s "
              f"(validation and checkpoints included), {steps} steps, "
              f"{r['samples_per_s']:,.0f} training samples/s\n")  # fmt: skip
        print("| part | ms per step | share of the epoch |")
        print("|---|---|---|")
        for k, v in sorted(r["per_step"].items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v / steps * 1e3:.2f} | {v / epoch:.1%} |")
        for k, v in sorted(r["per_epoch"].items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v * 1e3:.0f} ms per epoch | {v / epoch:.1%} |")


if __name__ == "__main__":
    main()

"""Measure the divergence rule on real loss traces: false positives and detections.

Two steps:

1. ``generate``: train runs *with the divergence monitor off* and the training loss of every
   step logged (CSV logger, ``trainer.log_every_n_steps=1``), so each trace shows what the loss
   does when nothing stops the run. Two sets:

   * **stable**: learning rates known to train (Clippy 0.1, AdaGrad 0.1, Adam 1e-3), at batch
     sizes 32, 128 and 2048, plain and ``--hard`` data: small batches with the rare
     conversions are where a batch holding several positives has a loss ten times the median.
   * **blow-up**: ``--hard`` data, SharedBottom without normalisation, AdaGrad at lr 3.16 and
     10 and Clippy without clipping at lr 10: runs that end at chance or at non-finite losses.

2. ``score``: replay :class:`mtl_clippy.callbacks.DivergenceMonitor`'s rule (its
   ``observe``, the same code a run uses) on every trace and compare it with a ground truth
   defined from the whole trace, independently of the rule:

   * a trace **blew up** at step s if from s on the loss never again comes within 3x of
     its median over the 50 steps before s (or is non-finite there), for the rest of training,
     with at least 20 steps left after s, or the run's test AUC ended at chance (both tasks
     within 0.01 of 0.5);
   * the rule's verdict is a *false positive* on a trace that did not blow up, and a
     *detection* on one that did; the delay is the rule's step minus s.

   python benchmarks/divergence_rule.py generate --out /tmp/divergence_traces
   python benchmarks/divergence_rule.py score --out /tmp/divergence_traces \
       --json benchmarks/divergence_rule.json
   python benchmarks/divergence_rule.py score --out /tmp/divergence_traces --set persist_steps=1
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = [
    "~callbacks.divergence_monitor",
    "~callbacks.progress_bar",
    "~callbacks.step_checkpoint",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "callbacks.optimizer_telemetry.log_every_n_steps=1000",
    "data.test_rows=30000",
]

# (name, overrides): the stable set
STABLE = []
for seed in (1, 2):
    for optim, lr in (("clippy", 0.1), ("adagrad", 0.1), ("adam", 0.001)):
        STABLE += [
            (
                f"b32_{optim}_s{seed}",
                [
                    f"optim={optim}",
                    f"optim.lr={lr}",
                    "data.batch_size=32",
                    "data.train_rows=6000",
                    "trainer.max_epochs=2",
                    f"seed={seed}",
                ],
            ),
            (
                f"b128_{optim}_s{seed}",
                [
                    f"optim={optim}",
                    f"optim.lr={lr}",
                    "data.batch_size=128",
                    "data.train_rows=30000",
                    "trainer.max_epochs=2",
                    f"seed={seed}",
                ],
            ),
            (
                f"b2048_{optim}_s{seed}",
                [
                    f"optim={optim}",
                    f"optim.lr={lr}",
                    "data.batch_size=2048",
                    "data.train_rows=100000",
                    "trainer.max_epochs=4",
                    f"seed={seed}",
                ],
            ),
        ]
    STABLE.append(
        (
            f"hard_b256_clippy_s{seed}",
            [
                "optim=clippy",
                "data.hard=true",
                "data.batch_size=256",
                "data.train_rows=30000",
                "trainer.max_epochs=2",
                f"seed={seed}",
            ],
        )
    )

BLOWUP = []
for seed in (1, 2):
    for optim, lr in (("adagrad", 3.16), ("adagrad", 10), ("clippy_noclip", 10)):
        BLOWUP.append(
            (
                f"hard_nonorm_{optim}_lr{lr}_s{seed}",
                [
                    f"optim={optim}",
                    f"optim.lr={lr}",
                    "data.hard=true",
                    "model.norm=none",
                    "data.batch_size=512",
                    "data.train_rows=60000",
                    "trainer.max_epochs=2",
                    f"seed={seed}",
                ],
            )
        )


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind, runs in (("stable", STABLE), ("blowup", BLOWUP)):
        for name, overrides in runs:
            folder = out / kind / name
            if (folder / "metrics.json").exists():
                continue
            cmd = [
                sys.executable,
                str(ROOT / "train.py"),
                *COMMON,
                *overrides,
                f"hydra.run.dir={folder}",
                "threads=1",
            ]
            print(kind, name, flush=True)
            with open(out / "generate.log", "a") as log:
                subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)


def read_trace(folder: Path) -> list[tuple[int, float]]:
    files = sorted(folder.glob("csv/**/metrics.csv")) or sorted(folder.glob("**/metrics.csv"))
    trace = []
    for f in files:
        for row in csv.DictReader(open(f)):
            v = row.get("train/loss")
            if v not in (None, ""):
                trace.append((int(row["step"]) + 1, float(v)))
    return trace


def blew_up(trace: list[tuple[int, float]], summary: dict) -> int | None:
    """The ground truth: the step the loss blew up for good, independent of the rule."""
    losses = [v for _, v in trace]
    for i in range(1, len(losses)):
        before = [v for v in losses[max(0, i - 50) : i] if math.isfinite(v)]
        if not before:
            continue
        ref = statistics.median(before)
        rest = losses[i:]
        if len(rest) >= 20 and all((not math.isfinite(v)) or v > 3 * ref for v in rest):
            return trace[i][0]
    test = summary.get("test") or {}
    aucs = [v for k, v in test.items() if k.startswith("auc_") and k != "auc_mean"]
    if aucs and all(abs(a - 0.5) <= 0.01 for a in aucs):
        return -1  # collapsed: ends at chance (no single step)
    return None


def score(out: Path, json_path: Path | None, settings: dict | None = None) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import yaml

    from mtl_clippy.callbacks import DivergenceMonitor

    block = yaml.safe_load((ROOT / "configs/callbacks/default.yaml").read_text())
    shipped = {k: v for k, v in block["divergence_monitor"].items() if k != "_target_"}
    shipped.update(settings or {})  # --set persist_steps=1: the earlier single-step rule
    rows = []
    for kind in ("stable", "blowup"):
        for folder in sorted((out / kind).glob("*")):
            mj = folder / "metrics.json"
            if not mj.exists():
                continue
            summary = json.loads(mj.read_text())
            trace = read_trace(folder)
            truth = blew_up(trace, summary)
            monitor = DivergenceMonitor(**shipped)  # the rule as a run is configured
            for step, loss in trace:
                if monitor.observe(step, loss):
                    break
            finish = getattr(monitor, "finish", None)
            if callable(finish):
                finish()
            verdict = monitor.summary()
            rows.append(
                {
                    "set": kind,
                    "run": folder.name,
                    "steps": len(trace),
                    "truth_step": truth,
                    "rule_step": verdict.get("step"),
                    "verdict": verdict.get(
                        "verdict", "diverged" if verdict.get("step") else "stable"
                    ),
                    "spikes": verdict.get("spikes"),
                    "max_over_median": max_ratio(trace),
                }
            )
    fp = [r for r in rows if r["truth_step"] is None and r["rule_step"] is not None]
    real = [r for r in rows if r["truth_step"] is not None]
    caught = [r for r in real if r["rule_step"] is not None or r["verdict"] == "collapsed"]
    result = {
        "runs": rows,
        "false_positives": f"{len(fp)} of {len(rows) - len(real)}",
        "detections": f"{len(caught)} of {len(real)}",
    }
    for r in rows:
        print(
            f"{r['set']:7s} {r['run']:34s} steps {r['steps']:5d} truth {r['truth_step']!s:>6s} "
            f"rule {r['rule_step']!s:>6s} {r['verdict']:9s} spikes {r['spikes']!s:>4s} "
            f"max/median {r['max_over_median']:.1f}"
        )
    print("false positives:", result["false_positives"], " detections:", result["detections"])
    if json_path:
        json_path.write_text(json.dumps(result, indent=1) + "\n")


def max_ratio(trace: list[tuple[int, float]]) -> float:
    """The largest loss over the running median of the 50 before it (after 10 steps)."""
    best = 0.0
    losses = [v for _, v in trace]
    for i in range(10, len(losses)):
        before = [v for v in losses[max(0, i - 50) : i] if math.isfinite(v)]
        if before and math.isfinite(losses[i]):
            best = max(best, losses[i] / max(statistics.median(before), 1e-12))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["generate", "score"])
    p.add_argument("--out", type=Path, default=Path("/tmp/divergence_traces"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="score with a monitor option changed, e.g. --set persist_steps=1",
    )
    a = p.parse_args()
    settings = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    generate(a.out) if a.command == "generate" else score(a.out, a.json, settings)


if __name__ == "__main__":
    main()

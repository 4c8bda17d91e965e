"""``python -m mtl_clippy.report [--paper] SWEEP_DIR``: results table, plots and report.md of a
sweep; with ``--paper`` (automatic for ``experiment=paper_baselines``) also paper_report.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtl_clippy.report import paper
from mtl_clippy.report.study import build_report
from mtl_clippy.report.sweep import write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mtl_clippy.report",
        description=(
            "Write results.csv/results.md and report/ (table over seeds, plots, report.md) for "
            "a folder of runs; with --paper, also paper_report.md."
        ),
    )
    ap.add_argument(
        "sweep_dir", help="a sweep folder (outputs/multirun/...) or any folder of run folders"
    )
    ap.add_argument(
        "--paper",
        action="store_true",
        help=(
            "also write paper_report.md, the comparison in the paper's framing: per model size "
            "and method, the largest learning rate at which every seed trains stably; test AUC "
            "at 1x, 2x and 4x unclipped AdaGrad's best stable learning rate; the training loss "
            "around each divergence; Clippy's clipping factor per parameter role (figures in "
            "report/paper_*.png). A run's model choice is its size; its loss and clipping "
            "factors come from its csv/metrics.csv (logger=csv trainer.log_every_n_steps=1). "
            f"Automatic for a sweep of experiment={paper.EXPERIMENT}."
        ),
    )
    args = ap.parse_args(argv)
    root = Path(args.sweep_dir)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    df = write_results(root)
    if df.empty:
        print(f"error: no run (metrics.json) under {root}", file=sys.stderr)
        return 2
    md = build_report(root)
    print(f"{len(df)} runs; wrote {root / 'results.md'} and {md}")
    if args.paper or paper.is_paper_sweep(root):
        done = paper.build_paper_report(root)
        for line in done.problems:
            print(f"warning: {line}", file=sys.stderr)
        if done.path is None:
            print(f"error: no readable run under {root} for the paper report", file=sys.stderr)
            return 2
        print(f"wrote {done.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

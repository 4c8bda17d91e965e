"""``python -m mtl_clippy.report SWEEP_DIR``: results table, plots and report.md of a sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtl_clippy.report.study import build_report
from mtl_clippy.report.sweep import write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mtl_clippy.report",
        description="Write results.csv/results.md and report/ (table over seeds, plots, report.md) for a folder of runs.",
    )
    ap.add_argument(
        "sweep_dir", help="a sweep folder (outputs/multirun/...) or any folder of run folders"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

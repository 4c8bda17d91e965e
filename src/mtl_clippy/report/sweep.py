"""One table for a sweep: ``results.csv`` and ``results.md`` from the runs' ``metrics.json``.

Written automatically when a Hydra multirun ends (``hydra_callback.SweepResultsCallback``,
configured in ``configs/hydra/default.yaml``), or by hand for any folder of runs::

    python -m mtl_clippy.report.sweep outputs/multirun/<sweep>
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_clippy.report.tuning import add_trial_columns
from mtl_clippy.summary import METRICS_FILE, RunSummary, stability_of

log = logging.getLogger(__name__)

FIRST_COLUMNS = ["job", "model", "optim", "variant", "lr", "seed", "status", "stability"]
# Overrides that other columns already show, or that do not change what a run is.
_NOT_VARIANT_KEYS = {
    "experiment",
    "model",
    "optim",
    "optim.lr",
    "seed",
    "data.data_dir",
    "ckpt_path",
    "resume",
    "slurm_requeue",
    "threads",
    "logger",
}
_NOT_VARIANT_PREFIXES = ("paths.", "hydra.", "hydra/")


def variant_of(overrides: list[str]) -> str | None:
    """The overrides that make a run differ beyond model, optimizer, lr and seed (for example
    ``model.norm=none``), so that tables keep such runs apart."""
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" in o and key not in _NOT_VARIANT_KEYS and not key.startswith(_NOT_VARIANT_PREFIXES):
            keep.append(o)
    return ",".join(sorted(keep)) or None


LAST_COLUMNS = ["best_monitor", "best_score", "best_val_auc_mean", "epochs", "steps",
                "wall_time_s", "samples_per_s", "error"]  # fmt: skip


def _row(path: Path, root: Path) -> dict[str, Any]:
    m = RunSummary.load(path)
    row: dict[str, Any] = {
        "job": str(path.parent.relative_to(root)) if path.parent != root else path.parent.name,
        **{k: getattr(m, k) for k in ("model", "optim", "lr", "seed", "status")},
        "variant": variant_of(m.overrides or []),
        "stability": stability_of(m),  # derived for an older file without the key
    }
    for key, value in sorted((m.test or {}).items()):
        if key.startswith(("auc_", "logloss_")):
            row[f"test_{key}"] = value
    for key, value in sorted((m.bayes or {}).items()):
        if key.startswith("auc_"):
            row[f"bayes_{key}"] = value
    best = m.best or {}
    # The mean validation AUC of the best checkpoint's epoch, whatever chose it; a run whose
    # best.ckpt followed another metric (model_checkpoint.monitor) also gets that metric and
    # its value (only then: a table of default runs keeps its columns).
    if best.get("monitor") not in (None, "val/auc_mean"):
        row["best_monitor"], row["best_score"] = best.get("monitor"), best.get("score")
    row["best_val_auc_mean"] = best.get("val/auc_mean")
    for key in ("epochs", "steps", "wall_time_s", "samples_per_s"):
        row[key] = getattr(m, key)
    row["diverged_at_step"] = m.divergence.step
    row["spikes"] = m.divergence.spikes
    row["collapsed"] = ",".join(m.collapsed or []) or None
    row["max_abs_logit"] = m.max_abs_logit
    row["error"] = m.error
    return row


def collect_results(root: str | Path) -> pd.DataFrame:
    """One row per ``metrics.json`` found under ``root`` (sorted by job folder)."""
    root = Path(root)
    paths = sorted(root.rglob(METRICS_FILE), key=lambda p: _job_sort_key(p, root))
    rows = []
    for p in paths:
        try:
            rows.append(_row(p, root))
        except (OSError, ValueError) as exc:  # a half-written or foreign file: say so, go on
            log.warning("skipping unreadable %s: %s", p, exc)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    middle = [c for c in df.columns if c not in FIRST_COLUMNS + LAST_COLUMNS]
    cols = [c for c in FIRST_COLUMNS if c in df] + middle + [c for c in LAST_COLUMNS if c in df]
    return add_trial_columns(df[cols], root)  # an Optuna study: trial, searched values, best


def _job_sort_key(p: Path, root: Path) -> tuple:
    first = p.relative_to(root).parts[0]
    head = first.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, str(p))


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if df.empty:
        return "_no runs found_\n"

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


def write_results(root: str | Path) -> pd.DataFrame:
    """Write ``results.csv`` and ``results.md`` at ``root`` (atomically) and return the table."""
    root = Path(root)
    df = collect_results(root)
    for name, text in (
        ("results.csv", df.to_csv(index=False)),
        ("results.md", to_markdown(df)),
    ):
        tmp = root / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, root / name)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description="Tabulate the runs under a folder (a sweep).")
    ap.add_argument("root", help="folder holding run folders with metrics.json")
    args = ap.parse_args()
    root = Path(args.root)
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a folder")
    df = write_results(root)
    print(to_markdown(df))
    print(f"wrote {root / 'results.csv'} and {root / 'results.md'}")


def __getattr__(name: str) -> Any:
    """``SweepResultsCallback``, which lived here, from its new module ``hydra_callback``
    (with a ``DeprecationWarning``), so that a config naming the old path still works.
    Imported only when asked for: this module does not import Hydra."""
    if name == "SweepResultsCallback":
        warnings.warn(
            "mtl_clippy.report.sweep.SweepResultsCallback moved to "
            "mtl_clippy.report.hydra_callback.SweepResultsCallback; use the new path",
            DeprecationWarning,
            stacklevel=2,
        )
        from mtl_clippy.report.hydra_callback import SweepResultsCallback

        return SweepResultsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()

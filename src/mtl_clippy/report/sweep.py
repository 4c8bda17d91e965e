"""One table for a sweep: ``results.csv`` and ``results.md`` from the runs' ``metrics.json``.

Written automatically when a Hydra multirun ends (``hydra_callback.SweepResultsCallback``,
configured in ``configs/hydra/default.yaml``), or by hand for any folder of runs::

    python -m mtl_clippy.report.sweep outputs/multirun/<sweep>
"""

from __future__ import annotations

import argparse
import logging
import os
import re
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
    "ckpt_path",
    "resume",
    "slurm_requeue",
    "threads",
    "logger",
}
_NOT_VARIANT_PREFIXES = ("paths.", "hydra.", "hydra/")
# ``data.data_dir`` is a variant: runs on different data are different settings, never seeds
# of one (it stays out of the run folders' names, which configs/hydra/default.yaml builds).


def variant_of(overrides: list[str]) -> str | None:
    """The overrides that make a run differ beyond model, optimizer, lr and seed (for example
    ``model.norm=none``), so that tables keep such runs apart."""
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" in o and key not in _NOT_VARIANT_KEYS and not key.startswith(_NOT_VARIANT_PREFIXES):
            keep.append(o)
    return ",".join(sorted(keep)) or None


LAST_COLUMNS = ["best_monitor", "best_score", "best_val_auc_mean", "best_epoch", "epochs",
                "steps", "wall_time_s", "samples_per_s", "error"]  # fmt: skip


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
    # the data's best achievable values (built-in data, from its true probabilities)
    for key, value in sorted((m.bayes or {}).items()):
        if key.startswith(("auc_", "logloss_")):
            row[f"bayes_{key}"] = value
    best = m.best or {}
    # The mean validation AUC of the best checkpoint's epoch, whatever chose it; a run whose
    # best.ckpt followed another metric (model_checkpoint.monitor) also gets that metric and
    # its value (only then: a table of default runs keeps its columns).
    if best.get("monitor") not in (None, "val/auc_mean"):
        row["best_monitor"], row["best_score"] = best.get("monitor"), best.get("score")
    row["best_val_auc_mean"] = best.get("val/auc_mean")
    # the tested checkpoint's epoch, counted from 1 as the run's own table does
    b = best.get("epoch")
    row["best_epoch"] = b + 1 if isinstance(b, int) and not isinstance(b, bool) else None
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
    """Any table as GitHub-flavoured Markdown (no extra dependency): every column, floats to
    4 significant figures. ``results.md`` is :func:`results_markdown`."""
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


_VARIANT_SPLIT = re.compile(r",(?=[+~]*[\w./@-]+=)")


def split_variant(variant: Any) -> dict[str, str]:
    """A ``variant`` cell (``"data.hard=true,model.norm=none"``) as ``{key: value}``; a comma
    inside a value (``a=[1,2]``) stays in it."""
    if not isinstance(variant, str) or not variant:
        return {}
    pairs = (o.split("=", 1) for o in _VARIANT_SPLIT.split(variant) if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs}


def varying_overrides(df: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """The override keys (beyond model, optimizer, lr and seed) whose value differs between
    the rows of ``df``, and those that every row sets to the same value."""
    parsed = [split_variant(v) for v in df.get("variant", pd.Series(dtype=object))]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    same = {k: parsed[0][k] for k in keys if k not in varying}
    return varying, same


def short_paths(parsed: list[dict[str, str]]) -> list[dict[str, str]]:
    """``parsed`` (one ``{key: value}`` per run) with each key whose values are paths
    (``data.data_dir=/data/A``) shown by the folder's own name (``A``) where that name still
    tells the runs apart; otherwise the whole path."""
    out = [dict(p) for p in parsed]
    keys = {k for p in parsed for k, v in p.items() if "/" in v}
    for k in keys:
        values = {p[k] for p in parsed if k in p}
        names = {v: v.rstrip("/").rsplit("/", 1)[-1] or v for v in values}
        if len(set(names.values())) == len(values):
            for p in out:
                if k in p:
                    p[k] = names[p[k]]
    return out


def _text(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else str(v)


def _num(v: Any, spec: str) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if x != x else format(x, spec)


def _seconds(v: Any) -> str:
    """A wall time: to 0.1 s below 10 s (a short run is not ``0``), whole seconds above."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if x != x else format(x, ".1f" if abs(x) < 10 else ",.0f")


def _trial_cell(r: pd.Series) -> str:
    trial = r.get("trial")
    cell = "-" if trial is None or pd.isna(trial) else f"{int(trial)}"
    best = r.get("best_trial")
    return cell + (" **best**" if best is not None and not pd.isna(best) and bool(best) else "")


def results_markdown(df: pd.DataFrame) -> str:
    """``results.md``: one row per job with the columns a reader compares (model, optimizer,
    lr, seed, status, test AUC and log loss per task, best validation AUC, epochs, wall time),
    AUC and log loss to 4 decimals; every other column is in ``results.csv``."""
    if df.empty:
        return "_no runs found_\n"
    tasks = [
        c.removeprefix("test_auc_")
        for c in df
        if c.startswith("test_auc_") and c != "test_auc_mean"
    ]
    varying, same = varying_overrides(df)
    parsed = short_paths([split_variant(v) for v in df.get("variant", pd.Series([None] * len(df)))])
    tuned = "trial" in df  # an Optuna study (mtl_clippy.report.tuning): trial first
    head = [*(["trial"] if tuned else []), "model", "optim", "lr", "seed", *varying, "status"]
    head += [f"test AUC {t}" for t in tasks] + [f"test log loss {t}" for t in tasks]
    head += ["best val AUC mean", "epochs (best)", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (_, r), extra in zip(df.iterrows(), parsed, strict=True):
        status = str(r.get("status") or "-")
        stability = r.get("stability")
        if status == "completed" and stability in ("spiked", "collapsed"):
            status += f" ({stability})"
        epochs = "-" if pd.isna(r.get("epochs")) else f"{int(r['epochs'])}"
        if pd.notna(r.get("best_epoch")):
            epochs += f" ({int(r['best_epoch'])})"
        cells = [_trial_cell(r)] if tuned else []
        cells += [_text(r.get("model")), _text(r.get("optim")), _num(r.get("lr"), "g"),
                 "-" if pd.isna(r.get("seed")) else f"{int(r['seed'])}",
                 *(extra.get(k, "(default)") for k in varying), status]  # fmt: skip
        cells += [_num(r.get(f"test_auc_{t}"), ".4f") for t in tasks]
        cells += [_num(r.get(f"test_logloss_{t}"), ".4f") for t in tasks]
        cells += [
            _num(r.get("best_val_auc_mean"), ".4f"),
            epochs,
            _seconds(r.get("wall_time_s")),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [
        "",
        "AUC and log loss to 4 decimals; `-`: none (a diverged or failed run is not tested). "
        "epochs (best): epochs trained (the tested checkpoint's epoch, counted from 1). "
        "Every other column (job folder, stability, steps, samples per second, divergence "
        "step, spikes, largest logit, Bayes values, error, ...) is in results.csv.",
    ]
    if tuned:
        notes += ["", "trial: the Optuna trial's number; **best**: the study's best trial."]
    if same:
        notes += ["", "Every run: " + ", ".join(f"`{k}={v}`" for k, v in same.items()) + "."]
    return "\n".join(lines + notes) + "\n"


def write_results(root: str | Path) -> pd.DataFrame:
    """Write ``results.csv`` and ``results.md`` at ``root`` (atomically) and return the table."""
    root = Path(root)
    df = collect_results(root)
    for name, text in (
        ("results.csv", df.to_csv(index=False)),
        ("results.md", results_markdown(df)),
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
    print(results_markdown(df))
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

"""The stability study's report of a sweep: a table over seeds, plots, and ``report.md``.

``python -m mtl_clippy.report SWEEP_DIR`` (and the end of every multirun) writes into the
sweep folder::

    report/report.md            the table and the figures below, with a short legend
    report/results_by_seed.csv  model x optimizer x lr: mean and std over seeds
    report/loss_curves.png      training loss of every run
    report/test_auc.png         test AUC per task (mean +- std over seeds)
    report/test_logloss.png     test log loss per task
    report/stability.png        learning rate vs final mean test AUC per optimizer, diverged runs marked
    report/clipping.png         Clippy's clipping factor over training (runs that logged it)

Everything is read from the runs' ``metrics.json`` and TensorBoard event files, so a report
can be rebuilt at any time from the folders alone.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from mtl_clippy.data.schema import TASKS
from mtl_clippy.report.sweep import collect_results

log = logging.getLogger(__name__)

GROUP_KEYS = ["model", "optim", "variant", "lr"]


def _fmt(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each (model, optimizer, lr), with run and divergence counts.

    Diverged or failed runs count in ``runs`` and ``diverged`` but not in the means (their
    test metrics are missing by design).
    """
    if df.empty:
        return df
    metrics = [c for c in df.columns if c.startswith(("test_auc_", "test_logloss_"))]
    rows = []
    df = df.assign(variant=df.get("variant", pd.Series(index=df.index, dtype=object)).fillna(""))
    for key, g in df.groupby(GROUP_KEYS, dropna=False, sort=True):
        ok = g[g["status"] == "completed"]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        row["runs"] = len(g)
        row["diverged"] = int((g["status"] == "diverged").sum())
        row["failed"] = int((g["status"] == "failed").sum())
        for m in metrics:
            values = pd.to_numeric(ok[m], errors="coerce").dropna()
            row[f"{m}_mean"] = values.mean() if len(values) else float("nan")
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def seed_study_table(summary: pd.DataFrame) -> str:
    """Markdown in the seed study's layout: Model | Optimizer | lr | AUCs | losses (mean ± std)."""
    variants = "variant" in summary and summary["variant"].astype(bool).any()
    head = (
        "| Model | Optimizer |"
        + (" Variant |" if variants else "")
        + " lr | runs | click AUC | conversion AUC | click loss | conversion loss |"
    )
    lines = [head, "|---|---|" + ("---|" if variants else "") + "---|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        d = r._asdict()
        runs = f"{d['runs']}" + (f" ({d['diverged']} diverged)" if d["diverged"] else "")
        cells = [
            _fmt(d.get(f"test_{m}_{t}_mean"), d.get(f"test_{m}_{t}_std"))
            for m in ("auc", "logloss")
            for t in TASKS
        ]
        variant = f" {d['variant'] or '-'} |" if variants else ""
        lines.append(
            f"| {d['model']} | {d['optim']} |{variant} {d['lr']:g} | {runs} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _collapsed(g: pd.DataFrame) -> pd.Series:
    if "collapsed" not in g:
        return pd.Series(False, index=g.index)
    return g["collapsed"].fillna("").astype(str).str.len() > 0


def stability_table(df: pd.DataFrame) -> str:
    """Per model and optimizer: the learning rates at which every seed trained to the end
    without diverging and without a task collapsing to AUC 0.5 (a learning failure that the
    loss alone does not show), and the test AUC (mean ± std over seeds) at the best of them."""
    if df.empty or df.groupby("optim")["lr"].nunique().max() < 2:
        return ""
    auc_cols = [f"test_auc_{t}" for t in TASKS if f"test_auc_{t}" in df]
    d = df.copy()
    d["auc_mean"] = d[auc_cols].apply(pd.to_numeric, errors="coerce").mean(axis=1)
    d["is_collapsed"] = _collapsed(d)
    d["variant"] = d.get("variant", pd.Series(index=d.index, dtype=object)).fillna("")
    variants = d["variant"].astype(bool).any()
    lines = [
        "| Model | Optimizer |"
        + (" Variant |" if variants else "")
        + " lrs tried | stable lrs | diverged at | collapsed at | best stable lr | "
        + " | ".join(f"{t} AUC there" for t in TASKS)
        + " |",
        "|---|---|" + ("---|" if variants else "") + "---|---|---|---|---|" + "---|" * len(TASKS),
    ]

    def lrs(values: list[float]) -> str:
        return ", ".join(f"{x:g}" for x in sorted(values)) or "-"

    for (model, optim, variant), g in d.groupby(["model", "optim", "variant"], sort=True):
        per_lr = g.groupby("lr")
        stable = [
            lr
            for lr, x in per_lr
            if (x["status"] == "completed").all() and not x["is_collapsed"].any()
        ]
        diverged = [lr for lr, x in per_lr if (x["status"] == "diverged").any()]
        collapsed = [lr for lr, x in per_lr if x["is_collapsed"].any()]
        best, cells = None, ["-"] * len(TASKS)
        if stable:
            means = {lr: per_lr.get_group(lr)["auc_mean"].mean() for lr in stable}
            best = max(means, key=lambda lr: means[lr])
            sel = per_lr.get_group(best)
            cells = [
                _fmt(
                    pd.to_numeric(sel[c]).mean(),
                    pd.to_numeric(sel[c]).std(ddof=1) if len(sel) > 1 else None,
                )
                for c in auc_cols
            ]
        lines.append(
            f"| {model} | {optim} |{f' {variant or chr(45)} |' if variants else ''} {lrs(list(per_lr.groups))} | {lrs(stable)} | {lrs(diverged)} | "
            f"{lrs(collapsed)} | {'-' if best is None else f'{best:g}'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def read_scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """All scalar series whose tag starts with ``prefix`` from a run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dir = run_dir / "tensorboard"
    if not event_dir.is_dir():
        return {}
    # TensorBoard's reader logs every event file it moves past at INFO level.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags().get("scalars", [])
        if tag.startswith(prefix)
    }


def _label(row: pd.Series) -> str:
    return f"{row['model']}/{row['optim']} lr={row['lr']:g} seed={row['seed']}"


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes, outside pyplot: no backend is chosen or switched for the
    process (``savefig`` renders PNGs with Agg by itself) and nothing is left open."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_loss_curves(df: pd.DataFrame, root: Path, out: Path) -> bool:
    fig, ax = _subplots(figsize=(8, 4.5))
    colours: dict[str, Any] = {}
    drawn = False
    for _, row in df.iterrows():
        series = read_scalars(root / row["job"], "train/loss").get("train/loss")
        if not series:
            continue
        steps, values = zip(*series, strict=True)
        colour = colours.setdefault(row["optim"], f"C{len(colours)}")
        ax.plot(steps, values, color=colour, alpha=0.6, lw=1, label=row["optim"])
        if row["status"] == "diverged":
            ax.plot(steps[-1], values[-1], "x", color=colour, ms=9, mew=2)
        drawn = True
    if not drawn:
        return False
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), title="optimizer")
    ax.set_yscale("log")
    ax.set(
        xlabel="training step",
        ylabel="training loss (log scale)",
        title="Training loss of every run (x: diverged)",
    )
    _save(fig, out)
    return True


def plot_test_metric(summary: pd.DataFrame, metric: str, out: Path) -> bool:
    cols = [f"test_{metric}_{t}_mean" for t in TASKS]
    if summary.empty or not all(c in summary for c in cols):
        return False
    labels = [f"{r.model}\n{r.optim}\nlr={r.lr:g}" for r in summary.itertuples()]
    fig, axes = _subplots(1, len(TASKS), figsize=(max(6, 1.1 * len(labels) * len(TASKS)), 4.2))
    for ax, task in zip(axes, TASKS, strict=True):
        means = summary[f"test_{metric}_{task}_mean"]
        stds = summary[f"test_{metric}_{task}_std"].fillna(0)
        ax.bar(
            range(len(labels)),
            means,
            yerr=stds,
            capsize=3,
            color=[f"C{i % 10}" for i in range(len(labels))],
        )
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"test {'AUC' if metric == 'auc' else 'log loss'}: {task}")
        finite = means.dropna()
        if metric == "auc" and len(finite):
            ax.set_ylim(max(0.0, finite.min() - 0.05), min(1.0, finite.max() + 0.03))
    _save(fig, out)
    return True


def plot_stability(df: pd.DataFrame, out: Path) -> bool:
    """Learning rate vs final mean test AUC per optimizer; diverged runs drawn at the bottom."""
    if df.empty or df.groupby("optim")["lr"].nunique().max() < 2:
        return False  # no optimizer was run at more than one learning rate
    auc_cols = [f"test_auc_{t}" for t in TASKS if f"test_auc_{t}" in df]
    if not auc_cols:
        return False
    d = df.copy()
    d["auc_mean"] = d[auc_cols].apply(pd.to_numeric, errors="coerce").mean(axis=1)
    fig, ax = _subplots(figsize=(7, 4.5))
    floor = d["auc_mean"].min() if d["auc_mean"].notna().any() else 0.5
    floor = min(floor, 0.5) - 0.02
    d["series"] = d["optim"] + d.get("variant", pd.Series(index=d.index, dtype=object)).fillna(
        ""
    ).map(lambda v: f" ({v})" if v else "")
    for i, (optim, g) in enumerate(d.groupby("series", sort=True)):
        colour = f"C{i}"
        ok = (
            g[g["status"] == "completed"]
            .groupby("lr")["auc_mean"]
            .agg(["mean", "std"])
            .reset_index()
        )
        ax.errorbar(
            ok["lr"],
            ok["mean"],
            yerr=ok["std"].fillna(0),
            marker="o",
            color=colour,
            capsize=3,
            label=optim,
        )
        bad = g[g["status"] != "completed"]
        if len(bad):
            ax.scatter(bad["lr"], [floor] * len(bad), marker="x", s=70, color=colour)
    ax.set_xscale("log")
    ax.axhline(floor, color="grey", lw=0.5, ls=":")
    ax.set(
        xlabel="learning rate",
        ylabel="mean test AUC over tasks",
        title="Final AUC by learning rate\n(x at the bottom: diverged; rings: a task collapsed to AUC 0.5)",
    )
    ax.legend(title="optimizer")
    _save(fig, out)
    return True


def plot_clipping(df: pd.DataFrame, root: Path, out: Path) -> bool:
    """Clippy's smallest clipping factor over training, one panel per parameter group, one
    line per optimizer and learning rate (mean over seeds)."""
    curves: dict[
        str, dict[tuple, dict[int, list[float]]]
    ] = {}  # group -> (optim, lr) -> step -> values
    for _, row in df.iterrows():
        for tag, points in read_scalars(root / row["job"], "telemetry/clip_min/").items():
            group = tag.rsplit("/", 1)[-1]
            kind = (str(row["optim"]), float(row["lr"]))
            by_step = curves.setdefault(group, {}).setdefault(kind, {})
            for step, value in points:
                by_step.setdefault(step, []).append(value)
    if not curves:
        return False
    groups = sorted(curves)
    fig, axes = _subplots(
        1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False, sharey=True
    )
    for ax, group in zip(axes[0], groups, strict=True):
        for i, (kind, by_step) in enumerate(sorted(curves[group].items())):
            steps = sorted(by_step)
            ax.plot(
                steps,
                [sum(by_step[s]) / len(by_step[s]) for s in steps],
                marker=".",
                color=f"C{i % 10}",
                label=f"{kind[0]} lr={kind[1]:g}",
            )
        ax.set(title=group, xlabel="training step")
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("smallest clipping factor (1 = no clipping)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Clippy's clipping factor over training (mean over seeds)")
    _save(fig, out)
    return True


def build_report(root: str | Path) -> Path:
    """Write the report of the runs under ``root`` into ``root/report``; returns report.md."""
    root = Path(root)
    out = root / "report"
    out.mkdir(exist_ok=True)
    df = collect_results(root)
    summary = summarise(df)
    if not summary.empty:
        tmp = out / f".results_by_seed.csv.tmp{os.getpid()}"
        summary.to_csv(tmp, index=False)
        os.replace(tmp, out / "results_by_seed.csv")
    figures = {
        "loss_curves.png": (
            "Training loss",
            plot_loss_curves(df, root, out / "loss_curves.png") if not df.empty else False,
        ),
        "test_auc.png": (
            "Test AUC per task",
            plot_test_metric(summary, "auc", out / "test_auc.png"),
        ),
        "test_logloss.png": (
            "Test log loss per task",
            plot_test_metric(summary, "logloss", out / "test_logloss.png"),
        ),
        "stability.png": (
            "Stability across learning rates",
            plot_stability(df, out / "stability.png"),
        ),
        "clipping.png": (
            "Clippy's clipping factor",
            plot_clipping(df, root, out / "clipping.png") if not df.empty else False,
        ),
    }
    n = len(df)
    counts = df["status"].value_counts().to_dict() if n else {}
    lines = [
        f"# Report: {root.name}",
        "",
        f"{n} runs: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none") + ".",
        "Test metrics are mean ± std over seeds of the completed runs; diverged runs have no test metrics.",
        "",
        seed_study_table(summary) if not summary.empty else "_no runs found_\n",
    ]
    stability = stability_table(df)
    if stability:
        lines += ["## Stable learning rates", "", stability]
    for name, (title, made) in figures.items():
        if made:
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    md = out / "report.md"
    tmp = out / f".report.md.tmp{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)
    return md

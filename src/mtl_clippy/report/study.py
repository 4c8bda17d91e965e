"""The stability study's report of a sweep: a table over seeds, plots, and ``report.md``.

``python -m mtl_clippy.report SWEEP_DIR`` (and the end of every multirun) writes into the
sweep folder::

    report/report.md            the table and the figures below, with a short legend
    report/results_by_seed.csv  per setting: mean, std and count of seeds, the data's Bayes values
    report/loss_curves.png      training loss of every run: a panel per model, a colour per optimizer
    report/test_auc.png         test AUC per task and setting (mean +- std over seeds), Bayes line
    report/test_logloss.png     test log loss per task and setting, Bayes line
    report/stability.png        learning rate vs final mean test AUC per optimizer, diverged runs marked
    report/clipping.png         Clippy's clipping factor over training per setting (runs that logged it)

A *setting* is what makes runs differ but the seed: model, optimizer, lr and every override
whose value differs between the runs. Each curve or bar is one setting, averaged over its own
seeds only; each optimizer has one colour (``OPTIMIZER_COLOURS``) in every figure.

Everything is read from the runs' ``metrics.json`` and TensorBoard event files, so a report
can be rebuilt at any time from the folders alone.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mtl_clippy.data.schema import TASKS
from mtl_clippy.report.sweep import collect_results, short_paths, split_variant

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
    bayes = [c for c in df.columns if c.startswith(("bayes_auc_", "bayes_logloss_"))]
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
            row[f"{m}_n"] = len(values)  # the seeds behind the mean
        for b in bayes:  # the data's best achievable value (the same for every seed)
            values = pd.to_numeric(g[b], errors="coerce").dropna()
            row[b] = values.mean() if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _variant_cells(variant: pd.Series) -> tuple[list[str], str]:
    """Each row's overrides as a table's Variant cell shows them: only the keys whose value
    differs between rows (a path by its folder's name where that is unique), and what every
    row sets alike, as one line for under the table (empty where nothing)."""
    parsed = short_paths([split_variant(v) for v in variant])
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    same = [f"`{k}={parsed[0][k]}`" for k in keys if k not in varying]
    cells = [", ".join(f"{k}={p.get(k, '(default)')}" for k in varying) for p in parsed]
    return cells, ("Every run: " + ", ".join(same) + ".") if same else ""


def seed_study_table(summary: pd.DataFrame) -> str:
    """Markdown in the seed study's layout: Model | Optimizer | lr | AUCs | losses (mean ± std)."""
    shown, common = _variant_cells(summary.get("variant", pd.Series([None] * len(summary))))
    variants = any(shown)
    summary = summary.assign(variant=shown)
    head = (
        "| Model | Optimizer |"
        + (" Variant |" if variants else "")
        + " lr | runs | click AUC | conversion AUC | click loss | conversion loss |"
    )
    lines = [head, "|---|---|" + ("---|" if variants else "") + "---|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        d = r._asdict()
        bad = [f"{d[k]} {k}" for k in ("diverged", "failed") if d.get(k)]
        runs = f"{d['runs']}" + (f" ({', '.join(bad)})" if bad else "")
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
    return "\n".join(lines) + ("\n\n" + common if common else "") + "\n"


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
    d["variant"] = _variant_cells(d.get("variant", pd.Series([None] * len(d))))[0]
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


#: One colour per optimizer, the same in every figure of every report (tab10 names); an
#: optimizer not named here gets one of the colours left, by name.
OPTIMIZER_COLOURS = {
    "clippy": "C0",
    "adam": "C1",
    "adagrad": "C2",
    "lamb": "C4",
    "clippy_noclip": "C9",
    "clippy_seed": "C5",
    "adam_seed": "C6",
}
_SPARE_COLOURS = ["C3", "C7", "C8", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
_LINESTYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "*", "X"]
#: Tick labels, legends and notes: readable when the PNG is shown at its size.
_FONT = 9


def optimizer_colours(names: Any) -> dict[str, str]:
    """The colour of each optimizer name (``OPTIMIZER_COLOURS``, then the spare ones)."""
    spare = iter(c for c in _SPARE_COLOURS if c not in OPTIMIZER_COLOURS.values())
    out = {}
    for name in sorted({str(n) for n in names}):
        out[name] = OPTIMIZER_COLOURS.get(name) or next(spare, "black")
    return out


def _override_col(key: str) -> str:
    return f"override:{key}"


def _settings(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``df`` with one column per override key of its runs' ``variant`` (``(default)``: not
    set), and the columns that say what a run is apart from its seed: model, optim, lr and those."""
    d = df.copy()
    parsed = short_paths([split_variant(v) for v in d.get("variant", pd.Series([None] * len(d)))])
    keys = sorted({k for p in parsed for k in p})
    for k in keys:
        d[_override_col(k)] = [p.get(k, "(default)") for p in parsed]
    return d, ["model", "optim", "lr", *(_override_col(k) for k in keys)]


def _varying(d: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if c in d and d[c].astype(str).nunique() > 1]


def _part(col: str, value: Any) -> str:
    """One setting as a curve or bar shows it: the model and optimizer by name, the others as
    ``key=value``."""
    if col in ("model", "optim"):
        return "-" if value is None or value != value else str(value)  # NaN: not known
    if col == "lr":
        try:
            return f"lr={float(value):g}"
        except (TypeError, ValueError):  # a run that failed before it had one
            return f"lr={value}"
    return f"{col.removeprefix('override:')}={value}"


def _name(col: str) -> str:
    return {"optim": "optimizer", "lr": "learning rate"}.get(col, col.removeprefix("override:"))


def _describe(values: dict[str, Any], cols: list[str]) -> str:
    return " · ".join(_part(c, values[c]) for c in cols)


#: Overrides that change what is logged or shown, not what a run computes: not repeated
#: under a figure's title.
_DISPLAY_ONLY = (
    "override:callbacks.progress_bar.",
    "override:callbacks.optimizer_telemetry.",
    "override:trainer.log_every_n_steps",
    "override:trainer.enable_",
    "override:logger",
)


def _short_keys(cols: list[str]) -> dict[str, str]:
    """Each override column's key as a tick label or a title shows it: its last dotted part
    (``optim.absolute_threshold`` -> ``absolute_threshold``) where no other column of ``cols``
    ends the same way, otherwise the whole key."""
    keys = {c: c.removeprefix("override:") for c in cols if c.startswith("override:")}
    last = [k.rsplit(".", 1)[-1] for k in keys.values()]
    return {
        c: (k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1 else k)
        for c, k in keys.items()
    }


def _short_value(value: Any) -> str:
    """A number to 4 significant digits (``0.012470001`` -> ``0.01247``); anything else as is."""
    text = str(value)
    try:
        x = float(text)
    except (TypeError, ValueError):
        return text
    return text if x != x or text.lower() in ("inf", "-inf", "nan") else f"{x:.4g}"


def _short_part(col: str, value: Any, keys: dict[str, str]) -> str:
    """:func:`_part` for a tick label or a title line: keys by their last dotted part,
    numbers to 4 significant digits."""
    if col in ("model", "optim"):
        return _part(col, value)
    if col == "lr":
        return f"lr={_short_value(value)}"
    return f"{keys.get(col, col.removeprefix('override:'))}={_short_value(value)}"


def _common(d: pd.DataFrame, cols: list[str], varying: list[str]) -> str:
    """What every curve or bar of a figure shares, as a line under its title: keys by their
    last dotted part, settings that only change what is logged left out."""
    same = [
        c
        for c in cols
        if c in d and c not in varying and len(d) and not c.startswith(_DISPLAY_ONLY)
    ]
    keys = _short_keys(same)
    parts = [
        _short_part(c, d[c].iloc[0], keys)
        if c not in ("model", "optim")
        else f"{_name(c)} {d[c].iloc[0]}"
        for c in same
        if str(d[c].iloc[0]) != "(default)"
    ]
    return "every run: " + ", ".join(parts) if parts else ""


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped, line by line, to what fits in ``width_in`` inches at ``fontsize``."""
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) or line for line in text.split("\n"))


def _ncols(labels: list[str], fig: Figure, most: int, fontsize: float = _FONT) -> int:
    """How many columns a legend of ``labels`` can have and still fit the figure's width."""
    if not labels:
        return 1
    longest = max(len(x) for line in labels for x in str(line).split("\n"))
    entry_in = (longest * 0.6 * fontsize + 40) / 72  # text, handle and padding
    fits = int(0.95 * fig.get_figwidth() / entry_in)
    return max(1, min(most, len(labels), fits))


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _completed(row: Any, n: int) -> str:
    """Under a bar: how many seeds it averages, or why there is no bar."""
    if n:
        return _seeds(n)
    runs, failed, diverged = (int(row.get(k) or 0) for k in ("runs", "failed", "diverged"))
    if runs and failed == runs:
        return "failed"
    if runs and diverged == runs:
        return "diverged"
    return "no completed seed"


def _styles(values: list[tuple], styles: list[str]) -> dict[tuple, str]:
    return {v: styles[i % len(styles)] for i, v in enumerate(sorted(set(values), key=str))}


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes, outside pyplot: no backend is chosen or switched for the
    process (``savefig`` renders PNGs with Agg by itself) and nothing is left open. The
    layout is constrained: titles, tick labels and a legend placed ``outside`` never
    overlap."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(*grid, **kwargs)


def _overlap(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5


def _ticks_collide(ax: Any, renderer: Any) -> bool:
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
    return any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _outside(fig: Figure, renderer: Any) -> tuple[float, float]:
    """By how many pixels the figure's drawn artists reach past its canvas, across and up."""
    box = fig.get_tightbbox(renderer)  # inches
    w, h = fig.get_figwidth(), fig.get_figheight()
    over_x = max(0.0, -box.x0) + max(0.0, box.x1 - w)
    over_y = max(0.0, -box.y0) + max(0.0, box.y1 - h)
    return over_x, over_y


def _fit(fig: Figure) -> None:
    """Lay ``fig`` out so that no two x tick labels overprint (rotated where they would,
    the figure widened where even that is not enough) and every title, label and legend lies
    inside the canvas (the figure grown by what reaches past it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    for _ in range(6):
        canvas.draw()
        renderer = canvas.get_renderer()
        crowded = [ax for ax in fig.axes if ax.get_visible() and _ticks_collide(ax, renderer)]
        for ax in crowded:
            if ax.get_xticklabels()[0].get_rotation() == 0:
                for t in ax.get_xticklabels():
                    t.set(rotation=90, ha="center", va="top")
            else:
                fig.set_figwidth(fig.get_figwidth() * 1.3)
        over_x, over_y = _outside(fig, renderer)
        if not crowded and over_x < 0.01 and over_y < 0.01:
            return
        if over_x or over_y:
            fig.set_size_inches(
                fig.get_figwidth() + over_x + 0.1, fig.get_figheight() + over_y + 0.1
            )


def _save(fig: Figure, path: Path) -> None:
    for ax in fig.axes:
        ax.tick_params(labelsize=_FONT)
    _fit(fig)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _title(fig: Figure, title: str, common: str) -> None:
    width = fig.get_figwidth()
    text = _wrap(title, width, 11) + (f"\n{_wrap(common, width, 10)}" if common else "")
    fig.suptitle(text, fontsize=11)


def _within(d: pd.DataFrame, cols: list[str], by: list[str]) -> list[str]:
    """Of ``cols``, those that vary within some group of ``by`` (Adam's default lr differs
    from Clippy's: lr then says nothing the optimizer does not, and gets no line style)."""
    return [c for c in cols if (d.groupby(by, dropna=False)[c].nunique(dropna=False) > 1).any()]


def plot_loss_curves(
    df: pd.DataFrame, root: Path, out: Path, colours: dict[str, str] | None = None
) -> Figure | None:
    """Training loss of every run: one panel per model, one colour per optimizer, one line
    style per further setting that varies for one optimizer (lr, an override), one line per
    seed. Each line's ``gid`` names its run's setting and seed."""
    d, cols = _settings(df)
    series = {}
    for i, row in d.iterrows():
        points = read_scalars(root / row["job"], "train/loss").get("train/loss")
        if points:
            series[i] = points
    if not series:
        return None
    d = d.loc[list(series)]
    colours = colours or optimizer_colours(d["optim"])
    varying = _varying(d, cols)
    rest = [c for c in varying if c not in ("model", "optim")]
    styled = _within(d, rest, ["model", "optim"])
    style = _styles([tuple(r) for r in d[styled].itertuples(index=False)], _LINESTYLES)
    keys = _short_keys(rest)
    models = sorted(d["model"].astype(str).unique())
    ncols = min(3, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig, axes = _subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows + 1.6), squeeze=False, sharey=True
    )
    axes = list(axes.flat)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}
    for model, ax in zip(models, axes, strict=False):
        counts, sizes = [], []
        for key, g in d.groupby(cols, sort=True, dropna=False):
            values = dict(zip(cols, key, strict=True))
            if str(values["model"]) != model:
                continue
            colour = colours[str(values["optim"])]
            label = " · ".join(_short_part(c, values[c], keys) for c in ["optim", *rest])
            counts.append(
                " · ".join(_part(c, values[c]) for c in ["optim", *styled]) + f" {len(g)}"
            )
            sizes.append(len(g))
            for i, row in g.iterrows():
                steps, losses = zip(*series[i], strict=True)
                (line,) = ax.plot(
                    steps, losses, color=colour, ls=style[tuple(values[c] for c in styled)],
                    lw=1.2, alpha=0.8, label=label,
                )  # fmt: skip
                line.set_gid(f"{_describe(values, cols)} · seed={row['seed']}")
                legend.setdefault(label, line)
                if row["status"] == "diverged":
                    ax.plot(steps[-1], losses[-1], "x", color=colour, ms=9, mew=2)
        ax.set_yscale("log")
        if len(sizes) > 2 and len(set(sizes)) == 1:  # a tune sweep: many settings alike
            seeds = f"{len(sizes)} settings, {_seeds(sizes[0])} each"
        else:
            seeds = f"seeds: {', '.join(counts)}"
        ax.set_title(_wrap(f"model {model}; {seeds}", fig.get_figwidth() / ncols, 10), fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both")
    for r in range(nrows):
        axes[r * ncols].set_ylabel("training loss\n(sum over tasks, log scale)")
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="outside lower center",
        ncols=_ncols(list(legend), fig, 4),
        fontsize=_FONT,
        title=_wrap(
            " · ".join(keys.get(c, _name(c)) for c in ["optim", *rest]) + " (colour: optimizer)",
            fig.get_figwidth(),
            _FONT,
        ),
        title_fontsize=_FONT,
    )
    _title(
        fig,
        "Training loss of every run: one panel per model, one line per seed (x: diverged there)",
        _common(d, cols, varying),
    )
    _save(fig, out)
    return fig


def _bayes_of(summary: pd.DataFrame, metric: str, task: str) -> pd.Series:
    col = f"bayes_{metric}_{task}"
    if col not in summary:
        return pd.Series(float("nan"), index=summary.index)
    return pd.to_numeric(summary[col], errors="coerce")


def plot_test_metric(
    summary: pd.DataFrame, metric: str, out: Path, colours: dict[str, str] | None = None
) -> Figure | None:
    """One bar per setting (model, optimizer, lr, overrides that vary) and task: the mean over
    its completed seeds, an error bar of one standard deviation where there are two or more
    (``1 seed`` under the bar where there is one), coloured by optimizer, with the data's
    Bayes value (from its true probabilities) as a dashed line where the data has one. AUC from
    0.5 (chance) up; log loss from just below the lowest value or Bayes, said on the axis.
    Each bar's ``label`` is its setting."""
    cols_needed = [f"test_{metric}_{t}_mean" for t in TASKS]
    if summary.empty or not all(c in summary for c in cols_needed):
        return None
    s, cols = _settings(summary)
    s = s.sort_values(cols, key=lambda c: c.astype(str) if c.dtype == object else c)
    s = s.reset_index(drop=True)
    colours = colours or optimizer_colours(s["optim"])
    varying = _varying(s, cols) or ["model", "optim"]
    # a setting that only follows the optimizer (each optimizer's own default lr) is said once,
    # in the optimizer's legend entry, not under every bar
    rest = [c for c in varying if c not in ("model", "optim")]
    by_optim = [c for c in rest if c not in _within(s, rest, ["optim"])]
    ticks = [c for c in varying if c not in by_optim]
    keys = _short_keys(ticks)
    name = "AUC" if metric == "auc" else "log loss"
    # bars of one model side by side, a gap between models
    x, pos = [], 0.0
    for i in range(len(s)):
        if i and s["model"].iloc[i] != s["model"].iloc[i - 1]:
            pos += 0.6
        x.append(pos)
        pos += 1.0
    fig, axes = _subplots(
        1, len(TASKS), figsize=(max(7.0, 0.62 * len(s) * len(TASKS) + 2.0), 5.2), squeeze=False
    )
    bayes_drawn = errorbars = False
    for ax, task in zip(axes[0], TASKS, strict=True):
        means = pd.to_numeric(s[f"test_{metric}_{task}_mean"], errors="coerce")
        stds = pd.to_numeric(s[f"test_{metric}_{task}_std"], errors="coerce")
        ns = s.get(f"test_{metric}_{task}_n", pd.Series(0, index=s.index)).fillna(0).astype(int)
        bayes = _bayes_of(s, metric, task)
        labels = []
        for i, r in s.iterrows():
            values = {c: r[c] for c in cols}
            label = _describe(values, cols)
            base = 0.5 if metric == "auc" else 0.0  # AUC bars rise (or fall) from chance
            ax.bar([x[i]], [means[i] - base], bottom=base, width=0.8,
                   color=colours[str(r["optim"])], label=label)  # fmt: skip
            if ns[i] >= 2 and not math.isnan(stds[i]):
                ax.errorbar(
                    [x[i]], [means[i]], yerr=[stds[i]], fmt="none", ecolor="black",
                    capsize=4, lw=1.2, label=f"std: {label}",
                )  # fmt: skip
                errorbars = True
            tick = "\n".join(_short_part(c, values[c], keys) for c in ticks)
            labels.append(f"{tick}\n{_completed(r, ns[i])}")
        ax.set_xticks(x, labels, fontsize=_FONT)
        top = (means + stds.fillna(0)).max()
        bottom = (means - stds.fillna(0)).min()
        finite_bayes = bayes.dropna()
        title = f"{task}: {'higher' if metric == 'auc' else 'lower'} is better"
        if len(finite_bayes):
            bayes_drawn = True
            if finite_bayes.max() - finite_bayes.min() < 1e-9:  # one dataset: one line
                b = float(finite_bayes.iloc[0])
                ax.axhline(b, color="black", ls="--", lw=1.3, label=f"Bayes {b:.4f}")
                title += f" (Bayes {b:.4f})"
            else:  # runs on different data: each bar its own
                for i in finite_bayes.index:
                    ax.hlines(bayes[i], x[i] - 0.45, x[i] + 0.45, color="black", ls="--", lw=1.3,
                              label=f"Bayes {bayes[i]:.4f}")  # fmt: skip
                title += " (Bayes: dashed, per bar)"
        if metric == "auc":
            low = 0.5 if not bottom < 0.5 else bottom - 0.02
            high = max(top, finite_bayes.max() if len(finite_bayes) else top)
            high = min(1.0, high + 0.08 * (high - low)) if high == high else 1.0
            ax.set_ylim(low, high)
            ax.set_ylabel("test AUC\n(bars from 0.5 = chance)")
        else:
            ref = min(bottom, finite_bayes.min()) if len(finite_bayes) else bottom
            high = max(top, finite_bayes.max()) if len(finite_bayes) else top
            if ref == ref and high == high:
                span = (high - ref) or 0.1 * abs(high) or 0.01
                low = max(0.0, ref - 0.25 * span)
                ax.set_ylim(low, high + 0.1 * span)
                cut = f"\n(axis from {low:.3g}, not 0)" if low > 0 else ""
            else:
                cut = ""
            ax.set_ylabel(f"test log loss{cut}")
        ax.set_title(_wrap(title, fig.get_figwidth() / len(TASKS), 10), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = []
    for o, g in s.groupby(s["optim"].astype(str), sort=True):
        own = ", ".join(_part(c, g[c].iloc[0]) for c in by_optim)
        handles.append(Patch(color=colours[o], label=f"{o} ({own})" if own else o))
    if errorbars:
        handles.append(
            Line2D([], [], color="black", marker="_", ms=10, ls="none", label="± 1 std over seeds")
        )
    if bayes_drawn:
        handles.append(
            Line2D(
                [], [], color="black", ls="--", label="Bayes: best achievable (true probabilities)"
            )
        )
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=_ncols([h.get_label() for h in handles], fig, 5),
        fontsize=_FONT,
    )
    _title(
        fig,
        f"Test {name} per task: mean over the completed seeds of each setting",
        _common(s, cols, varying if len(varying) > 0 else []),
    )
    _save(fig, out)
    return fig


def plot_stability(
    df: pd.DataFrame, out: Path, colours: dict[str, str] | None = None
) -> Figure | None:
    """Learning rate vs final mean test AUC per optimizer (and model, and override that
    varies); diverged runs drawn at the bottom, runs with a task collapsed to AUC 0.5 as rings."""
    if df.empty or df.groupby("optim")["lr"].nunique().max() < 2:
        return None  # no optimizer was run at more than one learning rate
    auc_cols = [f"test_auc_{t}" for t in TASKS if f"test_auc_{t}" in df]
    if not auc_cols:
        return None
    d, cols = _settings(df)
    d["auc_mean"] = d[auc_cols].apply(pd.to_numeric, errors="coerce").mean(axis=1)
    d["is_collapsed"] = _collapsed(d)
    colours = colours or optimizer_colours(d["optim"])
    curve_cols = [c for c in cols if c != "lr"]
    varying = [c for c in _varying(d, curve_cols)]
    rest = [c for c in varying if c != "optim"]
    styled = _within(d, rest, ["optim"])
    style = _styles([tuple(r) for r in d[styled].itertuples(index=False)], _LINESTYLES)
    keys = _short_keys(rest)
    fig, ax = _subplots(figsize=(7.5, 5.2))
    floor = d["auc_mean"].min() if d["auc_mean"].notna().any() else 0.5
    floor = min(floor, 0.5) - 0.02
    curves = d.groupby(curve_cols, sort=True, dropna=False)
    for k, (key, g) in enumerate(curves):
        values = dict(zip(curve_cols, key, strict=True))
        colour = colours[str(values["optim"])]
        label = " · ".join(_short_part(c, values[c], keys) for c in (varying or ["optim"]))
        ok = (
            g[g["status"] == "completed"]
            .groupby("lr")["auc_mean"]
            .agg(["mean", "std", "count"])
            .reset_index()
        )
        yerr = ok["std"].where(ok["count"] >= 2)  # no bar for one seed
        ax.errorbar(
            ok["lr"], ok["mean"], yerr=yerr,
            marker="o", color=colour, ls=style[tuple(values[c] for c in styled)], capsize=3,
            label=label,
        )  # fmt: skip
        bad = g[g["status"] != "completed"]
        if len(bad):  # each curve's x marks a little apart, so that none hides another's
            shift = 10 ** (0.025 * (k - (curves.ngroups - 1) / 2))
            ax.scatter(bad["lr"] * shift, [floor] * len(bad), marker="x", s=70, color=colour)
        rings = g[(g["status"] == "completed") & g["is_collapsed"]]
        if len(rings):
            ax.scatter(rings["lr"], rings["auc_mean"], s=160, facecolors="none",
                       edgecolors=colour, lw=1.5)  # fmt: skip
    ax.set_xscale("log")
    ax.axhline(floor, color="grey", lw=0.5, ls=":")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="learning rate (log scale)", ylabel="mean test AUC over tasks (0.5 = chance)")
    ax.set_title(
        "points: mean over seeds (± 1 std where 2 or more); dashed: chance;\n"
        "x at the bottom: diverged or failed (set a little apart per line);\n"
        "rings: a task collapsed to AUC 0.5",
        fontsize=_FONT,
    )
    fig.legend(
        title=_wrap(
            " · ".join(keys.get(c, _name(c)) for c in (varying or ["optim"])),
            fig.get_figwidth(),
            _FONT,
        ),
        fontsize=_FONT,
        title_fontsize=_FONT,
        loc="outside lower center",
        ncols=_ncols(ax.get_legend_handles_labels()[1], fig, 4),
    )
    ax.grid(alpha=0.3, which="both")
    _title(fig, "Final test AUC by learning rate", _common(d, curve_cols, varying))
    _save(fig, out)
    return fig


def plot_clipping(
    df: pd.DataFrame, root: Path, out: Path, colours: dict[str, str] | None = None
) -> Figure | None:
    """Clippy's smallest clipping factor over training, one panel per parameter group, one
    line per setting (model, optimizer, lr, overrides: everything but the seed), the mean over
    that setting's seeds at each step; the legend says over how many. Each line's ``label``
    names its setting and seeds."""
    d, cols = _settings(df)
    # parameter group -> setting -> step -> values; setting -> seeds that logged it
    curves: dict[str, dict[tuple, dict[int, list[float]]]] = {}
    seeds: dict[tuple, set] = {}
    logged = []
    for i, row in d.iterrows():
        found = read_scalars(root / row["job"], "telemetry/clip_min/")
        if not found:
            continue
        logged.append(i)
        kind = tuple(row[c] for c in cols)
        seeds.setdefault(kind, set()).add(row["seed"])
        for tag, points in found.items():
            by_step = curves.setdefault(tag.rsplit("/", 1)[-1], {}).setdefault(kind, {})
            for step, value in points:
                by_step.setdefault(step, []).append(value)
    if not curves:
        return None
    d = d.loc[logged]
    colours = colours or optimizer_colours(d["optim"])
    varying = _varying(d, cols) or ["optim"]
    models = sorted(d["model"].astype(str).unique())
    ls_of = {m: _LINESTYLES[i % len(_LINESTYLES)] for i, m in enumerate(models)}
    rest = _within(d, [c for c in varying if c not in ("model", "optim")], ["model", "optim"])
    marker = _styles([tuple(k[cols.index(c)] for c in rest) for k in seeds], _MARKERS)
    groups = sorted(curves)
    ncols = len(groups) if len(groups) <= 4 else 3
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = _subplots(
        nrows, ncols, figsize=(max(6.5, 3.9 * ncols), 3.2 * nrows + 2.2), squeeze=False, sharey=True
    )
    axes = list(axes.flat)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    for ax, group in zip(axes, groups, strict=False):
        for kind, by_step in sorted(curves[group].items(), key=lambda kv: str(kv[0])):
            values = dict(zip(cols, kind, strict=True))
            steps = sorted(by_step)
            n = len(seeds[kind])
            how = "1 seed" if n == 1 else f"mean of {n} seeds"
            ax.plot(
                steps,
                [sum(by_step[s]) / len(by_step[s]) for s in steps],
                marker=marker[tuple(values[c] for c in rest)],
                ms=3,
                color=colours[str(values["optim"])],
                ls=ls_of[str(values["model"])],
                lw=1.4,
                label=f"{_describe(values, varying)} ({how})",
            )
        ax.set_title(f"parameter group: {group}", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for r in range(nrows):
        axes[r * ncols].set_ylabel("smallest clipping factor\n(1 = no clipping)")
    legend: dict[str, Any] = {}  # every setting, whichever panels it has lines in
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    labels = sorted(legend)
    fig.legend(
        [legend[x] for x in labels],
        labels,
        loc="outside lower center",
        ncols=_ncols(labels, fig, 3),
        fontsize=_FONT,
        title=_wrap(
            " · ".join(_name(c) for c in varying) + " (colour: optimizer, line style: model)",
            fig.get_figwidth(),
            _FONT,
        ),
        title_fontsize=_FONT,
    )
    _title(
        fig,
        "Clippy's clipping factor over training: one line per setting, averaged over its seeds only",
        _common(d, cols, varying),
    )
    _save(fig, out)
    return fig


def jobs_without_metrics(root: Path) -> list[str]:
    """The folders right under ``root`` that look like a job's (not ``report/``, not hidden)
    and hold no ``metrics.json`` anywhere inside: jobs that crashed before writing one."""
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not p.is_dir() or p.name.startswith(".") or p.name == "report":
            continue
        if next(p.rglob("metrics.json"), None) is None and next(p.iterdir(), None) is not None:
            out.append(p.name)
    return out


def build_report(root: str | Path) -> Path:
    """Write the report of the runs under ``root`` into ``root/report``; returns report.md."""
    root = Path(root)
    out = root / "report"
    out.mkdir(exist_ok=True)
    df = collect_results(root)
    summary = summarise(df)
    # one colour per optimizer, the same in every figure
    colours = optimizer_colours(df["optim"]) if not df.empty else {}
    if not summary.empty:
        tmp = out / f".results_by_seed.csv.tmp{os.getpid()}"
        summary.to_csv(tmp, index=False)
        os.replace(tmp, out / "results_by_seed.csv")
    figures = {
        "loss_curves.png": (
            "Training loss",
            plot_loss_curves(df, root, out / "loss_curves.png", colours) if not df.empty else False,
        ),
        "test_auc.png": (
            "Test AUC per task",
            plot_test_metric(summary, "auc", out / "test_auc.png", colours),
        ),
        "test_logloss.png": (
            "Test log loss per task",
            plot_test_metric(summary, "logloss", out / "test_logloss.png", colours),
        ),
        "stability.png": (
            "Stability across learning rates",
            plot_stability(df, out / "stability.png", colours),
        ),
        "clipping.png": (
            "Clippy's clipping factor",
            plot_clipping(df, root, out / "clipping.png", colours) if not df.empty else False,
        ),
    }
    n = len(df)
    counts = df["status"].value_counts().to_dict() if n else {}
    lines = [
        f"# Report: {root.name}",
        "",
        f"{n} run{'' if n == 1 else 's'}: "
        + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none")
        + ".",
        "Test metrics are mean ± std over seeds of the completed runs; diverged runs have no test metrics.",
        "",
    ]
    crashed = jobs_without_metrics(root)
    if crashed:
        lines += [
            f"{len(crashed)} job folder{'' if len(crashed) == 1 else 's'} without metrics.json "
            "(the job stopped before it wrote one; its train.log says why): "
            + ", ".join(f"`{c}`" for c in crashed),
            "",
        ]
    lines += [
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

"""The stability study in the paper's framing (Tang et al., KDD 2023): ``paper_report.md``.

The paper asks at which learning rates each fix for unstable training (gradient clipping,
adaptive gradient clipping, LAMB, Clippy) still trains a multitask ranker, and how that changes
with the model's size. ``python -m mtl_clippy.report --paper SWEEP_DIR`` (automatic for a sweep
of ``experiment=paper_baselines``, and at the end of such a multirun) answers it from the job
folders of a sweep over methods x learning rates x model sizes x seeds, and writes::

    SWEEP_DIR/paper_report.md              the tables below, the figures, a header on the sweep
    SWEEP_DIR/report/paper_divergence.png  training loss around each divergence, per model size
    SWEEP_DIR/report/paper_clipping.png    Clippy's clipping factor per parameter role

Its tables:

* **Stable learning rates**: per model size and method, the largest learning rate at which
  every seed trained stably, the learning rates tried, which seeds diverged or collapsed where,
  and the spikes the runs recovered from.
* **Test AUC at 1x, 2x and 4x**: per size and method, test AUC (mean ± std over seeds) at the
  learning rate where the unclipped baseline (AdaGrad) does best among those at which all its
  seeds are stable, and at two and four times that learning rate.
* **Clipping per role**: for Clippy at 1x and 4x that learning rate, how strongly and how often
  each role of parameters (embeddings, numerical, bottom, gates, towers) was clipped.

**The outcome of a run** (``stability`` in its ``metrics.json``; derived the same way for a file
written before that key existed): ``diverged`` (stopped by the divergence monitor),
``collapsed`` (trained to the end, but every task's test AUC at chance), ``spiked`` (trained
to the end after loss spikes it recovered from) or ``stable``. A run counts as *stable* when it
is ``stable`` or ``spiked``; a run that failed never does. A run that was interrupted has no
outcome yet (it is resumed in its own folder): like a job without ``metrics.json`` it is left
out, with one line in the report.

**What each job folder gives**: ``metrics.json`` (read through
:class:`~mtl_clippy.summary.RunSummary`), ``.hydra/hydra.yaml`` (the config choices: ``model``
is the size; ``optim`` and ``grad_clip`` make the method, see :func:`method_name`) and
``csv/metrics.csv`` (the training loss of every step and Clippy's telemetry, written with
``logger=csv trainer.log_every_n_steps=1``). A job whose files cannot be read gets one line in
the report and is left out of what needs them; nothing stops the rest of the report. Where
the folder holds runs of ``experiment=paper_baselines``, the runs of other experiments are
left out; where it holds the same run twice (size, method, learning rate and seed: a sweep
started again into the same folder), the one whose ``metrics.json`` is newer is kept.

Steps are counted as ``metrics.json``'s ``divergence.step`` counts them: step n is the n-th
optimizer step (the CSV's 0-based ``step`` column plus one for the loss). A diverged run is
dated at the first step of the rise it did not come back from (``divergence.step``); its CSV
holds the losses up to the step before the one that settled it (``divergence.detected_step``):
the monitor ends the run before Lightning logs that step's loss.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure

from mtl_clippy.atomic import write_atomically
from mtl_clippy.data.schema import TASKS
from mtl_clippy.report.sweep import variant_of
from mtl_clippy.summary import METRICS_FILE, RunSummary, finite_or_none
from mtl_clippy.summary import stability_of as read_stability

__all__ = [
    "BASELINE",
    "EXPERIMENT",
    "PaperReport",
    "Run",
    "Traces",
    "auc_tables",
    "baseline_lrs",
    "best_stable_lr",
    "build_paper_report",
    "clipping_table",
    "grid_lr",
    "is_paper_sweep",
    "largest_stable_lr",
    "method_name",
    "read_runs",
    "stability_of",
    "stable_lr_table",
]

#: The experiment whose sweeps get this report without being asked.
EXPERIMENT = "paper_baselines"
#: The unclipped baseline whose best stable learning rate sets the 1x of the AUC table.
BASELINE = "AdaGrad"
REPORT_FILE = "paper_report.md"
FIGURE_DIR = "report"
DIVERGENCE_FIGURE = "paper_divergence.png"
CLIPPING_FIGURE = "paper_clipping.png"
#: Outcomes that count as training stably.
STABLE = frozenset({"stable", "spiked"})
OUTCOMES = ("stable", "spiked", "diverged", "collapsed")
#: Learning-rate multiples of the baseline's best stable learning rate in the AUC table.
MULTIPLES = (1, 2, 4)
#: How far a grid learning rate may lie from a multiple and still stand for it (relative).
LR_TOLERANCE = 0.01
#: Steps of loss shown before each divergence, and of the Clippy run after it.
STEPS_BEFORE = 100
STEPS_AFTER = 50
#: The parameter roles, in the backbones' order (``mtl_clippy.models.backbones.base.ROLES``,
#: not imported: that would import torch into the report).
ROLES = ("embeddings", "numerical", "bottom", "gates", "towers")
_DPI = 100
_WRITE_HINT = "free some space, then build the report again"
#: The end of the line of a job folder without an outcome yet.
UNFINISHED = ": no outcome yet, left out"

#: Display names of (optim, grad_clip) choices; any other pair is "<optim> + <grad_clip>".
_METHODS: dict[tuple[str, str], str] = {
    ("adagrad", "none"): "AdaGrad",
    ("adagrad", "norm"): "AdaGrad + GC",
    ("adagrad", "agc"): "AdaGrad + AGC",
    ("lamb", "none"): "LAMB",
    ("adam", "none"): "Adam",
    ("clippy", "none"): "Clippy",
    ("clippy_noclip", "none"): "Clippy without clipping",
    ("clippy_seed", "none"): "Clippy (seed settings)",
}
_METHOD_ORDER = list(_METHODS.values())
#: The method each figure and table compares with.
CLIPPY = "Clippy"


def method_name(optim: str | None, grad_clip: str | None) -> str:
    """The method of a run, named as in the paper, from its ``optim`` and ``grad_clip``
    choices (``grad_clip`` missing, as in runs made before it existed: ``none``)."""
    optim = optim or "?"
    grad_clip = grad_clip or "none"
    known = _METHODS.get((optim, grad_clip))
    if known:
        return known
    return optim if grad_clip == "none" else f"{optim} + {grad_clip}"


@dataclass
class Run:
    """What the report needs of one job folder."""

    job: str  #: the folder, relative to the sweep folder
    folder: Path
    size: str  #: the ``model`` choice
    method: str
    lr: float
    seed: int | None
    status: str
    stability: str  #: one of ``OUTCOMES``, or the status of a run that failed or was stopped
    auc: dict[str, float] = field(default_factory=dict)  #: test ``click``, ``conversion``, ``mean``
    divergence_step: int | None = None  #: where the run diverged (``divergence.step``)
    detected_step: int | None = None  #: the step that settled it (``divergence.detected_step``)
    spikes: int = 0
    wall_time_s: float | None = None
    experiment: str | None = None
    csv: Path | None = None  #: ``csv/metrics.csv``, where it exists
    #: the run's overrides beyond size, method, lr and seed (``model.norm=none``)
    variant: tuple[str, ...] = ()

    @property
    def stable(self) -> bool:
        return self.stability in STABLE


def stability_of(summary: RunSummary) -> str:
    """The run's outcome, as :func:`mtl_clippy.summary.stability_of` reads or derives it
    (``stable``, ``spiked``, ``collapsed``, ``diverged``); a run that neither completed nor
    diverged keeps its status (``failed``, ``interrupted``), and one that completed without a
    verdict (no divergence monitor watched it) counts as ``stable``: it trained to the end."""
    if summary.status == "diverged":
        return "diverged"
    if summary.status != "completed":
        return str(summary.status or "failed")
    judged = read_stability(summary)
    return judged if judged in OUTCOMES else "stable"


# ----------------------------------------------------------------------------- reading


def _choices(folder: Path) -> dict[str, Any] | None:
    """``hydra.runtime.choices`` of a job's ``.hydra/hydra.yaml``; None if it cannot be read."""
    try:
        data = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        choices = data["hydra"]["runtime"]["choices"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return dict(choices) if isinstance(choices, dict) else None


def _clipping_ran(folder: Path) -> str | None:
    """The clipping the job's resolved config (``.hydra/config.yaml``) really did
    (``config_checks.clipping_of``): a run may set ``trainer.gradient_clip_val`` without
    ``grad_clip=``. None if the file cannot be read."""
    from mtl_clippy.config_checks import clipping_of

    try:
        data = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return clipping_of(data) if isinstance(data, dict) else None


def _from_overrides(overrides: Iterable[str], key: str) -> str | None:
    for o in overrides:
        k, _, v = o.lstrip("+").partition("=")
        if k == key and v:
            return v
    return None


def _job_folders(root: Path) -> list[Path]:
    """The folders under ``root`` holding a ``metrics.json`` or a ``.hydra`` folder (a job that
    started), in job-number order; the report's own folder is not one."""
    found = {p.parent for p in root.rglob(METRICS_FILE)}
    found |= {p.parent for p in root.glob("*/.hydra") if p.is_dir()}

    def key(p: Path) -> tuple[int, str]:
        head = p.relative_to(root).parts[0].split("_", 1)[0] if p != root else ""
        return (int(head) if head.isdigit() else 1 << 30, str(p))

    return sorted((p for p in found if FIGURE_DIR not in p.relative_to(root).parts[:1]), key=key)


def _int(x: float | None) -> int | None:
    return None if x is None else int(x)


def read_runs(root: str | Path) -> tuple[list[Run], list[str]]:
    """The runs of the sweep folder ``root`` and one line for each job folder with a problem
    (named relative to ``root``): an unreadable ``metrics.json`` or none (the job is left
    out), no learning rate (left out), no ``.hydra/hydra.yaml`` (size and optimizer taken from
    ``metrics.json``), no ``csv/metrics.csv`` (left out of the figures)."""
    root = Path(root)
    runs: list[Run] = []
    problems: list[str] = []
    for folder in _job_folders(root):
        job = str(folder.relative_to(root)) if folder != root else folder.name
        try:
            s = RunSummary.read(folder)
        except FileNotFoundError:
            problems.append(f"{job}: no {METRICS_FILE} (the job did not finish){UNFINISHED}")
            continue
        except (OSError, ValueError) as exc:
            problems.append(f"{job}: unreadable {METRICS_FILE} ({exc}): left out")
            continue
        if s.lr is None:
            problems.append(f"{job}: {METRICS_FILE} has no learning rate (lr): left out")
            continue
        choices = _choices(folder)
        overrides = s.overrides or []
        if choices is None:
            problems.append(
                f"{job}: no readable .hydra/hydra.yaml: model and optimizer taken from "
                f"{METRICS_FILE}, gradient clipping from its overrides"
            )
            choices = {"grad_clip": _from_overrides(overrides, "grad_clip")}
        # a run refused before training (a failed run of 0 steps) ran no clipping at all
        trained = s.status != "failed" or bool(s.steps)
        ran = _clipping_ran(folder) if trained else None
        if ran is not None and ran != (choices.get("grad_clip") or "none"):
            problems.append(
                f"{job}: grad_clip={choices.get('grad_clip') or 'none'}, but its config clips "
                f"by {ran}: named by what it ran"
            )
            choices = {**choices, "grad_clip": ran}
        size = choices.get("model") or s.model or "?"
        optim = choices.get("optim") or s.optim
        test = s.test or {}
        # a NaN or infinite AUC (a hand-edited file; runs write null) is no measurement
        auc = {t: finite_or_none(test.get(f"auc_{t}")) for t in (*TASKS, "mean")}
        if auc["mean"] is None and all(auc[t] is not None for t in TASKS):
            auc["mean"] = sum(auc[t] for t in TASKS) / len(TASKS)
        csv = folder / "csv" / "metrics.csv"
        if not csv.is_file():
            problems.append(f"{job}: no csv/metrics.csv: left out of the figures")
        runs.append(
            Run(
                job=job,
                folder=folder,
                size=str(size),
                method=method_name(optim, choices.get("grad_clip")),
                lr=float(f"{float(s.lr):.12g}"),  # 0.1 * 3 and 0.3: one grid point
                seed=None if s.seed is None else int(s.seed),
                status=str(s.status),
                stability=stability_of(s),
                auc={k: float(v) for k, v in auc.items() if v is not None},
                divergence_step=_int(s.divergence.step),
                detected_step=_int(getattr(s.divergence, "detected_step", None)),
                spikes=int(s.divergence.spikes or 0),
                wall_time_s=s.wall_time_s,
                experiment=choices.get("experiment") or _from_overrides(overrides, "experiment"),
                csv=csv if csv.is_file() else None,
                variant=tuple(o for o in overrides if _is_variant(o)),
            )
        )
    _name_variants(runs)
    return _drop_duplicates(
        _of_the_experiment(_finished(runs, problems), problems), problems
    ), problems


def _is_variant(override: str) -> bool:
    """Whether an override makes a run other than its size, method, lr and seed say."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key not in ("method", "grad_clip") and variant_of([override]) is not None


def _name_variants(runs: list[Run]) -> None:
    """Add to each run's size the overrides whose values differ between the runs
    (``sb_small, model.norm=none``): variants of a size are kept apart, in every table and
    figure; an override that every run shares (``data.train_rows=3000``) is not shown."""
    given = [dict(o.lstrip("+~").split("=", 1) for o in r.variant if "=" in o) for r in runs]
    keys = sorted({k for g in given for k in g})
    varying = [k for k in keys if len({g.get(k) for g in given}) > 1]
    for r, g in zip(runs, given, strict=True):
        shown = [f"{k}={g[k]}" for k in varying if k in g]
        if shown:
            r.size = ", ".join([r.size, *shown])


def _finished(runs: list[Run], problems: list[str]) -> list[Run]:
    """``runs`` less the interrupted ones: no outcome yet (a resumed run writes its own)."""
    for r in runs:
        if r.status == "interrupted":
            problems.append(f"{r.job}: interrupted (resume it to count it){UNFINISHED}")
    return [r for r in runs if r.status != "interrupted"]


def _of_the_experiment(runs: list[Run], problems: list[str]) -> list[Run]:
    """Where some of ``runs`` are of ``EXPERIMENT``, those and the runs that do not say
    which experiment they are; all of them otherwise (``--paper`` on another sweep)."""
    if not any(r.experiment == EXPERIMENT for r in runs):
        return runs
    for r in runs:
        if r.experiment not in (EXPERIMENT, None):
            problems.append(
                f"{r.job}: a run of experiment={r.experiment}, not {EXPERIMENT}: left out"
            )
    return [r for r in runs if r.experiment in (EXPERIMENT, None)]


def _drop_duplicates(runs: list[Run], problems: list[str]) -> list[Run]:
    """``runs`` with one run per size, method, learning rate and seed: of two, a run with a
    result (completed or diverged) before one without (failed, interrupted), then the one
    whose ``metrics.json`` was written last (the other gets a line in ``problems``)."""

    def finished(r: Run) -> bool:
        return r.status in ("completed", "diverged")

    def written(r: Run) -> tuple[bool, float]:
        try:
            mtime = (r.folder / METRICS_FILE).stat().st_mtime
        except OSError:
            mtime = -math.inf
        return (finished(r), mtime)

    kept: dict[tuple[Any, ...], Run] = {}
    for r in runs:
        if r.seed is None:  # nothing tells two such runs apart from two seeds
            continue
        key = (r.size, r.method, r.lr, r.seed)
        other = kept.get(key)
        if other is None:
            kept[key] = r
            continue
        new, old = (r, other) if written(r) >= written(other) else (other, r)
        kept[key] = new
        problems.append(
            f"{old.job}: the same run (model {r.size}, {r.method}, lr {_lr(r.lr)}, seed "
            f"{r.seed}) as {new.job}, "
            + (
                "whose metrics.json is newer"
                if finished(new) == finished(old)
                else f"which is {new.status} (this one {old.status})"
            )
            + ": left out"
        )
    chosen = {id(r) for r in kept.values()}
    return [r for r in runs if id(r) in chosen or r.seed is None]


def is_paper_sweep(root: str | Path) -> bool:
    """Whether a job of the sweep folder ``root`` ran ``experiment=paper_baselines``."""
    root = Path(root)
    return any((_choices(f) or {}).get("experiment") == EXPERIMENT for f in _job_folders(root))


class Traces:
    """Each run's ``csv/metrics.csv``, read once when first asked for; a file that cannot be
    read gets one line in ``problems``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        self._cache: dict[str, pd.DataFrame | None] = {}

    def get(self, run: Run) -> pd.DataFrame | None:
        if run.job not in self._cache:
            self._cache[run.job] = self._read(run)
        return self._cache[run.job]

    def _read(self, run: Run) -> pd.DataFrame | None:
        if run.csv is None:
            return None

        def wanted(c: str) -> bool:
            return c in ("step", "train/loss") or c.startswith("telemetry/clip_")

        try:
            df = pd.read_csv(run.csv, usecols=wanted)
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # ParserError is a ValueError
            self.problems.append(f"{run.job}: unreadable csv/metrics.csv ({exc}): not in figures")
            return None
        if "step" not in df:
            self.problems.append(f"{run.job}: csv/metrics.csv has no step column: not in figures")
            return None
        df = df.apply(pd.to_numeric, errors="coerce")
        return df[df["step"].notna()]

    def loss(self, run: Run) -> pd.Series:
        """The training loss by optimizer step (1-based, as ``divergence.step``), finite only."""
        df = self.get(run)
        if df is None or "train/loss" not in df:
            return pd.Series(dtype=float)
        d = df[["step", "train/loss"]].dropna().drop_duplicates("step", keep="last")
        s = pd.Series(d["train/loss"].to_numpy(), index=d["step"].to_numpy().astype(int) + 1)
        return s[s.map(math.isfinite) & (s > 0)].sort_index()

    def telemetry(self, run: Run, quantity: str) -> dict[str, pd.Series]:
        """``telemetry/<quantity>/<role>`` by optimizer step, per role."""
        df = self.get(run)
        out: dict[str, pd.Series] = {}
        if df is None:
            return out
        prefix = f"telemetry/{quantity}/"
        for col in df.columns:
            if col.startswith(prefix):
                d = df[["step", col]].dropna().drop_duplicates("step", keep="last")
                if len(d):
                    steps = d["step"].to_numpy().astype(int)
                    out[col[len(prefix) :]] = pd.Series(d[col].to_numpy(), index=steps)
        return out


# ----------------------------------------------------------------------------- the grid


def _ordered(values: Iterable[str], order: Sequence[str] = ()) -> list[str]:
    """Distinct ``values``: those of ``order`` first in its order, the rest as first seen."""
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def _cells(runs: Iterable[Run]) -> dict[float, list[Run]]:
    by_lr: dict[float, list[Run]] = {}
    for r in runs:
        by_lr.setdefault(r.lr, []).append(r)
    return dict(sorted(by_lr.items()))


def largest_stable_lr(runs: Iterable[Run]) -> float | None:
    """The largest learning rate at which every run (every seed) is stable; None if none."""
    ok = [lr for lr, cell in _cells(runs).items() if all(r.stable for r in cell)]
    return max(ok) if ok else None


def best_stable_lr(runs: Iterable[Run]) -> float | None:
    """Among the positive learning rates at which every run is stable, the one with the
    highest mean test ``auc_mean`` over its runs (the smaller learning rate on a tie); None
    if none. (A control at lr 0 is left out: its multiples would all be 0.)"""
    best, best_auc = None, -math.inf
    for lr, cell in _cells(runs).items():
        if not lr > 0:
            continue
        values = [r.auc["mean"] for r in cell if "mean" in r.auc]
        if all(r.stable for r in cell) and values:
            auc = statistics.fmean(values)
            if auc > best_auc:
                best, best_auc = lr, auc
    return best


def grid_lr(lrs: Iterable[float], target: float) -> float | None:
    """The learning rate of ``lrs`` nearest ``target`` within ``LR_TOLERANCE`` (relative)."""
    if not target > 0:
        return None
    near = [lr for lr in lrs if abs(lr / target - 1) <= LR_TOLERANCE]
    return min(near, key=lambda lr: abs(lr / target - 1)) if near else None


def _groups(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """size -> method -> runs, sizes in job order, methods in the paper's order."""
    out: dict[str, dict[str, list[Run]]] = {}
    for size in _ordered(r.size for r in runs):
        of_size = [r for r in runs if r.size == size]
        out[size] = {
            m: [r for r in of_size if r.method == m]
            for m in _ordered((r.method for r in of_size), _METHOD_ORDER)
        }
    return out


def _lr(x: float) -> str:
    return f"{x:g}"


def _seed(r: Run) -> str:
    return "?" if r.seed is None else str(r.seed)


# ----------------------------------------------------------------------------- tables


def _not_stable(cell: list[Run]) -> str:
    """``diverged seeds 1, 2 (at steps 412, 388); collapsed seed 3`` for one lr's runs."""
    parts = []
    for outcome in _ordered((r.stability for r in cell if not r.stable), OUTCOMES):
        which = [r for r in cell if r.stability == outcome]
        seeds = ", ".join(_seed(r) for r in which)
        text = f"{outcome} seed{'s' if len(which) > 1 else ''} {seeds}"
        steps = [r.divergence_step for r in which]
        if outcome == "diverged" and any(s is not None for s in steps):
            shown = ", ".join("?" if s is None else str(s) for s in steps)
            text += f" (at step{'s' if len(which) > 1 else ''} {shown})"
        parts.append(text)
    return "; ".join(parts)


def _seeds_of(methods: dict[str, list[Run]]) -> int:
    """How many runs a full cell of this size holds: its distinct seeds (or its largest cell)."""
    group = [r for g in methods.values() for r in g]
    seeds = len({r.seed for r in group if r.seed is not None})
    return max(seeds, *(len(c) for g in methods.values() for c in _cells(g).values()))


def stable_lr_table(runs: list[Run]) -> str:
    """Markdown: per size and method, the largest learning rate at which every seed trained
    stably, the learning rates tried (with the number of seeds where it differs from the
    most), where seeds diverged or collapsed, and the spikes they recovered from."""
    lines = [
        "| Model | Method | lrs tried | largest lr stable for every seed | "
        "not stable at (lr: what happened) | spikes recovered from (lr: count over seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for size, methods in _groups(runs).items():
        seeds = _seeds_of(methods)
        for method, group in methods.items():
            cells = _cells(group)
            most = max(seeds, *(len(c) for c in cells.values()))
            tried = ", ".join(
                _lr(lr) + (f" ({len(c)} of {most} runs)" if len(c) < most else "")
                for lr, c in cells.items()
            )
            largest = largest_stable_lr(group)
            shown = "none" if largest is None else _lr(largest)
            if largest is not None and len(cells[largest]) < most:  # not every seed has run
                shown += f" ({len(cells[largest])} of {most} runs)"
            bad = "<br>".join(
                f"{_lr(lr)}: {_not_stable(c)}"
                for lr, c in cells.items()
                if not all(r.stable for r in c)
            )
            spikes = ", ".join(
                f"{_lr(lr)}: {sum(r.spikes for r in c)}"
                for lr, c in cells.items()
                if sum(r.spikes for r in c)
            )
            lines.append(
                f"| {size} | {method} | {tried} | {shown} | {bad or '-'} | {spikes or '-'} |"
            )
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float], seeds: int = 0) -> str:
    """Mean ± std of ``values``; ``(n=k)`` after it where they are fewer than ``seeds``."""
    if not values:
        return "no test"
    few = f" (n={len(values)})" if len(values) < seeds else ""
    if len(values) == 1:
        return f"{values[0]:.4f}{few}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}{few}"


def auc_cell(cell: list[Run] | None, task: str, seeds: int = 0) -> str:
    """One cell of the AUC table: ``-`` where the grid has no runs, the count of each outcome
    that is not stable (``diverged 2/3``) where any run is not, else mean ± std over seeds
    (``(n=2)`` after it where fewer than ``seeds`` runs have a test AUC)."""
    if not cell:
        return "-"
    if not all(r.stable for r in cell):
        counts = Counter(r.stability for r in cell if not r.stable)
        order = _ordered(counts, OUTCOMES)
        return ", ".join(f"{o} {counts[o]}/{len(cell)}" for o in order)
    return _mean_std([r.auc[task] for r in cell if task in r.auc], seeds)


def baseline_lrs(runs: list[Run]) -> dict[str, float | None]:
    """Per size: the baseline's best stable learning rate (None: no baseline run is stable)."""
    return {
        size: best_stable_lr(methods.get(BASELINE, [])) for size, methods in _groups(runs).items()
    }


def auc_tables(runs: list[Run]) -> str:
    """Markdown: per size, one table of test AUC (click, conversion) per method at 1x, 2x
    and 4x the baseline's best stable learning rate (the grid's learning rate within 1%)."""
    out = []
    base = baseline_lrs(runs)
    for size, methods in _groups(runs).items():
        lr0 = base[size]
        out.append(f"### {size}\n")
        if lr0 is None:
            why = (
                "has no run"
                if BASELINE not in methods
                else "has no test AUC where it is stable"
                if largest_stable_lr(methods[BASELINE]) is not None
                else "is stable at no learning rate"
            )
            out.append(f"{BASELINE} {why} for {size}: no reference learning rate.\n")
            continue
        out.append(
            f"{BASELINE}'s best stable lr for {size}: {_lr(lr0)} (highest mean test AUC among "
            f"the lrs at which all its seeds are stable).\n"
        )
        head = ["Method"]
        for k in MULTIPLES:
            head += [f"{k}x = {_lr(k * lr0)}: click AUC", f"{k}x: conversion AUC"]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        seeds = _seeds_of(methods)
        for method, group in methods.items():
            cells = _cells(group)
            row = [method]
            for k in MULTIPLES:
                lr = grid_lr(cells, k * lr0)
                cell = cells.get(lr) if lr is not None else None
                row += [auc_cell(cell, t, seeds) for t in TASKS]
            lines.append("| " + " | ".join(row) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


@dataclass
class _ClipRow:
    size: str
    multiple: int
    target: float | None  #: the multiple of the baseline's best stable lr
    lr: float | None  #: Clippy's grid lr standing for it
    runs: list[Run]


def _clippy_rows(runs: list[Run]) -> list[_ClipRow]:
    """Clippy's runs at 1x and 4x the baseline's best stable lr, per size."""
    rows = []
    groups = _groups(runs)
    for size, lr0 in baseline_lrs(runs).items():
        cells = _cells(groups[size].get(CLIPPY, []))
        for k in (1, 4):
            target = None if lr0 is None else k * lr0
            lr = grid_lr(cells, target) if target is not None else None
            rows.append(_ClipRow(size, k, target, lr, cells.get(lr, []) if lr is not None else []))
    return rows


def clipping_table(runs: list[Run], traces: Traces) -> str:
    """Markdown: per size, Clippy at 1x and 4x the baseline's best lr, and role: the mean
    clipping factor over training (``clip_mean`` averaged over logged intervals and seeds),
    the lowest one (``clip_min``), the share of logged intervals in which a tensor of the role
    was clipped (``clip_min`` < 1) and the share of steps clipped (``clip_fraction``)."""
    lines = [
        "| Model | Clippy lr | role | mean clip factor | lowest clip factor | "
        "logged intervals clipped | steps clipped |",
        "|---|---|---|---|---|---|---|",
    ]
    findings = []
    for row in _clippy_rows(runs):
        if not row.runs:
            continue
        per_role: dict[str, dict[str, list[float]]] = {}
        for run in row.runs:
            for q in ("clip_mean", "clip_min", "clip_fraction"):
                for role, s in traces.telemetry(run, q).items():
                    per_role.setdefault(role, {}).setdefault(q, []).extend(s.tolist())
        if not per_role:
            continue
        label = f"{_lr(row.lr)} ({row.multiple}x)"  # type: ignore[arg-type]
        means = {}
        for role in _ordered(per_role, ROLES):
            q = per_role[role]
            mean = statistics.fmean(q["clip_mean"]) if q.get("clip_mean") else math.nan
            means[role] = mean
            low = min(q["clip_min"]) if q.get("clip_min") else math.nan
            clipped = (
                sum(v < 1.0 for v in q["clip_min"]) / len(q["clip_min"])
                if q.get("clip_min")
                else math.nan
            )
            steps = statistics.fmean(q["clip_fraction"]) if q.get("clip_fraction") else math.nan
            lines.append(
                f"| {row.size} | {label} | {role} | {mean:.3f} | {low:.3f} | "
                f"{clipped:.0%} | {steps:.1%} |"
            )
        finite = {r: m for r, m in means.items() if math.isfinite(m)}
        if finite:
            role = min(finite, key=lambda r: finite[r])
            findings.append(
                f"- {row.size}, lr {label}: most clipped role **{role}** (mean clip factor "
                f"{finite[role]:.3f}; {len(row.runs)} run{'s' if len(row.runs) > 1 else ''})"
            )
    if len(lines) == 2:
        return ""
    return "\n".join(lines) + "\n\n" + "\n".join(findings) + "\n"


# ----------------------------------------------------------------------------- figures


def _colours(methods: Iterable[str]) -> dict[str, str]:
    """One colour per method, the same in every panel (paper order first)."""
    return {m: f"C{i % 10}" for i, m in enumerate(_ordered(methods, _METHOD_ORDER))}


def _save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG of at most 256 colours (a third of the size of matplotlib's
    full-colour file for line plots, and no visible difference), whole or not at all."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.set_dpi(_DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
    small = image.convert("RGB").quantize(colors=256)
    write_atomically(path, lambda tmp: small.save(tmp, format="PNG", optimize=True),
                     hint=_WRITE_HINT)  # fmt: skip


def plot_divergences(runs: list[Run], traces: Traces, out: Path) -> bool:
    """Per size, the training loss of every diverged run from ``STEPS_BEFORE`` steps before
    its divergence to the end of its trace (steps counted from the step it diverged at, a
    cross where the monitor stopped it), coloured by method; dashed, Clippy's run at the same
    lr (and seed, where there is one) over the same steps and ``STEPS_AFTER`` more, where
    that run did not diverge itself (if it did, it has its own line). False (nothing written)
    when no run diverged."""

    def step_of(r: Run) -> int:
        return (
            r.divergence_step
            if r.divergence_step is not None
            else int(traces.loss(r).index[-1]) + 1
        )

    # a run whose CSV holds no loss near its divergence (logged too rarely, or cut short)
    # has nothing to draw
    diverged = [
        r
        for r in runs
        if r.stability == "diverged"
        and len(traces.loss(r))
        and (traces.loss(r).index >= step_of(r) - STEPS_BEFORE).any()
    ]
    if not diverged:
        return False
    colours = _colours(r.method for r in runs)
    sizes = _ordered(r.size for r in diverged)
    fig = Figure(figsize=(5.2 * len(sizes), 4.2))
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for ax, size in zip(axes, sizes, strict=True):
        mine = [r for r in diverged if r.size == size]
        clippy = [r for r in runs if r.size == size and r.method == CLIPPY]
        compared = 0
        for r in mine:
            loss = traces.loss(r)
            d = step_of(r)
            part = loss[loss.index >= d - STEPS_BEFORE]
            ax.plot(part.index - d, part.to_numpy(), color=colours[r.method], lw=1, alpha=0.8)
            ax.plot(part.index[-1] - d, part.iloc[-1], "x", color=colours[r.method], ms=5)
            if r.method == CLIPPY:
                continue
            same = [
                c for c in clippy if grid_lr([c.lr], r.lr) is not None and c.stability != "diverged"
            ]
            same.sort(key=lambda c: c.seed != r.seed)  # the same seed first
            if same:
                c_loss = traces.loss(same[0])
                c_part = c_loss[
                    (c_loss.index >= d - STEPS_BEFORE) & (c_loss.index <= d + STEPS_AFTER)
                ]
                if len(c_part):
                    ax.plot(c_part.index - d, c_part.to_numpy(), color="black", lw=0.8, ls="--",
                            alpha=0.6)  # fmt: skip
                    compared += 1
        ax.axvline(0, color="grey", lw=1, ls=":")
        ax.set_yscale("log")
        ax.set(
            title=f"{size}: {len(mine)} diverged run{'s' if len(mine) > 1 else ''} "
            f"(lr {', '.join(_lr(x) for x in sorted({r.lr for r in mine}))})",
            xlabel="optimizer steps from the step it diverged at (dotted line: 0)",
            ylabel="training loss (log scale)",
        )
        handles = [
            ax.plot([], [], color=colours[m], lw=1.5, label=m)[0]
            for m in _ordered((r.method for r in mine), _METHOD_ORDER)
        ]
        handles += ax.plot([], [], "x", color="grey", label="last loss logged")
        if compared:
            handles += ax.plot([], [], color="black", ls="--", lw=0.8, label="Clippy, same lr")
        ax.legend(handles=handles, fontsize=8, title="method (diverged runs)", title_fontsize=8)
    fig.suptitle("Training loss around each divergence", fontsize=11)
    _save(fig, out)
    return True


def plot_clipping(runs: list[Run], traces: Traces, out: Path) -> bool:
    """One panel per size (rows) and Clippy lr (columns: 1x, 4x the baseline's best):
    ``clip_mean`` (solid) and ``clip_min`` (dashed) per role against the step, mean over
    seeds. False (nothing written) when no such run logged them."""
    panels: dict[tuple[str, int], tuple[_ClipRow, dict[str, dict[str, pd.Series]]]] = {}
    rows = _clippy_rows(runs)
    for row in rows:
        curves: dict[str, dict[str, pd.Series]] = {}
        for q in ("clip_mean", "clip_min"):
            per_role: dict[str, list[pd.Series]] = {}
            for run in row.runs:
                for role, s in traces.telemetry(run, q).items():
                    per_role.setdefault(role, []).append(s)
            curves[q] = {
                role: pd.concat(series, axis=1).mean(axis=1).sort_index()
                for role, series in per_role.items()
            }
        if curves["clip_mean"] or curves["clip_min"]:
            panels[(row.size, row.multiple)] = (row, curves)
    if not panels:
        return False
    sizes = _ordered(size for size, _ in panels)
    fig = Figure(figsize=(10, 3.1 * len(sizes) + 0.9), layout="constrained")
    axes = fig.subplots(len(sizes), 2, squeeze=False, sharey=True)
    role_colour = {role: f"C{i}" for i, role in enumerate(ROLES)}
    roles: list[str] = []
    for i, size in enumerate(sizes):
        for j, k in enumerate((1, 4)):
            ax = axes[i][j]
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("optimizer step")
            if (size, k) not in panels:
                (row,) = [r for r in rows if (r.size, r.multiple) == (size, k)]
                at = f"{k}x = lr {_lr(row.target)}" if row.target else f"{k}x"
                why = "not run" if not row.runs else "no clipping telemetry in csv/metrics.csv"
                ax.text(0.5, 0.5, f"{size}, Clippy at {at}:\n{why}", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, color="grey")  # fmt: skip
                ax.set_axis_off()
                continue
            row, curves = panels[(size, k)]
            for q, style in (("clip_mean", "-"), ("clip_min", "--")):
                for role in _ordered(curves[q], ROLES):
                    s = curves[q][role]
                    ax.plot(s.index, s.to_numpy(), color=role_colour.get(role, "black"), ls=style,
                            lw=1.2 if style == "-" else 0.9,
                            marker="o" if len(s) <= 20 else None, ms=3)  # fmt: skip
                    roles = _ordered([*roles, role], ROLES)
            diverged = sum(r.stability == "diverged" for r in row.runs)
            n = len(row.runs)
            seeds = f"mean over {n} seeds" if n > 1 else "1 seed"
            note = f"; {diverged} of {n} diverged" if diverged else ""
            ax.set_title(
                f"{size}, Clippy at lr {_lr(row.lr)} ({k}x {BASELINE}'s best)\n{seeds}{note}",  # type: ignore[arg-type]
                fontsize=9,
            )
        axes[i][0].set_ylabel("clipping factor σ\n(1 = not clipped)")
    handles = [
        axes[0][0].plot([], [], color=role_colour.get(r, "black"), label=r)[0] for r in roles
    ]
    handles += axes[0][0].plot([], [], color="grey", ls="-", label="mean over the interval")
    handles += axes[0][0].plot([], [], color="grey", ls="--", label="smallest in the interval")
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        "Clippy's clipping factor per parameter role over training, at 1x and 4x "
        f"{BASELINE}'s best stable lr",
        fontsize=10,
    )
    _save(fig, out)
    return True


# ----------------------------------------------------------------------------- the report


@dataclass
class PaperReport:
    """What :func:`build_paper_report` did: the markdown written (None for a sweep without a
    readable run), the runs it read, and one line per job folder with a problem."""

    path: Path | None
    runs: list[Run]
    problems: list[str]


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def _header(root: Path, runs: list[Run]) -> list[str]:
    status = Counter(r.status for r in runs)
    outcome = Counter(r.stability for r in runs)
    wall = [r.wall_time_s for r in runs if r.wall_time_s is not None]
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    methods = _ordered((r.method for r in runs), _METHOD_ORDER)
    return [
        f"# Stability across learning rates and model sizes: {root.name}",
        "",
        "_Written by `python -m mtl_clippy.report --paper` from the job folders; "
        "rebuild it with the same command._",
        "",
        f"- **Runs**: {len(runs)}; by status: "
        + ", ".join(f"{v} {k}" for k, v in sorted(status.items()))
        + "; by outcome: "
        + ", ".join(f"{outcome[o]} {o}" for o in _ordered(outcome, OUTCOMES))
        + ".",
        f"- **Training time**: {_duration(sum(wall))} in all (the sum of the runs' "
        f"wall_time_s{'' if len(wall) == len(runs) else f'; {len(runs) - len(wall)} runs without one'}).",
        f"- **Grid**: model sizes {', '.join(_ordered(r.size for r in runs))}; methods "
        f"{', '.join(methods)}; learning rates "
        f"{', '.join(_lr(x) for x in sorted({r.lr for r in runs}))}; seeds "
        f"{', '.join(map(str, seeds)) or '-'}.",
        "- **Outcomes**: *stable* trained to the end; *spiked* trained to the end after loss "
        "spikes it recovered from (counts as stable); *diverged* was stopped by the divergence "
        "monitor; *collapsed* ended with every task's test AUC at chance (0.5). Failed runs "
        "are never stable.",
        "",
    ]


def build_paper_report(root: str | Path) -> PaperReport:
    """Write ``paper_report.md`` and its figures for the sweep folder ``root``.

    A job folder that cannot be read is named in the report's last section (and in the
    result's ``problems``) and left out; a sweep without a readable run writes nothing
    (``path`` None)."""
    root = Path(root)
    runs, problems = read_runs(root)
    if not runs:
        return PaperReport(None, runs, problems)
    traces = Traces(problems)
    figures = root / FIGURE_DIR
    figures.mkdir(exist_ok=True)
    lines = _header(root, runs)
    unfinished = sum(p.endswith(UNFINISHED) for p in problems)
    if unfinished:  # a sweep still running: its grid is not complete yet
        lines[-1:-1] = [
            f"- **Not finished**: {unfinished} job folder{'s' if unfinished > 1 else ''} "
            "without an outcome yet (running, interrupted or killed; listed at the end): "
            "the tables below may change when they finish."
        ]
    lines += [
        "## Largest stable learning rate",
        "",
        "Per model size and method: the largest learning rate at which every seed trained "
        "stably (stable or spiked).",
        "",
        stable_lr_table(runs),
        f"## Test AUC at 1x, 2x and 4x {BASELINE}'s best stable learning rate",
        "",
        "Mean ± std over seeds. A cell where any seed was not stable counts the outcomes "
        "(`diverged 2/3`: two of three seeds diverged) instead; `-`: the method was not run at "
        "that learning rate (the grid's nearest within 1% stands for it).",
        "",
        auc_tables(runs),
        "## Loss around each divergence",
        "",
    ]
    if plot_divergences(runs, traces, figures / DIVERGENCE_FIGURE):
        lines += [
            f"Training loss of every diverged run, by optimizer step counted from the step it "
            f"diverged at (the first step of the rise it did not come back from), from "
            f"{STEPS_BEFORE} steps before to the last loss logged (x) before the divergence "
            f"monitor stopped it; dashed: Clippy at the same learning rate (same seed where "
            f"run) over the same steps and {STEPS_AFTER} more.",
            "",
            f"![Loss around each divergence]({FIGURE_DIR}/{DIVERGENCE_FIGURE})",
            "",
        ]
    elif any(r.stability == "diverged" for r in runs):
        lines += [
            "Runs diverged, but none has a training loss in csv/metrics.csv within "
            f"{STEPS_BEFORE} steps of its divergence (logger=csv trainer.log_every_n_steps=1).",
            "",
        ]
    else:
        lines += ["No run diverged.", ""]
    lines += [
        f"## Clippy's clipping factor per parameter role (1x and 4x {BASELINE}'s best lr)",
        "",
    ]
    table = clipping_table(runs, traces)
    if plot_clipping(runs, traces, figures / CLIPPING_FIGURE):
        lines += [f"![Clippy's clipping factor]({FIGURE_DIR}/{CLIPPING_FIGURE})", ""]
    if table:
        lines += [
            "Clip factor σ: the factor Clippy scales a tensor's update by (1 = not clipped). "
            "Mean: over the logged intervals and seeds; intervals clipped: the share of logged "
            "intervals in which some tensor of the role was clipped; steps clipped: the share "
            "of steps.",
            "",
            table,
        ]
    elif not any(r.method == BASELINE for r in runs):
        lines += [f"No reference learning rate: the sweep has no {BASELINE} run.", ""]
    elif all(lr is None for lr in baseline_lrs(runs).values()):
        lines += [f"No reference learning rate: {BASELINE} has none at any size (see above).", ""]
    elif not any(row.runs for row in _clippy_rows(runs)):
        lines += [f"{CLIPPY} was not run at 1x or 4x {BASELINE}'s best stable lr.", ""]
    else:
        lines += [
            f"No {CLIPPY} run at those learning rates logged its clipping factor "
            "(telemetry/clip_* in csv/metrics.csv).",
            "",
        ]
    if problems:
        lines += ["## Job folders left out or read in part", ""]
        lines += [f"- {p}" for p in problems]
        lines.append("")
    text = "\n".join(lines)
    path = root / REPORT_FILE
    write_atomically(path, lambda tmp: tmp.write_text(text), hint=_WRITE_HINT)
    return PaperReport(path, runs, problems)

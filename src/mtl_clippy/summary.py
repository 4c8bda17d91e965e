"""The run summary, ``metrics.json``: one typed object that the run writes and every reader
(the sweep table, the report, a resume, the printed table) reads.

Every run writes it in its folder whatever its outcome (``completed``, ``diverged``,
``failed``, ``interrupted``)::

    {"status": "completed", "stability": "stable", "model": "shared_bottom", "optim": "clippy",
     "lr": 0.1,
     "seed": 1, "overrides": [...], "epochs": 3, "steps": 150, "wall_time_s": 12.3,
     "samples_per_s": 41000.0, "optimizer_path": {"dense": ["foreach"], ...},
     "val": {"auc_click": 0.71, ...}, "val_last": {...},
     "best": {...}, "test": {...}, "bayes": {...}, "divergence": {...},
     "max_abs_logit": 7.2, "collapsed": [], "error": null, "output_dir": "...",
     "resumed_from": null, "threads": 2, "oov_rate": {...}, "early_stopping": "val/auc_mean",
     "precision": "32-true"}

The keys from ``resumed_from`` on are written once the run has got that far (a run whose
configuration is refused has none of them); ``resume_command`` and ``interrupted`` only for an
interrupted run, ``traceback`` only for a failure that is not a user's mistake.

``stability`` is the run's verdict on training stability (``STABILITY``): ``diverged`` (the
divergence monitor ended it: ``divergence`` says where and why), ``collapsed`` (it completed,
but every task's test AUC ended at chance: ``collapsed`` lists them), ``spiked`` (it completed;
the loss jumped and came back, ``divergence.spikes`` times) or ``stable``. A run writes it
once it has completed or diverged (null when no divergence monitor watched it and it did not
collapse); a run that failed or was interrupted has no verdict and no key. For an older file
without the key, :func:`stability_of` derives it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl_clippy.atomic import write_atomically

METRICS_FILE = "metrics.json"

#: A task whose test AUC ends within this distance of 0.5 is listed in ``collapsed``.
COLLAPSE_TOLERANCE = 0.01

#: The values of ``stability``, from best to worst (see the module).
STABILITY = ("stable", "spiked", "collapsed", "diverged")


class _Absent:
    """The value of a key that ``metrics.json`` does not hold (not written: the run did not
    get that far), as opposed to one it holds as ``null``."""

    _instance: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


@dataclass
class Divergence:
    """metrics.json's ``divergence``: what ``DivergenceMonitor`` saw (its rule:
    ``mtl_clippy.callbacks.divergence``). ``verdict``: stable, spiked or diverged (None: no
    monitor, or an older file); ``step``: where the run diverged (the first step of the rise
    it did not come back from), None when it did not; ``detected_step``: the step that settled
    it; ``spike_steps`` and ``spike_peaks``: the first step of each spike and its largest loss
    over the median before it; ``open_rise_step``: a rise that training ended in the middle
    of (counted as a spike)."""

    verdict: str | None = None
    step: int | None = None
    detected_step: int | None = None
    last_finite_loss: float | None = None
    spikes: int | None = 0
    spike_steps: list[int] | None = field(default_factory=list)
    spike_peaks: list[float] | None = field(default_factory=list)
    open_rise_step: int | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Divergence:
        """A key an older file lacks reads as None, as readers have always taken it."""
        data = data or {}
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


#: The keys written only once a run gets that far, or in one outcome only (see the module).
_OPTIONAL = (
    "stability",
    "val_last",
    "resumed_from",
    "threads",
    "oov_rate",
    "early_stopping",
    "precision",
    "resume_command",
    "interrupted",
    "traceback",
)


@dataclass
class RunSummary:
    """The content of one run's ``metrics.json``; the field order is the file's key order."""

    status: str | None = "failed"
    #: stable, spiked, collapsed or diverged (``STABILITY``; see the module); written by a
    #: run that completed or diverged (ABSENT: an older file, or a run that got nowhere)
    stability: str | None = ABSENT
    model: str | None = None
    optim: str | None = None
    lr: float | None = None
    seed: int | None = None
    overrides: list[str] | None = field(default_factory=list)
    epochs: int | None = 0
    steps: int | None = 0
    wall_time_s: float | None = None
    samples_per_s: float | None = None
    #: which ClippyAdagrad implementations ran the steps (``ClippyAdagrad.implementation()``;
    #: a string in older files; None for other optimizers)
    optimizer_path: str | dict[str, Any] | None = None
    #: the validation metrics of the tested checkpoint's epoch (best.ckpt's); null where
    #: they are not known (a checkpoint written between validations, or by an older version,
    #: that is not the final step's)
    val: dict[str, float | None] | None = field(default_factory=dict)
    #: the last validation's metrics, where that is another epoch than ``val``'s (early
    #: stopping ends a run some epochs after its best)
    val_last: dict[str, float | None] | None = ABSENT
    #: what chose best.ckpt, its score, that epoch's val/auc_mean (``mtl_clippy.best``)
    best: dict[str, Any] | None = field(default_factory=dict)
    test: dict[str, float | None] | None = None
    bayes: dict[str, float] | None = None
    divergence: Divergence = field(default_factory=Divergence)
    max_abs_logit: float | None = None
    collapsed: list[str] | None = field(default_factory=list)
    error: str | None = None
    output_dir: str | None = None
    # Written once the run gets that far (ABSENT: not in the file).
    resumed_from: str | None = ABSENT
    threads: int | None = ABSENT
    #: share of categorical cells mapped to the OOV slot, per split (and per field)
    oov_rate: dict[str, Any] | None = ABSENT
    early_stopping: str | None = ABSENT
    precision: str | None = ABSENT
    # An interrupted run (``mtl_clippy.preemption.record``).
    resume_command: str | None = ABSENT
    interrupted: dict[str, Any] | None = ABSENT
    # A failure that is not a user's mistake.
    traceback: str | None = ABSENT
    #: keys of a file that this version does not know: kept, and written back as they were
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The dict written as ``metrics.json`` (today's keys, in today's order)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is ABSENT:
                continue
            out[f.name] = value.to_json() if isinstance(value, Divergence) else value
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        """The summary of a ``metrics.json`` dict. An older file's missing key reads as None
        (what readers have always taken it for), an optional one stays absent; a key this
        version does not know is kept in ``extra``. ``ValueError`` if ``data`` is not an
        object (a foreign file), or a known key holds a value of another type than declared
        (``null`` is always allowed), naming the key: a reader (the sweep table) then skips
        the file with that reason instead of failing on it later."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        values: dict[str, Any] = {}
        for name in names:
            if name in data:
                _check_type(name, data[name], _KINDS[name])
                values[name] = data[name]
            elif name not in _OPTIONAL:
                values[name] = None
        divergence = values.get("divergence") or {}
        for name, value in divergence.items():
            if name in _DIVERGENCE_KINDS:
                _check_type(f"divergence.{name}", value, _DIVERGENCE_KINDS[name])
        values["divergence"] = Divergence.from_json(divergence)
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**values, extra=extra)

    def write(self, folder: str | Path) -> None:
        """Write ``<folder>/metrics.json`` whole or not at all (``write_json_atomic``)."""
        write_json_atomic(Path(folder) / METRICS_FILE, self.to_json())

    @classmethod
    def read(cls, folder: str | Path) -> RunSummary:
        """The summary in ``<folder>/metrics.json``; ``OSError`` if it cannot be read,
        ``ValueError`` if it is not a summary's JSON."""
        return cls.load(Path(folder) / METRICS_FILE)

    @classmethod
    def load(cls, path: str | Path) -> RunSummary:
        """The summary in the file ``path`` (errors as :meth:`read`)."""
        return cls.from_json(json.loads(Path(path).read_text()))


class _Kind:
    """A JSON type a key may hold (besides ``null``): its name for messages, its test, and
    for an object, the kind of each of its values (``each``)."""

    def __init__(self, name: str, test: Callable[[Any], bool], each: _Kind | None = None) -> None:
        self.name, self.test, self.each = name, test, each


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # JSON true is no number


_STR = _Kind("a string", lambda v: isinstance(v, str))
_NUMBER = _Kind("a number", _is_number)
_OBJECT = _Kind("an object", lambda v: isinstance(v, Mapping))
_STR_OR_OBJECT = _Kind("a string or an object", lambda v: isinstance(v, (str, Mapping)))
_NUMBERS = _Kind("an object", lambda v: isinstance(v, Mapping), each=_NUMBER)
_STRINGS = _Kind(
    "a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
)
_NUMBER_LIST = _Kind(
    "a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v)
)

#: What each of ``RunSummary``'s keys holds (its type hint, as JSON types).
_KINDS: dict[str, _Kind] = {
    **dict.fromkeys(
        ("status", "stability", "model", "optim", "error", "output_dir", "resumed_from",
         "early_stopping", "precision", "resume_command", "traceback"),
        _STR,
    ),
    **dict.fromkeys(
        ("lr", "seed", "epochs", "steps", "wall_time_s", "samples_per_s", "max_abs_logit",
         "threads"),
        _NUMBER,
    ),
    **dict.fromkeys(("overrides", "collapsed"), _STRINGS),
    **dict.fromkeys(("val", "val_last", "test", "bayes"), _NUMBERS),
    **dict.fromkeys(("best", "divergence", "oov_rate", "interrupted"), _OBJECT),
    "optimizer_path": _STR_OR_OBJECT,
}  # fmt: skip

#: The same for the keys of ``divergence``.
_DIVERGENCE_KINDS: dict[str, _Kind] = {
    "verdict": _STR,
    "step": _NUMBER,
    "detected_step": _NUMBER,
    "last_finite_loss": _NUMBER,
    "spikes": _NUMBER,
    "spike_steps": _NUMBER_LIST,
    "spike_peaks": _NUMBER_LIST,
    "open_rise_step": _NUMBER,
    "reason": _STR,
}


def _check_type(key: str, value: Any, kind: _Kind) -> None:
    """``ValueError`` naming ``key`` (``test.auc_click`` for a value inside an object)
    unless ``value`` is ``null`` or of ``kind``."""
    if value is None:
        return
    if not kind.test(value):
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"{key!r} should be {kind.name} or null, not {shown}")
    if kind.each is not None:
        for name, item in value.items():
            _check_type(f"{key}.{name}", item, kind.each)


def exists(folder: str | Path) -> bool:
    """Whether ``folder`` holds a ``metrics.json``."""
    return (Path(folder) / METRICS_FILE).exists()


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON to a temporary name, then rename: a reader never sees half a file, and a
    full disk leaves no temporary file and raises ``DiskFull`` naming ``path``."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def finite_or_none(x: Any) -> float | None:
    """``x`` (a number or a one-element tensor) as a float; None where it is missing or not
    finite (JSON has no NaN)."""
    if x is None:
        return None
    v = float(x.item() if hasattr(x, "item") else x)
    return v if math.isfinite(v) else None


def split_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float | None]:
    """``{"val/auc_click": t}`` -> ``{"auc_click": 0.71}`` for one split prefix."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix + "/") and not key.endswith("_best"):
            out[key[len(prefix) + 1 :]] = finite_or_none(value)
    return dict(sorted(out.items()))


def collapsed_tasks(test: Mapping[str, Any] | None) -> list[str]:
    """Tasks whose test AUC is within ``COLLAPSE_TOLERANCE`` of 0.5 (a constant predictor)."""
    return sorted(
        key[len("auc_") :]
        for key, value in (test or {}).items()
        if key.startswith("auc_")
        and key != "auc_mean"
        and isinstance(value, float)
        and abs(value - 0.5) <= COLLAPSE_TOLERANCE
    )


def _all_collapsed(summary: RunSummary) -> bool:
    """Whether every task's test AUC ended at chance (``collapsed`` covers them all)."""
    tasks = {k[len("auc_") :] for k in (summary.test or {}) if k.startswith("auc_")} - {"mean"}
    return bool(tasks) and tasks <= set(summary.collapsed or [])


def judge_stability(summary: RunSummary) -> str | None:
    """The ``stability`` a run writes, from its status, its divergence monitor's verdict and
    its collapsed tasks: diverged takes precedence, then collapsed (a completed run whose
    every task is at chance), then the monitor's spiked or stable; None for a run that did
    not complete, or that no monitor watched (``divergence.verdict`` None) and did not
    collapse."""
    if summary.status == "diverged":
        return "diverged"
    if summary.status != "completed":
        return None
    if _all_collapsed(summary):
        return "collapsed"
    verdict = summary.divergence.verdict
    return verdict if verdict in ("stable", "spiked") else None


def stability_of(summary: RunSummary) -> str | None:
    """A run's ``stability``: the key its file holds (null included); for an older file
    without it, derived as :func:`judge_stability` does, with ``divergence.spikes`` (counted
    by the rule of its time) standing in for the monitor's verdict that such a file lacks."""
    if summary.stability is not ABSENT:
        return summary.stability
    judged = judge_stability(summary)
    spikes = summary.divergence.spikes
    if judged is None and summary.status == "completed" and spikes is not None:
        return "spiked" if spikes else "stable"
    return judged


def format_summary(summary: RunSummary | Mapping[str, Any]) -> str:
    """The per-task table printed at the end of a run."""
    s = summary if isinstance(summary, RunSummary) else RunSummary.from_json(summary)
    val, test, bayes = s.val or {}, s.test or {}, s.bayes or {}
    tasks = sorted(
        {k.split("_", 1)[1] for k in [*val, *test] if k.startswith("auc_") and k != "auc_mean"}
    )

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "  -   "

    lines = [
        f"{s.model} + {s.optim} (lr {s.lr}, seed {s.seed}): "
        f"{s.status}"
        + (f" ({stability})" if (stability := stability_of(s)) not in (None, s.status) else "")
        + ", "
        f"{s.epochs} epochs"
        + (
            f" (epoch {b + 1} tested)"
            if s.test and isinstance(b := (s.best or {}).get("epoch"), int)
            else ""
        )
        + f", {s.steps} steps, "
        f"{s.wall_time_s} s" + (f", {s.samples_per_s:,.0f} samples/s" if s.samples_per_s else ""),
        "",
        f"| {'task':<12} | val AUC | test AUC | Bayes AUC | val logloss | test logloss |",
        f"|{'-' * 14}|---------|----------|-----------|-------------|--------------|",
    ]
    for t in [*tasks, "mean"]:
        lines.append(
            f"| {t:<12} | {fmt(val.get(f'auc_{t}'))}  | {fmt(test.get(f'auc_{t}'))}   | "
            f"{fmt(bayes.get(f'auc_{t}'))}    | {fmt(val.get(f'logloss_{t}'))}      | "
            f"{fmt(test.get(f'logloss_{t}'))}       |"
        )
    return "\n".join(lines)


__all__ = [
    "ABSENT",
    "COLLAPSE_TOLERANCE",
    "METRICS_FILE",
    "STABILITY",
    "Divergence",
    "RunSummary",
    "collapsed_tasks",
    "format_summary",
    "judge_stability",
    "split_metrics",
    "stability_of",
    "write_json_atomic",
]

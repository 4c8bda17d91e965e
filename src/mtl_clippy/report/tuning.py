"""The columns of an Optuna study in a sweep's table: the trial number, each searched value
and the best trial.

A sweep of ``hydra/sweeper=tune`` (``mtl_clippy.tune``) writes ``optuna_trials.csv`` (one row
per trial: its number, job folder, Optuna's state and value, the searched values) and the
plugin's ``optimization_results.yaml`` (the best parameters and value, and ``best_trial``).
:func:`add_trial_columns` adds to the table of such a folder:

- ``trial``: the trial's number (a job without a row in optuna_trials.csv, from a sweep of the
  plugin's own ``hydra/sweeper=optuna``, gets its job number, which is its trial number in a
  study that was not continued from a storage);
- one column per searched value other than ``optim.lr`` (which is the ``lr`` column),
  named by its key (``optim.variable_relative_threshold``), with the value the run used;
- ``optuna_value`` (what Optuna was told: the run's score; empty for a diverged run, which
  Optuna is told is pruned, and for a failed trial) and ``best_trial`` (true on the best trial's row).

A folder without these files is left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mtl_clippy.summary import METRICS_FILE

TRIALS_FILE = "optuna_trials.csv"
RESULTS_FILE = "optimization_results.yaml"
_TRIAL_COLUMNS = {"trial", "job", "state", "value", "run_status"}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _overrides(root: Path, job: str) -> dict[str, Any]:
    try:
        data = json.loads((root / job / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    pairs = (o.split("=", 1) for o in data.get("overrides") or [] if "=" in o)
    return {k.lstrip("+~"): _number(v) for k, v in pairs}


def add_trial_columns(df: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """``df`` (one row per job, with its ``job`` folder) with the study's columns, when
    ``root`` holds an Optuna study's files; else ``df`` unchanged."""
    root = Path(root)
    results_path, trials_path = root / RESULTS_FILE, root / TRIALS_FILE
    if df.empty or "job" not in df or not (results_path.is_file() or trials_path.is_file()):
        return df
    try:
        results = yaml.safe_load(results_path.read_text()) if results_path.is_file() else {}
    except (OSError, yaml.YAMLError):
        results = {}
    results = results if isinstance(results, dict) else {}
    trials = (
        pd.read_csv(trials_path, dtype={"job": str}) if trials_path.is_file() else pd.DataFrame()
    )
    searched = [c for c in trials.columns if c not in _TRIAL_COLUMNS]
    searched += [k for k in (results.get("best_params") or {}) if k not in searched]
    by_job = {str(r["job"]): r for _, r in trials.iterrows()} if "job" in trials else {}

    rows = []
    for job in df["job"]:
        row = by_job.get(str(job))
        head = str(job).split("_", 1)[0]
        out: dict[str, Any] = {
            "trial": int(row["trial"])
            if row is not None
            else (int(head) if head.isdigit() else None),
            "optuna_value": row["value"] if row is not None else None,
        }
        ran = _overrides(root, str(job))
        for key in searched:
            if key == "optim.lr":
                continue
            value = row[key] if row is not None and key in row else None
            out[key] = value if value is not None and value == value else ran.get(key)
        rows.append(out)
    extra = pd.DataFrame(rows, index=df.index)
    best = results.get("best_trial")
    if best is None and results.get("best_params"):  # the plugin's own file: match the values
        params = results["best_params"]
        match = pd.Series(True, index=df.index)
        for key, value in params.items():
            column = df["lr"] if key == "optim.lr" and "lr" in df else extra.get(key)
            match &= column == value if column is not None else False
        extra["best_trial"] = match
    else:
        extra["best_trial"] = extra["trial"] == best
    position = list(df.columns).index("job") + 1
    before, after = df.iloc[:, :position], df.iloc[:, position:]
    return pd.concat([before, extra, after.drop(columns=extra.columns, errors="ignore")], axis=1)


__all__ = ["RESULTS_FILE", "TRIALS_FILE", "add_trial_columns"]

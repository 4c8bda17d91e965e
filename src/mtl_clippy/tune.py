"""Hyperparameter search with Optuna: Hydra's Optuna sweeper, with a search space per optimizer.

``python train.py -m hydra/sweeper=tune optim=adam`` (``configs/hydra/sweeper/tune.yaml``)
runs ``n_trials`` trials, each a run in its own job folder of the sweep, and tunes what
``search_spaces.<optim>`` lists for the chosen optimizer: a log-uniform learning rate for
every optimizer, and Clippy's two thresholds for the Clippy variants whose thresholds clip.
Each optimizer is then compared at its own tuned learning rate, one study per optimizer.

What Optuna is told for each trial (``train.main`` returns the run's ``best.score``: the best
``val/auc_mean`` by default, ``direction: maximize``):

- a completed run: that score;
- a run that diverged: a pruned trial, without a value. It is never the best trial (Optuna
  picks the best among completed trials only), and the TPE sampler ranks it below every
  completed trial, so that it learns that the values around it are bad. Its own best score
  (of the epochs before the divergence) is not used: a learning rate that trains for a while
  and then diverges is not one to pick. A study in which every trial diverged or failed has
  no best trial;
- a run that failed (an error, or no validation metric: ``best.score`` null): a failed
  trial. The sweep goes on (``max_failure_rate: 1.0``); the plugin logs "Failed experiment:
  Return value must be float-castable" for it, after this module's own line saying why.

When the sweep ends it writes, at the sweep folder's root, the plugin's
``optimization_results.yaml`` (best parameters and value; here also ``best_trial``, the best
trial's number), and ``optuna_trials.csv``: one row per trial, with its number, its job
folder, Optuna's state and value, the run's status and the searched values. The results
table (``results.csv``/``results.md``) takes ``trial``, the searched values and ``best_trial``
from these files. A sweep in which no trial completed writes no best trial and still gets
its table, instead of stopping on Optuna's "No trials are completed yet".

Before any trial runs, one line (``error: ...``, status 2) refuses a study that would pick
the wrong trial or cannot run: ``hydra.sweeper.direction`` disagreeing with
``callbacks.model_checkpoint.mode`` (maximize goes with max, minimize with min), and the grid
sampler with a continuous key. The search space logged is the one searched: the optimizer's
entry, then ``hydra.sweeper.params``, then the command line's sweep values; a plain value on
the command line (``optim.lr=0.1``) takes its key out of the space, and is logged as fixed.

The class wraps the plugin's implementation (``hydra_plugins.hydra_optuna_sweeper._impl``;
its hooks are pinned in tests/test_tune.py): it picks the search space, tells diverged runs
to Optuna as pruned, records each trial's job folder (relative to the sweep folder), and
logs the best parameters as the best run used them (rounded to ``digits``) in place of the
plugin's line with the values as sampled.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from mtl_clippy.errors import ConfigError
from mtl_clippy.summary import METRICS_FILE

log = logging.getLogger(__name__)

#: The files a study writes at its sweep folder's root.
TRIALS_FILE = "optuna_trials.csv"
RESULTS_FILE = "optimization_results.yaml"  # the plugin's name

MISSING_PLUGIN = (
    "hydra/sweeper=optuna needs Hydra's Optuna sweeper, which is not installed: "
    "pip install -e '.[optuna]' (from the repository folder)"
)


def _plugin_impl() -> type:
    # Optuna 2.10 (the plugin pins optuna<3) defines its database models with SQLAlchemy 1's
    # declarative_base, which SQLAlchemy 2 warns about at import; the study is in memory
    # unless hydra.sweeper.storage names a database.
    warnings.filterwarnings(
        "ignore", message=r".*declarative_base\(\)", module=r"optuna\.storages\._rdb\.models"
    )
    try:
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    except ImportError as exc:
        raise ConfigError(MISSING_PLUGIN) from exc
    return OptunaSweeperImpl


def search_space_for(search_spaces: Any, optim: str | None, params: Any = None) -> dict[str, str]:
    """The sweep parameters of a study of optimizer ``optim``: its entry of
    ``hydra.sweeper.search_spaces``, then ``hydra.sweeper.params`` (which win, key by key).
    An optimizer without an entry is an error naming the key, unless ``params`` gives the
    whole search space."""
    spaces = dict(search_spaces or {})
    space = _dotted(spaces.get(optim) or {}) if optim is not None else {}
    extra = _dotted(params or {})
    if not space and not extra:
        raise ConfigError(
            f"hydra.sweeper.search_spaces has no search space for optim={optim} (it has: "
            f"{', '.join(sorted(spaces)) or 'none'}): add one in "
            "configs/hydra/sweeper/tune.yaml, or give hydra.sweeper.params"
        )
    space.update(extra)
    return {str(k): str(v) for k, v in space.items()}


def _dotted(node: Any, prefix: str = "") -> dict[str, Any]:
    """A search space as ``{"optim.lr": "<sweep>"}``, whether its keys are written dotted
    (``optim.lr: ...``) or nested (``optim: {lr: ...}``) in a config file."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node)
    out: dict[str, Any] = {}
    for key, value in dict(node).items():
        if isinstance(value, dict | DictConfig):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _run_status(folder: Path | None) -> tuple[str | None, str | None]:
    """The run's status and error in its metrics.json (None, None where there is none)."""
    if folder is None:
        return None, None
    try:
        data = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    return data.get("status"), data.get("error")


def _job_folder(ret: Any) -> Path | None:
    try:
        return Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    except Exception:  # a launcher that hands back no Hydra config
        return None


def _number(value: Any) -> Any:
    """An override's value as a number where it is one (``"0.1329"`` -> 0.1329)."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _rounded(overrides: Any, distributions: Any, digits: int | None) -> tuple[str, ...]:
    """A trial's overrides with each sampled float to ``digits`` significant digits (None:
    as sampled): ``optim.lr=0.1329`` instead of ``optim.lr=0.13291125735654793``, so that
    job folder names stay short enough for the file system (255 characters) and read."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        dist = (distributions or {}).get(key)
        if digits and dist is not None and type(dist).__name__.endswith("UniformDistribution"):
            if "Int" not in type(dist).__name__:
                value = f"{float(value):.{digits}g}"
        out.append(f"{key}={value}")
    return tuple(out)


def _refuse_on(check: Any) -> Any:
    """``check()``'s value; a ConfigError from it is one line, ``error: ...``, status 2,
    before any trial runs (Hydra would show a sweeper's error with its traceback)."""
    try:
        return check()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


_MODE_DIRECTION = {"max": "maximize", "min": "minimize"}


def check_direction(direction: Any, config: Any) -> None:
    """hydra.sweeper.direction must agree with callbacks.model_checkpoint.mode: the run
    returns the best value of the monitored metric, better when higher for mode max."""
    if isinstance(direction, list | tuple) or OmegaConf.is_list(direction):
        return  # several objectives: not the run's one score
    direction = getattr(direction, "name", direction)
    mode = OmegaConf.select(config, "callbacks.model_checkpoint.mode", default=None)
    monitor = OmegaConf.select(config, "callbacks.model_checkpoint.monitor", default=None)
    wanted = _MODE_DIRECTION.get(str(mode))
    if wanted is not None and str(direction) != wanted:
        raise ConfigError(
            f"hydra.sweeper.direction={direction} disagrees with "
            f"callbacks.model_checkpoint.mode={mode} (monitor {monitor}): Optuna would pick "
            f"the worst trial; add hydra.sweeper.direction={wanted}"
        )


def merged_space(space: dict[str, str], arguments: Any) -> tuple[dict[str, str], dict[str, str]]:
    """The search space actually searched, and the keys the command line fixes: a sweep
    value on the command line (``optim.lr='interval(0.1, 1)'``) adds to or replaces its
    key in ``space``; a plain value (``optim.lr=0.1``) takes its key out of the space."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = dict(space)
    fixed: dict[str, str] = {}
    bare = {k.lstrip("+~"): k for k in out}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.key_or_group
        value = override.input_line.partition("=")[2] if override.input_line else ""
        if key in bare:
            out.pop(bare.pop(key), None)
        if override.is_sweep_override():
            out[override.get_key_element()] = value
            bare[key] = override.get_key_element()
        elif key in (k.lstrip("+~") for k in space):
            fixed[key] = value
    return out, fixed


def _is_grid(sampler: Any) -> bool:
    import functools

    func = sampler.func if isinstance(sampler, functools.partial) else type(sampler)
    return getattr(func, "__name__", "") == "GridSampler"


def check_grid(space: dict[str, str]) -> None:
    """The grid sampler needs a finite set of values for every searched key."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import (
        CategoricalDistribution,
        DiscreteUniformDistribution,
        IntUniformDistribution,
    )

    discrete = (CategoricalDistribution, DiscreteUniformDistribution, IntUniformDistribution)
    dists, _ = create_params_from_overrides([f"{k}={v}" for k, v in space.items()])
    continuous = [k for k, d in dists.items() if not isinstance(d, discrete)]
    if continuous:
        raise ConfigError(
            "hydra/sweeper/sampler=grid needs a finite set of values for each searched key; "
            f"continuous here: {', '.join(continuous)}: give each choice(...) or a list "
            "(key=a,b), or fix it (key=value)"
        )


def _relative_job(folder: Path | None, sweep_dir: Path | None) -> str | None:
    """The job folder, relative to the sweep folder (its subdir may hold a ``/``)."""
    if folder is None:
        return None
    if sweep_dir is not None:
        try:
            return folder.resolve().relative_to(sweep_dir.resolve()).as_posix()
        except ValueError:
            pass
    return folder.name


class _DropPluginBest(logging.Filter):
    """The plugin logs the best parameters as sampled (0.4194588422698215); the sweeper
    logs them as the run used them (0.4195) once the study's files are written."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Best parameters:")


def _quiet_plugin_best_line() -> None:
    plugin_log = logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl")
    if not any(isinstance(f, _DropPluginBest) for f in plugin_log.filters):
        plugin_log.addFilter(_DropPluginBest())


class OptunaSweeper(Sweeper):
    """Hydra's Optuna sweeper with a search space per optimizer (``search_spaces``), diverged
    runs told as pruned, checks before any trial runs, and a record of the trials (see the module)."""

    def __init__(
        self,
        search_spaces: DictConfig | None = None,
        digits: int | None = 4,
        **plugin_options: Any,
    ) -> None:
        impl = _plugin_impl()
        self.search_spaces = search_spaces
        self.digits = digits
        self._diverged: set[int] = set()  # numbers of the trials whose run diverged
        self._ran: dict[int, dict[str, str]] = {}  # trial number -> the values its run used
        self.sweeper = impl(**plugin_options)
        self._trials: list[Any] = []  # the batch of trials being launched
        self._rows: dict[int, dict[str, Any]] = {}  # trial number -> its record
        self._study: Any = None
        self._sweep_dir: Path | None = None
        self._optim: str | None = None
        self._space: dict[str, str] = {}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        _refuse_on(lambda: check_direction(self.sweeper.direction, config))
        self._optim = OmegaConf.select(config, "hydra.runtime.choices.optim", default=None)
        self._space = _refuse_on(
            lambda: search_space_for(self.search_spaces, self._optim, self.sweeper.params)
        )
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        _quiet_plugin_best_line()
        # our hooks: the trials of each batch, and the launcher's returns
        configure = self.sweeper._configure_trials

        def configure_trials(trials: list[Any], distributions: Any, *args: Any) -> Any:
            self._trials = list(trials)
            if trials and self._study is None:
                self._study = trials[0].study
                self._wrap_tell(self._study)
            overrides = configure(trials, distributions, *args)
            rounded = [_rounded(o, distributions, self.digits) for o in overrides]
            for trial, trial_overrides in zip(trials, rounded):
                self._ran[trial.number] = dict(o.split("=", 1) for o in trial_overrides)
            return rounded

        self.sweeper._configure_trials = configure_trials
        launcher = self.sweeper.launcher
        launch = launcher.launch

        def launch_trials(job_overrides: Any, initial_job_idx: int) -> Any:
            returns = launch(job_overrides, initial_job_idx=initial_job_idx)
            for trial, ret in zip(self._trials, returns):
                self._judge(trial, ret)
            return returns

        launcher.launch = launch_trials

    def _judge(self, trial: Any, ret: Any) -> None:
        """Record the trial's job and run status; a diverged run is to be told to Optuna as
        pruned (see ``_wrap_tell``); say why a trial will count as failed."""
        folder = _job_folder(ret)
        status, error = _run_status(folder)
        row: dict[str, Any] = {
            "trial": trial.number,
            "job": _relative_job(folder, self._sweep_dir),
            "run_status": status,
        }
        self._rows[trial.number] = row
        if ret.status.name != "COMPLETED":  # the task raised: the plugin reports it
            return
        if status == "diverged":
            log.warning(
                "trial %d: the run diverged; Optuna is told it was pruned (never the best trial)",
                trial.number,
            )
            self._diverged.add(trial.number)
            ret.return_value = 0.0  # a placeholder: the trial is told as pruned, without it
        elif _float_or_none(ret.return_value) is None:
            why = error or (
                f"status {status}" if status not in (None, "completed") else "no best.score"
            )
            log.warning("trial %d counts as failed for Optuna: %s", trial.number, why)
            ret.return_value = None  # NaN would be recorded as a value

    def _wrap_tell(self, study: Any) -> None:
        """A diverged run's trial is told to Optuna as pruned, without a value: never the
        best trial, and one that the TPE sampler ranks below every completed trial."""
        import optuna

        tell = study.tell

        def tell_pruned_if_diverged(trial: Any, *args: Any, **kwargs: Any) -> Any:
            number = trial if isinstance(trial, int) else trial.number
            if number in self._diverged:
                return tell(trial, state=optuna.trial.TrialState.PRUNED)
            return tell(trial, *args, **kwargs)

        study.tell = tell_pruned_if_diverged

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = _refuse_on(lambda: merged_space(self._space, arguments))
        if _is_grid(self.sweeper.sampler):
            _refuse_on(lambda: check_grid(space))
        self.sweeper.params = OmegaConf.create(space)
        log.info("Optuna search space (optim=%s): %s", self._optim, space)
        if fixed:
            log.info("Fixed by the command line (not searched): %s", fixed)
        try:
            self.sweeper.sweep(arguments)
        except ValueError as exc:
            if "No trials are completed yet" not in str(exc):
                raise
            log.warning("no trial completed: the study has no best trial")
        except RuntimeError as exc:
            # the plugin tells a failed trial without its GridSampler workaround: the last
            # point of a grid, failed, stops the study from outside an objective
            if "Study.stop" not in str(exc):
                raise
            log.info("the grid's points are all done")
        finally:
            self._write_records()

    def _write_records(self) -> None:
        """``optuna_trials.csv``, and the best trial's number in optimization_results.yaml."""
        if self._study is None or self._sweep_dir is None or not self._sweep_dir.is_dir():
            return
        trials = self._study.get_trials(deepcopy=False)
        names = sorted({k for t in trials for k in t.params})
        rows = []
        for t in trials:
            row = {"trial": t.number, "job": None, "run_status": None}
            row.update(self._rows.get(t.number, {}))
            row["state"] = t.state.name
            row["value"] = t.value
            ran = self._ran.get(t.number, {})
            row.update({k: _number(ran.get(k, t.params.get(k))) for k in names})
            rows.append(row)
        columns = ["trial", "job", "state", "value", "run_status", *names]
        tmp = self._sweep_dir / f".{TRIALS_FILE}.tmp{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self._sweep_dir / TRIALS_FILE)
        results = self._sweep_dir / RESULTS_FILE
        try:
            best = self._study.best_trial.number
        except ValueError:  # no completed trial
            results.unlink(missing_ok=True)
            return
        if not results.is_file():  # the sweep stopped before the plugin wrote it
            best_trial = self._study.best_trial
            OmegaConf.save(
                OmegaConf.create(
                    {
                        "name": "optuna",
                        "best_params": dict(best_trial.params),
                        "best_value": best_trial.value,
                    }
                ),
                results,
            )
        if results.is_file():
            data = OmegaConf.load(results)
            ran = self._ran.get(best, {})
            if data.get("best_params"):  # the values the best run used (rounded)
                for key in list(data.best_params):
                    data.best_params[key] = _number(ran.get(key, data.best_params[key]))
            data.best_trial = best
            OmegaConf.save(data, results)
            if data.get("best_params"):
                log.info("Best parameters (as the run used them): %s", dict(data.best_params))


__all__ = ["RESULTS_FILE", "TRIALS_FILE", "OptunaSweeper", "search_space_for"]

"""Optuna studies (hydra/sweeper=tune): the search space of each optimizer, what Optuna is told
for completed, diverged and failed runs, the study's files, and the results table's columns."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st

from app_helpers import ROOT, TINY, run_train

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from optuna.distributions import LogUniformDistribution

from mtl_clippy.errors import ConfigError
from mtl_clippy.tune import _rounded, check_direction, check_grid, merged_space, search_space_for

CONFIGS = ROOT / "configs"
OPTIMS = sorted(p.stem for p in (CONFIGS / "optim").glob("*.yaml"))
CLIPPING = {"clippy", "clippy_seed"}  # the Clippy variants whose thresholds clip
THRESHOLDS = {"optim.variable_relative_threshold", "optim.absolute_threshold"}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("optim", OPTIMS)
def test_each_optimizer_has_a_log_uniform_lr_around_its_default(optim):
    cfg = _compose(["hydra/sweeper=tune", f"optim={optim}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.mtl_clippy_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.n_jobs == 1
    assert cfg.hydra.runtime.choices.optim == optim
    space = search_space_for(sweeper.search_spaces, optim, sweeper.params)
    dists, fixed = create_params_from_overrides([f"{k}={v}" for k, v in space.items()])
    assert not fixed
    # the thresholds are searched exactly where they clip (and exist)
    assert set(dists) == ({"optim.lr"} | (THRESHOLDS if optim in CLIPPING else set()))
    for key, dist in dists.items():
        assert isinstance(dist, LogUniformDistribution), key
        assert key in cfg or key.split(".", 1)[1] in cfg.optim  # a key the run has
    lr = dists["optim.lr"]
    assert lr.low < cfg.optim.lr < lr.high and math.log10(lr.high / lr.low) >= 2.5, optim
    if optim in CLIPPING:  # the defaults inside their ranges
        for key in THRESHOLDS:
            d = dists[key]
            assert d.low < cfg.optim[key.split(".", 1)[1]] < d.high


def test_the_tuning_experiment_uses_the_optuna_sweeper():
    cfg = _compose(["experiment=tune_lr", "optim=adam"])
    assert cfg.hydra.sweeper._target_.endswith("mtl_clippy_sweeper.OptunaSweeper")
    assert cfg.hydra.sweeper.n_trials == 20 and cfg.data.train_rows == 100_000
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"


def test_params_add_to_and_replace_the_optimizers_space():
    spaces = {"adam": {"optim.lr": "tag(log, interval(1e-5, 1e-2))"}}
    space = search_space_for(spaces, "adam", {"optim.lr": "interval(0.1, 0.2)", "seed": "1,2"})
    assert space == {"optim.lr": "interval(0.1, 0.2)", "seed": "1,2"}
    # nested keys, as a command line's +hydra.sweeper.params.model.dropout=... makes them
    nested = search_space_for(spaces, "adam", {"model": {"dropout": "interval(0, 0.5)"}})
    assert nested == {**spaces["adam"], "model.dropout": "interval(0, 0.5)"}
    assert search_space_for({}, "sgd", {"optim.lr": "interval(1, 2)"}) == {
        "optim.lr": "interval(1, 2)"
    }


def test_an_optimizer_without_a_search_space_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as info:
        search_space_for({"adam": {"optim.lr": "interval(1, 2)"}}, "sgd", None)
    message = str(info.value)
    assert "\n" not in message
    assert "hydra.sweeper.search_spaces" in message and "optim=sgd" in message
    assert "adam" in message  # what it has


@given(st.floats(min_value=1e-7, max_value=1e4), st.integers(min_value=1, max_value=60))
def test_sampled_floats_are_rounded_to_four_significant_digits(value, seed):
    dists = {"optim.lr": LogUniformDistribution(1e-8, 1e5)}
    out = _rounded((f"optim.lr={value!r}", f"seed={seed}"), dists, 4)
    assert out[1] == f"seed={seed}"  # not searched: as it was
    text = out[0].split("=", 1)[1]
    assert math.isclose(float(text), value, rel_tol=5e-4)  # half a unit of the 4th digit
    assert float(text) == float(f"{value:.4g}") and len(text) <= 10
    assert _rounded((f"optim.lr={value!r}",), dists, None) == (f"optim.lr={value!r}",)


def test_the_plugin_hooks_we_wrap_exist_with_their_shape():
    """mtl_clippy.tune wraps these private parts of hydra-optuna-sweeper: pinned here."""
    import inspect

    params = list(inspect.signature(OptunaSweeperImpl._configure_trials).parameters)
    assert params == ["self", "trials", "search_space_distributions", "fixed_params"]
    assert "launcher" in inspect.getsource(OptunaSweeperImpl.setup)
    assert "self.params" in inspect.getsource(OptunaSweeperImpl._parse_sweeper_params_config)


# A task that stands in for train.py: Optuna's sweep, the results table and its files,
# in seconds. lr > 1 diverges, lr < 0.01 fails (no score), else the score falls with lr.
FAKE_TASK = """
import math, sys
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig
from mtl_clippy.resume import register_resolvers
from mtl_clippy.summary import RunSummary

register_resolvers()

@hydra.main(version_base="1.3", config_path=".", config_name="study")
def main(cfg):
    out = Path(cfg.out)
    lr = float(cfg.optim.lr)
    overrides = list(HydraConfig.get().overrides.task)
    s = RunSummary(model="fake", optim="clippy", lr=lr, seed=1, output_dir=str(out),
                   overrides=overrides)
    score = 0.9 - abs(math.log10(lr) + 1) / 10 + float(cfg.get("shift", 0))
    s.best = {"monitor": "val/auc_mean", "score": score, "val/auc_mean": score}
    if lr > 1:
        s.status = "diverged"
    elif lr < 0.01:
        s.status, s.error, s.best = "failed", "ValueError: too small", {}
    else:
        s.status = "completed"
    s.write(out)
    return s.best.get("score")

main()
"""

STUDY_CONFIG = """
defaults:
  - _self_
  - optim: clippy
  - override hydra/sweeper: tune
  - override hydra/sweeper/sampler: grid
out: ${hydra:runtime.output_dir}
hydra:
  searchpath: [file://CONFIGS]
  sweep:
    dir: SWEEP
    subdir: ${hydra.job.num}
  sweeper:
    n_trials: 10
    search_spaces:
      clippy:
        optim.lr: choice(0.001, 0.03, 0.1, 5.0)
        optim.absolute_threshold: choice(0.001, 0.01)
        optim.variable_relative_threshold: choice(0.5)
"""


def test_a_study_scores_diverged_runs_fails_failed_ones_and_tabulates_the_trials(tmp_path):
    """8 trials (a grid): lr 5 diverges (a pruned trial, never the best), lr 0.001 fails (a
    failed trial), the others complete with their score; the study's files and the table
    agree."""
    from mtl_clippy.report.sweep import write_results

    sweep = tmp_path / "sweep"
    (tmp_path / "task.py").write_text(FAKE_TASK)
    config = STUDY_CONFIG.replace("CONFIGS", str(CONFIGS)).replace("SWEEP", str(sweep))
    (tmp_path / "study.yaml").write_text(config)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "task.py", "-m"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = pd.read_csv(sweep / "optuna_trials.csv", dtype={"job": str})
    n = len(trials)
    assert n == 8 and list(trials["trial"]) == list(range(n))
    assert list(trials["job"]) == [str(i) for i in range(n)]
    assert sorted(zip(trials["optim.lr"], trials["optim.absolute_threshold"])) == sorted(
        (lr, a) for lr in (0.001, 0.03, 0.1, 5.0) for a in (0.001, 0.01)
    )
    for _, t in trials.iterrows():
        lr = t["optim.lr"]
        if lr > 1:
            assert (t["run_status"], t["state"]) == ("diverged", "PRUNED")
            assert math.isnan(t["value"])
        elif lr < 0.01:
            assert (t["run_status"], t["state"]) == ("failed", "FAIL")
            assert math.isnan(t["value"])
        else:
            assert (t["run_status"], t["state"]) == ("completed", "COMPLETE")
            assert t["value"] == pytest.approx(0.9 - abs(math.log10(lr) + 1) / 10)
    said = res.stdout + res.stderr  # a line for each diverged and each failed trial
    assert said.count("the run diverged; Optuna is told it was pruned") == 2
    assert said.count("counts as failed for Optuna: ValueError: too small") == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    done = trials[trials["state"] == "COMPLETE"]
    top = done.loc[done["value"].idxmax()]
    assert best["best_value"] == top["value"] and best["best_params"]["optim.lr"] == 0.1
    assert trials.loc[best["best_trial"], "optim.lr"] == 0.1
    # the table: one row per trial, its number, the searched values, the best trial
    table = write_results(sweep)
    assert len(table) == n and list(table["trial"]) == list(range(n))
    assert list(table["lr"]) == list(trials["optim.lr"])
    assert list(table["optim.absolute_threshold"]) == list(trials["optim.absolute_threshold"])
    assert list(table["best_trial"]) == [i == best["best_trial"] for i in range(n)]
    assert "optuna_value" in table
    md = (sweep / "results.md").read_text()  # the searched values show there too
    assert "optim.absolute_threshold" in md.splitlines()[0]
    assert md.splitlines()[0].startswith("| trial | model |")
    rows = [line for line in md.splitlines()[2:] if line.startswith("| ")]
    marked = [i for i, line in enumerate(rows) if line.split(" | ")[0] == f"| {i} **best**"]
    assert len(rows) == n and marked == [best["best_trial"]]


@pytest.mark.slow  # about 40 s on 2 cores: two real runs
def test_a_tiny_optuna_study_of_real_runs(tmp_path):
    res = run_train(
        [
            "-m",
            "hydra/sweeper=tune",
            "hydra.sweeper.n_trials=2",
            "optim=clippy",
            *TINY,
            "trainer.max_epochs=1",
            "callbacks.progress_bar.refresh_rate=0",
            "logger=none",
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={tmp_path}/data",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 2 and list(table["trial"]) == [0, 1]
    assert set(table["status"]) == {"completed"}
    for column in ("optim.variable_relative_threshold", "optim.absolute_threshold"):
        assert table[column].notna().all() and table[column].nunique() == 2
    assert table["lr"].nunique() == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert table.loc[table["best_trial"], "trial"].tolist() == [best["best_trial"]]
    top = table.loc[table["best_val_auc_mean"].idxmax()]
    assert best["best_value"] == pytest.approx(top["best_val_auc_mean"])


def test_the_study_config_documents_its_commands():
    text = (CONFIGS / "hydra" / "sweeper" / "tune.yaml").read_text()
    assert "python train.py -m hydra/sweeper=tune optim=adam" in textwrap.dedent(text)
    assert Path(CONFIGS / "experiment" / "tune_lr.yaml").is_file()


def test_a_study_in_which_no_trial_completes_still_gets_its_table(tmp_path):
    """Optuna has no best trial then ("No trials are completed yet"): the study ends with a
    line saying so, without optimization_results.yaml, and the table lists the failures."""
    sweep = tmp_path / "sweep"
    (tmp_path / "task.py").write_text(FAKE_TASK)
    config = STUDY_CONFIG.replace("CONFIGS", str(CONFIGS)).replace("SWEEP", str(sweep))
    config = config.replace("  - override hydra/sweeper/sampler: grid\n", "")
    config = config.replace("choice(0.001, 0.03, 0.1, 5.0)", "choice(0.001, 0.002)")
    config = config.replace("n_trials: 10", "n_trials: 2")
    config = config.replace(
        "  sweeper:\n",
        "  callbacks:\n    results_table:\n"
        "      _target_: mtl_clippy.report.hydra_callback.SweepResultsCallback\n  sweeper:\n",
    )
    (tmp_path / "study.yaml").write_text(config)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "task.py", "-m"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no trial completed: the study has no best trial" in res.stdout + res.stderr
    assert not (sweep / "optimization_results.yaml").exists()
    table = pd.read_csv(sweep / "results.csv")
    assert list(table["trial"]) == [0, 1] and set(table["status"]) == {"failed"}
    assert not table["best_trial"].any()
    trials = pd.read_csv(sweep / "optuna_trials.csv")
    assert list(trials["state"]) == ["FAIL", "FAIL"]


def _study(tmp_path, args, space=None, subdir="${hydra.job.num}"):
    """Run the fake task's study with command-line ``args``; (result, sweep folder)."""
    sweep = tmp_path / "sweep"
    (tmp_path / "task.py").write_text(FAKE_TASK)
    config = STUDY_CONFIG.replace("CONFIGS", str(CONFIGS)).replace("SWEEP", str(sweep))
    config = config.replace("subdir: ${hydra.job.num}", f"subdir: {subdir}")
    if space is not None:
        head = config.index("      clippy:\n") + len("      clippy:\n")
        config = config[:head] + "".join(f"        {k}: {v}\n" for k, v in space.items())
    (tmp_path / "study.yaml").write_text(config)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "task.py", "-m", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return res, sweep


def test_a_diverged_trial_is_never_the_best_and_fixed_keys_leave_the_space(tmp_path):
    """Every completed trial scores 0.3 or less, below the 0.5 a diverged trial was told
    before: the diverged trial (lr 5) is pruned, the best is a completed one. A plain value
    on the command line takes its key out of the (grid's) space and the logged space; a job
    folder with a / in its overrides is recorded relative to the sweep folder and matched;
    the best parameters logged are the ones the run used."""
    from mtl_clippy.report.sweep import write_results

    space = {
        "optim.lr": "choice(0.1, 5.0)",
        "optim.absolute_threshold": "choice(0.001, 0.01)",
        "optim.variable_relative_threshold": "tag(log, interval(0.1, 1.0))",
    }
    res, sweep = _study(
        tmp_path,
        ["+shift=-0.6", "+note=a/b", "optim.variable_relative_threshold=0.5"],
        space,
        subdir="${hydra.job.num}_${hydra.job.override_dirname}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    said = res.stdout + res.stderr
    (logged,) = [line for line in said.splitlines() if "Optuna search space" in line]
    assert "optim.lr" in logged and "optim.variable_relative_threshold" not in logged
    (fixed,) = [line for line in said.splitlines() if "Fixed by the command line" in line]
    assert "'optim.variable_relative_threshold': '0.5'" in fixed
    trials = pd.read_csv(sweep / "optuna_trials.csv", dtype={"job": str})
    assert len(trials) == 4 and "optim.variable_relative_threshold" not in trials
    for _, t in trials.iterrows():
        assert (sweep / t["job"] / "metrics.json").is_file(), t["job"]  # a / in the name
        assert "/" in t["job"]
        expected = "PRUNED" if t["optim.lr"] == 5.0 else "COMPLETE"
        assert t["state"] == expected
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["optim.lr"] == 0.1
    assert best["best_value"] == pytest.approx(0.3)
    assert trials.loc[best["best_trial"], "state"] == "COMPLETE"
    table = write_results(sweep)
    done = table["trial"].isin(trials.loc[trials["state"] == "COMPLETE", "trial"])
    assert table.loc[done, "optuna_value"].notna().all() and done.sum() == 2
    assert "Best parameters: {" not in said  # the plugin's line, with values as sampled
    assert "Best parameters (as the run used them): {" in said


@pytest.mark.slow  # about 8 s: a study of the fake task
def test_a_study_in_which_every_trial_diverges_has_no_best_trial(tmp_path):
    """Before, each was told 0.5 and the study named one the best. Here the grid sampler
    with two keys fixed on the command line: they leave its space (they were a traceback)."""
    fix = ["optim.absolute_threshold=0.01", "optim.variable_relative_threshold=0.5"]
    res, sweep = _study(tmp_path, fix, {"optim.lr": "choice(5.0, 6.0)"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no trial completed: the study has no best trial" in res.stdout + res.stderr
    assert not (sweep / "optimization_results.yaml").exists()
    trials = pd.read_csv(sweep / "optuna_trials.csv")
    assert list(trials["state"]) == ["PRUNED", "PRUNED"]


@pytest.mark.parametrize(
    "args, space, words",
    [
        (  # the grid sampler with a continuous key
            [],
            {"optim.lr": "tag(log, interval(0.01, 1.0))", "optim.absolute_threshold": "choice(1)"},
            ["hydra/sweeper/sampler=grid", "optim.lr", "choice("],
        ),
        (  # a loss as the monitor, and the default direction (maximize)
            ["+callbacks.model_checkpoint.mode=min", "optim.absolute_threshold=0.01"],
            {"optim.lr": "choice(0.1, 0.2)"},
            [
                "hydra.sweeper.direction=maximize",
                "callbacks.model_checkpoint.mode=min",
                "hydra.sweeper.direction=minimize",
            ],
        ),
    ],
    ids=["grid-continuous", "direction-vs-mode"],
)
@pytest.mark.slow  # about 8 s each: the sweeper's start (the checks: the fast tests below)
def test_a_study_that_cannot_be_right_is_one_line_before_any_trial(tmp_path, args, space, words):
    res, sweep = _study(tmp_path, args, space)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    (line,) = [x for x in res.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ") and all(w in line for w in words), line
    assert not list(sweep.glob("*/metrics.json"))  # no trial ran


@pytest.mark.parametrize(
    "args, refused",
    [
        (["-m", "hydra/sweeper=optuna", "optim=adam"], True),
        (["-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"], True),
        (
            [
                "-m",
                "hydra/sweeper=optuna",
                "hydra.sweeper.direction=maximize",
                "+hydra.sweeper.params.optim.lr=interval(0.1, 1)",
            ],
            False,
        ),
        (["-m", "hydra/sweeper=tune", "optim=adam"], False),
    ],
)
def test_the_plugins_own_sweeper_config_is_one_line_pointing_to_tune(args, refused):
    from mtl_clippy.cli import check_overrides

    message = check_overrides(args, CONFIGS)
    if not refused:
        assert message is None
        return
    assert message is not None and "\n" not in message
    assert "hydra/sweeper=tune" in message and "hydra.sweeper.direction" in message


def test_the_command_line_changes_and_fixes_the_space_searched():
    space = {"optim.lr": "interval(0.1, 1)", "optim.absolute_threshold": "interval(0.1, 1)"}
    args = ["optim.lr=0.5", "model.dropout=choice(0,0.5)", "seed=3", "+x=1,2"]
    merged, fixed = merged_space(space, args)
    assert merged == {
        "optim.absolute_threshold": "interval(0.1, 1)",
        "model.dropout": "choice(0,0.5)",
        "+x": "1,2",
    }
    assert fixed == {"optim.lr": "0.5"}  # seed was not in the space: not "fixed"
    assert merged_space(space, ["optim.lr=tag(log, interval(1, 2))"])[0]["optim.lr"] == (
        "tag(log, interval(1, 2))"
    )


@pytest.mark.parametrize(
    "space, bad",
    [
        ({"optim.lr": "interval(0.1, 1)", "seed": "1,2"}, ["optim.lr"]),
        ({"optim.lr": "tag(log, interval(0.1, 1))", "a": "interval(1, 2)"}, ["optim.lr", "a"]),
        ({"optim.lr": "choice(0.1, 1)", "seed": "range(1, 4)"}, []),
    ],
)
def test_the_grid_sampler_refuses_continuous_keys_in_one_line(space, bad):
    if not bad:
        check_grid(space)
        return
    with pytest.raises(ConfigError) as info:
        check_grid(space)
    message = str(info.value)
    assert "\n" not in message and "hydra/sweeper/sampler=grid" in message
    assert all(k in message for k in bad) and "seed" not in message


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("mode", ["max", "min", None])
def test_the_direction_must_agree_with_the_checkpoint_mode(direction, mode):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"callbacks": {"model_checkpoint": {"mode": mode, "monitor": "val/m"}}} if mode else {}
    )
    agree = mode is None or {"max": "maximize", "min": "minimize"}[mode] == direction
    if agree:
        check_direction(direction, cfg)
        return
    with pytest.raises(ConfigError) as info:
        check_direction(direction, cfg)
    message = str(info.value)
    assert "\n" not in message and f"hydra.sweeper.direction={direction}" in message
    assert f"callbacks.model_checkpoint.mode={mode}" in message
    assert "hydra.sweeper.direction=" + {"max": "maximize", "min": "minimize"}[mode] in message

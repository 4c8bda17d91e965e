"""The run summary (``metrics.json``): one typed object, written and read back unchanged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mtl_clippy.summary import (
    ABSENT,
    METRICS_FILE,
    Divergence,
    RunSummary,
    format_summary,
    judge_stability,
    stability_of,
)

#: A completed run's metrics.json, key order as written.
COMPLETED = {
    "status": "completed", "stability": "spiked", "model": "shared_bottom", "optim": "clippy",
    "lr": 0.1, "seed": 1,
    "overrides": ["optim=clippy"], "epochs": 2, "steps": 20, "wall_time_s": 3.5,
    "samples_per_s": 1234.0, "optimizer_path": "foreach",
    "val": {"auc_click": 0.7, "auc_mean": 0.7}, "best": {"monitor": "val/auc_mean", "score": 0.7},
    "test": {"auc_click": 0.69}, "bayes": None,
    "divergence": {"verdict": "spiked", "step": None, "detected_step": None,
                   "last_finite_loss": 0.12, "spikes": 1, "spike_steps": [7], "spike_peaks": [14.2],
                   "open_rise_step": None, "reason": None},
    "max_abs_logit": 3.2, "collapsed": [], "error": None, "output_dir": "/runs/x",
    "resumed_from": None, "threads": 2, "oov_rate": None, "early_stopping": "val/auc_mean",
    "precision": "32-true",
}  # fmt: skip


def test_a_summary_is_written_and_read_back_with_the_same_keys_in_the_same_order(tmp_path):
    summary = RunSummary.from_json(COMPLETED)
    assert isinstance(summary.divergence, Divergence) and summary.divergence.spikes == 1
    assert summary.to_json() == COMPLETED and list(summary.to_json()) == list(COMPLETED)
    summary.write(tmp_path)
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == COMPLETED
    assert RunSummary.read(tmp_path) == summary
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary, renamed


def test_a_new_summary_writes_only_the_keys_of_a_run_that_got_nowhere():
    """A run refused at its configuration has none of the keys from ``resumed_from`` on, and
    no ``stability`` (a run that did not complete or diverge has no verdict)."""
    written = RunSummary(error="ConfigError: x").to_json()
    before = list(COMPLETED)[: list(COMPLETED).index("resumed_from")]
    assert list(written) == [k for k in before if k != "stability"]
    assert written["divergence"] == Divergence().to_json() and written["status"] == "failed"
    assert written["divergence"]["spikes"] == 0 and written["divergence"]["verdict"] is None


def test_an_older_file_reads_its_missing_keys_as_none_and_keeps_unknown_ones():
    old = {"status": "completed", "test": {"auc_click": 0.7}, "from_the_future": [1, 2]}
    summary = RunSummary.from_json(old)
    assert summary.model is None and summary.epochs is None and summary.divergence.spikes is None
    assert summary.threads is ABSENT and "threads" not in summary.to_json()  # stays absent
    assert summary.to_json()["from_the_future"] == [1, 2]


def test_a_foreign_file_is_a_value_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError):
        RunSummary.read(tmp_path)
    (tmp_path / METRICS_FILE).write_text('{"status": "comp')
    with pytest.raises(ValueError):
        RunSummary.read(tmp_path)


def test_the_printed_table_is_the_same_for_the_object_and_its_json():
    summary = RunSummary.from_json(COMPLETED)
    assert format_summary(summary) == format_summary(COMPLETED)
    assert "| click        | 0.7000  | 0.6900   |" in format_summary(summary)


def test_every_key_has_a_declared_json_type():
    """A key added to ``RunSummary`` must say what it holds (or reading any file fails)."""
    from mtl_clippy import summary as summary_mod

    names = {f.name for f in dataclasses.fields(RunSummary)} - {"extra"}
    assert set(summary_mod._KINDS) == names
    assert set(summary_mod._DIVERGENCE_KINDS) == {f.name for f in dataclasses.fields(Divergence)}


@pytest.mark.parametrize(
    ("key", "value"),
    [("best", [1]), ("best", "x"), ("test", "abc"), ("test", [0.5]),
     ("bayes", [1]), ("collapsed", 3), ("collapsed", [1]), ("overrides", 5), ("lr", "0.1"),
     ("steps", True), ("status", 1), ("divergence", 5), ("oov_rate", [])],
)  # fmt: skip
def test_a_value_of_another_type_than_declared_is_a_value_error_naming_its_key(key, value):
    with pytest.raises(ValueError, match=f"'{key}' should be"):
        RunSummary.from_json({**COMPLETED, key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [("step", "7"), ("spikes", [1]), ("spike_steps", 3), ("reason", 2), ("verdict", 1),
     ("detected_step", "9"), ("spike_peaks", ["x"]), ("open_rise_step", [])],
)  # fmt: skip
def test_a_divergence_value_of_another_type_is_a_value_error_naming_its_key(key, value):
    data = {**COMPLETED, "divergence": {**COMPLETED["divergence"], key: value}}
    with pytest.raises(ValueError, match=f"'divergence.{key}' should be"):
        RunSummary.from_json(data)


@pytest.mark.parametrize("key", ["val", "test", "bayes"])
def test_a_metric_that_is_not_a_number_is_a_value_error_naming_it(key):
    with pytest.raises(ValueError, match=f"'{key}.auc_click' should be a number or null"):
        RunSummary.from_json({**COMPLETED, key: {"auc_mean": 0.7, "auc_click": "0.7"}})


def test_null_and_any_number_are_accepted_where_declared():
    nulls = {k: None for k in COMPLETED}
    assert RunSummary.from_json(nulls).to_json()["test"] is None
    numbers = {**COMPLETED, "lr": 1, "steps": 20.0, "test": {"auc_click": None, "auc_x": 1}}
    assert RunSummary.from_json(numbers).to_json() == numbers


def test_what_a_run_writes_today_reads_back():
    """The shapes of a real run's keys (ClippyAdagrad's ``implementation()`` record, the OOV
    rates per field) pass the type check: a run's own file is never refused."""
    today = {
        **COMPLETED,
        "optimizer_path": {"dense": ["single"], "sparse": True, "sparse_paths": ["kernel"],
                           "fallback": None,
                           "groups": [{"dense": ["single"], "sparse": True,
                                       "sparse_paths": ["kernel"], "fallback": None}]},
        "oov_rate": {"train": 0.05, "per_field": {"train": {"categorical_1": 0.0}},
                     "min_count": 5, "untrained": ["categorical_5"]},
        "bayes": {"auc_click": 0.7, "logloss_click": 0.1},
        "stability": "diverged",
        "divergence": {"verdict": "diverged", "step": 12, "detected_step": 15,
                       "last_finite_loss": 0.1, "spikes": 2, "spike_steps": [3, 9],
                       "spike_peaks": [11.5, 30.25], "open_rise_step": None,
                       "reason": "non-finite loss (nan), inside a rise"},
        "resume_command": "python train.py resume=true", "traceback": "Traceback ...",
        "interrupted": {"signal": "SIGTERM", "step": 10, "requeued": True},
    }  # fmt: skip
    assert RunSummary.from_json(today).to_json() == today


def test_resume_on_a_finished_run_returns_its_metrics_json_as_the_file_holds_it(tmp_path):
    """An older file (fewer keys, a divergence key this version does not know): train()
    returns exactly its JSON, without the keys a ``RunSummary`` would add, and leaves it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtl_clippy.train import train

    older = {
        "status": "completed", "model": "sb", "optim": "clippy", "lr": 0.1, "seed": 1,
        "epochs": 1, "steps": 3, "val": {}, "best": {}, "test": {"auc_click": 0.6},
        "divergence": {"step": None, "spikes": 0, "future_key": 1}, "error": None,
    }  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text(json.dumps(older))
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=none"])
    OmegaConf.update(cfg, "paths.output_dir", str(run), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "data"), force_add=True)
    OmegaConf.update(cfg, "resume", True, force_add=True)
    assert train(cfg) == older
    assert json.loads((run / METRICS_FILE).read_text()) == older


def _completed(**changes):
    return RunSummary.from_json({**COMPLETED, **changes})


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "spiked"),
        ({"divergence": {**COMPLETED["divergence"], "verdict": "stable", "spikes": 0}}, "stable"),
        ({"status": "diverged", "test": None,
          "divergence": {**COMPLETED["divergence"], "verdict": "diverged", "step": 9}}, "diverged"),
        # every task at chance: collapsed, whatever the monitor saw
        ({"test": {"auc_click": 0.505, "auc_conversion": 0.49, "auc_mean": 0.4975},
          "collapsed": ["click", "conversion"]}, "collapsed"),
        # one task at chance is not a collapse of the run
        ({"test": {"auc_click": 0.505, "auc_conversion": 0.7, "auc_mean": 0.6},
          "collapsed": ["click"]}, "spiked"),
        ({"status": "failed"}, None),
        ({"status": "interrupted"}, None),
        # no monitor watched the run (callbacks=none): no verdict unless it collapsed
        ({"divergence": None}, None),
    ],
)  # fmt: skip
def test_the_run_judges_its_stability(changes, expected):
    summary = _completed(**changes)
    assert judge_stability(summary) == expected


def test_an_older_file_without_stability_gets_it_derived():
    old = {k: v for k, v in COMPLETED.items() if k != "stability"}
    old["divergence"] = {"step": None, "last_finite_loss": 0.1, "spikes": 0, "spike_steps": [],
                         "reason": None}  # fmt: skip
    summary = RunSummary.from_json(old)
    assert summary.stability is ABSENT and "stability" not in summary.to_json()  # kept as read
    assert stability_of(summary) == "stable"
    old["divergence"]["spikes"] = 2
    assert stability_of(RunSummary.from_json(old)) == "spiked"
    assert stability_of(RunSummary.from_json({**old, "status": "diverged"})) == "diverged"
    assert stability_of(RunSummary.from_json({"status": "failed"})) is None
    # a file that holds the key: as written, null included
    assert stability_of(RunSummary.from_json({**old, "stability": None})) is None
    assert stability_of(RunSummary.from_json(COMPLETED)) == "spiked"
    assert "completed (spiked)" in format_summary(COMPLETED)


def test_stability_is_a_string_or_null():
    with pytest.raises(ValueError, match="'stability' should be a string"):
        RunSummary.from_json({**COMPLETED, "stability": 1})

"""The run summary (``metrics.json``): one typed object, written and read back unchanged."""

from __future__ import annotations

import json

import pytest

from mtl_clippy.summary import ABSENT, METRICS_FILE, Divergence, RunSummary, format_summary

#: A completed run's metrics.json, key order as written.
COMPLETED = {
    "status": "completed", "model": "shared_bottom", "optim": "clippy", "lr": 0.1, "seed": 1,
    "overrides": ["optim=clippy"], "epochs": 2, "steps": 20, "wall_time_s": 3.5,
    "samples_per_s": 1234.0, "optimizer_path": "foreach",
    "val": {"auc_click": 0.7, "auc_mean": 0.7}, "best": {"monitor": "val/auc_mean", "score": 0.7},
    "test": {"auc_click": 0.69}, "bayes": None,
    "divergence": {"step": None, "last_finite_loss": None, "spikes": 0, "spike_steps": [],
                   "reason": None},
    "max_abs_logit": 3.2, "collapsed": [], "error": None, "output_dir": "/runs/x",
    "resumed_from": None, "threads": 2, "oov_rate": None, "early_stopping": "val/auc_mean",
    "precision": "32-true",
}  # fmt: skip


def test_a_summary_is_written_and_read_back_with_the_same_keys_in_the_same_order(tmp_path):
    summary = RunSummary.from_json(COMPLETED)
    assert isinstance(summary.divergence, Divergence) and summary.divergence.spikes == 0
    assert summary.to_json() == COMPLETED and list(summary.to_json()) == list(COMPLETED)
    summary.write(tmp_path)
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == COMPLETED
    assert RunSummary.read(tmp_path) == summary
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary, renamed


def test_a_new_summary_writes_only_the_keys_of_a_run_that_got_nowhere():
    """A run refused at its configuration has none of the keys from ``resumed_from`` on."""
    written = RunSummary(error="ConfigError: x").to_json()
    assert list(written) == list(COMPLETED)[: list(COMPLETED).index("resumed_from")]
    assert written["divergence"] == COMPLETED["divergence"] and written["status"] == "failed"


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

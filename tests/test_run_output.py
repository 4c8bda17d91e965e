"""What a run prints and what its train.log keeps (mtl_clippy.run_log): no library noise on
the console, the OOV share once, and in train.log the run's key facts and its result table;
a warning that matters still shows."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from app_helpers import ROOT, TINY, only_run
from mtl_clippy import run_log
from mtl_clippy.summary import RunSummary, format_summary

#: Lines of other libraries that say nothing about the run (mtl_clippy.run_log silences them).
NOISE = {
    "Lightning's tip on its cloud logger": r"💡 Tip|litlogger|litmodels",
    "the model summary's warning on mixed precision": r"not supported by the model summary",
    "torch's LeafSpec deprecation, raised in Lightning": r"isinstance\(treespec, LeafSpec\)",
    "torch's CUDA_HOME notice": r"CUDA_HOME",
    "any Python warning": r"\b\w*Warning: ",
    "a missing cache reported as unreadable": r"cannot be read; re-reading the source",
    "one OOV line per split": r"^(train|val|test): \d+ categorical values",
}
OOV_LINE = "categorical values mapped to the OOV slot"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `python train.py` on tiny data, with Python's warnings shown as a user sees them
    (run_train hides them) and a data folder of its own (its first read writes the caches)."""
    tmp = tmp_path_factory.mktemp("output")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["MTL_CLIPPY_DISABLE_FUSED"] = "1"
    args = [*TINY, "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0"]
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res, only_run(tmp), args


def test_a_run_prints_no_library_noise_and_the_oov_share_once(tiny_run):
    res, _, _ = tiny_run
    console = res.stdout + res.stderr
    for what, pattern in NOISE.items():
        found = re.findall(f".*(?:{pattern}).*", console, flags=re.MULTILINE)
        assert not found, f"{what}: {found}"
    assert console.count(OOV_LINE) == 1
    assert re.search(r"train [\d.]+ %, val [\d.]+ %, test [\d.]+ %", console)
    # what tells the user about the run stays: the device, the table, the folder
    assert "GPU available:" in console and "| task " in console and "run folder:" in console
    assert console.count("run folder:") == 1


def test_train_log_holds_the_key_facts_and_the_result_table(tiny_run):
    res, run, args = tiny_run
    log = (run / "train.log").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert format_summary(RunSummary.from_json(metrics)) in log  # the table, as printed
    assert format_summary(RunSummary.from_json(metrics)) in res.stdout
    facts = [
        f"command: python {ROOT / 'train.py'} " + " ".join(args),  # as typed
        "overrides: " + " ".join(args),
        "model: sb (SharedBottom)",
        "optimizer: clippy (ClippyAdagrad), lr 0.1",
        "seed: 42",
        "2700 train, 300 val, 1500 test rows",
        f"precision: {metrics['precision']}; threads: {metrics['threads']}",
        f"output folder: {run}",
        "result: status completed",
        f"epochs: {metrics['epochs']} (best epoch {metrics['best']['epoch'] + 1})",
        f"wall time: {metrics['wall_time_s']} s",
        "optimizer path: dense: ",
        f"run folder: {run}",
    ]
    for fact in facts:
        assert fact in log, fact
    # Lightning's own lines reach the file, as they reach the console
    assert "GPU available:" in log and "`Trainer.fit` stopped" in log
    assert log.count(OOV_LINE) == 1
    assert not re.search(NOISE["Lightning's tip on its cloud logger"], log)


@pytest.fixture
def default_warnings():
    """Python's default warning filters (as a user's process has them), with
    mtl_clippy.run_log's filters on top; the warnings shown are recorded."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        run_log.quiet_libraries()
        yield shown


def _warn_from(module: str, message: str, category: type[Warning]) -> None:
    warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)


def test_the_filters_silence_exactly_the_library_noise(default_warnings):
    _warn_from(
        "lightning.pytorch.utilities.model_summary.model_summary",
        "Precision bf16-mixed is not supported by the model summary.  Estimated model size "
        "in MB will not be accurate. Using 32 bits instead.",
        UserWarning,
    )
    _warn_from(
        "lightning.pytorch.utilities._pytree",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) "
        "and treespec.is_leaf()` instead.",
        FutureWarning,
    )
    assert not default_warnings
    # the same text from another module, or another of the module's warnings, still shows
    _warn_from("mtl_clippy.models.module", "Precision bf16-mixed is not supported by the model summary", UserWarning)  # fmt: skip
    _warn_from("lightning.pytorch.utilities._pytree", "something else", FutureWarning)
    assert len(default_warnings) == 2


def test_the_clippy_compile_fallback_warning_still_shows(default_warnings):
    from mtl_clippy.optim import clippy

    clippy._warn_fallback("cpu", "torch.float32", "no C++ compiler")
    assert [w.category for w in default_warnings] == [RuntimeWarning]
    assert "could not be compiled" in str(default_warnings[0].message)


def test_lightning_tips_are_dropped_and_its_other_lines_kept():
    import lightning.pytorch  # noqa: F401  (its loggers, at its levels)

    run_log.quiet_libraries()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    for logger in (lightning_log, torch_log):
        logger.addHandler(handler)
    try:
        lightning_log.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        lightning_log.info("GPU available: False, used: False")
        torch_log.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'")
        torch_log.warning("the compiler does not match the one torch was built with")
    finally:
        for logger in (lightning_log, torch_log):
            logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "GPU available: False, used: False",
        "the compiler does not match the one torch was built with",
    ]


def test_the_outcome_names_a_divergence_and_the_log_file_keeps_it(tmp_path):
    summary = RunSummary(
        status="diverged", model="sb", optim="adam", lr=1.0, seed=0, output_dir=str(tmp_path)
    )
    summary.divergence.step, summary.divergence.reason = 7, "loss is nan"
    lines = run_log.outcome_lines(summary)
    assert "run diverged at step 7: loss is nan (no test: status diverged)" in lines
    assert lines[-1] == f"run folder: {tmp_path}"
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(handler)
    try:
        run_log.quiet_libraries()
        run_log.record_end(summary)
    finally:
        root.removeHandler(handler)
        handler.close()
    log = Path(tmp_path / "train.log").read_text()
    assert "result: status diverged" in log and "run diverged at step 7" in log


def test_python_warnings_also_reach_the_log_file(tmp_path, monkeypatch):
    """train.py's entry point wraps warnings.showwarning: a warning prints as usual and is
    also written to train.log (here: a file handler of the root logger, as Hydra's)."""
    monkeypatch.setattr(run_log, "_installed", set())
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as printed:  # puts showwarning back after
            run_log.log_warnings_to_file()
            warnings.showwarning(
                RuntimeWarning("ClippyAdagrad: the compiled (fused) step could not be compiled"),
                RuntimeWarning,
                "clippy.py",
                7,
            )
    finally:
        root.removeHandler(handler)
        handler.close()
    assert len(printed) == 1  # the console's copy, as before
    log = (tmp_path / "train.log").read_text()
    assert "clippy.py:7: RuntimeWarning: ClippyAdagrad: the compiled (fused) step" in log


def test_a_run_that_fails_on_its_data_still_logs_what_it_was(tmp_path):
    """The command, overrides, model and optimizer are written before the data is read; the
    optimizer path of a run that never fitted says so (not "not ClippyAdagrad")."""
    from app_helpers import run_train

    missing = tmp_path / "no_such_folder"
    res = run_train(["data=aliexpress", f"data.data_dir={missing}", "optim=clippy"], tmp_path)
    assert res.returncode != 0
    log = (only_run(tmp_path) / "train.log").read_text()
    assert "run:\n" in log and f"data.data_dir={missing}" in log
    assert "optimizer: clippy (ClippyAdagrad), lr 0.1" in log, log
    assert "result: status failed" in log
    assert "not recorded (not ClippyAdagrad, or the run stopped before its fit ended)" in log
    assert "optimizer path: not ClippyAdagrad" not in log

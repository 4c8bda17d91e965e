"""What a run prints, and what its ``train.log`` keeps.

A run's console says what the user needs to know about the run, once: our own messages
(the data, the OOV share, a warning that matters), Lightning's lines on the device and
precision, the progress bar, the results table. Lines of other libraries that say nothing
about the run are silenced here, each at its source and each for its stated reason
(:func:`quiet_libraries`): a precise filter on one message of one module, never a blanket one.

``train.log`` (Hydra's log file in the run folder; ``train_ddp_process_<rank>.log`` on DDP
ranks other than 0) holds everything the console logs, Lightning's own lines and the Python
warnings included (Lightning logs to loggers that do not reach Hydra's handlers), plus what
only the file keeps: the run's key facts as it starts (:func:`record_start`) and its outcome
with the per-task table as it ends (:func:`record_end`).
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from collections.abc import Mapping
from typing import Any

#: The loggers that write only to the run's log files (Hydra's file handlers of the root
#: logger), never to the console: the key facts and the outcome.
FILE_LOG = "mtl_clippy.run_log"

#: Lightning's loggers: Lightning gives them a console handler of their own and stops them
#: from propagating (when imported before logging is configured, as here), so their lines
#: never reached train.log.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _RootFiles(logging.Handler):
    """Hands a record to the root logger's current file handlers (Hydra's ``train.log``):
    looked up at each record, so that each job of a sweep writes to its own file."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_ROOT_FILES = _RootFiles()
_installed: set[str] = set()


def quiet_libraries() -> None:
    """Silence the lines of other libraries that tell a user nothing about their run, and
    send Lightning's lines to ``train.log`` too. Idempotent; called as each run starts
    (a test harness may have reset the warning filters since the last)."""
    # Lightning 2.6 advertises its cloud logger and model registry on every Trainer (the
    # "💡 Tip: ... litlogger / litmodels" line): an advertisement, not a fact about the run.
    # Its other lines on that logger (GPU available, `Trainer.fit` stopped, ...) stay.
    if "tips" not in _installed:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
            _DropMessages("💡 Tip:")
        )
        _installed.add("tips")
    # A CUDA build of torch on a machine without a CUDA runtime logs this on importing
    # torch.utils.cpp_extension (the sparse kernel's build, torch.compile): the run uses
    # the CPU or the GPU it found, and CUDA_HOME plays no part in it. Its other warnings
    # (a compiler that does not match torch's) stay.
    if "cuda_home" not in _installed:
        logging.getLogger("torch.utils.cpp_extension").addFilter(
            _DropMessages("No CUDA runtime is found")
        )
        _installed.add("cuda_home")
    # Under bf16-mixed / 16-mixed the parameters stay float32 (autocast computes in the
    # lower precision), so the model summary's "using 32 bits instead" *is* the right size:
    # the warning that it "will not be accurate" is wrong for these precisions.
    warnings.filterwarnings(
        "ignore",
        message=r"Precision (bf)?16-mixed is not supported by the model summary",
        category=UserWarning,
        module=r"lightning\.pytorch\.utilities\.model_summary\.model_summary",
    )
    # Lightning 2.6 builds torch's LeafSpec, deprecated in torch 2.13, for every data
    # loader it wraps (CombinedLoader): Lightning's code to change, not ours or the user's.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    if "files" not in _installed:
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).addHandler(_ROOT_FILES)
        _file_logger()
        _installed.add("files")


def _file_logger() -> logging.Logger:
    file_log = logging.getLogger(FILE_LOG)
    if _ROOT_FILES not in file_log.handlers:
        file_log.addHandler(_ROOT_FILES)
        file_log.setLevel(logging.INFO)
        file_log.propagate = False  # the file only: the console shows the table itself
    return file_log


def log_warnings_to_file() -> None:
    """Python warnings still print to stderr as usual, and are also written to the log file.
    For ``python train.py`` itself (its entry point calls it once, first thing): it wraps the
    process's ``warnings.showwarning``, which a test harness replaces with its own."""
    if "warnings" in _installed:
        return
    _installed.add("warnings")
    _file_logger()
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        shown(message, category, filename, lineno, file, line)
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        _file_logger().warning("%s", text)

    warnings.showwarning = show


def to_file(message: str, *args: Any, level: int = logging.INFO) -> None:
    """A line (or block) for the run's log file only."""
    logging.getLogger(FILE_LOG).log(level, message, *args)


def command_line() -> str:
    """This process's command line, as a shell would take it."""
    return " ".join(["python", *(shlex.quote(a) for a in sys.argv)])


def record_command(cfg: Any, summary: Any) -> None:
    """What the run is, first thing (before its data is read, so that a run that fails
    early still names its command): the command line, its overrides, model, optimizer, seed
    and output folder. (The log never stops a run.)"""
    try:
        to_file(_command_text(cfg, summary))
    except Exception as exc:  # the run goes on; the file says what is missing
        to_file("run: its command could not be listed (%s: %s)", type(exc).__name__, exc)


def _command_text(cfg: Any, summary: Any) -> str:
    return "\n".join(
        [
            "run:",
            f"  command: {command_line()}",
            f"  overrides: {' '.join(summary.overrides or []) or '(none)'}",
            f"  model: {summary.model} ({_target(cfg, 'model')})",
            f"  optimizer: {summary.optim} ({_target(cfg, 'optim')}), lr {summary.lr}",
            f"  seed: {summary.seed}",
            f"  output folder: {summary.output_dir}",
        ]
    )


def record_start(cfg: Any, summary: Any, datamodule: Any, trainer: Any) -> None:
    """The rest of the run's key facts, as it starts fitting: its data, precision, threads
    and devices. (A fact that cannot be read is written as such: the log never stops a run.)"""
    try:
        to_file(_start_text(cfg, summary, datamodule, trainer))
    except Exception as exc:  # the run goes on; the file says what is missing
        to_file("run: its key facts could not be listed (%s: %s)", type(exc).__name__, exc)


def _start_text(cfg: Any, summary: Any, datamodule: Any, trainer: Any) -> str:
    extra = getattr(getattr(datamodule, "metadata", None), "extra", {}) or {}
    rows = extra.get("rows") or {}
    source = getattr(datamodule, "source_dir", None) or extra.get("source")
    lines = [
        "run, as it starts fitting:",
        f"  data: {source}{' (generated)' if extra.get('source') == 'synthetic' else ''}: "
        + ", ".join(f"{rows[k]} {k}" for k in ("train", "val", "test") if k in rows)
        + " rows",
        f"  precision: {summary.precision}; threads: {summary.threads}; "
        f"device: {trainer.strategy.root_device}, {trainer.world_size} process(es)",
    ]
    return "\n".join(lines)


def outcome_lines(summary: Any) -> list[str]:
    """The per-task table a run prints as it ends, then a line for each thing a reader must
    know about the result (diverged, collapsed tasks, which checkpoint was tested when not
    the best by a metric), then the run folder."""
    from mtl_clippy import config_checks
    from mtl_clippy.summary import COLLAPSE_TOLERANCE, format_summary

    lines = [format_summary(summary)]
    if summary.status == "diverged":
        div = summary.divergence
        lines += ["", f"run diverged at step {div.step}: {div.reason} (no test: status diverged)"]
    if summary.collapsed:
        lines += [
            "",
            f"collapsed tasks (test AUC within {COLLAPSE_TOLERANCE} of 0.5): "
            + ", ".join(summary.collapsed),
        ]
    chosen = str((summary.best or {}).get("monitor"))
    if chosen == config_checks.NO_VALIDATION:
        lines += ["", "no validation: early stopping off, the last epoch's checkpoint was tested"]
    elif chosen.startswith("last epoch ("):  # a validation metric that stayed undefined
        lines += ["", f"best.ckpt: {chosen}; the last epoch's checkpoint was tested"]
    return [*lines, "", f"run folder: {summary.output_dir}"]


def record_end(summary: Any) -> None:
    """The run's outcome in the log file: status, epochs, time, the optimizer's path, and
    the per-task table with its notes as printed (or the error of a run that failed)."""
    try:
        to_file(_end_text(summary))
    except Exception as exc:  # the result is in metrics.json whatever happens here
        to_file("result: could not be listed (%s: %s)", type(exc).__name__, exc)


def _end_text(summary: Any) -> str:
    best = summary.best if isinstance(summary.best, Mapping) else {}
    epoch = best.get("epoch")
    lines = [
        f"result: status {summary.status}"
        + (
            f" ({summary.stability})"
            if isinstance(summary.stability, str) and summary.stability != summary.status
            else ""
        ),
        f"  epochs: {summary.epochs}"
        + (f" (best epoch {epoch + 1})" if isinstance(epoch, int) else "")
        + f", steps: {summary.steps}, wall time: {summary.wall_time_s} s",
        f"  optimizer path: {_path(summary.optimizer_path)}",
    ]
    if summary.error:
        lines.append(f"  error: {summary.error}")
    if summary.status in ("completed", "diverged"):
        lines += ["", *outcome_lines(summary)]
    else:
        lines.append(f"run folder: {summary.output_dir}")
    return "\n".join(lines)


def _path(path: Any) -> str:
    """ClippyAdagrad's record of its implementations, short; None: none recorded."""
    if isinstance(path, Mapping):
        return "; ".join(f"{k}: {v}" for k, v in path.items() if k != "groups")
    if path is None:  # recorded when the fit ends, for ClippyAdagrad only
        return "not recorded (not ClippyAdagrad, or the run stopped before its fit ended)"
    return str(path)


def _target(cfg: Any, key: str) -> str:
    try:
        target = cfg[key]["_target_"]
    except Exception:
        return "?"
    return str(target).rsplit(".", 1)[-1]

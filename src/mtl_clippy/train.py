"""The task function of ``python train.py``: check, seed, build, fit, test, summarise.

Every run writes ``metrics.json`` in its folder (the single source for sweep tables and
reports), whatever its outcome: ``completed``, ``diverged``, ``failed`` or ``interrupted``
(``mtl_clippy.summary.RunSummary``). What is not the task lives in modules of its own: the
objects of a run (``build``), the checks before fitting (``run_checks``), where a resumed run
starts (``resume_point``), the loggers (``loggers``), threads and precision (``runtime``),
ranks and DDP (``distributed``), stopping on a signal (``preemption``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from mtl_clippy import best as best_mod
from mtl_clippy import (
    config_checks,
    distributed,
    launch,
    preemption,
    run_checks,
    run_log,
    runtime,
)
from mtl_clippy import resume as resume_mod
from mtl_clippy.atomic import remove_dead_temporaries
from mtl_clippy.build import build, build_callbacks, build_trainer
from mtl_clippy.callbacks import (
    AtomicCheckpointIO,
    DivergenceMonitor,
    ResumeState,
    StepCheckpoint,
    ThroughputMeter,
    TrainingDiverged,
    prune_finished_run,
)
from mtl_clippy.errors import (
    DiskFull,
    full_disk_reported,
    innermost_message,
    reported,
    user_error_types,
)
from mtl_clippy.loggers import instantiate_loggers, log_results
from mtl_clippy.resume_point import resume_point
from mtl_clippy.summary import (
    Divergence,
    RunSummary,
    collapsed_tasks,
    judge_stability,
    split_metrics,
)

log = logging.getLogger("mtl_clippy")

__all__ = ["build", "main", "register_resolvers", "train"]


def register_resolvers() -> None:
    """Config resolvers used by configs/hydra (a process id keeps sweep folders unique)."""
    if not OmegaConf.has_resolver("mtl_clippy.pid"):
        OmegaConf.register_new_resolver("mtl_clippy.pid", lambda: str(os.getpid()), use_cache=True)
    # The launch folder, usable before Hydra's runtime config exists (sweep folders are
    # resolved by the launcher, where ${hydra:runtime.cwd} is not available yet).
    if not OmegaConf.has_resolver("mtl_clippy.cwd"):
        OmegaConf.register_new_resolver("mtl_clippy.cwd", os.getcwd, use_cache=True)
    resume_mod.register_resolvers()
    launch.register_resolvers()


register_resolvers()


# ----------------------------------------------------------------------------- the task


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration; returns (and writes) its ``metrics.json`` content."""
    run_log.quiet_libraries()  # other libraries' noise off; Lightning's lines to train.log
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = _new_summary(cfg, out_dir)
    run_log.record_command(cfg, summary)  # train.log: what the run is, before anything can fail
    t_start = time.perf_counter()
    run_checks.check_values(cfg, summary, out_dir, t_start)  # a bad value: one line, recorded
    distributed.set_rank(cfg.trainer)
    if distributed.is_global_zero():  # metrics.json.tmp<pid> (...) of a run killed writing them
        remove_dead_temporaries(out_dir)
    start = resume_point(cfg, out_dir)
    if start.previous is not None:  # resume=true on a run that had already finished
        log.info("this run had already completed; nothing to resume (%s)", out_dir)
        return start.previous  # the file's JSON as it is (an older file's keys, no more)
    summary.resumed_from = os.path.relpath(start.ckpt_path, out_dir) if start.ckpt_path else None
    trainer: pl.Trainer | None = None
    try:
        # SIGTERM / SIGINT (/ SLURM's SIGUSR1): checkpoint the current step, then stop.
        stop_on_signal = preemption.StopOnSignal.for_config(cfg)
        summary.threads = runtime.apply_threads(cfg.get("threads"))
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

        datamodule, module = build(cfg)
        undefined = config_checks.check_data(cfg, datamodule)  # val metrics that stay NaN
        run_checks.check_checkpoint_vocabulary(start.ckpt_path, datamodule.metadata)
        run_checks.check_checkpoint_param_groups(start.ckpt_path, module)
        _record_data(summary, datamodule)

        throughput = ThroughputMeter()
        loggers = instantiate_loggers(cfg.get("logger"), start.step)
        ours = [throughput, ResumeState(), stop_on_signal, best_mod.ValidationRecord()]
        callbacks, summary.early_stopping = build_callbacks(cfg, ours, undefined, bool(loggers))
        precision = runtime.precision_of(cfg.trainer)
        summary.precision = str(precision)
        trainer = build_trainer(cfg, callbacks, loggers, precision, [AtomicCheckpointIO()])
        run_checks.check_processes(trainer)
        run_log.record_start(cfg, summary, datamodule, trainer)  # train.log: the key facts
        config_checks.check_batches(cfg, datamodule, trainer.world_size)
        if trainer.world_size > 1:
            distributed.children_run_this_job()

        diverged = _fit(trainer, module, datamodule, start.ckpt_path)
        _record_fit(summary, trainer, throughput)
        validation = config_checks.has_validation(cfg)
        summary.best, tested_val = best_mod.summary(
            tested_checkpoint(trainer), validation, out_dir, summary.val, summary.steps
        )
        if tested_val != summary.val and summary.val:
            # val describes the tested checkpoint, like test (null where that is not known);
            # the last epoch's stays apart
            summary.val_last, summary.val = summary.val, tested_val
        if diverged:  # a result, not a crash: no test numbers from a broken model
            summary.status = "diverged"
        else:
            if cfg.get("test", True):
                summary.test = _test_best(trainer, module, datamodule)
                summary.collapsed = collapsed_tasks(summary.test)
            summary.status = "completed"
            params = OmegaConf.to_container(cfg, resolve=True)
            log_results(trainer.loggers, params, summary.test, trainer.global_step)
        summary.stability = judge_stability(summary)
    except BaseException as exc:
        raised = _record_stop(summary, exc, trainer, out_dir)
        if raised is exc:
            raise
        raise raised from exc
    finally:
        preemption.settle()  # the result stands: a signal from here on changes nothing
        summary.wall_time_s = round(time.perf_counter() - t_start, 3)
        keep = run_checks.keeps_previous_metrics(summary, start.ckpt_path, trainer, out_dir)
        if distributed.is_global_zero(trainer) and not keep:  # keep: a resume refused
            summary.write(out_dir)
            _prune_checkpoints(cfg, summary, trainer)
        if distributed.is_global_zero(trainer):
            run_log.record_end(summary)  # train.log: the outcome and the per-task table
        preemption.uninstall()
    return summary.to_json()


# ----------------------------------------------------------------------------- its steps


def _new_summary(cfg: DictConfig, out_dir: Path) -> RunSummary:
    """The summary of a run that has not started: what it is (model, optimizer, lr, seed,
    overrides); status ``failed`` until it gets further."""
    choices = _choices()
    return RunSummary(
        model=_name_of(cfg.model, choices.get("model")),
        optim=_name_of(cfg.optim, choices.get("optim")),
        # a bad value is the run's error (check_values): recorded as None here, never a
        # crash (an interpolation that cannot be resolved reads as None too)
        lr=config_checks.number_or_none(_select(cfg, "optim.lr")),
        seed=config_checks.whole_or_none(_select(cfg, "seed")),
        overrides=_overrides(),
        output_dir=str(out_dir),
    )


def _choices() -> dict[str, str]:
    """The config-group choices of this run (model=..., optim=...), when run under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except Exception:
        return {}


def _overrides() -> list[str]:
    """The command line's overrides of this run, when run under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _name_of(cfg_node: Any, choice: str | None) -> str | None:
    if choice:
        return choice
    if isinstance(cfg_node, Mapping | DictConfig) and "_target_" in cfg_node:
        return str(cfg_node["_target_"]).rsplit(".", 1)[-1]
    return None


def _select(cfg: DictConfig, key: str) -> Any:
    """The value of ``key``, or None where it is missing or cannot be resolved."""
    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


def _record_data(summary: RunSummary, datamodule: Any) -> None:
    """What the summary takes from the data: the Bayes AUC and log loss of generated data,
    and the share of categorical cells mapped to the OOV slot, per split (and per field)."""
    extra = getattr(datamodule.metadata, "extra", {}) or {}
    if extra.get("bayes_auc"):
        summary.bayes = {f"auc_{k}": v for k, v in extra["bayes_auc"].items()}
        summary.bayes.update({f"logloss_{k}": v for k, v in extra.get("bayes_logloss", {}).items()})
    summary.oov_rate = getattr(datamodule, "oov_rate", None) or None


def _fit(trainer: pl.Trainer, module: Any, datamodule: Any, ckpt_path: str | None) -> bool:
    """Fit (from ``ckpt_path`` when resuming); whether training diverged."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingDiverged:
        return True
    return False


def _record_fit(summary: RunSummary, trainer: pl.Trainer, throughput: ThroughputMeter) -> None:
    """What the summary takes from a fit: divergence, epochs and steps, speed, which
    ClippyAdagrad implementation ran the steps (None for other optimizers), the last
    validation's metrics."""
    monitor = next((c for c in trainer.callbacks if isinstance(c, DivergenceMonitor)), None)
    if monitor is not None:
        summary.divergence = Divergence(**monitor.summary())
        summary.max_abs_logit = monitor.max_abs_logit
    summary.epochs = int(trainer.current_epoch)
    summary.steps = int(trainer.global_step)
    summary.samples_per_s = throughput.samples_per_s
    opt = trainer.optimizers[0] if trainer.optimizers else None
    summary.optimizer_path = getattr(opt, "implementation", lambda: None)()
    summary.val = split_metrics(trainer.callback_metrics, "val")


def tested_checkpoint(trainer: pl.Trainer) -> Any:
    """The checkpoint callback whose file is tested: the first that is not the every-N-steps
    :class:`StepCheckpoint` (Lightning's ``trainer.checkpoint_callback`` would be that one
    when ``callbacks.model_checkpoint=null``, and a mid-run step would be tested as if it
    were the best or the last epoch); None without one: the final weights are tested."""
    for callback in getattr(trainer, "checkpoint_callbacks", None) or []:
        if not isinstance(callback, StepCheckpoint):
            return callback
    return None


def _test_best(trainer: pl.Trainer, module: Any, datamodule: Any) -> dict[str, float | None]:
    """The test metrics of the best checkpoint (of the final weights without one)."""
    best_path = getattr(tested_checkpoint(trainer), "best_model_path", "") or ""
    results = trainer.test(
        module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False
    )
    return split_metrics(results[0] if results else {}, "test")


def _prune_checkpoints(cfg: DictConfig, summary: RunSummary, trainer: pl.Trainer | None) -> None:
    """A run that completed or diverged is never resumed: delete the checkpoints
    ``keep_checkpoints`` does not keep (after metrics.json, so that a kill in between leaves
    a finished run with a file too many, never one short). A file that cannot be deleted is
    a warning: the result stands."""
    if summary.status not in ("completed", "diverged") or trainer is None:
        return
    try:
        prune_finished_run(trainer, cfg.get("keep_checkpoints", "all"), tested_checkpoint(trainer))
    except OSError as exc:
        log.warning("could not delete a checkpoint the run no longer needs: %s", exc)


def _record_stop(
    summary: RunSummary, exc: BaseException, trainer: pl.Trainer | None, out_dir: Path
) -> BaseException:
    """Record why the run stopped early in ``summary``; the exception to raise for it.

    A signal or Ctrl-C is status ``interrupted`` (``preemption.record``: the steps, the
    resume command), raised as ``RunInterrupted``. Anything else is status ``failed`` with
    its one-line error (and its traceback, unless a user's mistake); a full disk in any
    wrapper (a logger's thread, a library's error) is named now, as ``DiskFull``, so that it
    stays the first failure reported when metrics.json then fails too.
    """
    stop = preemption.interruption(exc)
    if stop is not None:
        preemption.record(summary, stop, trainer, out_dir)
        return stop
    summary.status = "failed"
    full = reported(exc, out_dir) if isinstance(exc, Exception) else None
    shown = full if full is not None else exc
    summary.error = f"{type(shown).__name__}: {innermost_message(shown, out_dir)}"
    if not isinstance(shown, user_error_types()):
        summary.traceback = traceback.format_exc()
    return shown


# ----------------------------------------------------------------------------- entry point


def main(cfg: DictConfig) -> float | None:
    """Entry point used by ``train.py`` under ``@hydra.main``.

    A single run re-raises user mistakes as one clear line (exit status 2) and other errors
    as usual. In a sweep, a failing job is recorded (``metrics.json`` with status ``failed``
    and its error) and the sweep goes on; the results table lists it. A full disk ends the
    sweep (one line, status 2): every later job would fail on it too.

    Returns metrics.json's ``best.score`` (``mtl_clippy.best.score``), which a Hydra sweeper
    (Optuna) optimises: the best value of ``callbacks.model_checkpoint.monitor``, higher is
    better for the default ``val/auc_mean`` (``direction: maximize``), lower for a loss;
    None when no metric chose the checkpoint, or the job failed.
    """
    multirun = distributed.is_multirun()
    env_before = {k: os.environ.get(k) for k in distributed.DDP_ENV}
    run_dir = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
    try:
        with full_disk_reported(run_dir):  # a full disk, however it arrives: one line, status 2
            summary = RunSummary.from_json(train(cfg))
    except preemption.RunInterrupted as exc:  # one line, 143 / 130; ends a sweep too
        preemption.exit_interrupted(exc)
    except user_error_types() as exc:
        message = f"error: {innermost_message(exc, run_dir)}"
        if multirun and isinstance(exc, DiskFull):  # the next jobs would fail too: stop
            print(message, file=sys.stderr)
            sys.exit(2)
        if multirun:
            log.error("job failed: %s", message)
            return None
        print(message, file=sys.stderr)
        sys.exit(2)
    except Exception:
        if multirun:
            log.exception("job failed")
            return None
        raise
    finally:
        if multirun:
            distributed.end_distributed(env_before)
    if not distributed.is_global_zero():  # other DDP ranks: rank 0 reports
        return best_mod.score(summary.best)
    _print_outcome(summary, multirun)  # the table, its notes, the run folder
    return best_mod.score(summary.best)  # what a sweeper optimises: best.score


def _print_outcome(summary: RunSummary, multirun: bool) -> None:
    """The per-task table, then a line for each thing a reader must know about the result
    (``run_log.outcome_lines``; train.log holds the same, ``run_log.record_end``)."""
    if summary.status == "diverged" and multirun:
        div = summary.divergence
        log.warning(f"run diverged at step {div.step}: {div.reason} (no test: status diverged)")
    print()
    print("\n".join(run_log.outcome_lines(summary)))

"""Stopping a run on a signal so that it continues where it stopped.

A scheduler preempts a job with SIGTERM (SLURM, Kubernetes and most batch systems), a person
stops a run with Ctrl-C (SIGINT), and SLURM can warn a job before its time limit with a
signal of its choice (``#SBATCH --signal=USR1@90``). Killed outright, a run loses the steps
since its last periodic checkpoint and leaves a ``metrics.json`` that says nothing useful.
Told by a signal, it stops like this instead:

1. It finishes the optimizer step in progress, since a step cut in half leaves weights and
   optimizer state that belong to no step, then saves a checkpoint of it,
   ``<run>/checkpoints/step-<n>.ckpt``. The checkpoint is taken at the same point of the
   step as the periodic one (``StepCheckpoint``) and with the same content: the data
   position inside the epoch, the random generators, the optimizer. ``resume=true`` picks
   it, as the newest checkpoint, and continues to the numbers of an uninterrupted run.
2. It writes ``metrics.json`` with ``"status": "interrupted"``, the steps done and
   ``resume_command``, the command that continues it.
3. It prints one line on stderr saying so, and exits with status 128 + the signal's number,
   as a shell reports a process that the signal ended: 143 for SIGTERM, 130 for SIGINT, 138
   for SIGUSR1. SIGHUP (a closed terminal or ssh connection) stops it like SIGTERM, with 129.

Where the signal finds no training step in progress:

* before training (data and model being built) and between training and testing, the run
  stops at once: there is nothing new to save;
* during validation, testing or the sanity check, and during the last training batch of an
  epoch, it stops after the current batch without a new checkpoint. A checkpoint between an
  epoch's last batch and its validation could not resume that validation. ``resume=true``
  continues from the newest checkpoint, at most
  ``callbacks.step_checkpoint.every_n_train_steps`` steps (or an epoch's validation) back;
* a second Ctrl-C stops at once, without waiting for the step to end. Other repeated signals
  are ignored, since the run is already stopping;
* before the run can record a stop (``train.py``'s task has started, the configuration and
  the resume point are being checked), :func:`guard`'s handlers note the signal and the run
  stops on it as soon as it can, with ``metrics.json`` saying ``interrupted``;
* once ``metrics.json`` is being written with the result, a signal changes nothing: the run
  ends as it would have, with one line saying that the signal came too late.

DataLoader workers ignore the signals (:class:`WorkerInit`): a scheduler signals the whole
process group, and a worker killed by it made the run fail before it could save its step.

How it fits with Lightning: Lightning's trainer installs its own SIGTERM handler while it
runs. The handler sets ``trainer.received_sigterm`` and raises ``SIGTERMException`` at its
next check; that exception is a ``SystemExit`` with status 0, so without this module a
preempted run exited 0. Lightning calls any handler installed before its own, so
:class:`StopOnSignal` installs its handler for the whole task. While the trainer runs, the
handler only records the signal. The stop itself happens in the callback's
``on_train_batch_end``, after the step and before Lightning's own check. Lightning catches
what the callback raises, tears down (restoring the handlers) and re-raises it to
``train``. Lightning handles Ctrl-C by raising ``KeyboardInterrupt`` wherever the program
is, even in the middle of an optimizer step, then calls ``sys.exit(1)``. With this handler
installed, SIGINT takes the SIGTERM path.

DDP: every rank must stop at the same step, since saving a checkpoint is a collective call.
Under SLURM a signal reaches all ranks, but not at the same instant, so the ranks agree on
it at every step: one all-reduce of a number, the signal or 0, which Lightning's own
per-step SIGTERM broadcast already costs too. Lightning's SIGTERM handler is not fit for
this. It broadcasts from inside the handler, at whatever point of a step the signal finds
each rank, and each rank then stops at its own next check. A SIGTERM at the wrong moment of
a 2-process CPU run broke gloo's connection, and the other rank hung. Under DDP this
callback therefore takes SIGTERM back once the trainer has started. As Lightning's handler
does, it passes the signal on to the ranks that Lightning's launcher started. The ranks do
not stop inside validation, where they do not meet: they agree at the next step, at the
end of training, or at the end of testing. Only global rank 0 writes ``metrics.json``,
prints and requeues.

SLURM requeue (``slurm_requeue=true``): inside a SLURM job, SIGUSR1 also stops the run with a
checkpoint of the current step. Global rank 0 then calls ``scontrol requeue <job>``, and the
run exits. The requeued job runs the batch script again; with ``resume=true`` there, it
continues from that checkpoint. Lightning's own SLURM auto-requeue
(``SLURMEnvironment(auto_requeue=True)``, the default under SLURM) is not used, for three
reasons. It saves its checkpoint inside the signal handler, at whatever point of a step the
signal arrives. It saves ``hpc_ckpt_<n>.ckpt`` into the trainer's root folder, which this
project's resume does not look in. And it loads that file only in a process with the same
root folder, while every new run gets a new one. Lightning installs its handler only where
none exists, so ours replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mtl_clippy.errors import ConfigError
from mtl_clippy.summary import RunSummary

log = logging.getLogger("mtl_clippy")

#: Signals that stop a run with a checkpoint of its current step. SIGHUP (the terminal or
#: the ssh connection of an interactive run went away) is taken as SIGTERM: without a
#: handler it kills the run outright, between two checkpoints and without metrics.json.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Inside a SLURM job with ``slurm_requeue=true``: stop with a checkpoint, then requeue.
REQUEUE_SIGNAL = signal.SIGUSR1

#: Overrides that say how a run starts (dropped from the resume command, which adds its own).
_START_KEYS = ("resume", "ckpt_path")
#: Overrides that Hydra adds to those of the command line (its run mode).
_HYDRA_OWN = ("hydra.mode",)


class RunInterrupted(BaseException):
    """The run stops because it received ``signum``.

    It derives from ``BaseException``, as ``KeyboardInterrupt`` does, so that no ``except
    Exception`` on its way stops it and goes on: a sweep's handling of a failed job, or
    Hydra's. ``train`` records the stop in ``metrics.json``, and ``train.main`` prints
    ``message`` and exits with ``exit_code``.
    """

    def __init__(self, signum: int, forced: bool = False) -> None:
        self.signum = int(signum)
        self.forced = forced  # a second Ctrl-C: stopped without waiting for the step
        self.checkpoint: str | None = None  # saved on this signal
        self.requeue = False  # slurm_requeue was on when the signal came
        self.message = f"interrupted by {signal_name(signum)}"
        super().__init__(self.message)

    def __reduce__(self) -> tuple:  # to cross process boundaries (a sweep's workers)
        return (_rebuild, (self.signum, self.forced, self.checkpoint, self.requeue, self.message))

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the status a shell reports for a process it ended."""
        return 128 + self.signum


def _rebuild(signum: int, forced: bool, checkpoint: str | None, requeue: bool, message: str):
    stop = RunInterrupted(signum, forced)
    stop.checkpoint, stop.requeue, stop.message = checkpoint, requeue, message
    return stop


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def _requeue_setting(cfg: Any) -> bool:
    value = cfg.get("slurm_requeue", False) if cfg is not None else False
    if not isinstance(value, bool):
        raise ConfigError(f"slurm_requeue: expected true or false, got {value!r}")
    return value


class StopOnSignal(pl.Callback):
    """Stops a run at a step boundary on SIGTERM, SIGINT, SIGHUP (and, inside a SLURM job with
    ``slurm_requeue=true``, SIGUSR1), with a checkpoint of that step.

    ``install`` sets the signal handlers for the whole task, from before the data is built.
    Outside the trainer's loops, a signal raises :class:`RunInterrupted` at once. Between the
    trainer's ``setup`` and ``teardown`` hooks, it only records the signal, and the training
    and evaluation batch hooks stop the run.
    """

    def __init__(self, requeue: bool = False) -> None:
        self.requeue = requeue
        self.signum: int | None = None
        self.checkpoint: str | None = None
        self._in_trainer = False
        self._raised = False
        self._previous: dict[int, Any] = {}
        self._launcher: Any = None  # Lightning's DDP launcher, in the process that started it
        self._deferred = False  # installed by guard() before train(): only record a signal
        self._guarded = False  # guard() puts the handlers back, not train()
        self._settled = False  # metrics.json is being or has been written: nothing to stop
        self.late: int | None = None  # a signal that came once the run was settled
        self.requeued = False  # scontrol requeue succeeded

    @classmethod
    def for_config(cls, cfg: Any) -> StopOnSignal:
        """The callback of a run config (``slurm_requeue`` checked), handlers installed. Under
        :func:`guard` it is the instance whose handlers are already set: a signal that came
        since (while the run folder and its resume point were looked at) stops now."""
        requeue = _requeue_setting(cfg)
        active = _ACTIVE
        if active is not None and active._guarded and active._deferred:
            active.requeue = requeue
            active.install()  # SIGUSR1 where it now means requeue
            active._deferred = False
            if active.signum is not None:
                active._stop()
            return active
        return cls(requeue=requeue).install()

    # ------------------------------------------------------------------ signal handlers

    def signals(self) -> list[int]:
        """The signals handled: SIGTERM, SIGINT, SIGHUP, and SIGUSR1 where it means requeue."""
        handled = list(STOP_SIGNALS)
        if self.requeue and in_slurm_job():
            handled.append(REQUEUE_SIGNAL)
        return handled

    def install(self) -> StopOnSignal:
        """Set the handlers, keeping the ones they replace for :meth:`uninstall`. Only the
        main thread can set them (a sweep run by threads leaves them as they are)."""
        global _ACTIVE
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals():
            if signum in self._previous:
                continue  # already installed
            previous = signal.getsignal(signum)
            if signum == signal.SIGHUP and previous == signal.SIG_IGN:
                continue  # started under nohup: SIGHUP is to be ignored
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)
        _ACTIVE = self
        return self

    def uninstall(self) -> None:
        """Put back the handlers that :meth:`install` replaced. After a successful requeue
        SIGTERM stays ignored: SLURM sends it to end the job it has just requeued, and the
        run, already stopped and saved, exits with its own status. Under :func:`guard` the
        handlers stay until the guard ends, and only note a signal (see :meth:`settle`)."""
        global _ACTIVE
        if self._guarded:
            self.settle()
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if self.requeued:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._previous = {}
        if _ACTIVE is self:
            _ACTIVE = None

    def settle(self) -> None:
        """The run's result is being written to metrics.json: from now on a signal stops
        nothing (the result stands) and is only noted, for :func:`guard` to report."""
        self._settled = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._settled:
            if self.late is None and not self._raised:
                self.late = signum
            return
        if self._deferred:
            self.signum = self.signum or signum  # train() stops on it, once it can record it
            return
        if self.signum is None:
            self.signum = signum
            self._pass_on(signum)
            if not self._in_trainer:
                self._stop()
            log.warning(
                "%s received: stopping at the end of the current step or batch",
                signal_name(signum),
            )
        elif signum == signal.SIGINT and not self._raised:
            self._stop(forced=True)  # a second Ctrl-C: do not wait for the step

    def _stop(self, signum: int | None = None, forced: bool = False) -> None:
        self._raised = True
        stop = RunInterrupted(signum or self.signum or signal.SIGTERM, forced=forced)
        stop.checkpoint = self.checkpoint
        stop.requeue = self.requeue
        raise stop

    # ------------------------------------------------------------------ trainer hooks

    def _pass_on(self, signum: int) -> None:
        """Send the signal on to the DDP ranks that Lightning's launcher started from this
        process (as Lightning's own SIGTERM handler does), so that they stop too."""
        kill = getattr(self._launcher, "kill", None)
        if kill is not None and getattr(self._launcher, "procs", None):
            try:
                kill(signum)
            except Exception as exc:  # a rank that has already ended
                log.debug("could not pass %s on: %s", signal_name(signum), exc)

    def _take_sigterm(self, trainer: pl.Trainer) -> None:
        """Under DDP, take SIGTERM back from Lightning's handler, which the trainer installs
        when it starts. That handler broadcasts from inside itself, at whatever point of a
        step the signal arrives on each rank, and it makes each rank stop at its own next
        check. Ranks that do not stop together hang in, or break, the next collective call.
        This handler only records the signal, and the ranks agree on it at each step. The
        trainer puts the handler back when it ends: it is the one installed before it."""
        self._launcher = trainer.strategy.launcher
        if trainer.world_size > 1 and signal.SIGTERM in self._previous:
            if signal.getsignal(signal.SIGTERM) != self._on_signal:
                signal.signal(signal.SIGTERM, self._on_signal)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._in_trainer = True
        self._launcher = trainer.strategy.launcher

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_sigterm(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_sigterm(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_sigterm(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_at_end(trainer)  # a signal during the last validation

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_at_end(trainer)

    def _stop_at_end(self, trainer: pl.Trainer) -> None:
        """Under DDP the evaluation batches do not stop (see ``_stop_evaluation``): the
        ranks agree at the end of training and of testing instead, all of them together."""
        if trainer.world_size > 1 and not self._raised:
            signum = self._agreed_signal(trainer)
            if signum is not None:
                self.signum = self.signum or signum
                self._stop(signum)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._in_trainer = False
        if self.signum is not None and not self._raised and trainer.world_size == 1:
            self._stop()  # came after the last batch's hook

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        signum = self._agreed_signal(trainer)
        if signum is None:
            return
        self.signum = self.signum or signum  # a DDP rank that did not get it itself
        if batch_idx + 1 < trainer.num_training_batches:  # see StepCheckpoint: not the last
            self._save(trainer)
        self._stop(signum)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning checks for SIGTERM once more at the very end of each step, after the
        # callbacks' hooks: a SIGTERM that came after on_train_batch_end (while the step
        # checkpoint or the loggers wrote, say) stops the run there. That point is a step
        # boundary too, and a checkpoint taken at it resumes like one from on_train_batch_end
        # (Lightning's loops count the step as finished). One process only: under DDP such a
        # stop is not agreed between the ranks, and saving is a collective call.
        if (
            isinstance(exception, SIGTERMException)
            and self.checkpoint is None
            and trainer.world_size == 1
            and _at_step_boundary(trainer)
            and not _saved_this_step(trainer)
        ):
            self._save(trainer)
        # Lightning calls no teardown hook after an exception: from here on a signal stops
        # the run at once (train() may go on after a divergence, which is a result).
        self._in_trainer = False

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_evaluation(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_evaluation(trainer)

    def _stop_evaluation(self, trainer: pl.Trainer) -> None:
        # One process stops after the batch. DDP ranks would each stop at their own batch
        # and leave the others waiting in the next collective: they stop at the next
        # training step, where they agree, or when the trainer ends.
        if self.signum is not None and trainer.world_size == 1:
            self._stop()

    def _agreed_signal(self, trainer: pl.Trainer) -> int | None:
        """The signal this step stops on: this process's; under DDP, any rank's, the same
        on every rank (a collective call, made by every rank at every step)."""
        if trainer.world_size == 1:
            return self.signum
        mine = torch.tensor(float(self.signum or 0), device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(mine, reduce_op="max").item())
        return agreed or None

    def _save(self, trainer: pl.Trainer) -> None:
        """A checkpoint of the step that just ended, as ``StepCheckpoint`` would save it.

        The file has the step checkpoint's name and folder. The step checkpoint's state,
        saved inside it, names it as that callback's newest file, so after a resume the step
        checkpoint replaces it like one of its own; the older step file is removed. As
        before any checkpoint, the losses not checked yet are checked first: a diverged step
        raises ``TrainingDiverged`` and is not saved.
        """
        from mtl_clippy.callbacks.checkpointing import StepCheckpoint
        from mtl_clippy.callbacks.divergence import check_pending_losses

        check_pending_losses(trainer)
        step_cb = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)  # type: ignore[attr-defined]
        pruner = None
        if step_cb is not None and step_cb.dirpath:
            path = step_cb.format_checkpoint_name({"step": trainer.global_step})
            previous, step_cb.best_model_path = step_cb.best_model_path, path
        else:  # no step checkpoint (callbacks=none): the same name, folder and pruning
            folder = Path(trainer.default_root_dir) / "checkpoints"
            path, previous = str(folder / f"step-{trainer.global_step:07d}.ckpt"), ""
            pruner = StepCheckpoint(dirpath=str(folder), every_n_train_steps=1)
        # weights_only=False: the whole training state (Lightning warns when it is not said).
        trainer.save_checkpoint(path, weights_only=False)
        self.checkpoint = path
        if previous and os.path.abspath(previous) != os.path.abspath(path):
            trainer.strategy.remove_checkpoint(previous)  # rank 0 only
        if pruner is not None:  # the signal checkpoints of earlier attempts of this run
            pruner._keep_only(trainer, path)
        log.info("saved %s on %s", path, signal_name(self.signum or signal.SIGTERM))


def _at_step_boundary(trainer: pl.Trainer) -> bool:
    """Whether training stands between two steps of an epoch, neither its first nor its
    last (the end of an epoch has its own checkpoint, after validation)."""
    if trainer.sanity_checking or not trainer.training or trainer.global_step == 0:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return (
        progress.ready == progress.completed
        and 0 < progress.completed < trainer.num_training_batches
    )


def _saved_this_step(trainer: pl.Trainer) -> bool:
    """Whether the step checkpoint has just saved this very step (its file exists)."""
    from mtl_clippy.callbacks.checkpointing import StepCheckpoint

    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, StepCheckpoint) and cb.dirpath:
            path = cb.format_checkpoint_name({"step": trainer.global_step})
            if cb.best_model_path == path and os.path.exists(path):
                return True
    return False


class WorkerInit:
    """The ``worker_init_fn`` of the DataLoaders: a data-loading worker ignores the stop
    signals, and then seeds itself as Lightning's would.

    A scheduler stops a job by signalling its whole process group (SLURM's preemption and
    ``scancel``, ``kill -TERM -<pgid>``, systemd, a terminal's Ctrl-C), which includes the
    DataLoader's worker processes. A worker that dies of the signal makes the main process
    fail with "DataLoader worker ... is killed by signal" before it can save its step, and the
    run ends ``failed`` instead of ``interrupted``. Ignoring the signals in the workers
    leaves the stop to the main process, which ends them itself when it exits. Setting a
    ``worker_init_fn`` stops Lightning from adding its own (``seed_everything(workers=True)``
    adds ``pl_worker_init_function`` only where there is none), so this one calls it, as
    Lightning would, when ``PL_SEED_WORKERS`` says so.
    """

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        for signum in WORKER_IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        if int(os.environ.get("PL_SEED_WORKERS", 0)):
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id, rank=self.rank)


#: Signals that a DataLoader worker ignores (see :class:`WorkerInit`).
WORKER_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


#: The instance whose handlers are installed (``uninstall`` puts the previous ones back).
_ACTIVE: StopOnSignal | None = None


def uninstall() -> None:
    """Put back the signal handlers of the task that is ending (a no-op without one)."""
    if _ACTIVE is not None:
        _ACTIVE.uninstall()


def settle() -> None:
    """The task's result is being written: a signal from now on only gets noted."""
    if _ACTIVE is not None:
        _ACTIVE.settle()


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """The signal handlers for one whole task (``train.py``'s Hydra task function), from
    before ``train`` starts until the task returns.

    Before the run can record a stop (its configuration checked, its folder and resume
    point found), a signal is only noted, and the run stops on it as soon as it can, with
    ``metrics.json`` saying ``interrupted``; without this, SIGTERM there killed the process
    and left no ``metrics.json``. Once the run's result is being written, a signal no longer
    changes it: the run has ended, completed (or failed); the task exits as it would have,
    with one line saying that the signal came too late to stop anything, instead of a
    traceback or an exit status that says interrupted.
    """
    global _ACTIVE
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from mtl_clippy import early_signals

    stopper = StopOnSignal()
    stopper._deferred = stopper._guarded = True
    stopper.install()
    stopper.signum = early_signals.take()  # one that came while train.py started
    try:
        yield
    finally:
        stopper._guarded = False
        stopper.uninstall()
        if stopper.late is not None and rank_zero_only.rank == 0:
            print(
                f"{signal_name(stopper.late)} received after the run had ended: "
                "nothing to stop (metrics.json has its result)",
                file=sys.stderr,
                flush=True,
            )


# ----------------------------------------------------------------------------- reporting


def interruption(exc: BaseException) -> RunInterrupted | None:
    """The stop that ``exc`` is, or None for any other exception: ``RunInterrupted`` itself;
    Lightning's ``SIGTERMException`` (raised at its own checks); and a ``KeyboardInterrupt``
    that came before the handlers were set or through a handler that someone else installed.
    Lightning turns such a ``KeyboardInterrupt`` into ``sys.exit(1)``."""
    if isinstance(exc, RunInterrupted):
        return exc
    if isinstance(exc, SIGTERMException):
        active = _ACTIVE
        stop = RunInterrupted(signal.SIGTERM)
        if active is not None:
            stop.checkpoint, stop.requeue = active.checkpoint, active.requeue
            stop.signum = active.signum or signal.SIGTERM
        return stop
    keyboard = isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)
    )
    return RunInterrupted(signal.SIGINT, forced=True) if keyboard else None


def record(summary: RunSummary, stop: RunInterrupted, trainer: Any, out_dir: Path) -> None:
    """Fill ``summary`` (the run's ``metrics.json``) for an interrupted run, requeue the SLURM
    job if asked, and set ``stop.message``, the line that ``train.main`` prints."""
    from mtl_clippy.resume import find_checkpoint

    name = signal_name(stop.signum)
    steps = int(trainer.global_step) if trainer is not None else 0
    epoch = int(trainer.current_epoch) if trainer is not None else 0
    try:
        newest = find_checkpoint(out_dir)
    except Exception:  # an unsafe file in checkpoints/: the resumed run reports it
        newest = None
    ckpt_step = newest[1] if newest is not None else None
    steps = max(steps, ckpt_step or 0)  # stopped before a resumed run restored its step
    command = resume_command(out_dir, resumable=newest is not None)
    current = newest is not None and ckpt_step == steps  # a checkpoint of the step it stopped at
    summary.status = "interrupted"
    summary.steps = steps
    summary.epochs = max(epoch, int(summary.epochs or 0))
    summary.resume_command = command
    info: dict[str, Any] = {
        "signal": name,
        "checkpoint": os.path.relpath(newest[0], out_dir) if newest is not None else None,
        "checkpoint_step": ckpt_step,
        "of_this_step": current,
        "forced": stop.forced,
    }
    if newest is None:
        message = f"interrupted by {name} at step {steps}, before any checkpoint; start again with: {command}"
    elif current:
        message = (
            f"interrupted by {name} at step {steps}: checkpoint {newest[0]}; resume with: {command}"
        )
    else:
        message = (
            f"interrupted by {name} at step {steps}, not at a training step (validation, "
            f"testing, an epoch's last batch or a second Ctrl-C): the newest checkpoint is "
            f"{newest[0]} (step {ckpt_step}); resume with: {command}"
        )
    if stop.requeue and stop.signum == REQUEUE_SIGNAL:
        ok, detail = requeue_slurm_job() if rank_zero_only.rank == 0 else (True, "")
        info["requeued"] = ok
        if _ACTIVE is not None:
            _ACTIVE.requeued = ok  # SIGTERM stays ignored only after a requeue
        if detail:
            info["requeue"] = detail
            message += f"; {detail}"
    summary.interrupted = info
    stop.message = message


def resume_command(out_dir: Path, resumable: bool = True) -> str:
    """The command that continues this run, from the folder it was started in: the same
    overrides plus ``resume=<this run's folder>`` (without it where there is no checkpoint
    to continue). The folder, not ``resume=true``: ``resume=true`` picks the newest run of
    the same overrides, which is another run once the same command has run again. A sweep's
    job is continued by its sweep: the sweep's command, ``hydra.sweep.dir`` and
    ``resume=true`` (the sweep folder names the sweep)."""
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "train.py" else "train.py"
    resume = _resume_override(out_dir)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # not under Hydra
        return shlex.join(["python", script, resume] if resumable else ["python", script])
    if hc.mode == RunMode.MULTIRUN:
        hydra_overrides, task = _sweep_overrides(Path(str(hc.sweep.dir)))
        hydra_overrides = [
            o for o in hydra_overrides if _key(o) not in (*_HYDRA_OWN, "hydra.sweep.dir")
        ]
        parts = ["python", script, "-m", *hydra_overrides, *_without_start(task)]
        parts += [f"hydra.sweep.dir={hc.sweep.dir}", "resume=true"]
        return shlex.join(parts)
    hydra_overrides = [o for o in hc.overrides.hydra if _key(o) not in _HYDRA_OWN]
    parts = ["python", script, *hydra_overrides, *_without_start(hc.overrides.task)]
    return shlex.join([*parts, resume] if resumable else parts)


def _resume_override(out_dir: Path) -> str:
    """``resume=<absolute run folder>``, quoted for Hydra's override parser where the path
    holds characters that it reads as syntax (spaces, commas, brackets, quotes ...); the
    shell quoting comes on top, from ``shlex.join``."""
    folder = str(Path(out_dir).resolve())
    if re.fullmatch(r"[\w./@%+~:-]+", folder):
        return f"resume={folder}"
    return "resume='" + folder.replace("'", "\\'") + "'"


def _sweep_overrides(sweep_dir: Path) -> tuple[list[str], list[str]]:
    """(Hydra's, the task's) overrides of the sweep command, from its ``multirun.yaml``."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.load(sweep_dir / "multirun.yaml")
        return (
            [str(o) for o in OmegaConf.select(saved, "hydra.overrides.hydra") or []],
            [str(o) for o in OmegaConf.select(saved, "hydra.overrides.task") or []],
        )
    except Exception:
        return [], []


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def _without_start(overrides: Any) -> list[str]:
    return [str(o) for o in overrides if _key(str(o)) not in _START_KEYS]


def requeue_slurm_job() -> tuple[bool, str]:
    """``scontrol requeue`` this SLURM job (an array's task as ``<array job>_<task>``);
    (whether it worked, what to tell)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")
    if not job:
        return False, "not requeued: SLURM_JOB_ID is not set"
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"requeueing SLURM job {job} failed: {exc}"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return False, (
            f"requeueing SLURM job {job} failed: scontrol exited with {done.returncode}"
            + (f" ({why[-1]})" if why else "")
        )
    return True, f"requeued SLURM job {job}"


def exit_interrupted(stop: RunInterrupted) -> None:
    """End the process of an interrupted run: its line on stderr (global rank 0), status
    128 + the signal. In a sweep this ends the sweep too: the remaining jobs are not run,
    and the sweep continues with its resume command."""
    if rank_zero_only.rank == 0:
        log.warning(stop.message)
        print(stop.message, file=sys.stderr, flush=True)
    sys.exit(stop.exit_code)

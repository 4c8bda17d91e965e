"""Signals that come while ``train.py`` starts, before a run can stop on them.

Importing Lightning and composing the configuration take seconds, and a scheduler can
preempt a job in them. Without a handler, SIGTERM there killed the process and left no
``metrics.json``, so the folder looked like a run that never started (a SLURM job requeued
then could not tell it from a mistake). ``train.py`` calls :func:`install` once the
command line has been checked, and :func:`mtl_clippy.preemption.guard` takes the signal
noted so far when the first task starts (:func:`take`): the run then stops on it as soon
as it can record the stop. Once a task has started, the handlers here behave as the ones
they replaced (a signal between two jobs of a sweep stops the sweep as before).

Standard library only: it is imported before Lightning.
"""

from __future__ import annotations

import os
import signal
from typing import Any

#: The signals noted while starting (SIGUSR1 is only meant for a run with slurm_requeue).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_pending: int | None = None
_started = False
_previous: dict[int, Any] = {}


def install() -> None:
    """Note the stop signals from now until the first task starts."""
    for signum in SIGNALS:
        previous = signal.getsignal(signum)
        if signum == signal.SIGHUP and previous == signal.SIG_IGN:
            continue  # started under nohup: SIGHUP is to be ignored
        _previous[signum] = previous
        signal.signal(signum, _note)


def take() -> int | None:
    """The signal noted before the first task started (None if none), once: from now on
    these handlers act as the ones they replaced."""
    global _pending, _started
    _started = True
    signum, _pending = _pending, None
    return signum


def _note(signum: int, frame: Any) -> None:
    global _pending
    if not _started:
        _pending = _pending or signum
        return
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):  # SIGINT: Python's handler, which raises KeyboardInterrupt
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

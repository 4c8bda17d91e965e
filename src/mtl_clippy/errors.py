"""Exceptions for user mistakes: the command-line app prints their message, without a
traceback, and exits with status 2."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
from collections.abc import Iterator
from types import TracebackType


class ConfigError(ValueError):
    """A configuration value is invalid or two options cannot be combined.

    The message names the config key (e.g. ``optim.lr``) and says what to do.
    """


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix (bad data, bad configuration)."""
    from omegaconf.errors import MissingMandatoryValue

    from mtl_clippy.data.errors import DataError

    return (
        ConfigError,
        DataError,
        DiskFull,
        MissingMandatoryValue,
        FileNotFoundError,
        PermissionError,
    )


# ----------------------------------------------------------------------------- full disk

#: The errno values that mean "no room left to write": the file system is full, or the
#: user's quota on it is used up (the usual case on a cluster's shared home or scratch).
NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}

#: What to do after a run stopped on a full disk while writing into its run folder.
RUN_FOLDER_HINT = (
    "the files written before are intact: free some space, then run the same command with "
    "resume=true"
)

#: The same, for a run that has no checkpoint to resume from yet (the full disk came first).
RUN_AGAIN_HINT = (
    "the run has no checkpoint to resume from yet: free some space, then run the same command again"
)


def resume_hint(run_dir: str | os.PathLike[str] | None) -> str:
    """:data:`RUN_FOLDER_HINT` if ``run_dir/checkpoints`` holds a checkpoint that
    ``resume=true`` continues from (``last.ckpt`` or a step checkpoint: ``best.ckpt`` is not
    one), else :data:`RUN_AGAIN_HINT`."""
    import stat

    folder = os.path.join(os.fspath(run_dir), "checkpoints") if run_dir is not None else None
    try:
        for entry in os.scandir(folder) if folder else ():
            if entry.name.endswith(".ckpt") and not entry.name.startswith((".", "best")):
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.stat(entry.path).st_mode):
                        return RUN_FOLDER_HINT
    except OSError:
        pass
    return RUN_AGAIN_HINT


#: Below this many free bytes a folder's file system counts as full (see :func:`disk_full`).
NEARLY_FULL_BYTES = 1 << 20


class DiskFull(OSError):
    """Writing ``path`` failed because its file system is full (or the quota there is used up).

    Raised in place of the writer's own error, which often says neither what ran out nor where:
    ``torch.save`` reports a full disk as an internal message of its zip writer
    (``unexpected pos ...``), a plain ``write`` as ``[Errno 28]`` without a file name. The
    message is one line, ``no space left on device while writing <path>``, and ``hint`` (in
    parentheses after it) says what to do. ``into`` means ``path`` is the folder that was
    written into, the file being unknown; ``later`` lists files that could not be written
    after it either (``metrics.json``, written on the way out). An ``OSError`` subclass, so code that tolerates a
    failed write (an optional cache) still does; ``user_error_types`` lists it, so the
    command line prints the message and exits with status 2.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        code: int = errno.ENOSPC,
        hint: str | None = None,
        into: bool = False,
        later: tuple[str, ...] = (),
    ) -> None:
        self.path = os.fspath(path)
        self.hint = hint
        self.into = into
        self.later = tuple(later)
        self.reason = NO_ROOM.get(code) or os.strerror(code).lower()
        self.target = f"into {self.path}" if into else self.path
        self.message = f"{self.reason} while writing {self.target}"
        if self.later:
            self.message += "; then also " + ", ".join(self.later)
        if hint:
            self.message += f" ({hint})"
        super().__init__(code, self.message, self.path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:  # to cross process boundaries (submitit, DDP spawn)
        return (type(self), (self.path, self.errno, self.hint, self.into, self.later))


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, newest first: those
    Python prints with it (not a context dropped with ``raise ... from None``)."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        if exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            exc = None if exc.__suppress_context__ else exc.__context__
    return out


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """The bytes an unprivileged writer may still use on ``folder``'s file system (its
    deepest existing parent's), or None where that cannot be asked."""
    folder = os.path.abspath(os.fspath(folder))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    return st.f_bavail * st.f_frsize


def _file_being_written(err: BaseException) -> str | None:
    """The name of a file open for writing in the call that raised ``err``, innermost call
    first: where a ``write`` failed without naming its file (a full disk), this is the file."""
    frames = []
    tb: TracebackType | None = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            if not isinstance(value, io.IOBase):
                continue
            name, mode = getattr(value, "name", None), str(getattr(value, "mode", ""))
            if isinstance(name, str | bytes) and any(c in mode for c in "wax+"):
                return os.fsdecode(name)
    return None


#: What torch's zip writer (``PytorchStreamWriter``) says when a write of its file fails; it
#: drops the ``OSError`` (and its errno) of the write that failed.
ZIP_WRITER_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def errno_of(err: OSError) -> int | None:
    """The errno of ``err``; for an ``OSError`` that has none but says it in its message, as
    pyarrow's do (``Error writing bytes to file. Detail: [errno 28] No space left on
    device``), the one it says."""
    if err.errno is not None:
        return err.errno
    found = re.search(r"\[errno (\d+)\]", str(err), flags=re.IGNORECASE)
    return int(found[1]) if found else None


def _lost_errno(chain: list[BaseException]) -> bool:
    """Whether ``chain`` (an error and what it was raised from) is a write that failed without
    saying why: no ``OSError`` with an errno in it, no CUDA error (the zip writer fails too
    when pickling raised one), and a ``RuntimeError`` with one of the zip writer's messages
    (``ZIP_WRITER_FAILURES``). Only then may the free space decide."""
    if any(isinstance(e, OSError) and errno_of(e) is not None for e in chain):
        return False
    if any("CUDA" in str(e) for e in chain):
        return False
    return any(
        isinstance(e, RuntimeError) and any(m in str(e) for m in ZIP_WRITER_FAILURES) for e in chain
    )


def disk_full(
    exc: BaseException,
    path: str | os.PathLike[str] | None = None,
    folder: str | os.PathLike[str] | None = None,
    hint: str | None = None,
) -> DiskFull | None:
    """The :class:`DiskFull` of a write that just failed with ``exc``, or None when the failure
    is not a full disk (``exc`` itself when it is one already).

    A full disk is an ``OSError`` with ``ENOSPC`` or ``EDQUOT`` in ``exc``'s chain
    (``torch.save`` raises its zip writer's ``RuntimeError`` while handling it); the chain is
    followed back to an earlier ``DiskFull`` at most, which is another write's failure. Where
    it holds none, an ``OSError`` or ``RuntimeError`` raised while ``folder``'s file system
    has less than ``NEARLY_FULL_BYTES`` left counts too, if it is a writer that lost the
    errno (:func:`_lost_errno`: torch's zip writer, whose messages are known); any error
    with another errno, or any other message (a CUDA error), is left alone. Call this before
    deleting what the failed write left, which holds the space.

    The file named: ``path``; else the file name the ``OSError`` carries, or the file its call
    had open for writing; else ``folder`` (``into``).
    """
    if isinstance(exc, DiskFull):
        return exc
    chain = []
    for e in _chain(exc):
        if isinstance(e, DiskFull):
            break
        chain.append(e)
    err = next(
        (e for e in reversed(chain) if isinstance(e, OSError) and errno_of(e) in NO_ROOM), None
    )
    if err is not None:
        code = errno_of(err)
    elif folder is not None and _lost_errno(chain):
        room = free_bytes(folder)
        if room is None or room >= NEARLY_FULL_BYTES:
            return None
        code = errno.ENOSPC
    else:
        return None
    name = path
    if name is None and err is not None:
        found = err.filename if isinstance(err.filename, str | bytes) else None
        if found is None:  # an error raised in C (a close's flush) has no frames of its own:
            # the file is in the frames of the error raised while handling it
            found = next((f for e in [err, *chain] if (f := _file_being_written(e))), None)
        name = os.fsdecode(found) if found is not None else None
    if name is not None:
        return DiskFull(name, code, hint)
    if folder is not None:
        return DiskFull(folder, code, hint, into=True)
    return DiskFull("a file (its name is unknown)", code, hint)


def first_disk_full(exc: BaseException, hint: str | None = None) -> DiskFull | None:
    """The full disk that ``exc`` (an error on its way to the user) comes from: the earliest
    :class:`DiskFull` in its chain (the write that failed first; the others failed after it,
    on the way out), else what :func:`disk_full` makes of it, with ``hint``; None if none."""
    earlier = [e for e in _chain(exc) if isinstance(e, DiskFull)]
    return earlier[-1] if earlier else disk_full(exc, hint=hint)


def reported(exc: BaseException, run_dir: str | os.PathLike[str] | None = None) -> DiskFull | None:
    """What a user is told about a full disk in ``exc``'s chain (None if there is none): the
    write that failed first (:func:`first_disk_full`), with the files that could not be
    written after it in ``later``. With the ``run_dir`` of the run, its advice to resume is
    given only where the run has a checkpoint to resume from (:func:`resume_hint`)."""
    full = first_disk_full(exc, hint=RUN_FOLDER_HINT)
    if full is None:
        return None
    later: list[str] = []
    for e in reversed(_chain(exc)):
        if isinstance(e, DiskFull) and e.path != full.path and e.path not in later:
            later.append(e.path)
    hint = full.hint
    if run_dir is not None and hint == RUN_FOLDER_HINT:
        hint = resume_hint(run_dir)
    if not later and full is exc and hint == full.hint:
        return full
    return DiskFull(full.path, full.errno or errno.ENOSPC, hint, full.into, tuple(later))


def disk_full_message(
    exc: BaseException, run_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """The one-line message of :func:`reported` (None without a full disk in the chain)."""
    full = reported(exc, run_dir)
    return None if full is None else str(full)


@contextlib.contextmanager
def full_disk_reported(run_dir: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Re-raise an error that a full disk caused, in whatever wrapper it arrives (a logger's
    ``OSError`` without a file name, an error of a library that was handling it), as the
    :class:`DiskFull` of :func:`reported` (for the run in ``run_dir``): the command line then
    prints its one line."""
    try:
        yield
    except Exception as exc:
        full = reported(exc, run_dir)
        if full is None or full is exc:
            raise
        raise full from exc


def innermost_message(exc: BaseException, run_dir: str | os.PathLike[str] | None = None) -> str:
    """The innermost message of an exception chain (Hydra wraps instantiation errors); a
    ConfigError's own message, which names the config key, is kept; a full disk anywhere in
    the chain is told as such, naming the file (:class:`DiskFull`; advising a resume only
    where ``run_dir`` has a checkpoint)."""
    full = disk_full_message(exc, run_dir)
    if full is not None:
        return full
    while exc.__cause__ is not None and not isinstance(exc, ConfigError):
        exc = exc.__cause__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

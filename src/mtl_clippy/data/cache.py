"""Cache folders written once and shared by processes that start together (first writer wins).

Every cache the data layer keeps (the parse cache of a CSV, the encoded ids, a generated
dataset) is one folder that appears whole or not at all, and DDP ranks, loader workers and the
jobs of a parallel sweep may all want it at the same moment. The protocol:

1. Look for a complete folder, without a lock (the fast path: memory-map it and go).
2. Otherwise take an exclusive ``fcntl.flock`` on ``.<name>.lock`` beside the folder
   (:func:`exclusive`) and look again: a process that waited while another wrote uses that
   copy and writes nothing.
3. The lock holder writes into a fresh temporary folder, flushes it to disk, and renames it
   into place (:func:`publish`).

A complete folder is never replaced. Only one the caller found unusable under the lock (stale
for a changed source, or damaged) is renamed aside and deleted once its successor is in place;
a process that has its files open or memory-mapped keeps reading them (POSIX keeps an unlinked
file alive while it is open). A writer that crashes leaves only its temporary folder, which
no reader opens. A writer holds an exclusive ``flock`` on its temporary folder while it
writes (``mtl_clippy.atomic``: the kernel drops it when the writer dies), so that the next
process that looks for the cache, even one that finds it complete, deletes the leftovers of
writers that are gone (:func:`remove_dead_leftovers`) and never those of a writer still at
work, whatever its pid namespace or clock. Temporary names also carry their writer
(``<random>-<pid>@<host>``, see :func:`writer_tag`) for a person looking at them. The lock
file is removed by its holder, so nothing but the cache folders stays behind.

Where no lock can be taken (a folder that cannot be written, a file system without ``flock``)
the rename alone decides: renaming onto an existing non-empty folder fails, so the first
complete copy still wins and late writers use it (they just do the work in vain).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mtl_clippy.atomic import lock_for_writing, remove_unused_temporary

log = logging.getLogger(__name__)

TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it."""
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike[str]) -> Iterator[bool]:
    """Hold the exclusive lock of ``folder`` while the block runs; yields whether it is held.

    The lock is an ``fcntl.flock`` on :func:`lock_path`, which the holder deletes on release;
    a waiter that then finds the path gone or pointing at a new file locks again, so exactly
    one process holds the lock of a folder at a time. A lock dies with its process. The
    temporary folders of writers that are gone are deleted on entry. Parent
    folders created for the lock file are removed again if nothing was written into them.
    Yields False (no lock) where the parent folder cannot be written or the file system has
    no ``flock``.
    """
    path = lock_path(Path(folder))
    created = _missing_parents(path.parent)
    fd = _acquire(path)
    try:
        remove_dead_leftovers(folder)
        yield fd is not None
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # before unlocking: a waiter on this file then retries
            os.close(fd)
        for parent in created:  # folders made only for the lock file (nothing was written)
            try:
                os.rmdir(parent)
            except OSError:
                break  # not empty (a cache was written, or another process uses it)


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _acquire(path: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    for _ in range(100):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another process removed the empty folder: again
            continue
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # ENOLCK, EOPNOTSUPP: a file system without flock
            os.close(fd)
            return None
        try:
            ours, now = os.fstat(fd), os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino):
            return fd
        os.close(fd)  # the previous holder deleted the file we waited on: lock the new one
    return None


def leftovers(folder: Path) -> list[Path]:
    """Temporary folders of ``folder``'s writers, live or dead (``.<name>.tmp-<tag>`` being
    written, ``.<name>.old-<tag>`` a replaced copy about to be deleted)."""
    parent = folder.parent
    if not parent.is_dir():
        return []
    prefixes = (f".{folder.name}{TMP_TAG}", f".{folder.name}{_OLD_TAG}")
    return [p for p in parent.iterdir() if p.name.startswith(prefixes)]


#: The temporary folders :func:`publish` makes beside a cache folder ``<name>``:
#: ``.<name>.tmp-<random>-<pid>@<host>`` (and ``.old-`` for a replaced copy), or
#: ``.<name>.tmp-<pid>-<random>`` from versions that did not record the host.
_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?:tmp|old)-"
    r"(?:[0-9a-f]{8}-(?P<pid>\d+)@(?P<host>[A-Za-z0-9_~-]+)|(?P<old_pid>\d+)-[0-9a-f]{8})$"
)


def remove_dead_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary folders beside ``folder`` (of any cache folder there, not only
    ``folder``'s: a killed writer's key may never be asked for again) that no writer holds
    (``mtl_clippy.atomic.remove_unused_temporary``: its ``flock`` can be taken); returns
    them. Safe without the lock and at any time: a live writer's folder is kept, and only
    names :func:`publish` gives (this version's and the earlier one's) are considered. The
    lock files of those folders that no process holds (their holder was killed) go too."""
    parent = Path(folder).parent
    try:
        found = [(p, _LEFTOVER.match(p.name)) for p in parent.iterdir() if p.name[:1] == "."]
    except OSError:  # no such folder (yet), or not readable
        return []
    removed = []
    locks = {lock_path(Path(folder))}  # and those of the folders that leftovers were for
    for path, match in found:
        if match is None:
            continue
        locks.add(lock_path(parent / match["name"]))
        if remove_unused_temporary(path):
            log.info("removed %s, left by a writer that did not finish", path)
            removed.append(path)
    removed += [path for path in sorted(locks) if _remove_unheld_lock(path)]
    return removed


def _remove_unheld_lock(path: Path) -> bool:
    """Delete the lock file of a holder that was killed (its lock died with it), the way a
    holder does: locked, then unlinked before unlocking, so a process about to wait on it
    notices and locks the next one (:func:`_acquire`). A held lock is left alone."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDWR)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ours, now = os.fstat(fd), os.stat(path)
        if (ours.st_dev, ours.st_ino) != (now.st_dev, now.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:  # held by a live process, or already replaced
        return False
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- writers


def host_tag() -> str:
    """This machine, as temporary names record it: the host name (letters, digits and ``-``
    kept, the rest as ``_``) and, where Linux has one, the pid namespace (containers on one
    host may share a host name but not their process ids)."""
    host = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())[:64] or "unknown"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return host
    return f"{host}~{namespace}"


def writer_tag() -> str:
    """``<pid>@<host>``: who writes a temporary file (for a person reading its name; whether
    the writer is gone is told by its lock, see ``mtl_clippy.atomic``)."""
    return f"{os.getpid()}@{host_tag()}"


def publish(
    folder: str | os.PathLike[str],
    fill: Callable[[Path], None],
    *,
    held: bool,
    replace: bool | None = None,
    raise_errors: bool = False,
) -> bool:
    """Create ``folder``: ``fill(tmp)`` writes its files into a fresh temporary folder beside
    it, which is flushed to disk and renamed to ``folder``.

    Call it inside :func:`exclusive` (``held`` is what that yielded) after finding no usable
    cache there. Temporary folders of writers that are gone are deleted first. An
    existing ``folder`` is set aside and deleted after the rename only when ``replace``
    (default: ``held``, i.e. the lock holder found it unusable); otherwise it is kept and the
    call returns False: the first complete copy wins.

    Returns True when ``folder`` now holds this copy. An ``OSError`` (read-only folder, full
    disk) gives a warning and False; the caller's data in hand stays valid. With
    ``raise_errors`` (a caller that has nothing without the folder: generated data) it
    propagates instead, leaving nothing behind. Exceptions from ``fill`` propagate, leaving
    nothing behind.
    """
    folder = Path(folder)
    replace = held if replace is None else replace
    remove_dead_leftovers(folder)
    tag = f"{uuid.uuid4().hex[:8]}-{writer_tag()}"
    tmp = folder.with_name(f".{folder.name}{TMP_TAG}{tag}")
    old: Path | None = None
    held_fds: list[int] = []  # the locks that tell a cleaner these folders are in use
    try:
        tmp.mkdir(parents=True)
        held_fds.append(_lock_folder(tmp))
        fill(tmp)
        _sync(tmp)
        if replace and (folder.exists() or folder.is_symlink()):
            if folder.is_dir() and not folder.is_symlink():
                held_fds.append(_lock_folder(folder))  # locked before it gets a temporary name
            old = folder.with_name(f".{folder.name}{_OLD_TAG}{tag}")
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if folder.is_dir() and not replace:
                log.info("%s was completed by another process first; using it", folder)
                return False
            raise
        _sync_dir(folder.parent)
        return True
    except OSError as err:
        if old is not None and not folder.exists():
            with contextlib.suppress(OSError):
                os.rename(old, folder)
                old = None
        if raise_errors:
            raise
        log.warning("could not write the cache %s (%s); continuing without it", folder, err)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for fd in held_fds:
            if fd >= 0:
                os.close(fd)


def _lock_folder(folder: Path) -> int:
    """An open descriptor of ``folder`` holding its writer's lock (``lock_for_writing``),
    until closed; -1 where a folder cannot be opened (then it is not closed either)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return -1
    lock_for_writing(fd)
    return fd


def _sync(tmp: Path) -> None:
    """Flush the files of ``tmp`` and the folder itself to disk, so that a folder renamed into
    place holds its data even after a power cut (a killed process loses nothing anyway)."""
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_dir(tmp)


def _sync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def array_filler(
    arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None, meta_name: str = "cache.json"
) -> Callable[[Path], None]:
    """A ``fill`` for :func:`publish`: ``<name>.npy`` per array, then ``meta`` as JSON."""

    def fill(tmp: Path) -> None:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        if meta is not None:
            (tmp / meta_name).write_text(json.dumps(meta, indent=2))

    return fill

"""Small files written whole or not at all, with a full disk reported as such; and how a
later process tells a killed writer's temporary file from one still being written.

A run's summary (``metrics.json``), the CSV logger's files and the rows a resumed run keeps are
each written to ``<name>.tmp<pid>`` beside the final name, flushed to disk and renamed into
place: a reader never sees half a file, and a write that fails (a kill, a full disk) leaves the
previous version of the file as it was. On a full disk the temporary file is deleted and a
:class:`~mtl_clippy.errors.DiskFull` names the final file, instead of a bare ``[Errno 28]``.
Checkpoints are written the same way by ``mtl_clippy.callbacks.AtomicCheckpointIO``, the data
caches into temporary folders by ``mtl_clippy.data.cache.publish``.

**Whose temporary is it?** Every writer holds an exclusive ``fcntl.flock`` on its temporary
file (or folder) from its creation until it is renamed into place; the kernel drops the lock
when the writer ends, however it ends. A later process deletes a temporary only if it can take
that lock itself (:func:`remove_unused_temporary`): a process id in the name could not say
this, since another container (its own pid namespace) or a reused pid would answer for a
writer that is gone, and a clock that differs between hosts would make a live writer's file
look old. Where ``flock`` may not reach every writer (a network file system: NFS, Lustre, GPFS,
CIFS, ...) or does not exist, a temporary must also be unchanged for a day
(``NETWORK_UNCHANGED_S``); an empty temporary younger than a minute is left too (its writer
may not have locked it yet).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mtl_clippy.errors import RUN_FOLDER_HINT, disk_full

try:
    import fcntl
except ImportError:  # not on POSIX: the age alone decides
    fcntl = None  # type: ignore[assignment]

#: Where ``flock`` may not be seen by every writer (or is missing), a temporary is deleted only
#: once nothing in it has changed for this long (the slowest writer, generating the full-size
#: data set, changes its files every few minutes).
NETWORK_UNCHANGED_S = 24 * 3600.0
#: An empty temporary younger than this is never deleted: its writer may have created it and
#: not yet taken its lock.
FRESH_S = 60.0
#: File systems whose ``flock`` every process that can open the file takes part in (any pid
#: namespace): local disks and memory. Others get the age guard as well.
LOCAL_FILE_SYSTEMS = frozenset(
    "ext2 ext3 ext4 xfs btrfs tmpfs ramfs zfs f2fs jfs reiserfs bcachefs overlay apfs hfs "
    "vfat exfat ntfs3".split()
)
#: The files written with :func:`write_atomically` (their temporaries are cleaned at a run's
#: start by :func:`remove_dead_temporaries`).
ATOMIC_NAMES = ("metrics.json", "metrics.csv", "hparams.yaml")
_ATOMIC_TMP = re.compile(r"^(?P<target>.+)\.tmp\d+$")


# ----------------------------------------------------------------------------- writers


def lock_for_writing(fd: int) -> None:
    """Hold an exclusive ``flock`` on the open file (or folder) ``fd`` until it is closed:
    the sign that its writer is at work. Where the file system has no ``flock`` (or, on NFS,
    cannot lock a folder) nothing is held and the age guard protects the writer."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def locked_temporary(path: str | os.PathLike[str]) -> Iterator[int]:
    """Create the empty file ``path`` (replacing one a writer of the same name left) and hold
    its lock (:func:`lock_for_writing`) until the block ends; yields its descriptor (open for
    reading and writing). Whatever the block writes into ``path`` (opened again by name) is
    covered: the lock is on the file, not the descriptor."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        lock_for_writing(fd)
        yield fd
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- cleaners


def on_local_file_system(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies on a file system of ``LOCAL_FILE_SYSTEMS``, read from Linux's
    /proc/self/mounts (the longest mount point above it). True where that cannot be read
    (another system: its local ``flock`` is honoured)."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return True
    real = os.path.realpath(path)
    best, kind = "", None
    for point, fstype in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), point)  # \040: a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind is None or kind in LOCAL_FILE_SYSTEMS


def _last_change(path: Path, is_dir: bool) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if is_dir:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _empty(path: Path, info: os.stat_result, is_dir: bool) -> bool:
    if not is_dir:
        return info.st_size == 0
    try:
        return not any(os.scandir(path))
    except OSError:
        return False


def remove_unused_temporary(
    path: str | os.PathLike[str], *, unchanged_s: float = NETWORK_UNCHANGED_S
) -> bool:
    """Delete the temporary file or folder ``path`` if no writer holds it; True if deleted.

    Its writer is gone when its ``flock`` can be taken (see this module's docstring). On a
    file system where ``flock`` may not reach every writer, or fails, nothing in ``path`` must
    also have changed for ``unchanged_s`` seconds; an empty one younger than ``FRESH_S`` is
    kept. Anything but a regular file or a folder (a link, a FIFO) is never touched.
    """
    path = Path(path)
    try:
        info = path.lstat()
        is_dir = stat.S_ISDIR(info.st_mode)
        if not (is_dir or stat.S_ISREG(info.st_mode)):
            return False
        age = time.time() - _last_change(path, is_dir)
    except OSError:  # gone already (renamed into place by its writer, or deleted)
        return False
    if age < FRESH_S and _empty(path, info, is_dir):
        return False
    if age < unchanged_s and not on_local_file_system(path):
        return False
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:  # for a file, read-write: NFS maps flock onto locks that need it
        fd = os.open(path, flags | (getattr(os, "O_DIRECTORY", 0) if is_dir else os.O_RDWR))
    except OSError:
        try:
            fd = os.open(path, flags)
        except OSError:
            return False
    try:
        if fcntl is None:
            if age < unchanged_s:
                return False
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer holds it: at work
                return False
            except OSError:  # no flock here: the age alone decides
                if age < unchanged_s:
                    return False
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            return False  # replaced since it was looked at
        if is_dir:
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return True
    finally:
        os.close(fd)


def remove_dead_temporaries(folder: str | os.PathLike[str], depth: int = 1) -> list[Path]:
    """Delete the temporaries of :func:`write_atomically` (``<name>.tmp<pid>`` for a name of
    ``ATOMIC_NAMES``) that no writer holds, in ``folder`` and its subfolders down to ``depth``
    levels (a run folder: ``csv/``, ``tensorboard/``); returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _ATOMIC_TMP.match(entry.name)
        if match and match["target"] in ATOMIC_NAMES and entry.is_file(follow_symlinks=False):
            if remove_unused_temporary(entry.path):
                removed.append(Path(entry.path))
        elif depth > 0 and entry.is_dir(follow_symlinks=False):
            removed += remove_dead_temporaries(entry.path, depth - 1)
    return removed


# ----------------------------------------------------------------------------- small files


def tmp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name this process writes ``path`` under: ``<name>.tmp<pid>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def write_atomically(
    path: str | os.PathLike[str],
    write: Callable[[Path], object],
    *,
    hint: str | None = RUN_FOLDER_HINT,
) -> None:
    """``write(tmp)`` writes the content of ``path`` into the file ``tmp``; it is then flushed
    to disk and renamed to ``path``.

    Whatever goes wrong, the temporary file is removed and ``path`` keeps its previous content
    (or stays absent). A full disk raises :class:`~mtl_clippy.errors.DiskFull` naming ``path``
    (``hint``: what to do, in its message); other errors propagate as they are.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with locked_temporary(tmp) as fd:  # held until renamed: a cleaner leaves it alone
            write(tmp)
            # Where space is allocated late (NFS, quotas), a full disk shows only here.
            os.fsync(fd)
            os.replace(tmp, path)
    except BaseException as exc:
        full = disk_full(exc, path=path, folder=path.parent, hint=hint)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if full is not None and full is not exc:
            raise full from exc
        raise

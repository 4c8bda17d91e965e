"""Resuming a run: which folder it continues in, and which checkpoint it continues from.

``python train.py <overrides> resume=true`` continues the newest earlier run of the same
overrides (the same command without ``resume``) that left a checkpoint: in its folder, its
TensorBoard run and from its newest checkpoint. ``resume=<run folder>`` names the run, and
``ckpt_path=<file>`` a checkpoint (a file inside ``<run>/checkpoints/`` continues that run's
folder). For a sweep, ``python train.py -m <same sweep> resume=true`` continues the newest
sweep of the same overrides: finished jobs are kept, the others resume or start.

The folder choice is made by config resolvers (``configs/hydra/default.yaml``), before Hydra
creates the run folder; the checkpoint choice by ``find_checkpoint`` in the task.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import io
import logging
import os
import pickle
import pickletools
import stat
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf

from mtl_clippy import run_names
from mtl_clippy.errors import ConfigError

log = logging.getLogger("mtl_clippy")

#: Overrides that choose how a run starts, not what it computes; ignored when matching.
RESUME_KEYS = ("resume", "ckpt_path")
STAMP = "%Y-%m-%d_%H-%M-%S_%f"


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def run_identity(overrides: Iterable[str]) -> list[str]:
    """The overrides that define what a run computes (sorted; resume and Hydra's own keys
    dropped)."""
    return sorted(
        o for o in overrides if _key(o) not in RESUME_KEYS and not _key(o).startswith("hydra")
    )


def resume_requested(cfg: Any) -> bool:
    value = cfg.get("resume", False) if cfg is not None else False
    return value not in (None, False, "false", "False", "")


def _task_overrides(root: DictConfig) -> list[str]:
    try:
        return list(OmegaConf.select(root, "hydra.overrides.task") or [])
    except Exception:
        return []


def _saved_overrides(path: Path, key: str | None = None) -> list[str] | None:
    try:
        saved = OmegaConf.load(path)
        node = OmegaConf.select(saved, key) if key else saved
        return [str(o) for o in node]
    except Exception:
        return None


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The ``*.ckpt`` regular files of ``run_dir/checkpoints`` (a FIFO or a folder named like
    one is not a checkpoint, and opening a FIFO would block)."""
    folder = run_dir / "checkpoints"
    try:
        return sorted(p for p in folder.glob("*.ckpt") if is_regular_file(p))
    except OSError:
        return []


def has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoint_files(run_dir))


_RUN_DIRS: dict[tuple[Any, ...], str] = {}


def run_dir(log_dir: str, name: str, _root_: DictConfig) -> str:
    """``hydra.run.dir``: a new ``<log_dir>/runs/<time>_<name>_<overrides>`` folder
    (``mtl_clippy.run_names``), or, when resuming,
    the folder of the run being continued. The same answer every time it is asked in a
    process (the resolver cannot use OmegaConf's cache, since it reads the root)."""
    resume = _root_.get("resume", False)
    ckpt_path = _root_.get("ckpt_path")
    key = (log_dir, name, str(resume), str(ckpt_path), tuple(_task_overrides(_root_)))
    if key not in _RUN_DIRS:
        _RUN_DIRS[key] = _choose_run_dir(Path(log_dir) / "runs", name, resume, ckpt_path, _root_)
    return _RUN_DIRS[key]


def _choose_run_dir(runs: Path, name: str, resume: Any, ckpt_path: Any, _root_: DictConfig) -> str:
    if ckpt_path:
        ckpt = Path(str(ckpt_path)).expanduser().resolve()
        if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / ".hydra").is_dir():
            return str(ckpt.parent.parent)
    elif isinstance(resume, str) and resume not in ("true", "false", "True", "False", ""):
        folder = Path(resume).expanduser()
        if folder.is_dir():
            return str(folder.resolve())
    elif resume_requested(_root_):
        wanted = run_identity(_task_overrides(_root_))
        if runs.is_dir():
            # <stamp>_<model>-<optim>[_<overrides>] (older runs: no overrides in the name);
            # the overrides the run was started with decide, not its name
            pattern = f"*_{glob.escape(run_names.safe_name(name))}*"
            for folder in sorted(runs.glob(pattern), key=lambda p: p.name, reverse=True):
                saved = _saved_overrides(folder / ".hydra" / "overrides.yaml")
                if saved is not None and run_identity(saved) == wanted and has_checkpoint(folder):
                    return str(folder)
    _check_one_folder_for_all_ranks(_root_)
    stamp = datetime.datetime.now().strftime(STAMP)
    exclude = OmegaConf.select(_root_, "hydra.job.config.override_dirname.exclude_keys") or ()
    overrides = _task_overrides(_root_)
    return str(runs / run_names.run_folder_name(stamp, name, overrides, list(exclude)))


def _check_one_folder_for_all_ranks(_root_: DictConfig) -> None:
    """A new run folder's name holds the time of its start: processes started separately
    (srun, torchrun, one command per node) would each make their own and write their own
    results. Every one of them stops here, before any folder exists, rather than hang or
    scatter the run; they agree on a folder named on the command line."""
    from mtl_clippy import launch

    try:
        num_nodes = (_root_.get("trainer") or {}).get("num_nodes", 1)
    except Exception:
        num_nodes = 1
    if launch.started_separately(num_nodes):
        raise ConfigError(launch.separate_run_dir_message())


def register_resolvers() -> None:
    """``mtl_clippy.run_dir`` (a single run's folder) and ``mtl_clippy.safe_name`` (a sweep
    job's folder name made safe: ``mtl_clippy.run_names``)."""
    if not OmegaConf.has_resolver("mtl_clippy.run_dir"):
        OmegaConf.register_new_resolver("mtl_clippy.run_dir", run_dir)
    if not OmegaConf.has_resolver("mtl_clippy.safe_name"):
        OmegaConf.register_new_resolver("mtl_clippy.safe_name", run_names.safe_name_resolver)


# ----------------------------------------------------------------------------- checkpoints


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file that ``torch.load(weights_only=True)`` refuses: it holds Python
    objects other than tensors and plain values, which unpickling could make run code."""


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of a checkpoint file, loaded the only way this project loads one:
    ``torch.load(weights_only=True)``, which rebuilds tensors and plain Python values and
    nothing else, so a crafted file cannot run code. Tensors stay memory-mapped where the
    file allows it (reading the step of a large checkpoint costs nothing).

    Raises :class:`UnsafeCheckpoint` (a ``ConfigError``, naming the file) for a file that
    needs anything more; other errors (a damaged or truncated file, or a path that is not a
    regular file) propagate as ``OSError`` or as torch raises them.
    """
    if not is_regular_file(path):  # a FIFO would block the read below forever
        raise OSError(f"{path} is not a regular file")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch's format; the old one cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        if refused_for_safety(path, exc):
            raise UnsafeCheckpoint(unsafe_checkpoint_message(path, exc)) from None
        raise


def refused_for_safety(path: Any, exc: pickle.UnpicklingError) -> bool:
    """Whether the safe loader's ``exc`` refused what the file holds (a Python object other
    than tensors and plain values, named by a global or built by an opcode it does not run),
    rather than found no complete pickle (a text file, random bytes, a file cut short:
    damaged, and harmless to any loader).

    The loader's message cannot tell an unknown opcode of a payload from the garbage of a
    damaged file, so the pickle it read is decoded (never run): in torch's zip format the
    ``data.pkl`` member, in its old format the fourth pickle of the file (after the magic
    number, the protocol and the system info), else the file's first pickle. A pickle that
    decodes to its end was refused for what it holds. ``path`` may be an open binary file.
    """
    if "GLOBAL" in str(exc):  # a class or function to import: the heart of a payload
        return True
    try:
        with _open_binary(path) as f:
            if f.read(4) == b"PK\x03\x04":
                f.seek(0)
                with zipfile.ZipFile(f) as archive:
                    member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                    _decode_pickle(io.BytesIO(archive.read(member)))
                return True
            f.seek(0)
            first = _decode_pickle(f)
            if first == [torch.serialization.MAGIC_NUMBER]:  # torch's old format
                for _ in range(3):  # the protocol, the system info, then the content
                    _decode_pickle(f)
    except Exception:  # no complete pickle where the loader read one: damaged
        return False
    return True


@contextlib.contextmanager
def _open_binary(path: Any) -> Iterator[IO[bytes]]:
    """``path`` opened for reading, or an open file rewound (and left open)."""
    if hasattr(path, "read") and hasattr(path, "seek"):
        position = path.tell()
        path.seek(0)
        try:
            yield path
        finally:
            path.seek(position)
        return
    if not is_regular_file(path):
        raise OSError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        yield f


def _decode_pickle(f: IO[bytes]) -> list[Any]:
    """Decode (never run) one pickle from ``f`` up to its STOP opcode; the arguments of its
    LONG1 opcodes (how torch's old format writes its magic number). Raises on anything that
    is not a complete pickle."""
    longs = []
    for opcode, arg, _ in pickletools.genops(f):
        if opcode.name == "LONG1":
            longs.append(arg)
    return longs


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is (or links to) a regular file. A FIFO, a device or a socket named
    like a checkpoint is never opened: reading one could block forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def unsafe_checkpoint_message(path: str | os.PathLike[str], exc: BaseException) -> str:
    """One line naming ``path`` and what torch's safe loader refused in it."""
    return (
        f"checkpoint {path} is refused: it holds Python objects other than tensors and plain "
        f"values ({_reason(exc)}), which could run code when loaded; checkpoints are loaded with "
        "torch.load(weights_only=True) only: use a checkpoint written by this project, or "
        "remove the file"
    )


def _reason(exc: BaseException) -> str:
    """The line of torch's many-line safe-loader message that says what it met."""
    skip = ("weights only load failed", "please file an issue", "check the documentation")
    lines = [line.strip() for line in str(exc).splitlines()]
    found = [line for line in lines if line and not line.lower().startswith(skip)]
    if not found:
        return type(exc).__name__
    return found[0].removeprefix("WeightsUnpickler error:").strip(" .")


def checkpoint_step(path: Path) -> tuple[int, int] | None:
    """(global step, epoch) stored in a checkpoint, or None if it cannot be read (damaged).

    Raises :class:`UnsafeCheckpoint` for a file that does not load with ``weights_only=True``:
    it is neither used nor skipped in silence, since it was put there by someone.
    """
    try:
        ckpt = load_checkpoint(path)
        return int(ckpt.get("global_step", -1)), int(ckpt.get("epoch", -1))
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # a damaged file: say so, and use an older one
        log.warning("skipping unreadable checkpoint %s (%s)", path, _reason(exc))
        return None


def find_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint of ``run_dir`` that is furthest into training (``last.ckpt`` from the
    end of an epoch, or ``step-*.ckpt`` from inside one; ``best.ckpt`` is never newer) and
    its global step.

    Every checkpoint of the folder is opened (``best.ckpt`` too, though never chosen), so that
    a file someone put there is refused (:class:`UnsafeCheckpoint`) before the run trains,
    not when the test loads the best checkpoint after training.
    """
    found: list[tuple[int, int, Path]] = []
    for path in checkpoint_files(run_dir):
        step = checkpoint_step(path)  # raises UnsafeCheckpoint, best.ckpt included
        if step is not None and not path.name.startswith("best"):
            # at equal steps prefer last.ckpt: it was taken after that epoch's validation
            found.append((step[0], int(path.name.startswith("last")), path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step

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

import datetime
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

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


def has_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.suffix == ".ckpt" for p in folder.iterdir())


_RUN_DIRS: dict[tuple[Any, ...], str] = {}


def run_dir(log_dir: str, name: str, _root_: DictConfig) -> str:
    """``hydra.run.dir``: a new ``<log_dir>/runs/<time>_<name>`` folder, or, when resuming,
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
            for folder in sorted(runs.glob(f"*_{name}"), reverse=True):
                saved = _saved_overrides(folder / ".hydra" / "overrides.yaml")
                if saved is not None and run_identity(saved) == wanted and has_checkpoint(folder):
                    return str(folder)
    _check_one_folder_for_all_ranks(_root_)
    return str(runs / f"{datetime.datetime.now().strftime(STAMP)}_{name}")


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
    if not OmegaConf.has_resolver("mtl_clippy.run_dir"):
        OmegaConf.register_new_resolver("mtl_clippy.run_dir", run_dir)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> tuple[int, int] | None:
    """(global step, epoch) stored in a checkpoint, or None if it cannot be read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(ckpt.get("global_step", -1)), int(ckpt.get("epoch", -1))
    except Exception as exc:  # a damaged file: say so, and use an older one
        log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
        return None


def find_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint of ``run_dir`` that is furthest into training (``last.ckpt`` from the
    end of an epoch, or ``step-*.ckpt`` from inside one; ``best.ckpt`` is never newer) and
    its global step."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found: list[tuple[int, int, Path]] = []
    for path in folder.glob("*.ckpt"):
        if path.name.startswith("best"):
            continue
        step = checkpoint_step(path)
        if step is not None:
            # at equal steps prefer last.ckpt: it was taken after that epoch's validation
            found.append((step[0], int(path.name.startswith("last")), path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step

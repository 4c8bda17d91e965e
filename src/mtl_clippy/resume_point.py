"""Where a run starts: a checkpoint to continue from, afresh, or nowhere because it had
already finished (``resume=true`` on a completed run).

The run folder a resume continues in is chosen earlier, by ``mtl_clippy.resume``'s config
resolvers; this is the checkpoint choice inside that folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig

from mtl_clippy import distributed
from mtl_clippy import resume as resume_mod
from mtl_clippy.errors import ConfigError
from mtl_clippy.summary import METRICS_FILE, RunSummary

log = logging.getLogger("mtl_clippy")


class ResumePoint(NamedTuple):
    ckpt_path: str | None = None  # the checkpoint to continue from (None: start afresh)
    step: int | None = None  # its global step
    #: resume=true on a finished run: its metrics.json as the file holds it (not a
    #: ``RunSummary``, which would add the keys an older file lacks: train() returns it as is)
    previous: dict[str, Any] | None = None


def resume_point(cfg: DictConfig, out_dir: Path) -> ResumePoint:
    """Where this run starts: a checkpoint (``ckpt_path``, or the newest of this run folder
    with ``resume=true``), afresh, or nowhere because it had already finished."""
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
        found = resume_mod.checkpoint_step(path)
        if found is None:
            raise ConfigError(f"ckpt_path: {path} is not a readable checkpoint")
        return ResumePoint(str(path), found[0])
    if not resume_mod.resume_requested(cfg):
        return ResumePoint()
    previous: dict[str, Any] | None = None
    if (out_dir / METRICS_FILE).is_file():
        try:
            previous = json.loads((out_dir / METRICS_FILE).read_text())
        except ValueError:  # half a file (a kill while writing it, before writes were atomic)
            previous = None
        if not isinstance(previous, Mapping):  # a foreign file: as if there were none
            previous = None
        else:
            try:  # a file RunSummary cannot read (a wrongly typed key): as if there were none
                RunSummary.from_json(previous)
            except ValueError:
                previous = None
        if previous is not None and previous.get("status") in ("completed", "diverged"):
            return ResumePoint(previous=dict(previous))
    newest = resume_mod.find_checkpoint(out_dir)
    if newest is not None:
        log.info("resuming from %s", newest[0])
        return ResumePoint(str(newest[0]), newest[1])
    if distributed.is_multirun():  # a sweep job that had not started (or saved nothing)
        return ResumePoint()
    if previous is not None and previous.get("status") == "interrupted":
        # This folder's run was stopped (a requeued SLURM job, say) before its first
        # checkpoint: there is nothing to resume, so it starts again, in the same folder.
        log.info("resume: %s stopped before its first checkpoint; starting it afresh", out_dir)
        return ResumePoint()
    raise ConfigError(
        f"resume={cfg.resume}: found no checkpoint of an earlier run with the same overrides "
        f"under {Path(cfg.paths.log_dir) / 'runs'} (compare the overrides in "
        "<run>/.hydra/overrides.yaml); start it without resume=true, or name the run with "
        "resume=<run folder> or a checkpoint with ckpt_path=<file>"
    )

"""Rank and DDP plumbing of the task: which process writes, and how a sweep job that runs
on several processes starts its other ranks and leaves no trace for the next job.

The rank rules themselves (srun, torchrun, Lightning's own variables) are
``mtl_clippy.launch``'s; this module applies them to a run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from mtl_clippy import launch

#: Set by Lightning's DDP launcher in the launching process; a later job of the same sweep
#: would take them as "the other ranks already exist" and wait for them forever.
DDP_ENV = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def is_global_zero(trainer: pl.Trainer | None = None) -> bool:
    """Lightning's global rank 0: the trainer's, or before it exists ``rank_zero_only.rank``,
    which :func:`set_rank` sets to the rank Lightning will give this process
    (``mtl_clippy.launch``: ``SLURM_PROCID`` under srun, ``RANK`` under torchrun, else
    ``NODE_RANK`` and ``LOCAL_RANK``)."""
    if trainer is not None:
        return bool(trainer.is_global_zero)
    return rank_zero_only.rank == 0


def set_rank(trainer_cfg: Mapping[str, Any] | None) -> None:
    """Make Lightning's rank-zero utilities (its loggers, ``rank_zero_only``) take the rank
    that the Trainer of ``trainer_cfg`` will give this process, from now on, not only once
    the Trainer exists."""
    trainer_cfg = trainer_cfg or {}
    rank_zero_only.rank = launch.global_rank(
        trainer_cfg.get("devices"),
        trainer_cfg.get("num_nodes", 1),
        trainer_cfg.get("accelerator", "auto"),
    )


def children_run_this_job() -> None:
    """In a sweep, make Lightning's DDP launcher start the other ranks on this job alone.

    Lightning starts rank k by re-running the command line (``sys.argv``) with
    ``hydra.run.dir=<HydraConfig run.dir>``; in a sweep that would be the whole sweep, in the
    wrong folder. Point both at this job: its overrides, and its output folder.
    """
    if not is_multirun():
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hc = HydraConfig.get()
    sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir


def end_distributed(env_before: Mapping[str, str | None]) -> None:
    """After a sweep job: close its process group and restore the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

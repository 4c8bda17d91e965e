"""Which DDP rank this process is, the way Lightning decides it, also before a Trainer exists.

Lightning picks a cluster environment from the process's environment (TorchElastic, SLURM,
LSF, MPI, else its own) and the DDP strategy gives the process the global rank
``node_rank * processes_per_node + local_rank`` of that environment (SLURM, TorchElastic,
LSF and MPI state the global rank themselves). Once a Trainer exists, ``trainer.global_rank``
and ``rank_zero_only.rank`` hold that rank. What runs before the Trainer (Hydra's run folder,
its ``.hydra`` files and log file, resuming a CSV log) asks :func:`global_rank`, which
applies the same rule, so that exactly one process (global rank 0) writes each file:

* under ``srun`` (SLURM): ``SLURM_PROCID``;
* under ``torchrun``: ``RANK``;
* processes started by Lightning's own launcher, or one ``python train.py`` per node
  started by hand: ``NODE_RANK`` (or ``GROUP_RANK``) and ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

#: Lightning's order of detection (``_AcceleratorConnector._choose_and_init_cluster_environment``).
_ENVIRONMENTS = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)

#: Hydra's job name of a rank > 0: its log file is ``<name>.log`` in the run folder, as for
#: the ranks that Lightning's launcher starts (``train_ddp_process_<local rank>``).
RANK_JOB_NAME = "train_ddp_process_{rank}"


def environment_type() -> type[ClusterEnvironment]:
    """The cluster environment class that a Trainer started now would use."""
    for env_type in _ENVIRONMENTS:
        if env_type.detect():
            return env_type
    return LightningEnvironment


def _int_env(*keys: str, default: int = 0) -> int:
    for key in keys:
        value = os.environ.get(key)
        if value not in (None, ""):
            return int(value)
    return default


def processes_per_node(devices: Any = None, num_nodes: Any = 1) -> int:
    """The DDP processes of each node for ``trainer.devices`` (only the rank numbers of
    processes started by Lightning or by hand on nodes > 0 depend on it)."""
    if isinstance(devices, bool):
        return 1
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, list | tuple):
        return max(len(devices), 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return processes_per_node(int(devices), num_nodes)
    if isinstance(devices, str) and "," in devices:
        return max(len([d for d in devices.split(",") if d.strip()]), 1)
    world = _int_env("WORLD_SIZE", default=0)  # "auto": Lightning's launcher states the world
    nodes = num_nodes if isinstance(num_nodes, int) and num_nodes > 0 else 1
    return max(world // nodes, 1) if world else 1


def global_rank(devices: Any = None, num_nodes: Any = 1) -> int:
    """The global rank that Lightning gives this process (0 outside distributed training)."""
    env_type = environment_type()
    if env_type is SLURMEnvironment:
        return _int_env("SLURM_PROCID")
    if env_type is TorchElasticEnvironment:
        return _int_env("RANK")
    if env_type is not LightningEnvironment:  # LSF, MPI: they state it
        try:
            return int(env_type().global_rank())
        except Exception:
            return 0
    node_rank = _int_env("NODE_RANK", "GROUP_RANK")
    return node_rank * processes_per_node(devices, num_nodes) + _int_env("LOCAL_RANK")


def is_global_zero(trainer: Any = None, devices: Any = None, num_nodes: Any = 1) -> bool:
    """Whether this process is global rank 0: the trainer's answer once one exists."""
    if trainer is not None:
        return bool(trainer.is_global_zero)
    return global_rank(devices, num_nodes) == 0


def launched_world_size() -> int:
    """The number of processes that the launcher (srun, torchrun, Lightning) started
    together, as the environment states it (1 when it states none)."""
    env_type = environment_type()
    if env_type is SLURMEnvironment:
        return _int_env("SLURM_NTASKS", default=1)
    if env_type is not LightningEnvironment and env_type is not TorchElasticEnvironment:
        try:
            return int(env_type().world_size())
        except Exception:
            return 1
    return _int_env("WORLD_SIZE", default=1)


def started_separately(num_nodes: Any = 1) -> bool:
    """Whether this process is one of several that were started each as a ``python train.py``
    of its own, by ``srun``, ``torchrun``, or by hand on each node (``trainer.num_nodes`` > 1)
    or by Lightning's launcher: they can agree on nothing they choose independently (a time
    stamp), and rank 0 cannot pass them its choices (Lightning's launcher passes its children
    the run folder)."""
    if environment_type() is not LightningEnvironment:
        return launched_world_size() > 1
    nodes = num_nodes if isinstance(num_nodes, int) else 1
    return nodes > 1 or ("LOCAL_RANK" in os.environ and launched_world_size() > 1)


def separate_run_dir_message(key: str = "hydra.run.dir") -> str:
    """The one line for processes started separately without a run folder named for all."""
    kind = "sweep" if "sweep" in key else "run"
    return (
        f"{key}: this is one of {launched_world_size()} processes started separately (srun, "
        f"torchrun, or one command per node), which must write one {kind} folder: name it on "
        f"the command line, the same for all, e.g. {key}=outputs/{kind}s/job-$SLURM_JOB_ID"
    )


def _trainer_value(root: Any, key: str, default: Any) -> Any:
    try:
        trainer = root.get("trainer") or {}
        return trainer.get(key, default)
    except Exception:
        return default


def hydra_output_subdir(default: str = ".hydra", _root_: Any = None) -> str | None:
    """``hydra.output_subdir``: Hydra's config files are written by global rank 0 only."""
    devices, nodes = _trainer_value(_root_, "devices", None), _trainer_value(_root_, "num_nodes", 1)
    return default if global_rank(devices, nodes) == 0 else None


def hydra_job_name(default: str = "train", _root_: Any = None) -> str:
    """``hydra.job.name`` (the log file's name): ``train_ddp_process_<rank>`` on ranks > 0."""
    devices, nodes = _trainer_value(_root_, "devices", None), _trainer_value(_root_, "num_nodes", 1)
    rank = global_rank(devices, nodes)
    return default if rank == 0 else RANK_JOB_NAME.format(rank=rank)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mtl_clippy.hydra_subdir"):
        OmegaConf.register_new_resolver("mtl_clippy.hydra_subdir", hydra_output_subdir)
    if not OmegaConf.has_resolver("mtl_clippy.job_name"):
        OmegaConf.register_new_resolver("mtl_clippy.job_name", hydra_job_name)

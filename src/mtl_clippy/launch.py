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
from collections.abc import Sequence
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

#: Hydra's job name and log file (``<name>.log`` in the run folder) of a rank > 0, by its
#: global rank (Lightning's launcher names the ranks it starts by their local rank).
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


def _lightning_device_count(devices: Any, accelerator: Any) -> int | None:
    """How many devices Lightning's Trainer takes for ``devices`` (``"auto"``, ``-1``, ...) on
    ``accelerator``, by Lightning's own parsing; None where it would not accept them."""
    try:
        from lightning.fabric.utilities.device_parser import _select_auto_accelerator
        from lightning.pytorch.accelerators import AcceleratorRegistry, MPSAccelerator

        name = str(accelerator or "auto").lower()
        if name == "auto":
            name = _select_auto_accelerator()
        elif name == "gpu":
            name = "mps" if MPSAccelerator.is_available() else "cuda"
        accelerator_cls = AcceleratorRegistry[name]["accelerator"]
        if devices in (None, "auto"):
            devices = accelerator_cls.auto_device_count()
        parsed = accelerator_cls.parse_devices(devices)
        return max(len(accelerator_cls.get_parallel_devices(parsed)), 1)
    except Exception:
        return None


def processes_per_node(devices: Any = None, num_nodes: Any = 1, accelerator: Any = "auto") -> int:
    """The DDP processes of each node for ``trainer.devices`` on ``trainer.accelerator``, as
    Lightning counts them (only the rank numbers of processes started by Lightning or by hand
    on nodes > 0 depend on it)."""
    if isinstance(devices, bool):
        return 1
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) > 0:
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return max(len([d for d in devices.split(",") if d.strip()]), 1)
    if isinstance(devices, Sequence) and not isinstance(devices, str):  # a list (ListConfig)
        return max(len(devices), 1)
    counted = _lightning_device_count(devices, accelerator)  # "auto", -1: Lightning's count
    if counted is not None:
        return counted
    world = _int_env("WORLD_SIZE", default=0)  # Lightning's launcher states the world
    nodes = num_nodes if isinstance(num_nodes, int) and num_nodes > 0 else 1
    return max(world // nodes, 1) if world else 1


def global_rank(devices: Any = None, num_nodes: Any = 1, accelerator: Any = "auto") -> int:
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
    per_node = processes_per_node(devices, num_nodes, accelerator)
    return node_rank * per_node + _int_env("LOCAL_RANK")


def is_global_zero(
    trainer: Any = None, devices: Any = None, num_nodes: Any = 1, accelerator: Any = "auto"
) -> bool:
    """Whether this process is global rank 0: the trainer's answer once one exists."""
    if trainer is not None:
        return bool(trainer.is_global_zero)
    return global_rank(devices, num_nodes, accelerator) == 0


def launched_world_size() -> int:
    """The number of processes that the launcher (srun, torchrun, Lightning) started
    together, as the environment states it (1 when it states none).

    Under SLURM that is the job *step's* task count, ``SLURM_STEP_NUM_TASKS``, which srun
    sets in every task (with ``SLURM_STEP_ID``). ``SLURM_NTASKS`` is the allocation's: the
    batch script of ``sbatch --ntasks=4`` sees 4 there, but runs as one process, and a
    ``python train.py`` in it is one process (rank 0), not one of 4."""
    env_type = environment_type()
    if env_type is SLURMEnvironment:
        return max(_int_env("SLURM_STEP_NUM_TASKS", default=1), _int_env("SLURM_PROCID") + 1)
    if env_type is not LightningEnvironment and env_type is not TorchElasticEnvironment:
        try:
            return int(env_type().world_size())
        except Exception:
            return 1
    return _int_env("WORLD_SIZE", default=1)


def started_separately(num_nodes: Any = 1) -> bool:
    """Whether this process is one of several that were really started, each as a
    ``python train.py`` of its own: by ``srun`` (a job step of several tasks), ``torchrun``
    (``WORLD_SIZE`` > 1), by hand on each node (``trainer.num_nodes`` > 1) or by Lightning's
    launcher. They can agree on nothing they choose independently (a time stamp), and rank 0
    cannot pass them its choices (Lightning's launcher passes its children the run folder).
    A lone process in a SLURM allocation of several tasks (the batch script) is not one."""
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


def _config_rank(root: Any) -> int:
    """The global rank of this process for the config ``root`` (its trainer's devices)."""
    return global_rank(
        _trainer_value(root, "devices", None),
        _trainer_value(root, "num_nodes", 1),
        _trainer_value(root, "accelerator", "auto"),
    )


def hydra_output_subdir(default: str = ".hydra", _root_: Any = None) -> str | None:
    """``hydra.output_subdir``: Hydra's config files are written by global rank 0 only."""
    return default if _config_rank(_root_) == 0 else None


def hydra_job_name(default: str = "train", _root_: Any = None) -> str:
    """``hydra.job.name``: ``train_ddp_process_<global rank>`` on ranks > 0."""
    rank = _config_rank(_root_)
    return default if rank == 0 else RANK_JOB_NAME.format(rank=rank)


def hydra_log_name(job_name: str = "train", _root_: Any = None) -> str:
    """The name of Hydra's log file (``<name>.log`` in the run folder): the job's name on
    global rank 0, ``train_ddp_process_<global rank>`` on every other rank.

    Lightning's launcher names the processes it starts ``hydra.job.name=train_ddp_process_<local
    rank>``: with one command per node, a process of each node would have the same name, and
    write the same file. The file is named by the global rank instead, whatever the job name."""
    rank = _config_rank(_root_)
    return str(job_name) if rank == 0 else RANK_JOB_NAME.format(rank=rank)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mtl_clippy.hydra_subdir"):
        OmegaConf.register_new_resolver("mtl_clippy.hydra_subdir", hydra_output_subdir)
    if not OmegaConf.has_resolver("mtl_clippy.job_name"):
        OmegaConf.register_new_resolver("mtl_clippy.job_name", hydra_job_name)
    if not OmegaConf.has_resolver("mtl_clippy.log_name"):
        OmegaConf.register_new_resolver("mtl_clippy.log_name", hydra_log_name)

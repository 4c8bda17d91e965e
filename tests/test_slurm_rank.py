"""Rank zero under every launcher: srun (SLURM), torchrun, one command per node, Lightning's own.

Exactly one process, global rank 0, writes each file of a run (metrics.json, the printed
table, the CSV log, Hydra's .hydra/ files and log). Under srun Lightning sets neither RANK nor
LOCAL_RANK: the rank is SLURM_PROCID, read by Lightning's SLURMEnvironment. The rank that the
code asks for before a Trainer exists (mtl_clippy.launch) must be the one the Trainer then
gives the process: checked against an independent statement of Lightning's rule, against
Lightning's Trainer itself, and end to end by two-"node" jobs on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.utilities import rank_zero_only

from app_helpers import DDP_COMMON, ROOT

#: Everything a launcher may set that says which process this is.
LAUNCH_VARS = (
    "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "JSM_NAMESPACE_RANK",
)  # fmt: skip


def _clean_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """The process environment with no launcher's variables but ``env``."""
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith(("SLURM_", "LSB_", "OMPI_", "PMI_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _srun_env(procid: int, ntasks: int = 2) -> dict[str, str]:
    """What srun sets in task ``procid`` of a job of ``ntasks`` nodes, one task per node: the
    allocation's variables (SLURM_NTASKS, ...) and the job step's (SLURM_STEP_*)."""
    return {
        "SLURM_JOB_ID": "81234",
        "SLURM_JOB_NAME": "train",
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_STEP_NUM_NODES": str(ntasks),
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_STEP_TASKS_PER_NODE": f"1(x{ntasks})",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(procid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": str(ntasks),
        "SLURM_NODELIST": "127.0.0.1",
    }


def _ddp_trainer(devices: int, num_nodes: int):
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=devices, num_nodes=num_nodes,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip


# ----------------------------------------------------------------------------- unit


@pytest.mark.parametrize("procid, zero", [(1, False), (0, True)])
def test_srun_task_is_rank_zero_only_for_procid_zero(procid, zero, monkeypatch):
    """srun sets SLURM_PROCID, not RANK / LOCAL_RANK: task 1 of 2 is not rank zero."""
    from mtl_clippy import distributed

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # restored afterwards
    _clean_env(monkeypatch, **_srun_env(procid))
    trainer = _ddp_trainer(devices=1, num_nodes=2)
    assert trainer.global_rank == procid  # Lightning's own answer
    assert distributed.is_global_zero() is zero
    assert distributed.is_global_zero(trainer) is zero
    from mtl_clippy import launch

    assert launch.global_rank(1, 2) == procid  # before any Trainer: the same rule
    assert launch.is_global_zero(devices=1, num_nodes=2) is zero


def _expected_rank(env: dict[str, str], devices: int) -> int:
    """Lightning's rule, stated independently: torchrun (TORCHELASTIC_RUN_ID) gives RANK;
    srun (SLURM_NTASKS, unless the job is named bash or interactive) gives SLURM_PROCID;
    otherwise the DDP strategy's node_rank * devices + local_rank, with node_rank from
    NODE_RANK, else GROUP_RANK, else 0, and local_rank from LOCAL_RANK, else 0."""
    if "TORCHELASTIC_RUN_ID" in env:
        return int(env.get("RANK", 0))
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(env.get("SLURM_PROCID", 0))
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    return node * devices + int(env.get("LOCAL_RANK", 0))


_envs = st.fixed_dictionaries(
    {},
    optional={
        "RANK": st.integers(0, 7).map(str),
        "LOCAL_RANK": st.integers(0, 3).map(str),
        "NODE_RANK": st.integers(0, 3).map(str),
        "GROUP_RANK": st.integers(0, 3).map(str),
        "WORLD_SIZE": st.integers(1, 8).map(str),
        "TORCHELASTIC_RUN_ID": st.just("none"),
        "SLURM_PROCID": st.integers(0, 7).map(str),
        "SLURM_NTASKS": st.integers(1, 8).map(str),
        "SLURM_JOB_NAME": st.sampled_from(["train", "bash", "interactive", "job"]),
    },
)


@given(env=_envs, devices=st.integers(1, 4))
def test_rank_before_the_trainer_follows_lightnings_rule(env, devices):
    from mtl_clippy import launch

    with pytest.MonkeyPatch.context() as mp:
        _clean_env(mp, **env)
        rank = launch.global_rank(devices, 2)
        assert rank == _expected_rank(env, devices), env
        assert launch.is_global_zero(devices=devices, num_nodes=2) is (rank == 0)


#: Task 3 of srun on 2 nodes x 2 tasks, and rank 2 of torchrun on 2 nodes x 2 processes.
SRUN_2X2_TASK_3 = {
    **_srun_env(3, 4), "SLURM_NODEID": "1", "SLURM_LOCALID": "1",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}  # fmt: skip
TORCHRUN_2X2_RANK_2 = {
    "TORCHELASTIC_RUN_ID": "x", "RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1",
    "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
}  # fmt: skip


@pytest.mark.parametrize(
    "env, devices, num_nodes",
    [
        (_srun_env(1), 1, 2),
        (_srun_env(0), 1, 2),
        (SRUN_2X2_TASK_3, 2, 2),
        ({"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1, 2),
        ({"NODE_RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, 2, 2),
        ({"NODE_RANK": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 2, 1),
        (TORCHRUN_2X2_RANK_2, 2, 2),
        ({**_srun_env(1), "SLURM_JOB_NAME": "interactive", "NODE_RANK": "0"}, 1, 2),
        ({}, 1, 1),
        # devices=auto (one CPU device a node) with a stale WORLD_SIZE: the rank is 1, not 4
        ({"NODE_RANK": "1", "WORLD_SIZE": "8"}, "auto", 2),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "8"}, "auto", 2),
        ({"NODE_RANK": "1", "WORLD_SIZE": "8"}, "3", 2),
    ],
)
def test_rank_before_the_trainer_is_the_trainers(env, devices, num_nodes, monkeypatch):
    """Lightning's Trainer, built in each environment, is the oracle."""
    from mtl_clippy import launch

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    _clean_env(monkeypatch, **env)
    expected = launch.global_rank(devices, num_nodes, "cpu")
    trainer = _ddp_trainer(devices, num_nodes)
    assert trainer.global_rank == expected
    assert rank_zero_only.rank == expected


def test_separately_started_processes_must_name_their_run_folder(monkeypatch):
    """Each srun task would name a new run folder by its own start time: every task stops
    with one line before any folder exists, unless hydra.run.dir names one for all."""
    from mtl_clippy.cli import check_overrides

    configs = ROOT / "configs"
    args = ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"]
    for procid in (0, 1):
        _clean_env(monkeypatch, **_srun_env(procid))
        message = check_overrides(args, configs)
        assert message is not None and message.startswith("hydra.run.dir:"), message
        assert check_overrides([*args, "hydra.run.dir=/tmp/job-81234"], configs) is None
        multirun = check_overrides(["-m", *args, "seed=1,2"], configs)
        assert multirun is not None and multirun.startswith("hydra.sweep.dir:")
    _clean_env(monkeypatch, NODE_RANK="1")  # one command per node, by hand
    assert check_overrides(args, configs).startswith("hydra.run.dir:")
    _clean_env(monkeypatch)  # one process (Lightning starts the others): its own folder
    assert check_overrides(["trainer=ddp", "trainer.devices=2"], configs) is None


def test_hydra_files_and_log_of_ranks_above_zero(monkeypatch):
    """Hydra's .hydra/ files come from rank 0 only; rank k logs to train_ddp_process_<k>.log."""
    from mtl_clippy import launch

    _clean_env(monkeypatch, **_srun_env(1))
    assert launch.hydra_output_subdir(".hydra") is None
    assert launch.hydra_job_name("train") == "train_ddp_process_1"
    _clean_env(monkeypatch, **_srun_env(0))
    assert launch.hydra_output_subdir(".hydra") == ".hydra"
    assert launch.hydra_job_name("train") == "train"


def test_sweep_table_is_written_by_rank_zero_only(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from mtl_clippy.report.hydra_callback import SweepResultsCallback

    job = tmp_path / "0_seed=1"
    job.mkdir()
    (job / "metrics.json").write_text(json.dumps({"status": "completed", "model": "sb"}))
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path)}}, "trainer": {"devices": 1, "num_nodes": 2}}
    )
    _clean_env(monkeypatch, **_srun_env(1))
    SweepResultsCallback().on_multirun_end(config)
    assert not (tmp_path / "results.csv").exists()
    _clean_env(monkeypatch, **_srun_env(0))
    SweepResultsCallback().on_multirun_end(config)
    assert (tmp_path / "results.csv").is_file()


# ----------------------------------------------------------------------------- end to end

COMMON = DDP_COMMON


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "LSB_", "OMPI_", "PMI_"))
    }
    return {**env, "MTL_CLIPPY_DISABLE_FUSED": "1", "PYTHONWARNINGS": "ignore", **extra}


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _two_nodes(tmp: Path, data_dir: Path, rank_env) -> tuple[Path, list[str]]:
    """Two `python train.py`, one per "node" (trainer.num_nodes=2 trainer.devices=1), with
    the same global batch as one process with 128 rows; returns the run folder, stdouts."""
    tmp.mkdir()
    port = str(_free_port())
    run_dir = tmp / "outputs" / "runs" / "job-81234"
    args = [
        *COMMON, f"paths.log_dir={tmp}/outputs", f"paths.data_dir={data_dir}",
        "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=64",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    procs = [
        _start(args, tmp, _train_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **rank_env(r)))
        for r in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return run_dir, outs


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, batch 128 (it also generates the data the two-node jobs read)."""
    tmp = tmp_path_factory.mktemp("single")
    data_dir = tmp / "data"
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *COMMON, "data.batch_size=128",
         f"paths.log_dir={tmp}/outputs", f"paths.data_dir={data_dir}"],
        cwd=tmp, env=_train_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics,) = (tmp / "outputs").rglob("metrics.json")
    return data_dir, json.loads(metrics.read_text())


def _check_one_writer(tmp: Path, run_dir: Path, outs: list[str], single: dict) -> None:
    metrics = list(tmp.rglob("metrics.json"))
    assert metrics == [run_dir / "metrics.json"], metrics  # one file, by rank 0
    assert [p.name for p in (tmp / "outputs" / "runs").iterdir()] == [run_dir.name]
    two = json.loads(metrics[0].read_text())
    assert two["status"] == single["status"] == "completed"
    assert two["steps"] == single["steps"]
    for split in ("val", "test"):
        assert set(two[split]) == set(single[split])
        for key, value in single[split].items():
            assert two[split][key] == pytest.approx(value, abs=1e-5), (split, key)
    assert "run folder:" in outs[0] and "run folder:" not in outs[1]  # one table, by rank 0
    assert "| task" not in outs[1]
    assert len(list(tmp.rglob("metrics.csv"))) == 1
    assert (run_dir / "train.log").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    assert "train_ddp_process_1" not in (run_dir / "train.log").read_text()
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_nodes_by_node_rank_write_one_result_equal_to_one_process(tmp_path, single_run):
    data_dir, single = single_run
    run_dir, outs = _two_nodes(tmp_path / "two", data_dir, lambda r: {"NODE_RANK": str(r)})
    _check_one_writer(tmp_path / "two", run_dir, outs, single)


@pytest.mark.slow
def test_two_srun_tasks_write_one_result_equal_to_one_process(tmp_path, single_run):
    """The case of the bug: srun's variables (SLURM_PROCID 0 and 1), no RANK / LOCAL_RANK."""
    data_dir, single = single_run
    run_dir, outs = _two_nodes(tmp_path / "srun", data_dir, _srun_env)
    _check_one_writer(tmp_path / "srun", run_dir, outs, single)


def test_several_tasks_with_a_one_process_trainer_stop(tmp_path, monkeypatch):
    """srun with 2 tasks but no DDP trainer: each task would train alone as its own rank 0."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtl_clippy.errors import ConfigError
    from mtl_clippy.train import train

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["data.train_rows=600", "data.test_rows=300", "logger=none"],
        )
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "data"), force_add=True)
    one_node = {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_STEP_NUM_NODES": "1"}
    _clean_env(monkeypatch, **{**_srun_env(0), **one_node})
    with pytest.raises(ConfigError, match="one of 2 processes started together"):
        train(cfg)
    metrics = tmp_path / "run" / "metrics.json"
    assert json.loads(metrics.read_text())["status"] == "failed"  # written once, by rank 0


# ----------------------------------------------------------------------------- review cases

#: The batch script of ``sbatch --ntasks=4`` on one node: the allocation's variables only. It
#: runs as one process (no srun step): a ``python train.py`` in it is one process, rank 0.
BATCH_STEP = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "myjob", "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1",
}  # fmt: skip
#: ``srun --ntasks=1 python train.py`` in that allocation: a step of one task.
ONE_TASK_STEP = {
    **BATCH_STEP, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "1",
    "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": "1",
}  # fmt: skip
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}


@pytest.mark.parametrize(
    "env, num_nodes, together",
    [
        (BATCH_STEP, 1, 1),  # the allocation's SLURM_NTASKS=4 is not 4 processes
        (ONE_TASK_STEP, 1, 1),
        (_srun_env(0), 2, 2),
        (_srun_env(1), 2, 2),
        (SRUN_2X2_TASK_3, 2, 4),
        ({**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 1, 2),
        ({**TORCHRUN, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, 1, 1),
        ({"NODE_RANK": "0"}, 2, 2),  # one command per node
        ({"NODE_RANK": "1"}, 2, 2),
        ({"NODE_RANK": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 1, 2),  # Lightning's child
        ({"WORLD_SIZE": "4"}, 1, 1),  # a stale WORLD_SIZE alone starts nothing
        ({}, 1, 1),
    ],
)
def test_processes_count_as_started_together_only_when_several_were(
    env, num_nodes, together, monkeypatch
):
    """``together`` (stated here from what each launcher starts) > 1 exactly where the run
    folder must be named on every process, and where a one-process trainer must stop."""
    from mtl_clippy import launch
    from mtl_clippy.cli import check_overrides

    _clean_env(monkeypatch, **env)
    assert launch.started_separately(num_nodes) is (together > 1)
    if together > 1 and "NODE_RANK" not in env:
        assert launch.launched_world_size() == together
    args = ["trainer=ddp", "trainer.devices=1", f"trainer.num_nodes={num_nodes}"]
    if num_nodes == 1:
        args = []
    message = check_overrides(args, ROOT / "configs")
    if together > 1:
        assert message is not None and message.startswith("hydra.run.dir:"), message
    else:
        assert message is None, message


def test_a_lone_process_in_a_batch_allocation_trains_as_rank_zero(tmp_path, monkeypatch):
    """``python train.py`` in the batch script of ``sbatch --ntasks=4`` (not started by srun)
    is one process: Lightning makes it rank 0 of one, and it trains and writes its result."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtl_clippy.cli import check_overrides
    from mtl_clippy.train import train

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    args = ["data.train_rows=600", "data.test_rows=300", "logger=none", "trainer.max_epochs=1"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "data"), force_add=True)
    _clean_env(monkeypatch, **BATCH_STEP)
    assert check_overrides(args, ROOT / "configs") is None  # no hydra.run.dir needed
    summary = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics.get("error")
    assert metrics["steps"] > 0 and summary["status"] == "completed"


def _copy_configs(tmp_path: Path, experiment: str) -> Path:
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "experiment" / "slurm_job.yaml").write_text(experiment)
    return configs


def test_a_run_folder_named_in_a_config_file_is_one_for_all_tasks(tmp_path, monkeypatch):
    """An experiment that names hydra.run.dir / hydra.sweep.dir names the folder as well as
    the command line does: srun's tasks then need nothing more on the command line."""
    from mtl_clippy.cli import check_overrides

    configs = _copy_configs(
        tmp_path,
        "# @package _global_\n"
        "hydra:\n"
        "  run:\n"
        "    dir: outputs/runs/job-${oc.env:SLURM_JOB_ID}\n"
        "  sweep:\n"
        "    dir: outputs/multirun/job-${oc.env:SLURM_JOB_ID}\n",
    )
    args = ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"]
    for procid in (0, 1):
        _clean_env(monkeypatch, **_srun_env(procid))
        assert check_overrides([*args, "experiment=slurm_job"], configs) is None
        assert check_overrides(["-m", *args, "experiment=slurm_job", "seed=1,2"], configs) is None
        # without it, the default folder (a time stamp): every task stops
        assert check_overrides(args, configs).startswith("hydra.run.dir:")
        assert check_overrides(["-m", *args, "seed=1,2"], configs).startswith("hydra.sweep.dir:")


def test_a_config_file_naming_only_the_run_folder_leaves_a_sweep_unnamed(tmp_path, monkeypatch):
    from mtl_clippy.cli import check_overrides

    configs = _copy_configs(
        tmp_path, "# @package _global_\nhydra:\n  run:\n    dir: outputs/runs/job-1\n"
    )
    _clean_env(monkeypatch, **_srun_env(1))
    args = ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "experiment=slurm_job"]
    assert check_overrides(args, configs) is None
    assert check_overrides(["-m", *args, "seed=1,2"], configs).startswith("hydra.sweep.dir:")


#: Two nodes of two processes each, started by one command per node (NODE_RANK) and on each
#: node by Lightning's launcher, which names its child ``hydra.job.name=train_ddp_process_1``.
#: (env, job name override, global rank stated independently: node * 2 + local rank)
TWO_BY_TWO = [
    ({"NODE_RANK": "0"}, None, 0),
    ({"NODE_RANK": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, "train_ddp_process_1", 1),
    ({"NODE_RANK": "1"}, None, 2),
    ({"NODE_RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, "train_ddp_process_1", 3),
]


def test_each_process_of_several_nodes_logs_to_a_file_of_its_own(monkeypatch):
    """The log file that Hydra's configuration names, resolved in each of the 4 processes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtl_clippy import launch

    launch.register_resolvers()
    names = []
    for env, job_name, rank in TWO_BY_TWO:
        args = ["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2"]
        if job_name is not None:
            args.append(f"hydra.job.name={job_name}")
        _clean_env(monkeypatch, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", **env)
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=args, return_hydra_config=True)
        OmegaConf.update(cfg, "hydra.runtime.output_dir", "/run", force_add=True)
        log_file = cfg.hydra.job_logging.handlers.file.filename
        expected = "train" if rank == 0 else f"train_ddp_process_{rank}"
        assert log_file == f"/run/{expected}.log", (env, log_file)
        assert (cfg.hydra.output_subdir is None) is (rank > 0)
        names.append(log_file)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("env, job_name, rank", TWO_BY_TWO)
@pytest.mark.parametrize("devices", [2, "2", "0,1", [0, 1]])
def test_log_name_is_the_global_rank_whatever_the_job_name(
    env, job_name, rank, devices, monkeypatch
):
    from omegaconf import OmegaConf

    from mtl_clippy import launch

    _clean_env(monkeypatch, **env)
    root = OmegaConf.create({"trainer": {"devices": devices, "num_nodes": 2, "accelerator": "cpu"}})
    name = launch.hydra_log_name(job_name or "train", _root_=root)
    assert name == ("train" if rank == 0 else f"train_ddp_process_{rank}")
    assert launch.hydra_log_name("mine", _root_=root) == ("mine" if rank == 0 else name)


def test_devices_minus_one_counts_every_gpu(monkeypatch):
    """devices=-1 on GPUs is every GPU of the node (Lightning's parsing, here with 4 GPUs
    pretended): node 1's first process is rank 4. On CPUs Lightning rejects -1; the rank of
    node 1 is then still not 0."""
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pl_cuda

    from mtl_clippy import launch

    _clean_env(monkeypatch, NODE_RANK="1")
    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: 4)
    monkeypatch.setattr(pl_cuda, "num_cuda_devices", lambda: 4, raising=False)
    assert launch.processes_per_node(-1, 2, "cuda") == 4
    assert launch.global_rank(-1, 2, "gpu") == 4
    assert launch.global_rank("-1", 2, "cuda") == 4
    assert launch.global_rank("auto", 2, "cuda") == 4
    assert launch.global_rank(-1, 2, "cpu") >= 1

"""Preemption: SIGTERM, Ctrl-C (SIGINT) and SLURM's warning signal stop a run at a step
boundary, with a checkpoint of that step, ``metrics.json`` status ``interrupted`` and the
command that resumes it, and exit 128 + the signal; resuming gives the numbers of an
uninterrupted run.

The end-to-end tests send real signals to a real ``python train.py`` process while it trains
(as soon as a periodic step checkpoint shows it is inside the epoch). The in-process tests
send signals to this process in the middle of a step, of a validation, of an epoch's last
batch, and outside the trainer.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from app_helpers import ROOT, only_run, read_metrics, run_train
from mtl_clippy import preemption
from mtl_clippy.callbacks import StepCheckpoint
from mtl_clippy.data.datamodule import EpochBatchSampler, ResumableDataLoader
from mtl_clippy.errors import ConfigError
from mtl_clippy.preemption import RunInterrupted, StopOnSignal
from mtl_clippy.resume import find_checkpoint

# 2,700 training rows / 128 = 21 batches per epoch, 2 epochs = 42 steps; a step checkpoint
# every 5 steps. The signal goes once step-0000025.ckpt exists: in the second epoch.
ARGS = [
    "data.train_rows=3000",
    "data.test_rows=1500",
    "data.batch_size=128",
    "trainer.max_epochs=2",
    "callbacks.step_checkpoint.every_n_train_steps=5",
    "callbacks.progress_bar.refresh_rate=0",
    "logger=csv",
    "threads=1",
    # completed runs keep their step checkpoints: step 40's is compared across runs
    "keep_checkpoints=all",
]
BATCHES_PER_EPOCH = 21
ENV = {**os.environ, "MTL_CLIPPY_DISABLE_FUSED": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("preemption_data")


def _args(tmp: Path, data_dir: Path, *extra: str) -> list[str]:
    return [*ARGS, f"paths.log_dir={tmp}/outputs", f"paths.data_dir={data_dir}", *extra]


def start_and_signal(
    args: list[str],
    cwd: Path,
    wait_for: str,
    signum: int,
    env: dict | None = None,
    timeout: float = 300,
    group: bool = False,
) -> subprocess.CompletedProcess:
    """Start `python train.py ARGS` in ``cwd``, send it ``signum`` as soon as a file matching
    ``wait_for`` (a glob under ``cwd``) exists, and wait for it to end by itself. ``group``:
    to its whole process group (its DataLoader workers too), as SLURM and systemd do."""
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not list(cwd.glob(wait_for)):
            if proc.poll() is not None:
                raise AssertionError(
                    "the run ended before the signal: " + proc.stderr.read()[-2000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {wait_for} within {timeout} s")
            time.sleep(0.002)
        (os.killpg if group else os.kill)(proc.pid, signum)
        _, err = proc.communicate(timeout=timeout)
        for _ in range(300):  # every process it started (DDP ranks) ends too, none hangs
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("a process of the run was still running 30 s after it ended")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


def _run_command(command: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a ``python train.py ...`` command line as printed (``python``: this interpreter)."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    return subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=cwd,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _tensors(ckpt: Path) -> list[tuple[str, torch.Tensor]]:
    """The weights and the optimizer state (Clippy's accumulators) of a checkpoint."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = sorted(state["state_dict"].items())
    for i, opt in enumerate(state["optimizer_states"]):
        for p, slots in sorted(opt["state"].items()):
            out += [(f"opt{i}.{p}.{k}", torch.as_tensor(v)) for k, v in sorted(slots.items())]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    res = run_train(_args(tmp, data_dir), cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return only_run(tmp)


def _check_interrupted(run: Path, res: subprocess.CompletedProcess, name: str, code: int) -> dict:
    """The common promises of a run stopped mid-epoch by a signal; returns its metrics."""
    assert res.returncode == code, res.stderr[-3000:]
    metrics = read_metrics(run)
    assert metrics["status"] == "interrupted"
    steps = metrics["steps"]
    info = metrics["interrupted"]
    assert info["signal"] == name and info["of_this_step"] is True
    # The checkpoint is of the step the run stopped at, and the only step checkpoint left.
    ckpt, ckpt_step = find_checkpoint(run)
    assert ckpt_step == steps == info["checkpoint_step"]
    assert (
        info["checkpoint"]
        == os.path.join("checkpoints", ckpt.name)
        == f"checkpoints/step-{steps:07d}.ckpt"
    )
    assert [p.name for p in (run / "checkpoints").glob("step-*.ckpt")] == [ckpt.name]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == steps
    lines = [line for line in res.stderr.splitlines() if line.startswith("interrupted")]
    assert lines == [
        f"interrupted by {name} at step {steps}: checkpoint {ckpt}; "
        f"resume with: {metrics['resume_command']}"
    ], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    return metrics


def test_sigterm_mid_epoch_saves_the_step_and_resumes_to_identical_numbers(
    tmp_path, data_dir, uninterrupted
):
    args = _args(tmp_path, data_dir)
    res = start_and_signal(
        args, tmp_path, "outputs/runs/*/checkpoints/step-0000025.ckpt", signal.SIGTERM
    )
    run = only_run(tmp_path)
    metrics = _check_interrupted(run, res, "SIGTERM", 143)
    assert BATCHES_PER_EPOCH < metrics["steps"] < 40  # in the second epoch
    assert metrics["resume_command"] == shlex.join(
        ["python", str(ROOT / "train.py"), *args, f"resume={run.resolve()}"]
    )  # the run's own folder: resume=true would pick the newest run of these overrides

    # The printed command continues it in its folder, to the numbers of an uninterrupted run.
    res = _run_command(metrics["resume_command"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert only_run(tmp_path) == run
    resumed, expected = read_metrics(run), read_metrics(uninterrupted)
    assert resumed["status"] == "completed"
    assert resumed["resumed_from"] == metrics["interrupted"]["checkpoint"]
    assert resumed["steps"] == expected["steps"] == 2 * BATCHES_PER_EPOCH
    assert resumed["val"] == expected["val"] and resumed["test"] == expected["test"]
    assert resumed["best"]["val/auc_mean"] == expected["best"]["val/auc_mean"]
    # The weights and optimizer state of step 40, 14 steps after the resume, bit for bit
    # (Lightning 2.6 writes last.ckpt only when best.ckpt improves, so it is no common point).
    ours = _tensors(run / "checkpoints" / "step-0000040.ckpt")
    theirs = _tensors(uninterrupted / "checkpoints" / "step-0000040.ckpt")
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs, strict=True))


@pytest.mark.slow  # about 15 s; in-process tests send real SIGINTs, the default suite checks a SIGTERM-ed run end to end
def test_ctrl_c_mid_epoch_exits_130_with_a_checkpoint_of_the_step(tmp_path, data_dir):
    args = _args(tmp_path, data_dir, "trainer.max_epochs=1")
    res = start_and_signal(
        args, tmp_path, "outputs/runs/*/checkpoints/step-0000005.ckpt", signal.SIGINT
    )
    run = only_run(tmp_path)
    metrics = _check_interrupted(run, res, "SIGINT", 130)
    assert 5 <= metrics["steps"] < BATCHES_PER_EPOCH
    assert metrics["resume_command"].endswith(f" resume={run.resolve()}")


@pytest.mark.slow  # about 25 s; the default suite resumes a SIGTERM-ed run
def test_ctrl_c_then_resume_gives_identical_numbers(tmp_path, data_dir, uninterrupted):
    res = start_and_signal(
        _args(tmp_path, data_dir),
        tmp_path,
        "outputs/runs/*/checkpoints/step-0000010.ckpt",
        signal.SIGINT,
    )
    run = only_run(tmp_path)
    metrics = _check_interrupted(run, res, "SIGINT", 130)
    res = _run_command(metrics["resume_command"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, expected = read_metrics(run), read_metrics(uninterrupted)
    assert resumed["status"] == "completed"
    assert resumed["val"] == expected["val"] and resumed["test"] == expected["test"]


def _fake_scontrol(folder: Path, status: int = 0) -> Path:
    """An ``scontrol`` that appends its arguments to ``<folder>/scontrol.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/scontrol.log"\nexit {status}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder / "scontrol.log"


@pytest.mark.slow  # about 25 s; in-process tests cover the requeue call and the setting
def test_slurm_warning_signal_saves_the_step_requeues_and_the_requeued_job_resumes(
    tmp_path, data_dir, uninterrupted
):
    calls = _fake_scontrol(tmp_path / "bin")
    env = {**ENV, "PATH": f"{tmp_path / 'bin'}:{ENV['PATH']}", "SLURM_JOB_ID": "4242"}
    args = _args(tmp_path, data_dir, "slurm_requeue=true")
    res = start_and_signal(
        args, tmp_path, "outputs/runs/*/checkpoints/step-0000025.ckpt", signal.SIGUSR1, env=env
    )
    assert res.returncode == 128 + signal.SIGUSR1, res.stderr[-3000:]
    run = only_run(tmp_path)
    metrics = read_metrics(run)
    assert metrics["status"] == "interrupted"
    assert metrics["interrupted"]["signal"] == "SIGUSR1"
    assert metrics["interrupted"]["requeued"] is True
    assert calls.read_text().split() == ["requeue", "4242"]
    assert find_checkpoint(run)[1] == metrics["steps"]
    assert "requeued SLURM job 4242" in res.stderr
    # What the batch script runs when SLURM starts the job again: the same command + resume.
    res = run_train([*args, "resume=true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(run)["test"] == read_metrics(uninterrupted)["test"]


@pytest.mark.slow  # about 25 s
def test_ctrl_c_stops_a_sweep_and_its_resume_command_finishes_it(tmp_path, data_dir):
    args = ["-m", "seed=1,2", *_args(tmp_path, data_dir, "trainer.max_epochs=1")]
    res = start_and_signal(
        args, tmp_path, "outputs/multirun/*/0_*/checkpoints/step-0000005.ckpt", signal.SIGINT
    )
    assert res.returncode == 130, res.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name.split("_")[0] for p in jobs] == ["0"]  # the second job never started
    metrics = read_metrics(jobs[0])
    assert metrics["status"] == "interrupted"
    assert f"hydra.sweep.dir={sweep}" in metrics["resume_command"]
    assert " -m " in metrics["resume_command"]
    res = _run_command(metrics["resume_command"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [read_metrics(p)["status"] for p in jobs] == ["completed", "completed"]
    assert read_metrics(jobs[0])["resumed_from"] == metrics["interrupted"]["checkpoint"]


@pytest.mark.slow  # 75-115 s: three 2-process runs
def test_ddp_sigterm_stops_every_rank_at_one_step_and_resumes_to_the_same_metrics(
    tmp_path, data_dir
):
    """SIGTERM to the launching process only: Lightning passes it on to the rank it
    started, both stop at one step with one checkpoint, none is left running."""
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=64"]
    (tmp_path / "full").mkdir()
    res = run_train(_args(tmp_path / "full", data_dir, *ddp), cwd=tmp_path / "full")
    assert res.returncode == 0, res.stderr[-3000:]
    full = read_metrics(only_run(tmp_path / "full"))

    cut = tmp_path / "cut"
    cut.mkdir()
    res = start_and_signal(
        _args(cut, data_dir, *ddp),
        cut,
        "outputs/runs/*/checkpoints/step-0000025.ckpt",
        signal.SIGTERM,
    )
    run = only_run(cut)
    metrics = _check_interrupted(run, res, "SIGTERM", 143)
    res = _run_command(metrics["resume_command"], cut)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = read_metrics(run)
    assert resumed["status"] == "completed" and resumed["steps"] == full["steps"]
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]


# ----------------------------------------------------------------------------- in process


class _Tiny(pl.LightningModule):
    """A linear model; ``hook(module, stage, batch_idx)`` runs inside each step."""

    def __init__(self, hook=None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.hook = hook

    def training_step(self, batch, batch_idx):
        if self.hook is not None:
            self.hook(self, "train", batch_idx)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        if self.hook is not None:
            self.hook(self, "val", batch_idx)
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class _Rows(torch.utils.data.Dataset):
    """64 fixed rows, indexed by whole batches of row numbers (as the app's data is)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, rows):  # a slice (evaluation) or an array of row numbers
        rows = rows if isinstance(rows, slice) else torch.as_tensor(rows)
        return self.x[rows], self.y[rows]


def _loaders(trainer: list) -> tuple[DataLoader, DataLoader]:
    """The app's resumable, shuffled training loader (16 batches) and a validation loader;
    ``trainer`` holds the trainer, read for the position when a checkpoint is taken."""

    def position() -> tuple[int, int]:
        loop = trainer[0].fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.ready

    train = ResumableDataLoader(
        _Rows(),
        sampler=EpochBatchSampler(64, 4, shuffle=True, seed=0, drop_last=True),
        batch_size=None,
        position=position,
    )
    val = DataLoader(_Rows(), sampler=EpochBatchSampler(64, 8, shuffle=False), batch_size=None)
    return train, val


def _fit(
    tmp: Path,
    hook=None,
    every_n: int | None = None,
    after: tuple = (),
    ckpt_path: str | None = None,
) -> tuple[pl.Trainer, StopOnSignal, BaseException | None]:
    """Fit the tiny model for 2 epochs of 16 steps with the stopping callback (``after``:
    callbacks whose hooks run after its own); what it raised, if anything."""
    stopper = StopOnSignal().install()
    callbacks: list = [stopper, *after]
    if every_n:
        callbacks.insert(
            0, StepCheckpoint(dirpath=str(tmp / "checkpoints"), every_n_train_steps=every_n)
        )
    trainer = pl.Trainer(
        max_epochs=2,
        default_root_dir=str(tmp),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every_n),
        num_sanity_val_steps=0,
        callbacks=callbacks,
        accelerator="cpu",
    )
    train, val = _loaders([trainer])
    raised = None
    try:
        torch.manual_seed(0)
        trainer.fit(_Tiny(hook), train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    except BaseException as exc:
        raised = exc
    finally:
        stopper.uninstall()
    return trainer, stopper, raised


def _signal_at(step: int, *signums: int, stage: str = "train"):
    def hook(module, where, batch_idx):
        if (
            where == stage
            and module.trainer.global_step == step
            and not module.trainer.sanity_checking
        ):
            for signum in signums:
                os.kill(os.getpid(), signum)

    return hook


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_in_the_middle_of_a_step_stops_after_it_with_its_checkpoint(tmp_path, signum):
    before = signal.getsignal(signum)
    if signum == signal.SIGHUP and before == signal.SIG_IGN:
        pytest.skip("the tests run under nohup")  # then the run leaves SIGHUP ignored
    # Inside training_step of the 8th step (7 done), before its backward pass and update.
    trainer, _, raised = _fit(tmp_path, _signal_at(7, signum), every_n=5)
    assert isinstance(raised, RunInterrupted) and raised.signum == signum
    assert raised.exit_code == 128 + signum and not raised.forced
    assert trainer.global_step == 8  # the step finished
    ckpt = tmp_path / "checkpoints" / "step-0000008.ckpt"
    assert raised.checkpoint == str(ckpt)
    # The periodic step-0000005.ckpt made way for it: only the newest step checkpoint is kept.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [ckpt.name]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 8
    # Whole steps only: the optimizer had made 8 updates, and the weights are those after it.
    assert all(s["step"] == 8 for s in state["optimizer_states"][0]["state"].values())
    module = trainer.lightning_module
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state["state_dict"].items())
    # The step checkpoint's own state names the file as its newest, for a resumed run.
    assert state["callbacks"]["StepCheckpoint"]["best_model_path"] == str(ckpt)
    assert signal.getsignal(signum) == before  # the handlers are put back


class _SignalAfterHooks(pl.Callback):
    """Sends ``signum`` from its own on_train_batch_end, after the stopping callback's: the
    signal then arrives once that callback has looked, as one sent while the step checkpoint
    or a logger writes does."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(
    ("signum", "late", "stopped_at"),
    [
        (signal.SIGTERM, False, 7),  # in the middle of a step: saved in on_train_batch_end
        (signal.SIGTERM, True, 7),  # after the hooks: Lightning's own check stops, saved then
        (signal.SIGINT, True, 8),  # after the hooks: the next step's end
        (signal.SIGTERM, True, 20),  # the same in the second epoch
    ],
)
def test_a_run_resumed_from_its_signal_checkpoint_ends_with_the_same_weights(
    tmp_path, signum, late, stopped_at
):
    reference, _, raised = _fit(tmp_path / "whole")
    assert raised is None and reference.global_step == 32
    if late:
        after, hook = (_SignalAfterHooks(7 if stopped_at < 16 else 20, signum),), None
    else:
        after, hook = (), _signal_at(stopped_at - 1, signum)
    trainer, stopper, raised = _fit(tmp_path / "cut", hook, after=after)
    # Lightning's own stop is its SIGTERMException, which train() takes as the same.
    assert preemption.interruption(raised).signum == signum
    assert trainer.global_step == stopped_at
    ckpt = tmp_path / "cut" / "checkpoints" / f"step-{stopped_at:07d}.ckpt"
    assert stopper.checkpoint == str(ckpt)
    resumed, _, raised = _fit(tmp_path / "cut", ckpt_path=str(ckpt))
    assert raised is None and resumed.global_step == 32
    ours, theirs = resumed.lightning_module.state_dict(), reference.lightning_module.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    _, _, raised = _fit(tmp_path, _signal_at(3, signal.SIGINT, signal.SIGINT))
    assert isinstance(raised, RunInterrupted) and raised.forced and raised.checkpoint is None
    assert not (tmp_path / "checkpoints").exists()


def test_a_repeated_sigterm_does_not_cut_the_step(tmp_path):
    _, _, raised = _fit(tmp_path, _signal_at(3, signal.SIGTERM, signal.SIGTERM))
    assert isinstance(raised, RunInterrupted)
    assert raised.signum == signal.SIGTERM and raised.forced is False
    assert raised.checkpoint == str(tmp_path / "checkpoints" / "step-0000004.ckpt")


def test_a_signal_during_validation_stops_without_a_new_checkpoint(tmp_path):
    # Validation of the first epoch runs at global step 16.
    trainer, _, raised = _fit(tmp_path, _signal_at(16, signal.SIGTERM, stage="val"), every_n=5)
    assert isinstance(raised, RunInterrupted) and raised.checkpoint is None
    assert trainer.global_step == 16
    # The newest checkpoint is the periodic one from before validation.
    assert find_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "step-0000015.ckpt", 15)


def test_a_signal_in_an_epochs_last_batch_stops_without_a_checkpoint(tmp_path):
    # A checkpoint between an epoch's last batch and its validation could not resume it.
    _, _, raised = _fit(tmp_path, _signal_at(15, signal.SIGINT))
    assert isinstance(raised, RunInterrupted) and raised.checkpoint is None


def test_outside_the_trainer_a_signal_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    stopper = StopOnSignal().install()
    try:
        with pytest.raises(RunInterrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    finally:
        preemption.uninstall()
    assert info.value.exit_code == 143 and stopper.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_lightnings_own_stops_count_as_interruptions():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    assert preemption.interruption(SIGTERMException()).exit_code == 143
    try:  # what Lightning makes of a KeyboardInterrupt: sys.exit(1) while handling it
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    except SystemExit as exc:
        assert preemption.interruption(exc).exit_code == 130
    assert preemption.interruption(SystemExit(1)) is None
    assert preemption.interruption(ValueError("x")) is None


def test_an_interruption_crosses_process_boundaries_whole():
    import pickle

    stop = RunInterrupted(signal.SIGINT, forced=True)
    stop.checkpoint, stop.message = "/run/checkpoints/step-0000003.ckpt", "interrupted by SIGINT"
    back = pickle.loads(pickle.dumps(stop))
    assert (back.signum, back.forced, back.checkpoint, back.message, back.exit_code) == (
        signal.SIGINT,
        True,
        stop.checkpoint,
        stop.message,
        130,
    )


def test_slurm_requeue_must_be_true_or_false():
    assert preemption._requeue_setting({"slurm_requeue": True}) is True
    assert preemption._requeue_setting({}) is False
    with pytest.raises(ConfigError, match="slurm_requeue: expected true or false, got 'yes'"):
        preemption._requeue_setting({"slurm_requeue": "yes"})


def test_sigusr1_is_handled_only_inside_a_slurm_job_with_slurm_requeue(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert signal.SIGUSR1 not in StopOnSignal(requeue=True).signals()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert signal.SIGUSR1 in StopOnSignal(requeue=True).signals()
    assert signal.SIGUSR1 not in StopOnSignal(requeue=False).signals()


@given(
    job=st.integers(1, 10**9),
    task=st.one_of(st.none(), st.integers(0, 10**5)),
    status=st.sampled_from([0, 1]),
)
def test_requeue_calls_scontrol_with_the_job_or_array_task(tmp_path_factory, job, task, status):
    folder = tmp_path_factory.mktemp("scontrol")
    calls = _fake_scontrol(folder, status)
    env = {"PATH": f"{folder}:{os.environ['PATH']}", "SLURM_JOB_ID": str(job + 1)}
    if task is not None:
        env |= {"SLURM_ARRAY_JOB_ID": str(job), "SLURM_ARRAY_TASK_ID": str(task)}
    saved = {k: os.environ.get(k) for k in (*env, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")}
    os.environ.pop("SLURM_ARRAY_JOB_ID", None)
    os.environ.pop("SLURM_ARRAY_TASK_ID", None)
    os.environ.update(env)
    try:
        ok, detail = preemption.requeue_slurm_job()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    wanted = f"{job}_{task}" if task is not None else str(job + 1)
    assert calls.read_text().split() == ["requeue", wanted]
    assert ok is (status == 0)
    assert detail == (
        f"requeued SLURM job {wanted}"
        if status == 0
        else f"requeueing SLURM job {wanted} failed: scontrol exited with 1"
    )


class _Handlers(torch.utils.data.Dataset):
    """One item: the SIGTERM, SIGINT, SIGUSR1 and SIGHUP handlers of the process reading it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index):
        sigs = preemption.WORKER_IGNORED
        return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in sigs])


def test_dataloader_workers_ignore_the_stop_signals_and_keep_lightnings_seeding(monkeypatch):
    # A scheduler signals the whole process group: a worker that died of SIGTERM made the
    # main process fail ("DataLoader worker ... killed by signal") instead of stopping.
    loader = DataLoader(
        _Handlers(), batch_size=None, num_workers=1, worker_init_fn=preemption.WorkerInit()
    )
    assert next(iter(loader)).tolist() == [True] * 4
    # Setting a worker_init_fn keeps Lightning from adding its own: ours calls it.
    from lightning.fabric.utilities import seed

    calls = []
    monkeypatch.setattr(seed, "pl_worker_init_function", lambda w, rank: calls.append((w, rank)))
    saved = {s: signal.getsignal(s) for s in preemption.WORKER_IGNORED}
    try:
        monkeypatch.setenv("PL_SEED_WORKERS", "0")
        preemption.WorkerInit(rank=2)(3)
        monkeypatch.setenv("PL_SEED_WORKERS", "1")
        preemption.WorkerInit(rank=2)(3)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert calls == [(3, 2)]


@pytest.mark.parametrize("name", ["run_1", "a b,c", "it's [x]=1"])
def test_the_resume_command_names_the_run_folder_quoted_for_shell_and_hydra(tmp_path, name):
    # resume=true picks the newest run of the same overrides: after the same command ran
    # again, it would continue that other run, never this one.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    folder = tmp_path / name
    argv = shlex.split(preemption.resume_command(folder))
    assert argv[:2] == ["python", "train.py"] and len(argv) == 3
    override = OverridesParser.create().parse_override(argv[2])
    assert override.key_or_group == "resume" and override.value() == str(folder.resolve())


def test_sighup_stops_like_sigterm_with_129_unless_started_under_nohup():
    # A closed terminal or ssh connection: without a handler the run died between two
    # checkpoints and left no metrics.json.
    assert RunInterrupted(signal.SIGHUP).exit_code == 129
    before = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        StopOnSignal().install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # nohup: stays ignored
        preemption.uninstall()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        stopper = StopOnSignal().install()
        assert signal.getsignal(signal.SIGHUP) == stopper._on_signal
        preemption.uninstall()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        preemption.uninstall()
        signal.signal(signal.SIGHUP, before)


def test_sigterm_to_the_process_group_with_dataloader_workers_stops_the_run(tmp_path, data_dir):
    # The workers got the signal too and died of it: the run failed ("DataLoader worker ...
    # killed by signal") instead of stopping with its step saved.
    args = _args(tmp_path, data_dir, "trainer.max_epochs=1", "data.num_workers=2")
    res = start_and_signal(
        args, tmp_path, "outputs/runs/*/checkpoints/step-0000005.ckpt", signal.SIGTERM,
        group=True,
    )  # fmt: skip
    _check_interrupted(only_run(tmp_path), res, "SIGTERM", 143)


def test_resume_state_keeps_the_validation_metrics_and_optimizer_paths(tmp_path):
    # A resumed run that validates no more (stopped in its last, partial epoch under
    # trainer.max_steps, or during testing) had no val metrics: early stopping failed on a
    # missing metric at every resume, and metrics.json lost val and optimizer_path.
    from types import SimpleNamespace

    from mtl_clippy.callbacks.checkpointing import ResumeState
    from mtl_clippy.optim.clippy import ClippyAdagrad

    opt = ClippyAdagrad([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    opt._record(0)["dense"].add("single")
    metrics = {"val/auc_mean": torch.tensor(0.71), "train/loss": torch.tensor(0.3)}
    saver = ResumeState()
    saver._trainer = SimpleNamespace(callback_metrics=metrics, optimizers=[opt])
    torch.save({"ResumeState": saver.state_dict()}, tmp_path / "state.ckpt")
    loaded = torch.load(tmp_path / "state.ckpt", weights_only=True)["ResumeState"]

    fresh = ClippyAdagrad([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    resumed = SimpleNamespace(callback_metrics={}, optimizers=[fresh])
    loader = ResumeState()
    loader.load_state_dict(loaded)
    loader.on_fit_end(resumed, None)  # a fit with nothing left to train
    assert resumed.callback_metrics == {"val/auc_mean": torch.tensor(0.71)}
    assert fresh.implementation() == opt.implementation()
    # Newer values, logged by the resumed run itself, stand.
    newer = SimpleNamespace(
        callback_metrics={"val/auc_mean": torch.tensor(0.8)}, optimizers=[], callbacks=[]
    )
    loader.load_state_dict(loaded)
    loader.on_train_start(newer, None)
    assert newer.callback_metrics == {"val/auc_mean": torch.tensor(0.8)}


def test_without_a_step_checkpoint_a_signal_keeps_only_its_own_newest_file(
    tmp_path, monkeypatch, caplog
):
    # callbacks=none: every interrupted attempt left its step-*.ckpt behind; and Lightning
    # logged "weights_only was not set" at each signal save.
    from mtl_clippy.callbacks import checkpointing

    monkeypatch.setattr(checkpointing, "_run_folder", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-0000003.ckpt").write_bytes(b"an earlier attempt's")
    with caplog.at_level("INFO"):
        _, _, raised = _fit(tmp_path, _signal_at(7, signal.SIGTERM))
    assert isinstance(raised, RunInterrupted)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000008.ckpt"]
    assert not [r for r in caplog.records if "weights_only" in r.getMessage()]


def test_a_signal_before_the_run_can_record_it_stops_it_once_it_can():
    # guard() sets the handlers before train() starts: SIGTERM there killed the process
    # and left no metrics.json.
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info, preemption.guard():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # noted only
        StopOnSignal.for_config({})  # train() inside its try: the stop is recorded
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_result_is_written_changes_nothing(capsys, signum):
    before = signal.getsignal(signum)
    with preemption.guard():
        stopper = StopOnSignal.for_config({})
        preemption.settle()  # train()'s finally, before metrics.json
        preemption.uninstall()
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # neither raises nor kills
    assert stopper.late == signum and signal.getsignal(signum) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{signal.Signals(signum).name} received after the run had ended: nothing to stop "
        "(metrics.json has its result)"
    ]


def test_uninstall_restores_sigterm_unless_a_requeue_succeeded(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    before = signal.getsignal(signal.SIGTERM)
    stopper = StopOnSignal(requeue=True).install()
    stopper.signum = signal.SIGUSR1  # scontrol requeue failed: SIGTERM must stop it again
    stopper.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before
    stopper = StopOnSignal(requeue=True).install()
    stopper.signum, stopper.requeued = signal.SIGUSR1, True
    try:
        stopper.uninstall()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # SLURM ends the old job
    finally:
        signal.signal(signal.SIGTERM, before)


def test_resume_true_on_a_folder_interrupted_before_its_first_checkpoint_starts_afresh(tmp_path):
    # A SLURM job requeued before its first checkpoint restarts with resume=true in the same
    # hydra.run.dir: it failed for good with "found no checkpoint".
    from omegaconf import OmegaConf

    from mtl_clippy.resume_point import resume_point as _resume_point

    (tmp_path / "metrics.json").write_text(json.dumps({"status": "interrupted", "steps": 0}))
    cfg = OmegaConf.create({"resume": True, "ckpt_path": None, "paths": {"log_dir": "x"}})
    assert _resume_point(cfg, tmp_path) == (None, None, None)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(ConfigError, match="found no checkpoint"):
        _resume_point(cfg, tmp_path)


def test_a_signal_while_train_py_starts_stops_the_first_task(monkeypatch):
    # SIGTERM while Lightning was imported or Hydra started killed the process outright:
    # no metrics.json, and a requeued SLURM job could not tell the folder from a mistake.
    from mtl_clippy import early_signals

    monkeypatch.setattr(early_signals, "_started", False)
    monkeypatch.setattr(early_signals, "_pending", None)
    monkeypatch.setattr(early_signals, "_previous", {})
    saved = {s: signal.getsignal(s) for s in early_signals.SIGNALS}
    try:
        early_signals.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # noted only
        with pytest.raises(RunInterrupted) as info, preemption.guard():
            StopOnSignal.for_config({})  # train(), inside its try: recorded as interrupted
        assert info.value.signum == signal.SIGTERM and early_signals.take() is None
        if saved[signal.SIGINT] is signal.default_int_handler:  # then: as before
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)

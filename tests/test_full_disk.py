"""A full disk: one line naming the file that did not fit, nothing half-written, and every
checkpoint written before it intact (and resumable).

The file systems that fill up are small tmpfs mounts (the tests run as root; where mounting is
not permitted they are skipped, saying so). A *ballast* file fills one up to a chosen number of
bytes left. The end-to-end runs fill their run folder's file system at a chosen checkpoint with
the test-only callback :class:`FillDisk` (``+callbacks.fill_disk=...``), so that the first
checkpoints fit and a later one does not, whatever the size of a checkpoint.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app_helpers import ROOT, TINY, run_train
from mtl_clippy.atomic import write_atomically
from mtl_clippy.callbacks import AtomicCheckpointIO
from mtl_clippy.data import DataError
from mtl_clippy.errors import (
    DiskFull,
    disk_full,
    disk_full_message,
    full_disk_reported,
    reported,
    user_error_types,
)
from mtl_clippy.loggers import AtomicExperimentWriter, TensorBoardLogger
from mtl_clippy.summary import write_json_atomic

MESSAGE = "no space left on device while writing "

# ----------------------------------------------------------------------------- helpers


def _mount_tmpfs(folder: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` on ``folder``, or skip the test saying why it cannot."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("full-disk tests mount a tmpfs: Linux with mount(8) only")
    if os.geteuid() != 0:
        pytest.skip("full-disk tests mount a tmpfs, which needs root (or CAP_SYS_ADMIN)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # still busy


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a fresh tmpfs folder under ``tmp_path``, unmounted afterwards."""
    mounted: list[Path] = []

    def make(size: str = "4m", name: str = "fs") -> Path:
        folder = tmp_path / name
        _mount_tmpfs(folder, size)
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        _unmount(folder)


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory):
    """One 4 MiB tmpfs for the property tests of this module (emptied by each example)."""
    folder = tmp_path_factory.mktemp("full_disk") / "fs"
    _mount_tmpfs(folder, "4m")
    yield folder
    _unmount(folder)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill ``folder``'s file system with the file ``folder/ballast``, leaving about ``leave``
    bytes (tmpfs counts whole 4 KiB pages)."""
    ballast = folder / "ballast"
    with open(ballast, "ab", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    if leave:
        os.truncate(ballast, max(0, ballast.stat().st_size - leave))
    return ballast


def empty(folder: Path) -> None:
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


class FillDisk(pl.Callback):
    """Test-only: fill the file system of ``folder`` (leaving ``leave`` bytes) just before the
    ``at``-th checkpoint of the run is written, so that it is the first one that does not
    fit. Only once: the file ``done`` is created then, and a run that finds it (the same
    command with resume=true) fills nothing."""

    def __init__(self, folder: str, done: str, leave: int = 0, at: int = 2) -> None:
        self.folder, self.done, self.leave, self.at = Path(folder), Path(done), int(leave), int(at)
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves == self.at and not self.done.exists():
            fill(self.folder, self.leave)
            self.done.touch()


def _fill_at(folder: Path, done: Path, leave: int, at: int = 2) -> list[str]:
    return [
        "+callbacks.fill_disk._target_=test_full_disk.FillDisk",
        f"+callbacks.fill_disk.folder={folder}",
        f"+callbacks.fill_disk.done={done}",
        f"+callbacks.fill_disk.leave={leave}",
        f"+callbacks.fill_disk.at={at}",
    ]


#: A run that checkpoints every 3 steps (step-0000003.ckpt fits, step-0000006.ckpt does not).
RUN = [*TINY, "threads=1", "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0",
       "callbacks.step_checkpoint.every_n_train_steps=3"]  # fmt: skip

# ----------------------------------------------------------------------------- the error type


def test_a_zip_writer_error_over_enospc_becomes_a_disk_full_naming_the_file(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None
    except RuntimeError as exc:
        assert disk_full(exc) is None  # `from None`: the OSError was dropped on purpose
        exc.__suppress_context__ = False
        full = disk_full(exc, path=tmp_path / "last.ckpt")
    assert isinstance(full, DiskFull) and isinstance(full, user_error_types())
    assert str(full) == f"{MESSAGE}{tmp_path / 'last.ckpt'}"
    assert full.errno == errno.ENOSPC and full.filename == str(tmp_path / "last.ckpt")
    assert str(pickle.loads(pickle.dumps(full))) == str(full)  # crosses process boundaries


def test_a_quota_is_named_as_such_and_other_errors_are_left_alone(tmp_path):
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(disk_full(quota, path="x.json")) == "disk quota exceeded while writing x.json"
    # tmp_path's file system has room: a RuntimeError there is not a full disk
    assert disk_full(RuntimeError("unexpected pos 1 vs 2"), folder=tmp_path) is None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), folder=tmp_path) is None


def test_the_first_failed_write_is_reported_with_the_later_ones():
    first = DiskFull("run/checkpoints/step-6.ckpt", hint="free some space")
    try:
        try:
            raise first
        finally:
            raise DiskFull("run/metrics.json")  # on the way out, while `first` propagates
    except DiskFull as exc:
        assert disk_full_message(exc) == (
            f"{MESSAGE}run/checkpoints/step-6.ckpt; then also run/metrics.json (free some space)"
        )
        assert reported(exc).path == "run/checkpoints/step-6.ckpt"


def test_full_disk_reported_turns_a_nameless_enospc_into_one_line():
    with pytest.raises(DiskFull, match=r"no space left on device while writing a file"):
        with full_disk_reported():
            raise RuntimeError("logger failed") from OSError(errno.ENOSPC, "No space")
    with pytest.raises(ValueError, match="other"), full_disk_reported():
        raise ValueError("other")
    data = DataError("data/x", "cannot write the generated data into data (No space)")
    with pytest.raises(DataError) as caught, full_disk_reported():
        raise data from None  # its own message already says it
    assert caught.value is data


def test_a_plain_write_names_the_file_it_had_open(tmpfs):
    folder = tmpfs("64k")
    target = folder / "hparams.yaml"
    with pytest.raises(OSError) as caught, open(target, "w") as f:
        f.write("x" * 200_000)
    assert caught.value.filename is None  # what Python gives: no file name
    assert str(disk_full(caught.value)) == f"{MESSAGE}{target}"


def test_only_the_zip_writers_lost_errno_counts_as_a_full_disk_by_free_space(tmpfs):
    """With less than 1 MiB free, a write that fails for another reason (a permission, an I/O
    error, a CUDA error while pickling) is not reported as a full disk; only an error
    without an errno in the zip writer's words may be taken as one."""
    folder = tmpfs("4m")
    fill(folder, leave=512 * 1024)

    class CudaFails:
        def __reduce__(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def denied(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    def io_error(tmp):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(RuntimeError, match="CUDA error") as caught:
        AtomicCheckpointIO().save_checkpoint({"x": CudaFails()}, folder / "a.ckpt")
    assert not isinstance(caught.value, DiskFull)
    for write, kind in ((denied, PermissionError), (io_error, OSError)):
        with pytest.raises(kind) as caught:
            write_atomically(folder / "metrics.json", write)
        assert not isinstance(caught.value, DiskFull), caught.value
    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3")
    assert str(disk_full(lost, folder=folder)).startswith(f"{MESSAGE}into {folder}")
    assert disk_full(RuntimeError("shape mismatch"), folder=folder) is None
    assert temporaries(folder) == []


def test_pyarrows_errno_in_its_message_is_a_full_disk(tmp_path):
    arrow = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert arrow.errno is None
    assert str(disk_full(arrow, path=tmp_path / "d")) == f"{MESSAGE}{tmp_path / 'd'}"


def test_the_advice_to_resume_only_where_the_run_has_a_checkpoint(tmp_path):
    """Resuming needs last.ckpt or a step checkpoint (best.ckpt is never resumed from): else
    the advice is to run the command again."""
    from mtl_clippy.errors import RUN_AGAIN_HINT, RUN_FOLDER_HINT, resume_hint

    run = tmp_path / "run"
    full = DiskFull(run / "checkpoints" / "step-0000003.ckpt", hint=RUN_FOLDER_HINT)
    assert resume_hint(run) == RUN_AGAIN_HINT
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
    (run / "checkpoints" / ".last.ckpt.tmp1@h").write_bytes(b"x")
    os.mkfifo(run / "checkpoints" / "step-0000001.ckpt")
    assert str(reported(full, run)).endswith(f"({RUN_AGAIN_HINT})")
    assert "resume=true" not in disk_full_message(full, run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert reported(full, run) is full and str(full).endswith(f"({RUN_FOLDER_HINT})")
    other = DiskFull(run / "data", hint="choose another folder")  # not a run folder's advice
    assert reported(other, tmp_path / "elsewhere") is other


def test_a_failed_rewrite_for_a_new_column_keeps_the_header_and_the_rows_in_step(tmpfs):
    """The rewrite that adds a column fails; the save Lightning's finalize does next must not
    append rows of the new columns under the old header (the columns would shift)."""
    folder = tmpfs("1m")
    writer = AtomicExperimentWriter(log_dir=str(folder / "log"))
    writer.log_metrics({"train/loss": 0.7}, step=0)
    writer.save()
    fill(folder)
    writer.log_metrics({"train/loss": 0.6, "val/auc": 0.55}, step=1)
    for _ in range(2):  # the failed save, then finalize's
        with pytest.raises(DiskFull):
            writer.save()
    rows = list(csv.reader((folder / "log" / "metrics.csv").read_text().splitlines()))
    assert rows == [["step", "train/loss"], ["0", "0.7"]]
    (folder / "ballast").unlink()
    writer.save()  # room again: the kept rows, under the new header
    rows = list(csv.DictReader((folder / "log" / "metrics.csv").read_text().splitlines()))
    assert [r["val/auc"] for r in rows] == ["", "0.55"]
    assert temporaries(folder) == []


# ----------------------------------------------------------------------------- the writers


@given(room=st.integers(0, 400_000), same_name=st.booleans())
def test_a_checkpoint_that_does_not_fit_leaves_the_earlier_one_whole(small_fs, room, same_name):
    """Whatever room is left (the write fails in the zip header, the tensor data or the end
    record), the error names the checkpoint, no temporary file stays, the earlier checkpoint
    loads as it was."""
    empty(small_fs)
    io = AtomicCheckpointIO()
    earlier = {"w": torch.arange(1000.0), "global_step": 3}
    io.save_checkpoint(earlier, small_fs / "last.ckpt")
    fill(small_fs, leave=room)
    target = small_fs / ("last.ckpt" if same_name else "step-0000006.ckpt")
    with pytest.raises(DiskFull) as caught:
        io.save_checkpoint({"w": torch.randn(150_000), "global_step": 6}, target)  # 600 KB
    assert str(caught.value).startswith(f"{MESSAGE}{target} (")
    assert "resume=true" in str(caught.value)
    assert temporaries(small_fs) == []
    assert sorted(p.name for p in small_fs.iterdir()) == ["ballast", "last.ckpt"]
    kept = torch.load(small_fs / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 3 and torch.equal(kept["w"], earlier["w"])


def test_a_checkpoint_writer_that_loses_the_errno_is_caught_by_the_free_space(
    small_fs, monkeypatch
):
    empty(small_fs)
    fill(small_fs)

    def save(obj, f):  # a writer that reports a full disk without the OSError
        raise RuntimeError("unexpected pos 6188608 vs 6188500")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFull, match=r"no space left on device while writing .*last\.ckpt"):
        AtomicCheckpointIO().save_checkpoint({}, small_fs / "last.ckpt")
    assert temporaries(small_fs) == []


@given(room=st.integers(0, 40_000))
def test_metrics_json_that_does_not_fit_keeps_the_earlier_one(small_fs, room):
    empty(small_fs)
    path = small_fs / "metrics.json"
    write_json_atomic(path, {"status": "running"})
    before = path.read_bytes()
    fill(small_fs, leave=room)
    with pytest.raises(DiskFull) as caught:
        write_json_atomic(path, {"status": "failed", "traceback": "x" * 60_000})
    assert str(caught.value).startswith(f"{MESSAGE}{path} (")
    assert path.read_bytes() == before
    assert temporaries(small_fs) == []


@pytest.mark.parametrize("write", ["append rows", "new column", "hparams.yaml"])
def test_the_csv_logger_files_stay_whole_on_a_full_disk(tmpfs, write):
    """Lightning's writer would leave metrics.csv cut in a row (or emptied, when a new column
    rewrites it) and hparams.yaml cut short; ours keeps the complete earlier content."""
    folder = tmpfs("1m")
    writer = AtomicExperimentWriter(log_dir=str(folder / "csv"))
    writer.log_hparams({"lr": 0.1})
    for step in range(2000):  # about 50 KB: rewriting it for a new column needs that room
        writer.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    writer.save()
    csv_file, yaml_file = folder / "csv" / "metrics.csv", folder / "csv" / "hparams.yaml"
    before = {p: p.read_bytes() for p in (csv_file, yaml_file)}
    fill(folder, leave=8192)
    with pytest.raises(DiskFull) as caught:
        if write == "hparams.yaml":
            writer.log_hparams({f"key_{i}": "v" * 100 for i in range(2000)})
        else:
            key = "val/auc" if write == "new column" else "train/loss"
            for step in range(2000, 20_000):
                writer.log_metrics({key: 0.123456789}, step)
            writer.save()
    expected = yaml_file if write == "hparams.yaml" else csv_file
    assert str(caught.value).startswith(f"{MESSAGE}{expected} (")
    assert {p: p.read_bytes() for p in before} == before
    assert temporaries(folder) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_tensorboard_hparams_yaml_is_not_left_cut_short(tmpfs):
    folder = tmpfs("1m")
    logger = TensorBoardLogger(save_dir=str(folder), name="tb", version="")
    logger.experiment.flush()  # the event file exists
    fill(folder, leave=4096)
    logger.log_hyperparams({f"key_{i}": "v" * 100 for i in range(2000)})  # about 200 KB
    with pytest.raises(DiskFull) as caught:
        logger.save()
    hparams = folder / "tb" / "hparams.yaml"
    assert str(caught.value).startswith(f"{MESSAGE}{hparams} (")
    assert not hparams.exists()
    assert temporaries(folder) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_tensorboard_event_file_is_named(tmpfs):
    from torch.utils.tensorboard import SummaryWriter

    folder = tmpfs("256k")
    writer = SummaryWriter(str(folder / "tb"), max_queue=1)
    writer.add_scalar("loss", 1.0, 0)
    writer.flush()
    fill(folder)
    with pytest.raises(OSError) as caught:  # raised in a later call, from its writer thread
        for step in range(1, 100_000):
            writer.add_scalar("loss", float(step), step)
    (event_file,) = (folder / "tb").iterdir()
    assert str(disk_full(caught.value)) == f"{MESSAGE}{event_file}"
    with pytest.raises(OSError):
        writer.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_tensorboard_writer_that_cannot_start_names_its_file_and_leaves_none(tmpfs, capfd):
    """The event file's first record does not fit: its writer thread fails, and its
    traceback is not printed (the main thread reports it); no empty event file is left."""
    folder = tmpfs("256k")
    (folder / "tb").mkdir()
    fill(folder)
    logger = TensorBoardLogger(save_dir=str(folder), name="tb", version="")
    with pytest.raises(DiskFull) as caught:
        logger.experiment  # noqa: B018 (creating it writes the file)
    assert str(caught.value).startswith(f"{MESSAGE}{folder / 'tb'}/events.out.tfevents.")
    assert list((folder / "tb").iterdir()) == []
    assert "Exception in thread" not in capfd.readouterr().err


def test_only_a_full_disk_of_tensorboards_writer_threads_goes_unprinted(monkeypatch):
    import threading
    from types import SimpleNamespace

    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    from mtl_clippy import loggers

    printed = []
    monkeypatch.setattr(threading, "excepthook", printed.append)
    loggers.quiet_full_disk_in_writer_threads()
    writer = _AsyncWriterThread.__new__(_AsyncWriterThread)
    for thread, exc in [
        (writer, OSError(errno.ENOSPC, "No space left on device")),  # quiet
        (writer, OSError(errno.EIO, "Input/output error")),
        (threading.Thread(), OSError(errno.ENOSPC, "No space left on device")),
        (writer, ValueError("bad")),
    ]:
        threading.excepthook(SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                             exc_traceback=None, thread=thread))  # fmt: skip
    assert [type(a.exc_value) for a in printed] == [OSError, OSError, ValueError]
    assert [getattr(a.exc_value, "errno", None) for a in printed] == [errno.EIO, errno.ENOSPC, None]


# ----------------------------------------------------------------------------- end to end


def _command(tmp_path, disk: Path, monkeypatch, leave: int, extra=()) -> list[str]:
    """The overrides of a run in ``disk`` that fills it at its second checkpoint."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), *sys.path]))
    return [*RUN, *extra, f"paths.log_dir={disk}", *_fill_at(disk, tmp_path / "filled", leave)]


def _run_until_full(tmp_path, disk: Path, monkeypatch, leave: int, extra=()) -> tuple:
    result = run_train(_command(tmp_path, disk, monkeypatch, leave, extra), cwd=tmp_path)
    (run,) = (disk / "runs").iterdir()
    return result, run


def _check_one_line(result, names: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith(f"error: {MESSAGE}{names}")
    return lines[-1]


def test_train_py_on_a_disk_that_fills_up(tmp_path, tmpfs, monkeypatch):
    """The first step checkpoint fits, the second does not: one line naming it, status 2, the
    first checkpoint loads, no temporary file, metrics.json says what happened."""
    disk = tmpfs("64m", "outputs")
    result, run = _run_until_full(tmp_path, disk, monkeypatch, leave=64 * 1024)
    line = _check_one_line(result, str(run / "checkpoints" / "step-0000006.ckpt"))
    assert "resume=true" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003.ckpt"]
    assert torch.load(run / "checkpoints" / "step-0000003.ckpt", weights_only=True)[
        "global_step"
    ] == 3  # fmt: skip
    assert temporaries(disk) == []
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"] == "DiskFull: " + line.removeprefix("error: ")
    assert "traceback" not in metrics


@pytest.mark.slow  # two train.py runs (the one above is the default check)
def test_train_py_resumes_from_the_kept_checkpoint_once_space_is_freed(
    tmp_path, tmpfs, monkeypatch
):
    disk = tmpfs("64m", "outputs")
    result, run = _run_until_full(
        tmp_path, disk, monkeypatch, leave=64 * 1024, extra=["logger=csv"]
    )
    _check_one_line(result, str(run / "checkpoints" / "step-0000006.ckpt"))
    (disk / "ballast").unlink()
    command = _command(tmp_path, disk, monkeypatch, 64 * 1024, ["logger=csv"])
    resumed = run_train([*command, "resume=true"], tmp_path)  # the same command, resume=true
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["resumed_from"] == "checkpoints/step-0000003.ckpt"
    assert temporaries(disk) == []


@pytest.mark.slow
def test_train_py_when_metrics_json_does_not_fit_either(tmp_path, tmpfs, monkeypatch):
    """No room at all: the checkpoint is named first, then metrics.json; neither is left as a
    temporary file, and no metrics.json is left half-written."""
    disk = tmpfs("64m", "outputs")
    result, run = _run_until_full(tmp_path, disk, monkeypatch, leave=0)
    line = _check_one_line(result, str(run / "checkpoints" / "step-0000006.ckpt"))
    assert f"; then also {run / 'metrics.json'}" in line
    assert not (run / "metrics.json").exists()
    assert temporaries(disk) == []
    assert torch.load(run / "checkpoints" / "step-0000003.ckpt", weights_only=True)


@pytest.mark.slow
def test_train_py_with_tensorboard_on_a_disk_that_fills_up(tmp_path, tmpfs, monkeypatch):
    """With the TensorBoard logger (the default), whose writer thread fails too."""
    disk = tmpfs("64m", "outputs")
    result, run = _run_until_full(
        tmp_path, disk, monkeypatch, leave=0, extra=["logger=tensorboard"]
    )
    _check_one_line(result, str(run))
    assert temporaries(disk) == []
    assert torch.load(run / "checkpoints" / "step-0000003.ckpt", weights_only=True)


@pytest.mark.slow  # about 8 s end to end; test_hydras_own_full_disk_is_one_line checks it in-process
def test_train_py_on_a_disk_full_from_the_start(tmp_path, tmpfs):
    """Hydra itself writes first (.hydra/config.yaml): one line naming it, not Hydra's
    tracebacks; the run folder it could not fill is not left behind."""
    disk = tmpfs("8m", "outputs")
    fill(disk)
    result = run_train([*RUN, "logger=none", f"paths.log_dir={disk}"], cwd=tmp_path)
    line = _check_one_line(result, str(disk / "runs"))
    assert line.endswith("/.hydra/config.yaml (the run has no checkpoint to resume from yet: "
                         "free some space, then run the same command again)"), line  # fmt: skip
    assert [p.name for p in disk.rglob("*") if p.is_file()] == ["ballast"]


@pytest.mark.slow  # a sweep of train.py (the same guard as the run above; main's is below)
def test_a_sweep_on_a_full_disk_stops_at_its_first_job(tmp_path, tmpfs):
    disk = tmpfs("8m", "outputs")
    fill(disk)
    result = run_train(["-m", "optim.lr=0.01,0.02", *RUN, "logger=none",
                        f"paths.log_dir={disk}"], cwd=tmp_path)  # fmt: skip
    _check_one_line(result, str(disk / "multirun"))
    assert "optim.lr=0.02" not in result.stderr


def test_a_full_disk_in_a_sweep_job_ends_the_sweep(tmp_path, monkeypatch, capsys):
    """Every later job would fail on it too: one line, status 2 (a job that fails for another
    reason is recorded and the sweep goes on)."""
    from omegaconf import OmegaConf

    from mtl_clippy import distributed
    from mtl_clippy import train as train_mod
    from mtl_clippy.errors import RUN_FOLDER_HINT

    def train(cfg):
        raise DiskFull(tmp_path / "run" / "metrics.json", hint=RUN_FOLDER_HINT)

    monkeypatch.setattr(distributed, "is_multirun", lambda: True)
    monkeypatch.setattr(train_mod, "train", train)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(SystemExit) as caught:
        train_mod.main(cfg)
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {MESSAGE}{tmp_path / 'run' / 'metrics.json'} (the run has no checkpoint to "
        "resume from yet: free some space, then run the same command again)\n"
    )
    monkeypatch.setattr(train_mod, "train", lambda cfg: (_ for _ in ()).throw(ValueError("x")))
    assert train_mod.main(cfg) is None  # recorded; the sweep goes on


def test_hydras_own_full_disk_is_one_line(tmp_path, capsys):
    """What train.py wraps around hydra.main: Hydra's writer of .hydra/config.yaml fails in
    its close (the error raised in C, without frames of its own)."""
    import hydra._internal.utils as hydra_utils

    from mtl_clippy.full_disk_cli import full_disk_exits

    run = tmp_path / "runs" / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / "train.log").touch()

    def start():
        with open(run / ".hydra" / "config.yaml", "w") as file:  # what Hydra's _save_config does
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise OSError(errno.ENOSPC, "No space left on device") from None
        return file

    with full_disk_exits(), pytest.raises(SystemExit) as caught:
        hydra_utils.run_and_report(start)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {MESSAGE}{run / '.hydra' / 'config.yaml'} (the run has no ")
    assert not run.exists()  # only the empty files of a start: gone
    with full_disk_exits(), pytest.raises(SystemExit) as caught:  # other errors: Hydra's report
        hydra_utils.run_and_report(lambda: (_ for _ in ()).throw(ValueError("other")))
    assert caught.value.code == 1


def test_only_an_empty_start_is_removed(tmp_path):
    from mtl_clippy.full_disk_cli import remove_empty_start

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "train.log").touch()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not remove_empty_start(run)
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "train.log").write_text("a line of an earlier attempt\n")
    assert not remove_empty_start(run)
    (run / "train.log").write_text("")
    assert remove_empty_start(run) and not run.exists()


def test_a_full_disk_met_by_a_library_stays_the_first_failure_reported(tmp_path, monkeypatch):
    """TensorBoard's writer thread meets the full disk first (a bare ``OSError``, its file
    only in the frames of the write), then metrics.json does not fit either: the event file
    is named first, metrics.json after it."""
    from hydra import compose, initialize_config_dir

    from mtl_clippy import summary as summary_mod
    from mtl_clippy import train as train_mod

    events = tmp_path / "run" / "tensorboard" / "events.out.tfevents.1.host.1.0"
    events.parent.mkdir(parents=True)

    def fit(*args, **kwargs):  # as the writer thread's error, raised again by the main thread
        with open(events, "ab") as f:  # noqa: F841 (the open file is what names it)
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_json(path, payload):
        raise DiskFull(path, hint="free some space")

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    monkeypatch.setattr(summary_mod, "write_json_atomic", write_json)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, "logger=none", "threads=1"])
    cfg.paths.output_dir = str(tmp_path / "run")
    cfg.paths.data_dir = str(tmp_path / "data")
    with pytest.raises(DiskFull) as caught:
        train_mod.train(cfg)
    assert reported(caught.value).path == str(events)
    assert disk_full_message(caught.value, tmp_path / "run") == (
        f"{MESSAGE}{events}; then also {tmp_path / 'run' / 'metrics.json'} (the run has no "
        "checkpoint to resume from yet: free some space, then run the same command again)"
    )

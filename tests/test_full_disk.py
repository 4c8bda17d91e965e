"""A full disk: one line naming the file that did not fit, nothing half-written, and every
checkpoint written before it intact (and resumable).

The file systems that fill up are small tmpfs mounts (the tests run as root; where mounting is
not permitted they are skipped, saying so). A *ballast* file fills one up to a chosen number of
bytes left. The end-to-end runs fill their run folder's file system at a chosen checkpoint with
the test-only callback :class:`FillDisk` (``+callbacks.fill_disk=...``), so that the first
checkpoints fit and a later one does not, whatever the size of a checkpoint.
"""

from __future__ import annotations

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
from mtl_clippy.train import write_json_atomic

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

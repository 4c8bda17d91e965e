"""Nothing is left behind by a process that was killed, and nothing a live process still
writes is taken from it.

* Data caches: a writer killed mid-write leaves ``.<name>.tmp-<random>-<pid>@<host>``; the
  next process that looks for a cache in that folder deletes it, even when the cache it
  wants is already complete, or has another key (``cache.remove_dead_leftovers``).
* Checkpoints: a writer killed mid-write leaves ``.<name>.ckpt.tmp<pid>@<host>``; the next
  fit deletes it at its start (``remove_dead_checkpoint_temps``, rank 0).
* Step checkpoints: after a kill and a resume only the newest ``step-*.ckpt`` remains.

Whether a writer is gone: on this machine, its pid runs no process, or one that started after
the temporary last changed (a reused pid); from another machine (or a name without a host)
only after a day without a change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app_helpers import ROOT, run_train, start_and_kill
from mtl_clippy.callbacks import AtomicCheckpointIO, ResumeState
from mtl_clippy.callbacks.checkpointing import remove_dead_checkpoint_temps
from mtl_clippy.data import cache as cache_mod
from mtl_clippy.data import generate_dataset
from mtl_clippy.data.reader import read_split

DAY = 24 * 3600


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


DEAD = _dead_pid()
HERE = cache_mod.host_tag()
STARTED = cache_mod._process_start(os.getpid())  # this process, on Linux


def _age(path: Path, seconds: float) -> None:
    """Make everything in ``path`` (and ``path``) last changed ``seconds`` ago."""
    when = time.time() - seconds
    for inner in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(inner, (when, when))


#: (writer pid, host, age in seconds, removed?) of each kind of leftover.
def _kinds() -> dict[str, tuple[int, str | None, float, bool]]:
    mine = os.getpid()
    kinds = {
        "live writer here": (mine, HERE, 0, False),
        "dead writer here": (DEAD, HERE, 0, True),
        "writer elsewhere, fresh": (DEAD, "other-node~1", 3600, False),
        "writer elsewhere, two days old": (DEAD, "other-node~1", 2 * DAY, True),
        "no host recorded, fresh": (DEAD, None, 3600, False),
        "no host recorded, two days old": (DEAD, None, 2 * DAY, True),
    }
    if STARTED is not None:  # a live pid whose process started after the folder: reused
        kinds["reused pid here"] = (mine, HERE, time.time() - STARTED + 3600, True)
    return kinds


KINDS = _kinds()


def _cache_leftover(parent: Path, name: str, pid: int, host: str | None, age: float) -> Path:
    tag = f"0123abcd-{pid}@{host}" if host else f"{pid}-0123abcd"
    path = parent / f".{name}.tmp-{tag}"
    path.mkdir(parents=True)
    np_file = path / "categorical.npy"
    np_file.write_bytes(b"\x93NUMPY half of it")
    if age:
        _age(path, age)
    return path


# ----------------------------------------------------------------------------- data caches


@given(
    kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=6),
    names=st.lists(st.from_regex(r"[a-z]{1,6}-[0-9a-f]{4}", fullmatch=True), min_size=6),
)
def test_only_leftovers_of_writers_that_are_gone_are_removed(kinds, names):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        (root / "complete").mkdir(parents=True)  # a cache folder: never touched
        # names like a leftover's, but not made by publish: never touched
        (root / ".notes.tmp-draft").mkdir()
        (root / f"x.tmp-0123abcd-{DEAD}@{HERE}").mkdir()
        expected_gone, expected_kept = set(), {"complete", ".notes.tmp-draft"}
        expected_kept.add(f"x.tmp-0123abcd-{DEAD}@{HERE}")
        for i, kind in enumerate(kinds):
            pid, host, age, removed = KINDS[kind]
            path = _cache_leftover(root, f"{names[i]}{i}", pid, host, age)
            (expected_gone if removed else expected_kept).add(path.name)
        removed = cache_mod.remove_dead_leftovers(root / "complete")
        assert {p.name for p in removed} == expected_gone
        assert {p.name for p in root.iterdir()} == expected_kept


_WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from mtl_clippy.data.reader import read_split

    save = np.save
    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        np.save = save  # the first array only
        print("writing", flush=True)
        if sys.argv[3] == "die":
            os._exit(3)  # killed after writing the first array of the cache
        sys.stdin.readline()  # a slow writer: goes on when told
    np.save = save_then_stop
    read_split(sys.argv[1], cache_dir=sys.argv[2])
    """
)


def _writer(source: Path, cache: Path, how: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(source), str(cache), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _dotted(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_cache_writers_folder_goes_even_when_the_cache_is_complete(tmp_path):
    source, cache = tmp_path / "d", tmp_path / "c"
    generate_dataset(source, 600, 300, seed=3)
    assert not read_split(source / "train.csv", cache_dir=cache).from_cache  # complete
    # a writer of the other split's cache is killed mid-write
    proc = _writer(source / "test.csv", cache, "die")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    lock, left = _dotted(cache)  # the lock it held, and its temporary folder
    assert ".tmp-" in left and left.endswith(f"-{proc.pid}@{HERE}") and lock.endswith(".lock")
    # the next process finds its own cache complete (no lock, nothing to write): cleans up
    assert read_split(source / "train.csv", cache_dir=cache).from_cache
    assert _dotted(cache) == []


def test_a_live_cache_writers_folder_is_never_removed(tmp_path):
    source, cache = tmp_path / "d", tmp_path / "c"
    generate_dataset(source, 600, 300, seed=3)
    read_split(source / "train.csv", cache_dir=cache)
    proc = _writer(source / "test.csv", cache, "wait")
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()[-2000:]
        writing = _dotted(cache)  # the lock it holds and its temporary folder
        assert [".tmp-" in n for n in writing] == [False, True]
        assert read_split(source / "train.csv", cache_dir=cache).from_cache
        assert cache_mod.remove_dead_leftovers(cache / writing[1].split(".")[1]) == []
        assert _dotted(cache) == writing  # still there: its writer is at work
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert read_split(source / "test.csv", cache_dir=cache).from_cache  # its copy, complete
    assert _dotted(cache) == []


# ----------------------------------------------------------------------------- checkpoints


def _killed_while_saving(target: Path) -> int:
    """Fork a process that dies in the middle of ``AtomicCheckpointIO.save_checkpoint``
    (after the first bytes of ``target``); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: write a little, then die as SIGKILL would, without cleaning up
        try:

            def save_then_die(obj, f, *args, **kwargs):
                f.write(b"PK\x03\x04 the first bytes of a checkpoint")
                f.flush()
                os._exit(9)

            torch.save = save_then_die
            AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_killed_checkpoint_writers_file_goes_at_the_next_fit_start(tmp_path):
    folder = tmp_path / "checkpoints"
    _killed_while_saving(folder / "step-0000007.ckpt")
    (left,) = folder.iterdir()
    assert left.name.startswith(".step-0000007.ckpt.tmp") and left.name.endswith(f"@{HERE}")
    # beside it: a live writer's (this process), another machine's, files that are not ours
    live = folder / f".last.ckpt.tmp{os.getpid()}@{HERE}"
    elsewhere = folder / f".best.ckpt.tmp{DEAD}@other-node~1"
    old_elsewhere = folder / f".step-0000003.ckpt.tmp{DEAD}@other-node~1"
    dead_here = folder / f".best.ckpt.tmp{DEAD}@{HERE}"
    for path in (live, elsewhere, old_elsewhere, dead_here, folder / "last.ckpt"):
        path.write_bytes(b"x")
    (folder / "notes.tmp12").write_text("a user's file")
    _age(old_elsewhere, 2 * DAY)
    # what the next fit does at its start, on rank 0 (a checkpoint folder per callback)
    trainer = SimpleNamespace(
        is_global_zero=True,
        checkpoint_callbacks=[SimpleNamespace(dirpath=str(folder))] * 2,
    )
    ResumeState().on_fit_start(trainer, None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [live.name, elsewhere.name, "last.ckpt", "notes.tmp12"]
    )
    # rank 1 leaves everything to rank 0; a folder that does not exist yet is no error
    elsewhere.touch()
    _age(elsewhere, 2 * DAY)
    ResumeState().on_fit_start(SimpleNamespace(**{**vars(trainer), "is_global_zero": False}), None)
    assert elsewhere.exists()
    assert remove_dead_checkpoint_temps(tmp_path / "nowhere") == []


def test_atomic_checkpoint_temporaries_name_their_writer(tmp_path, monkeypatch):
    seen = []
    real = torch.save

    def spy(obj, f, *args, **kwargs):
        seen.append(Path(f.name).name)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    assert seen == [f".a.ckpt.tmp{os.getpid()}@{HERE}"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


# ----------------------------------------------------------------------------- kill + resume

# 2,700 training rows / 128 = 21 batches per epoch, a step checkpoint every 5 steps; killed
# at step 25 (second epoch), resumed: the resumed run saves steps 30, 35 and 40.
RESUME_ARGS = [
    "data.train_rows=3000",
    "data.test_rows=1500",
    "data.batch_size=128",
    "trainer.max_epochs=2",
    "callbacks.step_checkpoint.every_n_train_steps=5",
    "callbacks.progress_bar.refresh_rate=0",
    "logger=none",
    "threads=1",
    "test=false",
]


def test_after_a_kill_and_a_resume_only_the_newest_step_checkpoint_remains(tmp_path):
    args = [*RESUME_ARGS, f"paths.log_dir={tmp_path}/outputs", f"paths.data_dir={tmp_path}/d"]
    start_and_kill(args, tmp_path, "step-0000025.ckpt")
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    folder = run / "checkpoints"
    # what a kill at another moment leaves: the previous step checkpoint (killed between
    # writing the new one and deleting the old one) and a half-written temporary file
    (folder / "step-0000020.ckpt").write_bytes((folder / "step-0000025.ckpt").read_bytes())
    (folder / f".step-0000030.ckpt.tmp{DEAD}@{HERE}").write_bytes(b"PK\x03\x04 cut")
    res = run_train([*args, "resume=true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 42
    assert summary["resumed_from"] == os.path.join("checkpoints", "step-0000025.ckpt")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["best.ckpt", "last.ckpt", "step-0000040.ckpt"], names
    assert torch.load(folder / "step-0000040.ckpt", weights_only=True)["global_step"] == 40


@pytest.mark.parametrize("resumed_from", ["step-0000020.ckpt", "last.ckpt", None])
def test_at_fit_start_only_the_newest_step_checkpoint_is_kept(tmp_path, resumed_from):
    from mtl_clippy.callbacks import StepCheckpoint

    cb = StepCheckpoint(dirpath=str(tmp_path), every_n_train_steps=10)
    for i, step in enumerate([10, 20, 30]):
        path = tmp_path / f"step-{step:07d}.ckpt"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "last.ckpt").write_bytes(b"x")
    removed = []
    trainer = SimpleNamespace(
        ckpt_path=str(tmp_path / resumed_from) if resumed_from else None,
        strategy=SimpleNamespace(remove_checkpoint=lambda p: (removed.append(p), p.unlink())),
    )
    cb.on_fit_start(trainer, None)
    kept = "step-0000020.ckpt" if resumed_from == "step-0000020.ckpt" else "step-0000030.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", kept])
    assert len(removed) == 2

"""Nothing is left behind by a process that was killed, and nothing a live process still
writes is taken from it.

* Data caches: a writer killed mid-write leaves ``.<name>.tmp-<random>-<pid>@<host>``; the
  next process that looks for a cache in that folder deletes it, even when the cache it
  wants is already complete, or has another key (``cache.remove_dead_leftovers``).
* Checkpoints: a writer killed mid-write leaves ``.<name>.ckpt.tmp<pid>@<host>`` (or, from
  earlier versions, ``.<name>.ckpt.tmp<pid>``); the next fit deletes it at its start
  (``remove_dead_checkpoint_temps``, rank 0).
* Small files (``metrics.json``, ``metrics.csv``, ``hparams.yaml``): a writer killed
  mid-write leaves ``<name>.tmp<pid>``; the next start in that run folder deletes it
  (``atomic.remove_dead_temporaries``).
* Step checkpoints: after a kill and a resume only the newest ``step-*.ckpt`` of the run
  remains; never another callback's file (``best.ckpt``, ``last.ckpt``), nor another run's
  step checkpoint in a shared folder.

Whether a writer is gone: every writer holds an exclusive ``flock`` on its temporary while it
writes, so a temporary whose lock can be taken has no writer (any pid namespace, any clock);
on a network file system it must also be a day old, and an empty one younger than a minute
is left (its writer may not have locked it yet).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app_helpers import ROOT, run_train, start_and_kill
from mtl_clippy import atomic
from mtl_clippy.callbacks import AtomicCheckpointIO, ResumeState, StepCheckpoint
from mtl_clippy.callbacks.checkpointing import name_pattern, remove_dead_checkpoint_temps
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


def _age(path: Path, seconds: float) -> None:
    """Make everything in ``path`` (and ``path``) last changed ``seconds`` ago (for a clock
    that differs between hosts, or a file really that old)."""
    when = time.time() - seconds
    for inner in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(inner, (when, when))


def _hold(path: Path) -> int:
    """Take ``path``'s writer lock as a live writer does (a descriptor of our own: flock
    locks of two descriptors conflict even in one process); close it to let go."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


#: (held by a live writer?, age in seconds, empty?, on a network file system?, removed?)
KINDS = {
    "writer at work": (True, 0, False, False, False),
    "writer at work, clock two days behind": (True, 2 * DAY, False, False, False),
    "writer at work, network file system, old": (True, 2 * DAY, False, True, False),
    "writer gone": (False, 0, False, False, True),
    "writer gone, clock two days behind": (False, 2 * DAY, False, False, True),
    "writer gone, empty, just created": (False, 0, True, False, False),
    "writer gone, empty, an hour old": (False, 3600, True, False, True),
    "writer gone, network file system, fresh": (False, 3600, False, True, False),
    "writer gone, network file system, two days old": (False, 2 * DAY, False, True, True),
}


def _leftover(parent: Path, name: str, kind: str, folder: bool) -> tuple[Path, int]:
    """A temporary of ``kind`` (see KINDS); returns it and the descriptor that holds it (-1)."""
    held, age, empty, _, _ = KINDS[kind]
    path = parent / name
    if folder:
        path.mkdir(parents=True)
        if not empty:
            (path / "categorical.npy").write_bytes(b"\x93NUMPY half of it")
    else:
        path.write_bytes(b"" if empty else b"PK\x03\x04 half of it")
    if age:
        _age(path, age)
    return path, _hold(path) if held else -1


# ----------------------------------------------------------------------------- data caches


@given(
    kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=6),
    names=st.lists(st.from_regex(r"[a-z]{1,6}-[0-9a-f]{4}", fullmatch=True), min_size=6),
    old_format=st.lists(st.booleans(), min_size=6, max_size=6),
    other_namespace=st.booleans(),
)
def test_only_leftovers_no_writer_holds_are_removed(kinds, names, old_format, other_namespace):
    """Whatever the pid, host or pid namespace in the name (a container restarted on the same
    host), and whatever the clock says: the lock decides; the age guards only where the lock
    may not be seen (network file systems) or not taken yet (an empty, new folder)."""
    host = f"{HERE.split('~')[0]}~4026999999" if other_namespace else HERE
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        root = Path(tmp) / "cache"
        (root / "complete").mkdir(parents=True)  # a cache folder: never touched
        # names like a leftover's, but not made by publish: never touched
        (root / ".notes.tmp-draft").mkdir()
        (root / f"x.tmp-0123abcd-{DEAD}@{host}").mkdir()
        expected_gone, expected_kept = set(), {"complete", ".notes.tmp-draft"}
        expected_kept.add(f"x.tmp-0123abcd-{DEAD}@{host}")
        remote, fds = set(), []
        for i, kind in enumerate(kinds):
            tag = f"{DEAD}-0123abcd" if old_format[i] else f"0123abcd-{DEAD}@{host}"
            path, fd = _leftover(root, f".{names[i]}{i}.tmp-{tag}", kind, folder=True)
            fds.append(fd)
            if KINDS[kind][3]:
                remote.add(str(path))
            (expected_gone if KINDS[kind][4] else expected_kept).add(path.name)
        local = atomic.on_local_file_system
        mp.setattr(atomic, "on_local_file_system", lambda p: str(p) not in remote and local(p))
        try:
            removed = cache_mod.remove_dead_leftovers(root / "complete")
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        assert {p.name for p in removed} == expected_gone
        assert {p.name for p in root.iterdir()} == expected_kept


def test_a_leftover_of_another_pid_namespace_goes_at_once(tmp_path):
    """A writer killed in a container (its own pid namespace: pid 1 there), the next start in
    a fresh container on the same host: nothing to wait for, whatever the pids."""
    other = f"{HERE.split('~')[0]}~4026999999"
    ckpt = tmp_path / f".step-0000003.ckpt.tmp1@{other}"
    ckpt.write_bytes(b"x" * 1000)
    cache = tmp_path / f".train3000.tmp-deadbeef-1@{other}"
    cache.mkdir()
    (cache / "a.npy").write_bytes(b"x" * 1000)
    assert remove_dead_checkpoint_temps(tmp_path) == [ckpt]
    assert cache in cache_mod.remove_dead_leftovers(tmp_path / "train3000")
    assert list(tmp_path.iterdir()) == []


_WRITER = textwrap.dedent(
    """
    import os, sys, threading
    from mtl_clippy.data import reader
    from mtl_clippy.data.reader import read_split

    write = reader._NpyWriter.write  # the parsing threads write the cache block by block
    first = threading.Lock()
    def write_then_stop(*args, **kwargs):
        write(*args, **kwargs)
        if not first.acquire(blocking=False):
            return  # the first block only
        print("writing", flush=True)
        if sys.argv[3] == "die":
            os._exit(3)  # killed after writing the first block of rows of the cache
        sys.stdin.readline()  # a slow writer: goes on when told
    reader._NpyWriter.write = write_then_stop
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
        _age(cache / writing[1], 2 * DAY)  # a file server's clock two days behind: no matter
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
def test_a_killed_checkpoint_writers_file_goes_at_the_next_fit_start(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    _killed_while_saving(folder / "step-0000007.ckpt")
    (left,) = folder.iterdir()
    assert left.name.startswith(".step-0000007.ckpt.tmp") and left.name.endswith(f"@{HERE}")
    # beside it: a live writer's (held), the earlier versions' name, a FIFO named like one,
    # files that are not ours; two on a network file system (fresh, and two days old)
    live = folder / f".last.ckpt.tmp{DEAD}@{HERE}"
    old_name = folder / f".step-0000003.ckpt.tmp{DEAD}"  # no host: the version before
    remote_fresh = folder / f".best.ckpt.tmp{DEAD}@other-node~1"
    remote_old = folder / f".step-0000002.ckpt.tmp{DEAD}@other-node~1"
    for path in (live, old_name, remote_fresh, remote_old, folder / "last.ckpt"):
        path.write_bytes(b"x")
    fifo = folder / f".step-0000009.ckpt.tmp{DEAD}@{HERE}"
    os.mkfifo(fifo)
    (folder / "notes.tmp12").write_text("a user's file")
    _age(remote_old, 2 * DAY)
    remote = {str(remote_fresh), str(remote_old)}
    local = atomic.on_local_file_system
    monkeypatch.setattr(atomic, "on_local_file_system", lambda p: str(p) not in remote and local(p))
    held = _hold(live)
    try:
        # what the next fit does at its start, on rank 0 (a checkpoint folder per callback)
        trainer = SimpleNamespace(
            is_global_zero=True,
            checkpoint_callbacks=[SimpleNamespace(dirpath=str(folder))] * 2,
        )
        ResumeState().on_fit_start(trainer, None)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [live.name, remote_fresh.name, fifo.name, "last.ckpt", "notes.tmp12"]
        )
    finally:
        os.close(held)
    # rank 1 leaves everything to rank 0; a folder that does not exist yet is no error
    ResumeState().on_fit_start(SimpleNamespace(**{**vars(trainer), "is_global_zero": False}), None)
    assert live.exists()
    assert remove_dead_checkpoint_temps(folder) == [live]  # its writer let go
    assert remove_dead_checkpoint_temps(tmp_path / "nowhere") == []


def test_a_checkpoint_writer_at_work_keeps_its_file_whatever_the_clock(tmp_path, monkeypatch):
    """A writer in the middle of ``save_checkpoint`` (a thread here: flock locks of two open
    files conflict as between processes), its temporary stamped two days old (the clock of
    an NFS server behind this host's): kept; renamed into place when the writer finishes."""
    import threading

    target = tmp_path / "step-0000300.ckpt"
    writing, go = threading.Event(), threading.Event()

    def save_slowly(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes")
        f.flush()
        writing.set()
        go.wait(60)
        f.write(b" and the rest")

    monkeypatch.setattr(torch, "save", save_slowly)
    writer = threading.Thread(
        target=AtomicCheckpointIO().save_checkpoint, args=({"w": 1}, target), daemon=True
    )
    writer.start()
    try:
        assert writing.wait(60)
        (tmp,) = tmp_path.iterdir()
        _age(tmp, 2 * DAY)
        assert remove_dead_checkpoint_temps(tmp_path) == []
        assert atomic.remove_unused_temporary(tmp, unchanged_s=0) is False
    finally:
        go.set()
        writer.join(60)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes().endswith(b"the rest")


# ----------------------------------------------------------------------------- small files


def test_the_temporaries_of_small_files_go_at_the_start_of_a_run(tmp_path):
    """``<name>.tmp<pid>`` of metrics.json, metrics.csv and hparams.yaml (write_atomically)
    that no writer holds, in the run folder and its logger folders; nothing else."""
    run = tmp_path / "run"
    dead = [run / f"metrics.json.tmp{DEAD}", run / "csv" / f"metrics.csv.tmp{DEAD}",
            run / "csv" / f"hparams.yaml.tmp{DEAD}", run / "tensorboard" / "hparams.yaml.tmp7"]  # fmt: skip
    live = run / "csv" / f"metrics.csv.tmp{os.getpid()}"
    others = [run / "notes.tmp12", run / "metrics.json", run / "a" / "b" / f"metrics.json.tmp{DEAD}",
              run / "checkpoints" / "last.ckpt"]  # fmt: skip
    for path in [*dead, live, *others]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    held = _hold(live)
    try:
        assert sorted(atomic.remove_dead_temporaries(run)) == sorted(dead)
    finally:
        os.close(held)
    assert all(p.exists() for p in [live, *others]) and not any(p.exists() for p in dead)


def test_write_atomically_holds_its_temporary_while_writing(tmp_path):
    target = tmp_path / "metrics.json"
    seen = []

    def write(tmp: Path) -> None:
        tmp.write_text("{}")
        seen.append(atomic.remove_dead_temporaries(tmp_path))  # a cleaner, mid-write

    atomic.write_atomically(target, write)
    assert seen == [[]] and target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


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


@pytest.mark.slow  # about 20 s: a kill and a resume; the fit-start pruning is checked in-process
def test_after_a_kill_and_a_resume_only_the_newest_step_checkpoint_remains(tmp_path):
    args = [*RESUME_ARGS, f"paths.log_dir={tmp_path}/outputs", f"paths.data_dir={tmp_path}/d"]
    args.append("keep_checkpoints=all")  # a completed run keeps its step checkpoint here
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


def _step_file(path: Path, run_id: str, mtime: float | None = None) -> Path:
    """A checkpoint as StepCheckpoint saves it (its own state names the run and the file)."""
    state = {"run_id": run_id, "best_model_path": str(path), "dirpath": str(path.parent)}
    torch.save({"global_step": 1, "callbacks": {"StepCheckpoint": state}}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize("resumed_from", ["step-0000020.ckpt", "last.ckpt", None])
def test_at_fit_start_only_the_newest_step_checkpoint_is_kept(tmp_path, resumed_from):
    cb = StepCheckpoint(dirpath=str(tmp_path), every_n_train_steps=10)
    for i, step in enumerate([10, 20, 30]):
        _step_file(tmp_path / f"step-{step:07d}.ckpt", cb.run_id, 1000 + i)
    other_run = _step_file(tmp_path / "step-0000040.ckpt", "another run", 2000)
    (tmp_path / "step-0000050.ckpt").write_bytes(b"x")  # unreadable: whose is it?
    (tmp_path / "last.ckpt").write_bytes(b"x")
    removed = []
    trainer = SimpleNamespace(
        ckpt_path=str(tmp_path / resumed_from) if resumed_from else None,
        strategy=SimpleNamespace(remove_checkpoint=lambda p: (removed.append(p), p.unlink())),
    )
    cb.on_fit_start(trainer, None)
    kept = "step-0000020.ckpt" if resumed_from == "step-0000020.ckpt" else "step-0000030.ckpt"
    expected = ["last.ckpt", kept, other_run.name, "step-0000050.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    assert len(removed) == 2


def _fit(dirpath: Path, every: int, steps: int, *, ckpt_path=None, **step_kwargs) -> list[str]:
    """A short fit (10 batches an epoch) with a StepCheckpoint and a best/last ModelCheckpoint
    in ``dirpath``; the names in ``dirpath`` after it."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    torch.set_num_threads(1)
    callbacks = [
        StepCheckpoint(dirpath=str(dirpath), every_n_train_steps=every, **step_kwargs),
        ModelCheckpoint(dirpath=str(dirpath), filename="best", save_last=True),
    ]
    trainer = pl.Trainer(
        max_steps=steps, limit_train_batches=10, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=str(dirpath.parent), plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return sorted(p.name for p in dirpath.iterdir())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_step_name_of_fields_only_never_removes_best_or_last(tmp_path):
    """``callbacks.step_checkpoint.filename='{step}'``: its files (``24.ckpt``) and the other
    callback's (``best.ckpt``, ``last.ckpt``) share no text; only its own are pruned."""
    names = _fit(tmp_path / "checkpoints", every=3, steps=25, filename="{step}")
    assert names == ["24.ckpt", "best.ckpt", "last.ckpt"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_shared_step_folder_keeps_each_runs_newest_checkpoint(tmp_path, caplog):
    """Two runs (sweep jobs) with one ``dirpath``: neither deletes the other's step
    checkpoint; a resume from its own continues to prune its own."""
    shared = tmp_path / "ckpts"
    assert "step-0000004.ckpt" in _fit(shared, every=4, steps=5)  # run B, then killed
    names = _fit(shared, every=3, steps=4)  # run A
    assert {"step-0000003.ckpt", "step-0000004.ckpt"} <= set(names)
    assert "not saved by this run" in caplog.text
    names = _fit(shared, every=4, steps=9, ckpt_path=shared / "step-0000004.ckpt")  # B resumed
    assert [n for n in names if n.startswith("step")] == ["step-0000003.ckpt", "step-0000008.ckpt"]


#: Name templates with a step number (two number fields side by side could not be parsed).
_TEMPLATES = ["step-{step:07d}", "{step}", "{epoch}-{step}", "run_{step:05d}.x",
              "{val_auc:.3f}-{step}"]  # fmt: skip


@given(
    template=st.sampled_from(_TEMPLATES),
    auto_insert=st.booleans(),
    step=st.integers(0, 10**8),
    epoch=st.integers(0, 999),
    version=st.one_of(st.none(), st.integers(1, 20)),
    auc=st.floats(0, 1),
)
def test_the_name_pattern_matches_exactly_the_names_lightning_makes(
    template, auto_insert, step, epoch, version, auc
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = ModelCheckpoint(dirpath=None, filename=template, auto_insert_metric_name=auto_insert)
    metrics = {"step": torch.tensor(step), "epoch": torch.tensor(epoch),
               "val_auc": torch.tensor(auc)}  # fmt: skip
    name = cb.format_checkpoint_name(metrics, ver=version)
    pattern = name_pattern(template, auto_insert)
    match = pattern.match(name)
    assert match is not None and int(match["step"]) == step, (name, pattern.pattern)
    for other in ("best.ckpt", "last.ckpt", "last-v1.ckpt", "best-v2.ckpt", f".{name}.tmp1@h"):
        assert pattern.match(other) is None

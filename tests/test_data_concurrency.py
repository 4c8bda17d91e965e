"""Caches shared by processes that start together (issue 11, bug 5): first writer wins.

DDP ranks, loader workers and the jobs of a parallel sweep reach the same empty data folder
at the same moment. Each cache (the generated data, the parse cache of each CSV, the encoded
ids) must then be written by exactly one of them, the others must use that copy, a complete
cache must never be replaced under a process that reads it, and a writer that dies mid-write
must leave nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mtl_clippy.data import AliExpressDataModule, generate_dataset, read_split
from mtl_clippy.data import reader as reader_mod

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = {"train_rows": 3000, "test_rows": 1000, "batch_size": 256, "progress": False}

# One process of a race: count the work it does (generating, parsing, encoding) by wrapping
# the functions that do it, wait until every process is ready (a barrier on files), then
# build every cache of the generated data in the shared, empty cache folder; print the
# counts and hashes of what it ended with. With "datamodule" it sets up an
# AliExpressDataModule (importing Lightning: seconds per process); otherwise it makes the
# calls the data module makes, in a process that starts in a fraction of a second.
_RACER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from pathlib import Path

    import numpy as np

    from mtl_clippy.data import reader, synthetic

    cache_dir, ready_dir, me, n, how = sys.argv[1:6]
    ready_dir, n = Path(ready_dir), int(n)
    work = {"write_csv": 0, "parse": 0, "encode": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            work[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    synthetic._write_csv = counting("write_csv", synthetic._write_csv)
    reader._parse = counting("parse", reader._parse)
    rows = dict(train_rows=3000, test_rows=1000)
    if how == "datamodule":
        from mtl_clippy.data import datamodule as dm_module

        dm_module.AliExpressDataModule._encode = counting(
            "encode", dm_module.AliExpressDataModule._encode
        )
        dm = dm_module.AliExpressDataModule(
            cache_dir=cache_dir, batch_size=256, progress=False, **rows
        )
    else:
        from mtl_clippy.data import vocab

        config = synthetic.GeneratorConfig(**rows)
        folder = Path(cache_dir) / "synthetic" / config.key()
    (ready_dir / me).touch()
    deadline = time.monotonic() + 120
    while len(list(ready_dir.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.001)  # all start at once
    if how == "datamodule":
        dm.prepare_data()
        dm.setup("fit")
        source, encoded = dm.source_dir, (dm._train[0], dm._test[0])
        vocab_sizes = list(dm.metadata.vocab_sizes)
    else:  # what AliExpressDataModule.prepare_data and setup do
        if synthetic.dataset_meta(folder) is None:
            synthetic.generate_dataset(folder, **rows, replace=False)
        train, test = (reader.read_split(folder / f"{s}.csv") for s in ("train", "test"))
        n_fit = len(train) - round(0.1 * len(train))
        m = vocab.DEFAULT_MIN_COUNT
        vocabularies = vocab.build_vocabularies(train.categorical[:n_fit], m)
        encode = counting("encode", lambda ids: vocab.encode_all(ids, vocabularies))
        *encoded, _ = vocab.encoded_ids(train, test, n_fit, m, encode)
        source, vocab_sizes = folder, [v.size for v in vocabularies]

    def digest(a):
        a = np.ascontiguousarray(a)
        return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()

    parsed = [reader.read_split(source / f"{s}.csv") for s in ("train", "test")]
    hashes = {
        "csv": [hashlib.sha256((source / f"{s}.csv").read_bytes()).hexdigest()
                for s in ("train", "test")],
        "parsed": [digest(a) for p in parsed for a in (p.categorical, p.numerical, p.labels)],
        "encoded": [digest(a) for a in encoded],
        "vocab_sizes": vocab_sizes,
    }
    print(json.dumps({"work": work, "hashes": hashes}))
    """
)


def _start(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _digest(array: np.ndarray) -> str:
    """As the racers compute it: dtype, shape and bytes."""
    a = np.ascontiguousarray(array)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()


def _digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _race(tmp_path: Path, n: int, how: str) -> None:
    """``n`` processes build the caches of the same generated data on an empty folder at
    once: one generates the files, each CSV is parsed once, the ids are encoded once, all end
    with byte-identical files and arrays (those of one process alone), nothing is left."""
    ready = tmp_path / "ready"
    ready.mkdir()
    cache_dir = tmp_path / "cache"
    procs = [_start(_RACER, str(cache_dir), str(ready), str(i), str(n), how) for i in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    work = [r["work"] for r in results]
    # exactly one process generated (two CSV files), parsed each file, encoded both splits
    assert sorted(w["write_csv"] for w in work) == [0] * (n - 1) + [2], work
    assert sum(w["parse"] for w in work) == 2, work
    assert sorted(w["encode"] for w in work) == [0] * (n - 1) + [2], work
    assert all(r["hashes"] == results[0]["hashes"] for r in results)
    alone = AliExpressDataModule(cache_dir=str(tmp_path / "alone"), **SMALL)
    alone.setup()
    csv = [_digest_file(alone.source_dir / f"{s}.csv") for s in ("train", "test")]
    assert results[0]["hashes"]["csv"] == csv
    assert results[0]["hashes"]["encoded"] == [_digest(alone._train[0]), _digest(alone._test[0])]
    assert results[0]["hashes"]["vocab_sizes"] == list(alone.metadata.vocab_sizes)
    leftovers = [p.name for p in cache_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers and not list(cache_dir.rglob("*.lock"))


def test_processes_started_together_on_an_empty_folder_write_each_cache_once(tmp_path):
    """Four processes making the data module's calls (generate, read, encode) at once."""
    _race(tmp_path, 4, "calls")


@pytest.mark.slow
def test_data_modules_started_together_on_an_empty_folder_write_each_cache_once(tmp_path):
    """Three AliExpressDataModules set up at once (sweep jobs, DDP ranks) on an empty folder."""
    _race(tmp_path, 3, "datamodule")


def test_a_late_writer_never_replaces_a_complete_cache_that_is_being_read(tmp_path):
    """A cache that a reader has memory-mapped stays in place, byte for byte, when a late
    writer arrives with its own copy: the late writer keeps the first copy."""
    source = tmp_path / "d"
    generate_dataset(source, 2000, 500, seed=3)
    read_split(source / "train.csv", cache_dir=tmp_path / "c")  # the first writer
    split = read_split(source / "train.csv", cache_dir=tmp_path / "c")
    assert split.from_cache and isinstance(split.numerical, np.memmap)
    expected = [_digest(a) for a in (split.categorical, split.numerical, split.labels)]
    (folder,) = (tmp_path / "c").iterdir()
    inodes = {p.name: p.stat().st_ino for p in folder.iterdir()}

    late = {
        "categorical": np.zeros_like(split.categorical),
        "numerical": np.zeros_like(split.numerical),
        "labels": np.zeros_like(split.labels),
    }
    assert reader_mod.save_arrays_atomic(folder, late, {"rows": 0})  # the folder holds a copy
    assert {p.name: p.stat().st_ino for p in folder.iterdir()} == inodes  # never replaced
    assert [_digest(a) for a in (split.categorical, split.numerical, split.labels)] == expected
    again = read_split(source / "train.csv", cache_dir=tmp_path / "c")
    assert again.from_cache and _digest(again.numerical) == expected[1]


def test_a_late_generator_keeps_the_complete_dataset(tmp_path):
    """The data module's generator (replace=False) keeps a complete dataset and returns its
    meta.json; the command line's (replace=True) replaces it, while a reader that has the old
    files memory-mapped keeps reading the old bytes."""
    out = tmp_path / "d"
    first = generate_dataset(out, 2000, 500, seed=3)
    inodes = {p.name: p.stat().st_ino for p in out.iterdir()}
    kept = generate_dataset(out, 2000, 500, seed=4, replace=False)
    assert kept == first
    assert {p.name: p.stat().st_ino for p in out.iterdir()} == inodes

    truth = np.load(out / "truth_train.npy", mmap_mode="r")
    before = np.array(truth)
    generate_dataset(out, 2000, 500, seed=4)  # replace=True: the command line
    assert np.array_equal(truth, before)  # the mapped old file is intact
    assert not np.array_equal(np.load(out / "truth_train.npy"), before)
    assert json.loads((out / "meta.json").read_text())["config"]["seed"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_late_data_module_maps_the_encoded_ids_without_encoding(tmp_path, monkeypatch):
    first = AliExpressDataModule(cache_dir=str(tmp_path), **SMALL)
    first.setup()
    assert first.encoded_from_cache is False and isinstance(first._train[0], np.memmap)
    (folder,) = (first.source_dir / ".mtl_clippy_cache").glob("encoded-*")
    inodes = {p.name: p.stat().st_ino for p in folder.iterdir()}
    expected = _digest(first._train[0])

    def boom(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(AliExpressDataModule, "_encode", boom)
    late = AliExpressDataModule(cache_dir=str(tmp_path), **SMALL)
    late.setup()
    assert late.encoded_from_cache is True
    assert {p.name: p.stat().st_ino for p in folder.iterdir()} == inodes
    assert _digest(first._train[0]) == _digest(late._train[0]) == expected


_DIES_MID_WRITE = textwrap.dedent(
    """
    import os, sys
    from mtl_clippy.data import reader
    from mtl_clippy.data.reader import read_split

    write = reader._NpyWriter.write  # the parsing threads write the cache block by block
    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        os._exit(3)  # killed after writing the first block of rows of the cache
    reader._NpyWriter.write = write_then_die
    read_split(sys.argv[1], cache_dir=sys.argv[2])
    """
)


def test_a_writer_killed_mid_write_leaves_no_cache_and_the_next_one_cleans_up(tmp_path):
    source = tmp_path / "d"
    generate_dataset(source, 2000, 500, seed=3)
    proc = _start(_DIES_MID_WRITE, str(source / "train.csv"), str(tmp_path / "c"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    names = [p.name for p in (tmp_path / "c").iterdir()]
    assert [n for n in names if not n.startswith(".")] == []  # nothing that looks complete
    assert any(".tmp-" in n for n in names)  # the dead writer's leftover
    split = read_split(source / "train.csv", cache_dir=tmp_path / "c")
    assert not split.from_cache  # the leftover was not taken for a cache
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")] == []
    assert read_split(source / "train.csv", cache_dir=tmp_path / "c").from_cache


def test_without_a_lock_the_first_complete_copy_still_wins(tmp_path, monkeypatch):
    """On a file system without flock the rename alone decides: a second writer never
    replaces the first one's folder."""
    from mtl_clippy.data import cache as cache_mod

    monkeypatch.setattr(cache_mod, "_acquire", lambda path: None)
    folder = tmp_path / "cache" / "x"
    with cache_mod.exclusive(folder) as held:
        assert not held
        assert cache_mod.publish(folder, cache_mod.array_filler({"a": np.arange(3)}), held=held)
    with cache_mod.exclusive(folder) as held:
        wrote = cache_mod.publish(folder, cache_mod.array_filler({"a": np.zeros(3)}), held=held)
    assert not wrote
    assert np.load(folder / "a.npy").tolist() == [0, 1, 2]
    assert [p.name for p in folder.parent.iterdir()] == ["x"]


def test_the_lock_excludes_other_processes_and_is_removed(tmp_path):
    from mtl_clippy.data import cache as cache_mod

    folder = tmp_path / "x"
    code = (
        "import sys; from pathlib import Path; from mtl_clippy.data import cache\n"
        "with cache.exclusive(Path(sys.argv[1])) as held: print(held)"
    )
    with cache_mod.exclusive(folder) as held:
        assert held and cache_mod.lock_path(folder).exists()
        proc = _start(code, str(folder))
        with pytest.raises(subprocess.TimeoutExpired):
            proc.communicate(timeout=1.5)  # waits while this process holds the lock
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "True", err
    assert not cache_mod.lock_path(folder).exists() and not folder.exists()

"""Caches are served only for the very file they were made from.

A file edited in place to the same size, its modification time then set back (``touch -r``,
``cp -p``, ``rsync -a`` all do this), must not be read from the cache of its old content:
the cache key holds the inode and the status-change time too, which no tool can set back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl_clippy.data import AliExpressDataModule, generate_dataset, read_split
from mtl_clippy.data.reader import AliExpressSplit
from mtl_clippy.data.vocab import encoded_ids


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gen")
    generate_dataset(folder, train_rows=800, test_rows=200, seed=3)
    return folder


def _flip_clicks_in_place(path: Path, n: int = 40) -> None:
    """Set ``n`` click labels 0 -> 1 (same size), then restore the old atime / mtime, as the
    review's reproduction did (``os.utime``, what ``touch -r`` / ``cp -p`` do)."""
    st = path.stat()
    lines = path.read_text().split("\n")
    ci = lines[0].split(",").index("click")
    done = 0
    for i in range(1, len(lines)):
        cells = lines[i].split(",")
        if len(cells) > ci and cells[ci] == "0" and done < n:
            cells[ci] = "1"
            lines[i] = ",".join(cells)
            done += 1
    assert done == n
    path.write_text("\n".join(lines))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _copy(generated: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("train.csv", "test.csv"):
        (dest / name).write_bytes((generated / name).read_bytes())
    return dest


def test_parse_cache_is_not_served_for_same_size_and_mtime(generated, tmp_path):
    data = _copy(generated, tmp_path / "data")
    path = data / "train.csv"
    first = read_split(path, cache_dir=tmp_path / "cache")
    assert not first.from_cache
    _flip_clicks_in_place(path)
    truth = pd.read_csv(path)["click"].to_numpy(np.float32)
    again = read_split(path, cache_dir=tmp_path / "cache")
    assert float(again.labels[:, 0].sum()) == float(truth.sum())  # not the old 40 fewer
    np.testing.assert_array_equal(again.labels[:, 0], truth)
    assert not again.from_cache
    third = read_split(path, cache_dir=tmp_path / "cache")  # now current: mapped again
    assert third.from_cache
    np.testing.assert_array_equal(third.labels[:, 0], truth)


def test_encoded_ids_cache_is_not_served_for_same_size_and_mtime(generated, tmp_path):
    data = _copy(generated, tmp_path / "data")
    splits = [
        AliExpressSplit(
            np.zeros((3, 16), np.int64),
            np.zeros((3, 63), np.float32),
            np.zeros((3, 2), np.float32),
            data / name,
            cached=True,
        )
        for name in ("train.csv", "test.csv")
    ]

    def constant(value: int):
        return lambda cat: np.full(cat.shape, value, np.int32)

    root = tmp_path / "enc"
    train_idx, _, from_cache = encoded_ids(*splits, 2, 5, constant(1), root=root)
    assert not from_cache and (np.asarray(train_idx) == 1).all()
    _, _, from_cache = encoded_ids(*splits, 2, 5, constant(2), root=root)
    assert from_cache  # unchanged sources: the cache is used
    _flip_clicks_in_place(data / "train.csv")
    train_idx, _, from_cache = encoded_ids(*splits, 2, 5, constant(3), root=root)
    assert not from_cache and (np.asarray(train_idx) == 3).all()


def test_datamodule_reads_the_edited_labels(generated, tmp_path):
    """The review's reproduction end to end: the data module's labels are the file's."""
    data = _copy(generated, tmp_path / "data")

    def labels() -> float:
        dm = AliExpressDataModule(data_dir=str(data), cache_dir=str(tmp_path / "c"), progress=False)
        dm.setup("fit")
        return float(np.asarray(dm._train[2])[:, 0].sum())

    before = labels()
    _flip_clicks_in_place(data / "train.csv")
    assert labels() == before + 40

"""The first read writes the parse cache from the parsing threads (issue 15, item 2).

``read_split`` no longer builds the arrays in memory and then saves them with ``np.save``: the
worker threads write each validated block of rows into the ``.npy`` files of a temporary
folder (``reader._NpyWriter``), which is published (flushed, renamed into place) only when the
whole file is parsed and valid. These tests pin that the files are the very bytes ``np.save``
wrote before, that the arrays are those of the in-memory parse (values and dtypes), and that a
failed write, bad input, an interruption or a changed source never leaves a cache that a
later read trusts.
"""

from __future__ import annotations

import errno
import io
import logging
import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtl_clippy.data import DataError, generate_dataset, read_split
from mtl_clippy.data import reader as reader_module
from mtl_clippy.data.reader import npy_header

ARRAYS = ("categorical", "numerical", "labels")
DTYPES = {"categorical": np.int64, "numerical": np.float32, "labels": np.float32}


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("gen")
    generate_dataset(folder, train_rows=3000, test_rows=10, seed=5, hard=True)
    return (folder / "train.csv").read_bytes().splitlines(keepends=True)


def _file(folder, lines: list[bytes], rows: int):
    path = folder / "train.csv"
    path.write_bytes(b"".join(lines[: rows + 1]))
    return path


def _pandas(path) -> dict[str, np.ndarray]:
    table = pd.read_csv(path).to_numpy()
    return {
        "categorical": table[:, 1:17].astype(np.int64),
        "numerical": table[:, 17:80].astype(np.float32),
        "labels": table[:, 80:82].astype(np.float32),
    }


def _assert_arrays(split, reference) -> None:
    for name in ARRAYS:
        ours, theirs = getattr(split, name), reference[name]
        assert ours.dtype == DTYPES[name] and ours.flags.c_contiguous
        np.testing.assert_array_equal(ours, theirs)


def _saved(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _nothing_written(cache) -> bool:
    """No cache folder, no temporary, no lock: as if no read had written anything."""
    return not cache.exists() or list(cache.iterdir()) == []


# ----------------------------------------------------------------------------- the bytes


@given(
    rows=st.integers(0, 10**15),
    width=st.sampled_from([2, 16, 63]),
    dtype=st.sampled_from([np.int64, np.float32]),
)
def test_the_npy_header_is_what_np_save_writes(rows, width, dtype):
    """Byte for byte, for any row count up to 10**15 (np.save's header is 128 bytes for these
    shapes, and that is what the cache reserves)."""
    header = npy_header(np.dtype(dtype), (rows, width))
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (rows, width)}
    )
    assert header == buffer.getvalue()
    assert len(header) == 128


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(1, 3000),
    block_size=st.sampled_from([1 << 10, 1 << 12, 1 << 16, 1 << 23]),
)
def test_the_cache_is_np_saves_bytes_and_the_arrays_are_the_in_memory_parse(
    tmp_path_factory, lines, rows, block_size
):
    """Whatever the row count and however many ranges the threads write (in any order), the
    cache's files are the bytes np.save writes for the arrays the in-memory parse gives, and
    the first read returns those arrays (values, dtypes), mapped from the cache."""
    folder = tmp_path_factory.mktemp("write")
    path = _file(folder, lines, rows)
    memory = read_split(path, cache=False, block_size=block_size)
    first = read_split(path, cache_dir=folder / "cache", block_size=block_size)
    assert not first.from_cache and first.cached and isinstance(first.numerical, np.memmap)
    reference = {name: getattr(memory, name) for name in ARRAYS}
    _assert_arrays(first, reference)
    _assert_arrays(first, _pandas(path))
    (written,) = (folder / "cache").iterdir()
    for name in ARRAYS:
        assert (written / f"{name}.npy").read_bytes() == _saved(reference[name])
    again = read_split(path, cache_dir=folder / "cache")
    assert again.from_cache
    _assert_arrays(again, reference)


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("after", [0, 1, 7])
def test_a_failed_cache_write_leaves_no_cache_and_the_read_succeeds(
    tmp_path, lines, monkeypatch, caplog, after
):
    """A full disk after ``after`` writes of blocks: a warning, the arrays of the in-memory
    parse, nothing left in the cache folder; the next read writes the cache."""
    path = _file(tmp_path, lines, 3000)
    reference = _pandas(path)
    real = reader_module.os.pwrite
    calls = []
    lock = threading.Lock()

    def pwrite(fd, data, offset):
        with lock:
            calls.append(offset)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(reader_module.os, "pwrite", pwrite)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="mtl_clippy.data.cache"):
        split = read_split(path, cache_dir=cache, block_size=1 << 14)
    assert "No space left on device" in caplog.text and "continuing without it" in caplog.text
    assert not split.cached and not split.from_cache
    _assert_arrays(split, reference)
    assert _nothing_written(cache)
    monkeypatch.setattr(reader_module.os, "pwrite", real)
    assert not read_split(path, cache_dir=cache).from_cache  # written now
    again = read_split(path, cache_dir=cache)
    assert again.from_cache
    _assert_arrays(again, reference)


def test_a_failed_header_write_leaves_no_cache(tmp_path, lines, monkeypatch, caplog):
    path = _file(tmp_path, lines, 500)

    def ftruncate(fd, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(reader_module.os, "ftruncate", ftruncate)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="mtl_clippy.data.cache"):
        split = read_split(path, cache_dir=cache)
    assert "Input/output error" in caplog.text
    _assert_arrays(split, _pandas(path))
    assert _nothing_written(cache)


def test_bad_input_late_in_the_file_leaves_the_old_cache_as_it_was(tmp_path, lines):
    """A bad cell in the last range: the error names its line; the cache of the file's
    earlier version is left untouched (stale, so never used) and nothing else is written."""
    path = _file(tmp_path, lines, 3000)
    cache = tmp_path / "cache"
    read_split(path, cache_dir=cache, block_size=1 << 14)
    (old,) = cache.iterdir()
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    bad = list(lines[:3001])
    cells = bad[2900].split(b",")
    cells[20] = b"oops"
    bad[2900] = b",".join(cells)
    path.write_bytes(b"".join(bad))
    with pytest.raises(DataError) as info:
        read_split(path, cache_dir=cache, block_size=1 << 14)
    assert str(info.value).startswith(f"{path}, line 2901, column 'numerical_4': ")
    assert [p.name for p in cache.iterdir()] == [old.name]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_an_interrupted_first_read_leaves_no_cache(tmp_path, lines, monkeypatch):
    """Ctrl-C (or any exception) while the threads write: nothing is published, no thread is
    left running, and the next read parses and caches the file."""
    path = _file(tmp_path, lines, 3000)
    real = reader_module._NpyWriter.write
    seen = []

    def write(self, first_row, blocks):
        seen.append(first_row)
        if len(seen) == 3:
            raise KeyboardInterrupt
        real(self, first_row, blocks)

    monkeypatch.setattr(reader_module._NpyWriter, "write", write)
    threads = threading.active_count()
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        read_split(path, cache_dir=cache, block_size=1 << 14)
    assert threading.active_count() == threads  # the flusher and the workers are gone
    assert _nothing_written(cache)
    monkeypatch.setattr(reader_module._NpyWriter, "write", real)
    split = read_split(path, cache_dir=cache)
    assert not split.from_cache and split.cached
    _assert_arrays(split, _pandas(path))


def test_a_source_that_changes_while_it_is_parsed_is_not_cached(
    tmp_path, lines, monkeypatch, caplog
):
    """The rows parsed are returned (in memory), with a warning; no cache is published."""
    path = _file(tmp_path, lines, 1000)
    reference = _pandas(path)
    real = reader_module._parse

    def parse_then_touch(*args, **kwargs):
        result = real(*args, **kwargs)
        path.write_bytes(path.read_bytes())  # rewritten: a new mtime and ctime
        return result

    monkeypatch.setattr(reader_module, "_parse", parse_then_touch)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="mtl_clippy.data.reader"):
        split = read_split(path, cache_dir=cache)
    assert "changed while it was read; not caching it" in caplog.text
    assert not split.cached and not isinstance(split.numerical, np.memmap)
    _assert_arrays(split, reference)
    assert _nothing_written(cache)


def test_a_source_that_cannot_be_read_mid_file_is_a_data_error_not_a_cache_warning(
    tmp_path, lines, monkeypatch, caplog
):
    path = _file(tmp_path, lines, 3000)
    real = reader_module._read_into
    reads = []

    def read_into(f, buf, want):
        reads.append(want)
        if len(reads) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(f, buf, want)

    monkeypatch.setattr(reader_module, "_read_into", read_into)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as info:
        read_split(path, cache_dir=cache, block_size=1 << 14)
    assert str(info.value) == (
        f"{path}: cannot read the file: Input/output error (check that it is a readable file)"
    )
    assert "could not write the cache" not in caplog.text
    assert _nothing_written(cache)


# ----------------------------------------------------------------------------- odd systems


def test_short_writes_are_continued(tmp_path, lines, monkeypatch):
    """A file system that writes a third of what it is given at a time (network and FUSE file
    systems may): every byte still lands, headers included, and the cache reads back."""
    path = _file(tmp_path, lines, 3000)
    real = reader_module.os.pwrite
    monkeypatch.setattr(
        reader_module.os, "pwrite", lambda fd, d, o: real(fd, bytes(d[: max(1, len(d) // 3)]), o)
    )
    cache = tmp_path / "cache"
    first = read_split(path, cache_dir=cache, block_size=1 << 14)
    monkeypatch.setattr(reader_module.os, "pwrite", real)
    again = read_split(path, cache_dir=cache)
    assert first.cached and again.from_cache
    for split in (first, again):
        _assert_arrays(split, _pandas(path))


def test_without_pwrite_the_cache_is_written_by_seek_and_write(tmp_path, lines, monkeypatch):
    """Where os.pwrite does not exist (Windows), the same cache, byte for byte."""
    path = _file(tmp_path, lines, 3000)
    monkeypatch.delattr(reader_module.os, "pwrite")
    cache = tmp_path / "cache"
    first = read_split(path, cache_dir=cache, block_size=1 << 14)
    again = read_split(path, cache_dir=cache)
    assert first.cached and again.from_cache
    for split in (first, again):
        _assert_arrays(split, _pandas(path))


def test_a_lost_write_seen_by_the_background_flush_is_not_published(
    tmp_path, lines, monkeypatch, caplog
):
    """An I/O error reported to the background flush (Linux reports it once per handle):
    the read warns, returns the right arrays and publishes no cache."""
    path = _file(tmp_path, lines, 3000)
    real = reader_module._fdatasync
    seen = []

    def fdatasync(fd):
        if not seen:
            seen.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(reader_module, "_fdatasync", fdatasync)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="mtl_clippy.data.cache"):
        split = read_split(path, cache_dir=cache, block_size=1 << 14)
    assert seen and "Input/output error" in caplog.text
    assert not split.cached
    _assert_arrays(split, _pandas(path))
    assert _nothing_written(cache)


def test_a_cache_with_an_unreadable_header_is_read_again(tmp_path, lines):
    """A damaged .npy header (by hand, a crash of another tool): the source is parsed again
    and the cache replaced, never a crash."""
    path = _file(tmp_path, lines, 500)
    cache = tmp_path / "cache"
    read_split(path, cache_dir=cache)
    (npy,) = cache.glob("*/numerical.npy")
    data = bytearray(npy.read_bytes())
    data[10:40] = b"{'descr': '<f4', 'fortran_ord"[:30]  # a header cut mid-literal
    data[40:60] = b"(" * 20
    npy.write_bytes(bytes(data))
    split = read_split(path, cache_dir=cache)
    assert not split.from_cache
    _assert_arrays(split, _pandas(path))
    assert read_split(path, cache_dir=cache).from_cache

"""read_split: the real rows read exactly as pandas reads them, clear errors, the cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from data_fixtures import SAMPLE_DIR, sample_lines, set_cell, write_variant
from mtl_clippy.data import AliExpressSplit, DataError, generate_dataset, read_split
from mtl_clippy.data import reader as reader_module
from mtl_clippy.data.schema import COLUMNS


def _pandas_arrays(path):
    table = pd.read_csv(path).to_numpy()
    return (
        table[:, 1:17].astype(np.int64),
        table[:, 17:80].astype(np.float32),
        table[:, 80:82].astype(np.float32),
    )


@pytest.mark.parametrize("name", ["train.csv", "test.csv"])
def test_real_rows_equal_pandas(tmp_path, name):
    split = read_split(SAMPLE_DIR / name, cache_dir=tmp_path)
    assert isinstance(split, AliExpressSplit)
    categorical, numerical, labels = _pandas_arrays(SAMPLE_DIR / name)
    assert split.categorical.dtype == np.int64 and split.categorical.shape[1] == 16
    assert split.numerical.dtype == np.float32 and split.numerical.shape[1] == 63
    assert split.labels.dtype == np.float32 and split.labels.shape[1] == 2
    for ours, theirs in zip(
        (split.categorical, split.numerical, split.labels),
        (categorical, numerical, labels),
        strict=True,
    ):
        assert ours.flags.c_contiguous
        np.testing.assert_array_equal(ours, theirs)


def test_generated_file_over_many_blocks_equals_pandas(tmp_path):
    generate_dataset(tmp_path / "gen", train_rows=3000, test_rows=10, seed=1, hard=True)
    path = tmp_path / "gen" / "train.csv"
    split = read_split(path, cache=False, block_size=1 << 16)  # ~30 blocks
    for ours, theirs in zip(
        (split.categorical, split.numerical, split.labels), _pandas_arrays(path), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)


def test_second_read_memory_maps_the_cache(tmp_path):
    first = read_split(SAMPLE_DIR / "train.csv", cache_dir=tmp_path)
    second = read_split(SAMPLE_DIR / "train.csv", cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache
    assert isinstance(second.numerical, np.memmap)
    np.testing.assert_array_equal(first.numerical, second.numerical)
    np.testing.assert_array_equal(first.categorical, second.categorical)
    (folder,) = tmp_path.iterdir()
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["rows"] == 100 and meta["schema_version"] >= 1


def test_default_cache_sits_next_to_the_source(tmp_path):
    path = write_variant(tmp_path, lambda lines: None)
    read_split(path)
    assert read_split(path).from_cache
    assert (tmp_path / ".mtl_clippy_cache").is_dir()


def test_touched_source_invalidates_the_cache(tmp_path):
    path = write_variant(tmp_path, lambda lines: None)
    read_split(path, cache_dir=tmp_path / "c")
    assert read_split(path, cache_dir=tmp_path / "c").from_cache
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = read_split(path, cache_dir=tmp_path / "c")
    assert not again.from_cache


def test_changed_source_is_reread(tmp_path):
    path = write_variant(tmp_path, lambda lines: None)
    before = read_split(path, cache_dir=tmp_path / "c")
    write_variant(tmp_path, lambda lines: set_cell(lines, 2, 20, "0.5"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = read_split(path, cache_dir=tmp_path / "c")
    assert not after.from_cache
    assert after.numerical[0, 3] == np.float32(0.5) != before.numerical[0, 3]
    assert len(list((tmp_path / "c").iterdir())) == 1  # the stale cache was replaced


def _drop(lines, line):
    del lines[line - 1]


BAD_INPUTS = [
    # (id, edit, line, column, words in the message)
    ("missing column", lambda L: L.__setitem__(0, L[0].replace("numerical_5,", "")), 1, None, "missing numerical_5"),
    ("extra column", lambda L: L.__setitem__(0, L[0] + ",price"), 1, None, "unexpected price"),
    ("out of order", lambda L: L.__setitem__(0, L[0].replace("click,conversion", "conversion,click")), 1, "conversion", "out of order"),
    ("header only", lambda L: L.__setitem__(slice(1, None), []), 2, None, "no data rows"),
    ("text in numerical", lambda L: set_cell(L, 7, 20, "abc"), 7, "numerical_4", "'abc' is not a number"),
    ("empty cell", lambda L: set_cell(L, 9, 40, ""), 9, "numerical_24", "empty cell"),
    ("text in categorical", lambda L: set_cell(L, 4, 2, "x"), 4, "categorical_2", "not a non-negative integer"),
    ("non-integer id", lambda L: set_cell(L, 50, 5, "2.5"), 50, "categorical_5", "'2.5' is not a non-negative integer"),
    ("negative id", lambda L: set_cell(L, 51, 16, "-1"), 51, "categorical_16", "negative categorical id -1"),
    ("label not 0/1", lambda L: set_cell(L, 12, 80, "2"), 12, "click", "label 2 is not 0 or 1"),
    ("label text", lambda L: set_cell(L, 13, 81, "yes"), 13, "conversion", "label 'yes'"),
    ("conversion without click", lambda L: (set_cell(L, 20, 80, "0"), set_cell(L, 20, 81, "1")), 20, "conversion", "conversion = 1 with click = 0"),
    ("NaN", lambda L: set_cell(L, 30, 60, "nan"), 30, "numerical_44", "not finite"),
    ("infinity", lambda L: set_cell(L, 31, 79, "-inf"), 31, "numerical_63", "not finite"),
    ("short row", lambda L: L.__setitem__(40, L[40].rsplit(",", 1)[0]), 41, None, "got 81"),
    ("long row", lambda L: L.__setitem__(41, L[41] + ",0"), 42, None, "got 83"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "line", "column", "words"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_names_file_line_column_and_leaves_no_cache(tmp_path, edit, line, column, words):  # fmt: skip
    path = write_variant(tmp_path, edit)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        read_split(path, cache_dir=cache)
    err = info.value
    assert str(path) in str(err)
    assert words in str(err)
    assert err.line == line
    assert err.column == column
    if line is not None:
        assert f"line {line}" in str(err)
    assert not cache.exists() or not any(cache.iterdir())


def test_empty_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_split(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "nope.csv")


def test_bad_cell_deep_in_a_large_file_gets_its_line(tmp_path):
    generate_dataset(tmp_path / "gen", train_rows=4000, test_rows=10, seed=2)
    path = tmp_path / "gen" / "train.csv"
    lines = path.read_text().splitlines()
    set_cell(lines, 3456, 30, "1.2.3")  # conversion error: found by bisection
    set_cell(lines, 3700, 31, "nan")  # later: must not be the one reported
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_split(path, cache=False, block_size=1 << 16)
    assert (info.value.line, info.value.column) == (3456, COLUMNS[30])


def test_validation_error_in_a_later_block_gets_its_line(tmp_path):
    generate_dataset(tmp_path / "gen", train_rows=4000, test_rows=10, seed=2)
    path = tmp_path / "gen" / "train.csv"
    lines = path.read_text().splitlines()
    set_cell(lines, 3333, 12, "-7")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_split(path, cache_dir=tmp_path / "cache", block_size=1 << 16)
    assert (info.value.line, info.value.column) == (3333, "categorical_12")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_head_is_a_view_of_the_first_rows(tmp_path):
    split = read_split(SAMPLE_DIR / "train.csv", cache_dir=tmp_path)
    head = split.head(10)
    assert len(head) == 10 and np.shares_memory(head.numerical, split.numerical)
    assert split.head(None) is split


def test_crlf_line_endings_and_no_final_newline(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("\r\n".join(sample_lines()).encode())
    split = read_split(path, cache=False)
    reference = read_split(SAMPLE_DIR / "train.csv", cache=False)
    assert len(split) == 100
    np.testing.assert_array_equal(split.numerical, reference.numerical)
    np.testing.assert_array_equal(split.categorical, reference.categorical)


def test_arrays_grow_when_later_rows_are_shorter_than_the_first(tmp_path, monkeypatch):
    """The arrays are sized from the first range's bytes per row; shorter rows later must fit."""
    grown = []
    original = reader_module._grow
    monkeypatch.setattr(reader_module, "_grow", lambda *a: grown.append(1) or original(*a))
    lines = sample_lines()
    header, rows = lines[0], lines[1:]
    long_rows = [",".join(c + "0" * 30 if "." in c else c for c in r.split(",")) for r in rows]
    short_rows = [",".join("0" if "." in c else c for c in r.split(",")) for r in rows]
    path = tmp_path / "train.csv"
    path.write_text("\n".join([header, *long_rows * 3, *short_rows * 40]) + "\n")
    split = read_split(path, cache=False, block_size=1 << 13)
    for ours, theirs in zip(
        (split.categorical, split.numerical, split.labels), _pandas_arrays(path), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert len(split) == 4300
    assert grown  # the growth path ran


def test_processes_reading_an_uncached_file_together_parse_it_once(tmp_path):
    """DDP ranks under srun or parallel sweep jobs start together: one parses, the others
    wait for its cache and map it."""
    import subprocess
    import sys

    from mtl_clippy.data import generate_dataset

    generate_dataset(tmp_path / "d", 40_000, 1_000, seed=1)
    code = (
        "import sys; from mtl_clippy.data.reader import read_split;"
        "print(read_split(sys.argv[1], cache_dir=sys.argv[2]).from_cache)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "d" / "train.csv"), str(tmp_path / "c")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = sorted(p.communicate()[0].strip() for p in procs)
    assert outs == ["False", "True", "True"]  # exactly one parse
    assert len(list((tmp_path / "c").iterdir())) == 1

"""Vocabularies: memory follows the number of distinct ids, never their values (issue 12,
item 7), and the id -> index mapping equals a plain dict whatever the ids.

Until the fix, a field whose largest id was below 2**24 got a lookup table of one int32 slot
per id value (plus a count array of one int64 per value): 100 rows of ids near 16,777,215
allocated about 1.2 GB. NumPy reports its array allocations to ``tracemalloc``, so the
memory of building and encoding is measured in-process, in milliseconds.
"""

from __future__ import annotations

import tracemalloc
from collections import Counter
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtl_clippy.data import vocab as vocab_module
from mtl_clippy.data.vocab import Vocabulary, build_vocabularies, encode_all

LIMIT = 1 << 24  # where the old rule switched from lookup tables to sorted search
FIELDS = 16
MiB = 1 << 20


def _rows(offset: int, rows: int = 100, seed: int = 0) -> np.ndarray:
    """``rows`` x 16 ids: a few dozen distinct small values per field, plus ``offset``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, size=(rows, FIELDS), dtype=np.int64) + offset


def _traced(categorical: np.ndarray, min_count: int = 1) -> tuple[int, int, np.ndarray]:
    """(peak bytes while building and encoding, bytes still held by the vocabularies, codes)."""
    tracemalloc.start()
    try:
        vocabularies = build_vocabularies(categorical, min_count)
        held = tracemalloc.get_traced_memory()[0]
        codes = encode_all(categorical, vocabularies)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, held, codes


@pytest.mark.parametrize(
    "offset",
    [LIMIT - 41, LIMIT - 40, LIMIT + 1, 1 << 31, 1 << 40, (1 << 63) - 41],
    ids=["near 2^24-1", "up to 2^24-1", "2^24+1", "2^31", "2^40", "int64 max"],
)
def test_memory_of_100_rows_does_not_follow_id_values(offset):
    """100 rows with ids near 2**24 - 1 (and above) allocate well under 2 MiB, as small ids
    do, and encode to the same indices as the same rows with small ids."""
    small_peak, _, small_codes = _traced(_rows(0))
    peak, held, codes = _traced(_rows(offset))
    assert peak < 2 * MiB, f"building + encoding allocated {peak / MiB:.1f} MiB"
    assert held < 1 * MiB, f"the vocabularies hold {held / MiB:.1f} MiB"
    assert peak < small_peak + MiB
    np.testing.assert_array_equal(codes, small_codes)


def test_one_row_of_huge_ids_among_small_ones():
    """The issue's case: 99 rows of small ids and one row of ids near 16,777,215."""
    categorical = _rows(0)
    categorical[17] = LIMIT - 1 - np.arange(FIELDS)
    peak, held, codes = _traced(categorical)
    assert peak < 2 * MiB and held < MiB
    vocabularies = build_vocabularies(categorical, 1)
    assert all(v.table_bytes < 64 * 1024 for v in vocabularies)
    np.testing.assert_array_equal(codes[17], [v.oov - 1 for v in vocabularies])  # the largest


def test_dense_fields_keep_the_lookup_table():
    """Label-encoded ids (0..n-1, as in the AliExpress files) keep the fastest mapping, the
    lookup table, also when a field has millions of ids."""
    column = np.arange(3_000_000, dtype=np.int64)[::-1].copy()
    vocabulary = Vocabulary.from_column(column)
    assert vocabulary._lut is not None and vocabulary.table_bytes == 4 * (3_000_000 + 1)
    assert Vocabulary.from_column(_rows(0)[:, 0])._lut is not None
    assert Vocabulary.from_column(_rows(LIMIT - 41)[:, 0])._lut is None


def _fibonacci_colliders(n: int) -> np.ndarray:
    """``n`` ids whose Fibonacci hash (``id * 0x9E3779B97F4A7C15 mod 2**64``, the common
    multiplicative hash) is 0: they share one slot of such a hash table at any size, so a
    table with that public multiplier probes quadratically (review of issue 12: 4,000 such
    ids took 0.75 s to build and encode, random ids 2 ms)."""
    inverse = pow(0x9E3779B97F4A7C15, -1, 1 << 64)
    candidates = ((inverse * r) % (1 << 64) for r in range(4 * n))
    return np.sort(np.array([i for i in candidates if i < 1 << 63][:n], dtype=np.int64))


HOSTILE = {
    "Fibonacci-hash colliders": _fibonacci_colliders(4000),
    "multiples of 2^56": np.arange(100, dtype=np.int64) << 56,
    "one id per power of two": np.int64(1) << np.arange(63, dtype=np.int64),
}


@pytest.mark.parametrize("ids", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_ids_encode_to_their_ranks(ids):
    """Ids crafted against hash tables (one shared slot, shared high bits) take the sorted
    search, which has no such input and holds no table: each id encodes to its rank, its
    neighbours, negative and unsigned ids above 2**63 to the OOV slot. (No timing is
    asserted; ``benchmarks/bench_memory_ids.py`` measures the speed.)"""
    vocabulary = Vocabulary.from_column(np.repeat(ids, 3))
    n = len(ids)
    assert vocabulary.oov == n
    np.testing.assert_array_equal(vocabulary.encode(ids[::-1]), np.arange(n)[::-1])
    assert vocabulary._lut is None and vocabulary.table_bytes == 0  # nothing held but the ids
    neighbours = np.setdiff1d(np.concatenate([ids - 1, ids + 1]), ids)
    neighbours = neighbours[neighbours >= 0]  # ids + 1 at 2**63 - 1 wraps negative
    assert (vocabulary.encode(neighbours) == n).all()
    assert vocabulary.encode(np.array([-1, -(1 << 63)])).tolist() == [n, n]
    assert vocabulary.encode(np.array([(1 << 64) - 1, 1 << 63], dtype=np.uint64)).tolist() == [
        n,
        n,
    ]


@pytest.mark.parametrize(
    "ids",
    [np.arange(8, dtype=np.int64) * 3, _fibonacci_colliders(8)],
    ids=["lookup table", "sorted search"],
)
def test_encode_keeps_the_shape_of_its_input(ids):
    """``encode`` maps an array of any shape (here [2, 4], [2, 2, 2], [8, 1], empty) to
    indices of that shape, on both mappings; before the fix the hash path raised IndexError
    on a 2-D array. Float ids are refused (``2.5`` is no id), as before."""
    vocabulary = Vocabulary(ids)
    for shape in [(2, 4), (2, 2, 2), (8, 1)]:
        codes = vocabulary.encode(ids.reshape(shape))
        assert codes.dtype == np.int32
        np.testing.assert_array_equal(codes, np.arange(8).reshape(shape))
    strided = np.stack([ids, ids + 1], axis=1)  # a column of a row-major array: a view
    np.testing.assert_array_equal(vocabulary.encode(strided[:, 0]), np.arange(8))
    assert vocabulary.encode(np.empty((0, 3), dtype=np.int64)).shape == (0, 3)
    assert vocabulary.encode([]).shape == (0,)
    with pytest.raises(TypeError, match="ids must be integers, got an array of float64"):
        vocabulary.encode(ids.astype(np.float64))
    with pytest.raises(TypeError, match="ids must be integers"):
        Vocabulary.from_column(np.array([1.0, 2.5]))


def _counting_peak(column: np.ndarray) -> int:
    tracemalloc.start()
    try:
        Vocabulary.from_column(column, 1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_counting_memory_follows_id_values():
    """1,000,000 rows of the same 200,000 distinct ids, spread over ranges from dense
    (0..200,000) to 2**40: counting (and the table it builds) allocates at most ~32 bytes
    per row at any spread. Before the fix a largest id below 2**24 (or, later, below 8 times
    the rows) was counted by ``np.bincount``: one int64 per id value, 64 MiB here for ids
    up to 8,000,000 but 14 MiB for ids up to 9,000,000 (a sort)."""
    rng = np.random.default_rng(0)
    rows, n = 1_000_000, 200_000
    pick = rng.integers(0, n, rows)
    peaks = {}
    for spread in (1, 10, 40, 45, 1 << 20):
        ids = np.sort(rng.choice(spread * n, n, replace=False)) if spread < 1000 else None
        if ids is None:
            ids = np.unique(rng.integers(0, spread * n, 2 * n))[:n]
        peaks[spread] = _counting_peak(ids[pick])
    for spread, peak in peaks.items():
        assert peak < 32 * rows, f"spread {spread}: {peak / MiB:.0f} MiB for {rows:,} rows"
    assert peaks[40] < 2 * peaks[45], f"{peaks[40] / MiB:.0f} vs {peaks[45] / MiB:.0f} MiB"


# ----------------------------------------------------------------------------- the mapping

#: Ids around every place where a mapping could change behaviour: small values, the old
#: lookup-table limit 2**24 (+-1), int32's limit 2**31, and the top of int64.
EDGES = [0, 1, 2, LIMIT - 2, LIMIT - 1, LIMIT, LIMIT + 1, (1 << 31) - 1, 1 << 31, 1 << 32]
EDGES += [(1 << 62) + 7, (1 << 63) - 2, (1 << 63) - 1]
ID_VALUES = st.one_of(
    st.integers(0, 50),
    st.sampled_from(EDGES),
    st.integers(0, 50).map(lambda i: LIMIT - 1 - i),
    st.integers(0, (1 << 63) - 1),
)


def _reference(train: list[int], min_count: int, query: list[int]) -> list[int]:
    """Indices by a dict: kept ids (seen >= min_count times) numbered in increasing order."""
    kept = sorted(i for i, c in Counter(train).items() if c >= min_count)
    index = {i: k for k, i in enumerate(kept)}
    return [index.get(i, len(kept)) for i in query]


@given(
    train=st.lists(ID_VALUES, min_size=0, max_size=80),
    unseen=st.lists(st.one_of(ID_VALUES, st.integers(-(1 << 63), -1)), max_size=20),
    min_count=st.integers(1, 4),
)
def test_encode_equals_a_dict_reference(train, unseen, min_count):
    """Random ids (small, huge, mixed, at the limits), min_count and unseen (even negative)
    query ids: both mappings (lookup table where dense, sorted search) equal a dict."""
    column = np.array(train, dtype=np.int64)
    query = [*train, *unseen]
    expected = _reference(train, min_count, query)
    vocabulary = Vocabulary.from_column(column, min_count)
    assert vocabulary.size == len(set(i for i in train if train.count(i) >= min_count)) + 1
    codes = vocabulary.encode(np.array(query, dtype=np.int64))
    assert codes.dtype == np.int32 and codes.tolist() == expected
    # The same vocabulary forced onto the sorted search (no lookup table at any density):
    with (
        mock.patch.object(vocab_module, "_LUT_SLOTS_PER_ID", -1),
        mock.patch.object(vocab_module, "_SMALL_IDS", 0),
    ):
        hashed = Vocabulary.from_column(column, min_count)
    assert hashed._lut is None
    assert hashed.encode(np.array(query, dtype=np.int64)).tolist() == expected


@given(
    n_ids=st.integers(1, 3000),
    spread=st.sampled_from([1, 3, 17, 1 << 20, 1 << 40]),
    seed=st.integers(0, 2**32 - 1),
)
def test_many_ids_at_any_density(n_ids, spread, seed):
    """Thousands of ids spread from dense to sparse (both mappings): each id encodes to its
    rank, and ids in between to the OOV slot."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, n_ids * spread, size=n_ids, dtype=np.int64))
    vocabulary = Vocabulary(ids)
    np.testing.assert_array_equal(vocabulary.encode(ids), np.arange(len(ids)))
    between = np.setdiff1d(ids + 1, ids)
    assert (vocabulary.encode(between) == len(ids)).all()

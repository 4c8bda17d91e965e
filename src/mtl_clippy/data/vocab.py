"""Vocabularies of the categorical fields, the encoded-ids cache, and OOV statistics.

Free of torch and Lightning (the data module builds on it), so that tools and tests can use
it in processes that start in a fraction of a second.

* A field's vocabulary keeps the ids seen at least ``min_count`` times in the training rows,
  numbered ``0..n-1`` in increasing id order; every other id (rarer in training, or unseen)
  maps to the out-of-vocabulary slot ``n``. With ``min_count >= 2`` the OOV row is trained on
  the rare training ids, so an id first met in validation or test reads a learned vector
  instead of its random initialisation. Counting is vectorised (``np.bincount`` or
  ``np.unique(return_counts=True)``), never a Python loop over rows.
* Memory follows the number of distinct ids, never their values: a field whose ids are dense
  (the largest at most ``_LUT_SLOTS_PER_ID`` times the number of distinct ids, or below
  ``_SMALL_IDS``, as in the label-encoded AliExpress files) maps ids through a lookup table
  indexed by id (at most 64 bytes per distinct id); any other field (a few ids near 2**24,
  64-bit hashes) by a sorted search of its kept ids (``np.searchsorted``), which needs no
  table and has no slow case, whatever the ids. Counting uses ``np.bincount`` only while the
  largest id is within about twice the rows. The largest id sizes nothing: one row of ids
  near 16,777,215 used to allocate a 64 MiB table per field
  (``benchmarks/bench_memory_ids.py``, docs/benchmarks.md).
* :func:`encoded_ids` stores the int32 indices of both splits in a cache folder keyed by the
  sources, the training rows and ``min_count``, written once (first writer wins, see
  ``cache.py``) and memory-mapped by every process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtl_clippy.data import cache as cache_mod
from mtl_clippy.data.reader import CACHE_DIRNAME, AliExpressSplit, source_identity
from mtl_clippy.data.schema import CATEGORICAL_COLUMNS

#: Version of the encoded-ids cache layout (bump when the encoding changes).
ENCODED_CACHE_VERSION = 2
#: Training ids seen fewer times than this map to the OOV slot (``data.min_count``). At 2,
#: the built-in data's ``categorical_9`` (a user field, so repeated over a search's ~10 rows)
#: has no rare training id and its OOV row, read by 1 % of its test cells, never trains; at 5
#: every field's OOV row trains, for 0.025 % of the training cells (see docs/data.md).
DEFAULT_MIN_COUNT = 5
#: A field maps ids through a lookup table (one int32 slot per id value up to its largest
#: id: the fastest mapping) only when its largest id is at most this many times the number
#: of distinct ids of the field, or below ``_SMALL_IDS``; otherwise by a sorted search of its
#: kept ids, which holds nothing besides them.
_LUT_SLOTS_PER_ID = 16
#: Ids below this always get a lookup table (256 KiB at most): small ids, however few, keep
#: the fastest path.
_SMALL_IDS = 1 << 16
#: Ids are counted with ``np.bincount`` (an int64 count per id value, freed after counting)
#: only while the largest id is below this many times the column's rows (plus
#: ``_SMALL_IDS``): at most about 16 bytes per row. Else by sorting (``np.unique``), whose
#: memory follows the rows whatever the values.
_COUNT_SLOTS_PER_ROW = 2
#: Rows per step of a sorted search: its temporary arrays (a few of 512 KiB) stay small and
#: in the CPU's cache, however long the column.
_SEARCH_BLOCK = 1 << 16
_ENCODED_META = "encoded.json"  # written last: what the cache holds and was keyed by


class Vocabulary:
    """Kept ids of one categorical field, and the vectorised id -> index mapping.

    Kept ids get indices ``0..n-1`` in increasing id order; anything else gets ``n`` (OOV).
    ``seen_ids`` are the kept ids, unique and increasing. ``distinct`` is how many distinct
    ids the field's training rows hold (kept or not; default: the kept ones): it decides
    whether a lookup table indexed by id is dense enough to be worth its memory.
    """

    def __init__(self, seen_ids: np.ndarray, distinct: int | None = None) -> None:
        self.ids = np.asarray(_integers(seen_ids), dtype=np.int64)
        self.oov = len(self.ids)
        self._lut: np.ndarray | None = None
        if self.oov and self.ids[0] < 0:
            raise ValueError(f"ids must be >= 0, got {self.ids[0]}")
        distinct = self.oov if distinct is None else max(int(distinct), self.oov)
        if self.oov:
            top = int(self.ids[-1])
            if top < _SMALL_IDS or top <= _LUT_SLOTS_PER_ID * distinct:
                lut = np.full(top + 2, self.oov, dtype=np.int32)
                lut[self.ids] = np.arange(self.oov, dtype=np.int32)
                self._lut = lut  # the last entry catches every id above the largest seen

    @classmethod
    def from_column(cls, column: np.ndarray, min_count: int = 1) -> Vocabulary:
        """The vocabulary of the ids present at least ``min_count`` times in ``column``
        (non-negative integers); rarer ids, like unseen ones, map to the OOV slot.

        Counted with ``np.bincount`` when the largest id is below about twice the rows
        (memory: one int64 slot per id value, freed at once, so at most ~16 bytes per row),
        else with ``np.unique(return_counts=True)`` (a sort: memory follows the rows, not the
        values).
        """
        column = _integers(column).reshape(-1)
        if len(column) == 0:
            return cls(np.empty(0, np.int64))
        top = int(column.max())
        if top < _COUNT_SLOTS_PER_ROW * len(column) + _SMALL_IDS:
            counts = np.bincount(column, minlength=top + 1)
            kept = np.flatnonzero(counts >= min_count)
            return cls(kept, distinct=int(np.count_nonzero(counts)))
        ids, counts = np.unique(column, return_counts=True)
        return cls(ids[counts >= min_count], distinct=len(ids))

    @property
    def size(self) -> int:
        """Embedding rows needed: the seen ids plus the OOV slot."""
        return self.oov + 1

    @property
    def table_bytes(self) -> int:
        """Bytes held by the id -> index lookup table besides ``ids`` (0: sorted search)."""
        return 0 if self._lut is None else self._lut.nbytes

    def encode(self, column: np.ndarray) -> np.ndarray:
        """int32 indices of raw ids, an array of any shape (unseen ids -> the OOV slot)."""
        column = _integers(column)
        if self._lut is not None:
            # Ids above the largest, and negative ones (-1: the last entry), read the OOV entry.
            return self._lut[np.clip(column, -1, len(self._lut) - 1)]
        if not self.oov:
            return np.zeros(column.shape, dtype=np.int32)
        # Sorted search: correct for any ids, no table, no input that makes it slow (a binary
        # search per id: at 12 M rows it costs a few times a lookup table, docs/benchmarks.md).
        flat = column.reshape(-1)
        out = np.empty(flat.shape, dtype=np.int32)
        last = self.oov - 1
        for lo in range(0, len(flat), _SEARCH_BLOCK):
            block = np.asarray(flat[lo : lo + _SEARCH_BLOCK], dtype=np.int64)
            pos = np.searchsorted(self.ids, block)
            np.minimum(pos, last, out=pos)
            out[lo : lo + _SEARCH_BLOCK] = np.where(self.ids[pos] == block, pos, self.oov)
        return out.reshape(column.shape)


def _integers(values: np.ndarray) -> np.ndarray:
    """``values`` as an array of signed integers; float ids are refused, not truncated
    (``2.5`` is no id). Unsigned ids wrap to int64: those above 2**63 - 1, which no
    vocabulary holds, become negative and so map to the OOV slot."""
    array = np.asarray(values)
    if array.dtype.kind == "i":
        return array
    if array.dtype.kind != "u" and array.size:
        raise TypeError(f"ids must be integers, got an array of {array.dtype}")
    return array.astype(np.int64)  # unsigned, or empty (``np.asarray([])`` is float64)


def build_vocabularies(categorical: np.ndarray, min_count: int) -> tuple[Vocabulary, ...]:
    """One vocabulary per column of the training rows ``categorical`` ``[N, fields]``."""
    return tuple(
        Vocabulary.from_column(categorical[:, f], min_count) for f in range(categorical.shape[1])
    )


def encode_all(categorical: np.ndarray, vocabularies: tuple[Vocabulary, ...]) -> np.ndarray:
    """int32 indices ``[N, fields]`` of raw ids, one vectorised mapping per field."""
    out = np.empty(categorical.shape, dtype=np.int32)
    for f, vocabulary in enumerate(vocabularies):
        out[:, f] = vocabulary.encode(categorical[:, f])
    return out


def encoded_ids(
    train: AliExpressSplit,
    test: AliExpressSplit,
    n_fit: int,
    min_count: int,
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    root: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, bool | None]:
    """The vocabulary indices (int32) of both splits, and whether they came from the cache.

    When both splits are mapped from their parse cache, the indices live in a cache folder
    ``root/encoded-<key>`` (default: beside the parse caches), keyed by the version, the
    training rows ``n_fit``, ``min_count``, the row counts and each source's path, size,
    modification time, inode and status-change time (``reader.source_identity``: an edit in
    place that restores size and mtime still changes the key); every DDP rank and loader
    worker then maps one copy in the page cache instead of holding its own (768 MB per
    process for the 12 M NL rows). Processes that
    arrive together encode once: the first under the folder's lock, the others wait and map
    its copy. Otherwise (no parse cache) the splits are encoded in memory (``None``).
    ``encode`` maps raw ids ``[N, fields]`` to indices.
    """
    if not (train.cached and test.cached):
        return encode(train.categorical), encode(test.categorical), None
    key_parts: list[Any] = [ENCODED_CACHE_VERSION, n_fit, min_count, len(train), len(test)]
    for split in (train, test):
        key_parts += [str(split.source.resolve()), *source_identity(split.source.stat())]
    key = hashlib.sha1(json.dumps(key_parts).encode()).hexdigest()[:12]
    folder = (root or train.source.parent / CACHE_DIRNAME) / f"encoded-{key}"
    shapes = [list(train.categorical.shape), list(test.categorical.shape)]
    cache_mod.remove_dead_leftovers(folder)  # a killed writer's temporary folder
    cached = _load_encoded(folder, shapes)
    if cached is not None:
        return (*cached, True)
    with cache_mod.exclusive(folder) as held:
        cached = _load_encoded(folder, shapes)
        if cached is not None:
            return (*cached, True)
        encoded = encode(train.categorical), encode(test.categorical)
        fill = cache_mod.array_filler(
            {"train": encoded[0], "test": encoded[1]},
            {"key": key_parts, "shapes": shapes},
            meta_name=_ENCODED_META,
        )
        cache_mod.publish(folder, fill, held=held)
    return (*(_load_encoded(folder, shapes) or encoded), False)


def _load_encoded(folder: Path, shapes: list[list[int]]) -> tuple[np.ndarray, np.ndarray] | None:
    """The memory-mapped encoded ids in ``folder`` if complete and of the expected shapes."""
    try:
        meta = json.loads((folder / _ENCODED_META).read_text())
        arrays = tuple(np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("train", "test"))
    except (OSError, ValueError):
        return None
    if meta.get("shapes") != shapes or [list(a.shape) for a in arrays] != shapes:
        return None
    if any(a.dtype != np.int32 for a in arrays):
        return None
    return arrays[0], arrays[1]


def count_equal(indices: np.ndarray, oov: np.ndarray, block: int = 1 << 18) -> list[int]:
    """Per column, how many rows of ``indices`` equal ``oov`` (in blocks of rows: bounded
    temporary memory, no per-row Python)."""
    counts = np.zeros(len(oov), dtype=np.int64)
    for lo in range(0, len(indices), block):
        counts += (np.asarray(indices[lo : lo + block]) == oov).sum(0)
    return counts.tolist()


def oov_rates(
    counts: dict[str, list[int]], rows: dict[str, int], min_count: int | None = None
) -> dict[str, Any]:
    """What ``metrics.json`` records as ``oov_rate``: ``{split: share of the split's
    categorical cells that are OOV, ..., "per_field": {split: {column: share of that field's
    rows}}, "min_count": ..., "untrained": [columns]}``, None for a split without rows.

    ``untrained`` lists the fields whose OOV row no training cell reads (so it keeps its
    random initialisation) although validation or test cells do."""
    rates: dict[str, Any] = {}
    per_field: dict[str, dict[str, float | None]] = {}
    for split, per in counts.items():
        n = rows[split]
        rates[split] = sum(per) / (n * len(per)) if n else None
        per_field[split] = {
            c: (k / n if n else None) for c, k in zip(CATEGORICAL_COLUMNS, per, strict=True)
        }
    rates["per_field"] = per_field
    rates["min_count"] = min_count
    train = counts.get("train", [])
    rates["untrained"] = [
        c
        for f, c in enumerate(CATEGORICAL_COLUMNS[: len(train)])
        if train[f] == 0 and any(counts[s][f] for s in counts if s != "train")
    ]
    return rates


def oov_line(rates: dict[str, Any], min_count: int | None) -> str:
    """The one line a run logs on the OOV share of its splits (``oov_rates``' result)::

    categorical values mapped to the OOV slot (ids seen fewer than data.min_count=5 times in
    training): train 5.19 %, val 11 %, test 10.4 % (per field: oov_rate in metrics.json)"""
    shares = ", ".join(
        f"{split} {100 * rate:.3g} %"
        for split in ("train", "val", "test")
        if isinstance(rate := rates.get(split), float | int)
    )
    return (
        "categorical values mapped to the OOV slot (ids seen fewer than "
        f"data.min_count={min_count} times in training): {shares} "
        "(per field: oov_rate in metrics.json)"
    )

"""Vocabularies of the categorical fields, the encoded-ids cache, and OOV statistics.

Free of torch and Lightning (the data module builds on it), so that tools and tests can use
it in processes that start in a fraction of a second.

* A field's vocabulary keeps the ids seen at least ``min_count`` times in the training rows,
  numbered ``0..n-1`` in increasing id order; every other id (rarer in training, or unseen)
  maps to the out-of-vocabulary slot ``n``. With ``min_count >= 2`` the OOV row is trained on
  the rare training ids, so an id first met in validation or test reads a learned vector
  instead of its random initialisation. Counting is vectorised (``np.bincount`` or
  ``np.unique(return_counts=True)``), never a Python loop over rows.
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
#: Lookup tables are used for fields whose largest id is below this; sorted search above it.
_DENSE_ID_LIMIT = 1 << 24
_ENCODED_META = "encoded.json"  # written last: what the cache holds and was keyed by


class Vocabulary:
    """Kept ids of one categorical field, and the vectorised id -> index mapping.

    Kept ids get indices ``0..n-1`` in increasing id order; anything else gets ``n`` (OOV).
    """

    def __init__(self, seen_ids: np.ndarray) -> None:
        self.ids = np.asarray(seen_ids, dtype=np.int64)
        self.oov = len(self.ids)
        self._lut: np.ndarray | None = None
        if self.oov and self.ids[-1] < _DENSE_ID_LIMIT:
            lut = np.full(int(self.ids[-1]) + 2, self.oov, dtype=np.int32)
            lut[self.ids] = np.arange(self.oov, dtype=np.int32)
            self._lut = lut  # the last entry catches every id above the largest seen

    @classmethod
    def from_column(cls, column: np.ndarray, min_count: int = 1) -> Vocabulary:
        """The vocabulary of the ids present at least ``min_count`` times in ``column``
        (non-negative integers); rarer ids, like unseen ones, map to the OOV slot.

        Counted with ``np.bincount`` (ids below 2**24) or ``np.unique(return_counts=True)``.
        """
        if len(column) == 0:
            return cls(np.empty(0, np.int64))
        top = int(column.max())
        if top < _DENSE_ID_LIMIT:
            return cls(np.flatnonzero(np.bincount(column, minlength=top + 1) >= min_count))
        ids, counts = np.unique(column, return_counts=True)
        return cls(ids[counts >= min_count])

    @property
    def size(self) -> int:
        """Embedding rows needed: the seen ids plus the OOV slot."""
        return self.oov + 1

    def encode(self, column: np.ndarray) -> np.ndarray:
        """int32 indices of raw ids (unseen ids -> the OOV slot)."""
        if self._lut is not None:
            return self._lut[np.minimum(column, len(self._lut) - 1)]
        pos = np.minimum(np.searchsorted(self.ids, column), max(self.oov - 1, 0))
        hit = self.ids[pos] == column if self.oov else np.zeros(len(column), bool)
        return np.where(hit, pos, self.oov).astype(np.int32)


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

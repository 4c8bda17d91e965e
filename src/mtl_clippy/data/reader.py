r"""Fast, validating reader of one processed AliExpress split, with an ``.npy`` cache.

``read_split(path)`` parses ``train.csv`` / ``test.csv`` (the 82-column processed layout of
``schema.py``) with pyarrow's multithreaded CSV reader, typed per column (int64 ids, float32
features and labels), so no float64 copy of the table ever exists. Columns are copied block by
block into preallocated row-major arrays: a block of a few thousand rows fits in cache, so the
column-to-row transposition costs no strided main-memory traffic.

The first read stores the arrays as ``.npy`` files plus a ``cache.json`` (schema version,
source size, modification time, inode and status-change time, row count); later reads
memory-map them. The parsing threads write each validated block of rows straight into the
cache's files (no array of the whole file is built in memory, no copy or pass over the arrays
follows the parse) while a thread flushes them to disk. Processes that
read an uncached file together parse it once: the first takes the cache's lock and writes it
(under a temporary name, renamed when complete), the others wait and map its copy
(``cache.py``). An interrupted or failed read never leaves a partial cache, a complete cache
is never replaced while it is current, and a changed source (size, mtime, inode or ctime: any
write, even one that restores size and mtime) invalidates it.

Bad input raises :class:`~mtl_clippy.data.errors.DataError` naming the file, the line (header =
line 1) and the column. Validation is vectorised: masks per block, first offender reported.

Common shapes of the same data are read as the plain file: ``\r\n`` line ends, a UTF-8 byte
order mark, quoted cells (``"3"``), scientific notation (``1e-3``), labels written ``1.0`` /
``0.0``, no final newline, and empty, whitespace-only or only-comma lines at the end of the
file (which many editors, spreadsheets and tools write; they are not rows). An empty or
only-comma line between rows, ``\r\r\n`` or lone ``\r`` line ends, a pandas index column (an
unnamed first column, what ``DataFrame.to_csv()`` writes without ``index=False``), a first
column without its name and an unnamed last column are errors that say so, with a line.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mtl_clippy.data import cache as cache_mod
from mtl_clippy.data.errors import DataError
from mtl_clippy.data.schema import (
    CATEGORICAL_COLUMNS,
    COLUMNS,
    LABEL_COLUMNS,
    N_CATEGORICAL,
    N_NUMERICAL,
    NUMERICAL_COLUMNS,
)

log = logging.getLogger(__name__)

#: Bump when the cached arrays' layout or meaning changes; older caches are then re-parsed.
CACHE_SCHEMA_VERSION = 1
CACHE_DIRNAME = ".mtl_clippy_cache"
_ARRAYS = ("categorical", "numerical", "labels")
_FEATURE_COLUMNS = COLUMNS[1:]  # search_id is never converted
_N_LABELS = len(LABEL_COLUMNS)


@dataclass(frozen=True)
class AliExpressSplit:
    """One split as NumPy arrays (row-major, possibly memory-mapped read-only).

    ``categorical`` int64 [N, 16] raw ids; ``numerical`` float32 [N, 63]; ``labels`` float32
    [N, 2] (click, conversion). ``from_cache`` tells whether the arrays were memory-mapped
    from a previous read's cache (False: this read parsed the file); ``cached`` whether they
    are memory-mapped from a current cache (a previous one, or the one this read wrote).
    """

    categorical: np.ndarray
    numerical: np.ndarray
    labels: np.ndarray
    source: Path
    from_cache: bool = False
    cached: bool = False

    def __post_init__(self) -> None:
        if self.from_cache:
            object.__setattr__(self, "cached", True)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> AliExpressSplit:
        """The first ``n`` rows as views (no copy); all rows when ``n`` is None."""
        if n is None or n >= len(self):
            return self
        return AliExpressSplit(
            self.categorical[:n],
            self.numerical[:n],
            self.labels[:n],
            self.source,
            self.from_cache,
            self.cached,
        )


def read_split(
    path: str | os.PathLike[str],
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    block_size: int = 1 << 23,
) -> AliExpressSplit:
    """Read one processed split, validating it, through the ``.npy`` cache.

    Args:
        path: a processed ``train.csv`` / ``test.csv`` (header + 82 columns).
        cache: use and write the cache. Without it every call parses the CSV.
        cache_dir: folder holding caches; default ``<folder of path>/.mtl_clippy_cache``.
            If it cannot be written, the read still succeeds (with a warning).
        block_size: the most bytes per range parsed by one thread (ranges are parsed in
            parallel; a file of a few ranges is cut into at least 8 per thread so that the
            threads finish together); memory beyond the final arrays is a few ranges per
            thread (and the final arrays are memory-mapped from the cache when it is
            written).

    Raises:
        DataError: the file is missing, unreadable, not CSV text, empty or malformed (the
            message says where).
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise DataError(path, "this is a folder, not a file", hint="expected a CSV file")
        if not path.is_file():
            raise DataError(path, "file not found", hint="check the data directory")
        stat = path.stat()
        if not cache:
            return AliExpressSplit(*_parse(path, block_size), source=path, from_cache=False)
        folder = _cache_folder(path, cache_dir)
        cache_mod.remove_dead_leftovers(folder)  # a killed writer's temporary folder
        cached = _load_cache(folder, stat)
        if cached is not None:
            return AliExpressSplit(*cached, source=path, from_cache=True)
        with cache_mod.exclusive(folder) as held:
            # Processes started together (DDP ranks under srun, parallel sweep jobs) parse a
            # file once: the others wait here, then map the cache the first one wrote.
            stat = path.stat()  # as it is now: it may have changed while this one waited
            cached = _load_cache(folder, stat)
            if cached is not None:
                return AliExpressSplit(*cached, source=path, from_cache=True)
            try:
                changed = _parse_into_cache(folder, path, stat, block_size, held)
            except _SourceReadError as err:
                raise err.error from None
            if changed is not None:  # parsed, not cached: the source changed meanwhile
                return AliExpressSplit(*changed, source=path, from_cache=False)
            written = _load_cache(folder, stat)
            if written is not None:  # mapped: processes share it in the page cache
                return AliExpressSplit(*written, source=path, from_cache=False, cached=True)
            # The cache could not be written (the warning said why): parse into memory.
            categorical, numerical, labels = _parse(path, block_size)
    except OSError as err:  # permission denied, I/O error, ...: the user's to fix
        raise DataError(
            path,
            f"cannot read the file: {err.strerror or err}",
            hint="check that it is a readable file",
        ) from None
    return AliExpressSplit(categorical, numerical, labels, source=path, from_cache=False)


# ----------------------------------------------------------------------------- cache


#: What identifies a source file's content in a cache's key (``cache.json``): its size and
#: modification time, and also its inode and status-change time, which every write, copy or
#: replacement changes and which ``touch -r`` / ``cp -p`` / ``rsync -a`` cannot set back: an
#: edit in place that keeps the size and restores the mtime still invalidates the cache.
_IDENTITY_KEYS = ("source_size", "source_mtime_ns", "source_ino", "source_ctime_ns")


def source_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime, inode, ctime) of a source file: a cache keyed by it is used only for
    the very file, unchanged, that it was made from."""
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)


def _cache_folder(path: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else path.parent / CACHE_DIRNAME
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return root / f"{path.stem}-{key}"


def _load_cache(folder: Path, stat: os.stat_result) -> tuple[np.ndarray, ...] | None:
    """Memory-map a cache that matches the source, or None (missing, stale or unreadable).
    A cache that does not exist yet is no news (the first read writes it): nothing logged."""
    if not folder.exists():  # (caches appear whole: a folder without its files is damaged)
        return None
    try:
        meta = json.loads((folder / "cache.json").read_text())
        if meta.get("schema_version") != CACHE_SCHEMA_VERSION or [
            meta.get(k) for k in _IDENTITY_KEYS
        ] != list(source_identity(stat)):
            log.info("cache %s is stale; re-reading the source", folder)
            return None
        arrays = tuple(np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS)
    except Exception:  # noqa: BLE001: any cache that cannot be read is no cache (re-read)
        log.info("cache %s cannot be read; re-reading the source", folder)
        return None
    rows = meta.get("rows")
    if any(a.shape[0] != rows for a in arrays):
        return None
    return arrays


def save_arrays_atomic(
    folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None
) -> bool:
    """Make ``folder`` hold ``<name>.npy`` per array (and ``cache.json`` from ``meta``), first
    writer wins: under ``folder``'s lock, a folder already there (complete: folders only ever
    appear whole) is kept and used, never replaced; otherwise the arrays are written to a
    temporary folder beside it and renamed into place (``cache.publish``).

    Returns True when ``folder`` holds a complete copy (this one or an earlier writer's), or
    False, with a warning, if it could not be written (read-only folder, full disk): the
    arrays in hand stay valid.
    """
    with cache_mod.exclusive(folder) as held:
        if folder.is_dir():
            return True
        return cache_mod.publish(folder, cache_mod.array_filler(arrays, meta), held=held) or (
            folder.is_dir()
        )


class _SourceReadError(Exception):
    """An ``OSError`` reading the source while the cache is written: carried through
    ``cache.publish`` (which would take an ``OSError`` for a cache it cannot write)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _SourceChanged(Exception):
    """The source changed while it was parsed into the cache: not published."""

    def __init__(self, arrays: tuple[np.ndarray, ...]) -> None:
        super().__init__("changed")
        self.arrays = arrays


def _parse_into_cache(
    folder: Path, source: Path, stat: os.stat_result, block_size: int, held: bool
) -> tuple[np.ndarray, ...] | None:
    """Parse ``source`` straight into its cache (the parse cache of ``source``: its arrays
    plus what identifies the source). Called under the cache's lock after finding no current
    cache: a stale or damaged one is replaced.

    The worker threads write each validated block of rows into the ``.npy`` files of a
    temporary folder as they parse (``_NpyWriter``): no copy of the arrays is made in
    memory and no pass over them follows the parse. The folder is flushed to disk and renamed
    into place only once every row is written and valid (``cache.publish``); bad input, a
    kill or a failed write leaves no cache. Returns None once published or when the cache
    could not be written (``publish`` warned; the caller then parses into memory), or the
    arrays read back into memory when the source changed while it was parsed (not cached).
    """
    meta = {
        "schema_version": CACHE_SCHEMA_VERSION,
        "source": str(source.resolve()),
        **dict(zip(_IDENTITY_KEYS, source_identity(stat), strict=True)),
    }

    def fill(tmp: Path) -> None:
        writer = _NpyWriter(tmp)  # an OSError here: a cache folder that cannot be written
        try:
            try:
                rows = _parse(source, block_size, writer)
            except _CacheWriteError as err:
                raise err.error from None  # publish: a warning, no cache
            except OSError as err:  # reading the source: the user's to fix
                raise _SourceReadError(err) from None
            writer.finish(rows)
        finally:
            writer.close()
        try:
            now = source.stat()
        except OSError as err:
            raise _SourceReadError(err) from None
        if source_identity(now) != source_identity(stat):
            log.warning("%s changed while it was read; not caching it", source)
            raise _SourceChanged(tuple(np.load(tmp / f"{name}.npy") for name in _ARRAYS))
        (tmp / "cache.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))

    try:
        cache_mod.publish(folder, fill, held=held)
    except _SourceChanged as changed:
        return changed.arrays
    return None


class _CacheWriteError(Exception):
    """An ``OSError`` writing the cache's files from a worker thread (full disk, I/O error),
    told apart from one reading the source."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


#: Bytes of the ``.npy`` header the cache's files are written with (format 1.0): what
#: ``np.save`` writes for these shapes, and room for any row count below 10**18.
_NPY_HEADER = 128
_DTYPES = (np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.float32))
_WIDTHS = (N_CATEGORICAL, N_NUMERICAL, _N_LABELS)


def npy_header(dtype: np.dtype, shape: tuple[int, ...], size: int = _NPY_HEADER) -> bytes:
    """The ``.npy`` (format 1.0) header of a C-ordered array, padded to ``size`` bytes as
    ``np.save`` pads it (spaces, then a newline): the same bytes ``np.save`` writes when its
    header has that size."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    dims = tuple(int(n) for n in shape)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {dims!r}, }}"
    body = text.encode("latin1")
    room = size - 10  # magic (6), version (2), header length (2)
    if len(body) + 1 > room:
        raise ValueError(f"a .npy header for shape {shape} does not fit in {size} bytes")
    return (
        b"\x93NUMPY\x01\x00"
        + room.to_bytes(2, "little")
        + body
        + b" " * (room - len(body) - 1)
        + b"\n"
    )


_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
_SEEK_LOCK = threading.Lock()  # where os.pwrite is missing (Windows): seek and write, locked


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` of ``fd``: short writes (network file systems, a nearly
    full disk) are continued; without ``os.pwrite``, a locked seek and write."""
    data = memoryview(data)
    while len(data):
        if hasattr(os, "pwrite"):
            done = os.pwrite(fd, data, offset)
        else:
            with _SEEK_LOCK:
                os.lseek(fd, offset, os.SEEK_SET)
                done = os.write(fd, data)
        if done <= 0:
            raise OSError(f"no bytes written at offset {offset}")
        data, offset = data[done:], offset + done


class _NpyWriter:
    """The cache's ``.npy`` files in a temporary folder, written row block by row block, in
    any order, from the parsing threads (``os.pwrite`` at the block's offset releases the
    GIL); the headers, which hold the row count, are written by :meth:`finish`."""

    def __init__(self, folder: Path) -> None:
        self.fds: list[int] = []
        self._flusher: threading.Thread | None = None
        try:
            for name in _ARRAYS:
                self.fds.append(
                    os.open(folder / f"{name}.npy", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                )
        except OSError:
            self.close()
            raise
        # Writes the rows to disk while the file is parsed (the flush before the rename then
        # has little left to do): a thread that waits for the disk, not for the CPU.
        self._written = threading.Event()
        self._done = False
        self.flush_error: OSError | None = None
        self._flusher = threading.Thread(target=self._flush_written, daemon=True)
        self._flusher.start()

    def _flush_written(self) -> None:
        while True:
            self._written.wait()
            self._written.clear()
            if self._done:
                return
            for fd in list(self.fds):
                try:  # a head start on the flush before the rename
                    _fdatasync(fd)
                except OSError as err:
                    # Linux reports a lost write once per file handle: keep it for finish(),
                    # since a flush through a new handle would not see it again.
                    if self.flush_error is None:
                        self.flush_error = err

    def range_written(self) -> None:
        """A range's rows are written: start flushing them (and any before) to disk."""
        self._written.set()

    def write(self, first_row: int, blocks: tuple[np.ndarray, ...]) -> None:
        """Write rows ``first_row ..`` of each array; raises :class:`_CacheWriteError`."""
        try:
            for fd, block, dtype, width in zip(self.fds, blocks, _DTYPES, _WIDTHS, strict=True):
                data = memoryview(
                    np.ascontiguousarray(block, dtype=dtype).reshape(-1).view(np.uint8)
                )
                _pwrite_all(fd, data, _NPY_HEADER + first_row * width * dtype.itemsize)
        except OSError as err:
            raise _CacheWriteError(err) from None

    def finish(self, rows: int) -> None:
        """Write the headers (``rows`` rows), cut each file to its exact length and flush it
        through the handle that wrote it, so that any lost write raises ``OSError`` here (the
        cache is then not published)."""
        for fd, dtype, width in zip(self.fds, _DTYPES, _WIDTHS, strict=True):
            _pwrite_all(fd, npy_header(dtype, (rows, width)), 0)
            os.ftruncate(fd, _NPY_HEADER + rows * width * dtype.itemsize)
        self._stop_flusher()
        if self.flush_error is not None:
            raise self.flush_error
        for fd in self.fds:
            _fdatasync(fd)

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._done = True
            self._written.set()
            self._flusher.join()
            self._flusher = None

    def close(self) -> None:
        self._stop_flusher()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


# ----------------------------------------------------------------------------- parsing


def _parse(
    path: Path, range_bytes: int, out: _NpyWriter | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | int:
    """Read the file once, in ranges of whole lines parsed by threads, validated.

    The main thread reads a range (about ``range_bytes``, cut at a line end) into one of a few
    reused buffers and counts its lines (NumPy, a pass at memory speed), which fixes the
    range's first row; a worker thread parses it with pyarrow (which releases the GIL), turns
    it block by block into rows (``RecordBatch.to_tensor``: a row-major copy in C++, no
    strided Python copies) and validates those blocks. Ranges are at most an eighth of the
    file per thread, so that the threads finish together on a file of a few ranges.

    Without ``out`` the rows are copied into arrays allocated once, sized from the first
    range's bytes per row (5 % margin; grown in the rare case the estimate is short), and
    returned. With ``out`` (the cache being written) each validated block is written to the
    cache's files instead, and the number of rows is returned: no array of the whole file is
    made in memory at all. At most two ranges per thread are in flight, so peak memory is
    (the final arrays plus) a few ranges and their parsed tables: never the whole parsed
    table, never a float64 copy.
    """
    _check_header(path)
    size = _content_end(path, path.stat().st_size)  # trailing empty lines are not rows
    workers = max(1, os.cpu_count() or 1)
    # Ranges small enough that the threads share the file evenly (and few bytes are held),
    # large enough that the per-range costs stay small.
    range_bytes = max(1, min(range_bytes, max(_MIN_RANGE, size // (8 * workers))))
    arrays: tuple[np.ndarray, ...] | None = None
    futures: list[Future[None]] = []
    lent: dict[Future[None], bytearray] = {}  # buffers in use by their range's worker
    free: list[bytearray] = []
    scratch = np.empty(_COUNT_PIECE, dtype=bool)
    row = 0
    with open(path, "rb") as f, ThreadPoolExecutor(workers) as pool:
        pos = len(f.readline())
        length = range_bytes
        while pos < size:
            for fut in [fut for fut in lent if fut.done()]:
                free.append(lent.pop(fut))
            want = min(length, size - pos)
            buf = next((b for b in free if len(b) >= want), None)
            if buf is None:
                buf = bytearray(max(want, range_bytes))
            else:
                free.remove(buf)
            got = _read_into(f, buf, want)
            if got < want:  # the file was cut short while it was read
                want = got
                size = pos + got
            if pos + want >= size:  # the last range: a final line may lack its newline
                cut = want
                rows = _count_lines(buf, cut, scratch) + (want > 0 and buf[want - 1] != 10)
            else:
                cut = buf.rfind(b"\n", 0, want) + 1
                if cut == 0:  # one line longer than the range: read it again, longer
                    free.append(buf)
                    f.seek(pos)
                    length *= 2
                    continue
                rows = _count_lines(buf, cut, scratch)
                f.seek(pos + cut)
            if cut == 0:
                free.append(buf)
                break
            if out is None:
                if arrays is None:
                    arrays = _allocate(int(rows * (size - pos) / cut * 1.05) + 16)
                elif row + rows > len(arrays[0]):
                    wait(futures)  # every writer done: the arrays can be replaced safely
                    arrays = _grow(arrays, row, 2 * (row + rows))
            chunk = memoryview(buf)[:cut]
            fut = pool.submit(_parse_range, path, chunk, row, rows, arrays, out)
            futures.append(fut)
            lent[fut] = buf
            pos += cut
            row += rows
            length = range_bytes
            in_flight = [fut for fut in futures if not fut.done()]
            if len(in_flight) >= 2 * workers:
                wait(in_flight, return_when=FIRST_COMPLETED)
            if any(fut.done() and fut.exception() is not None for fut in futures):
                break  # stop reading; the earliest error is raised below
        wait(futures)
    for fut in futures:  # in file order: the first error raised is the earliest
        fut.result()
    if row == 0:
        raise DataError(path, "the file has a header but no data rows", line=2)
    if out is not None:
        return row
    assert arrays is not None
    return tuple(a[:row] for a in arrays)  # type: ignore[return-value]


#: The smallest range a thread parses (a range is cut down to an eighth of the file per thread).
_MIN_RANGE = 1 << 21
#: Bytes of a range compared with the newline byte at a time when its lines are counted.
_COUNT_PIECE = 1 << 18


def _read_into(f: Any, buf: bytearray, want: int) -> int:
    """Fill ``buf[:want]`` from ``f``; the bytes read (fewer only at the end of the file)."""
    view = memoryview(buf)
    got = 0
    while got < want:
        n = f.readinto(view[got:want])
        if not n:
            break
        got += n
    return got


def _count_lines(buf: bytearray, end: int, scratch: np.ndarray) -> int:
    """The newline bytes in ``buf[:end]``: compared in pieces into ``scratch`` (reused, so
    the count allocates nothing), several times faster than ``bytes.count``."""
    data = np.frombuffer(buf, dtype=np.uint8, count=end)
    lines = 0
    for start in range(0, end, len(scratch)):
        piece = data[start : start + len(scratch)]
        mask = scratch[: len(piece)]
        np.equal(piece, 10, out=mask)
        lines += int(np.count_nonzero(mask))
    return lines


def _allocate(rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.empty((rows, N_CATEGORICAL), dtype=np.int64),
        np.empty((rows, N_NUMERICAL), dtype=np.float32),
        np.empty((rows, _N_LABELS), dtype=np.float32),
    )


def _grow(arrays: tuple[np.ndarray, ...], filled: int, rows: int) -> tuple[np.ndarray, ...]:
    bigger = _allocate(rows)
    for old, new in zip(arrays, bigger, strict=True):
        new[:filled] = old[:filled]
    return bigger


#: Bytes that make a line blank: an empty or whitespace-only line (``\r`` of a CRLF included).
_BLANK = b" \t\r\n\x0b\x0c"
#: Bytes that make a line at the end of the file no row: blanks, and commas (the empty rows a
#: spreadsheet writes for formatted cells below the data, ``,,,,...``).
_TAIL_BLANK = _BLANK + b","
#: A line end as pyarrow reads one: ``\n``, ``\r\n`` or a lone ``\r``.
_LINE_END = re.compile(rb"\r\n?|\n")


def _content_end(path: Path, size: int, chunk: int = 1 << 16) -> int:
    r"""Length of ``path`` without its trailing blank lines (empty, whitespace or only commas):
    up to and including the line end (``\n``, ``\r\n`` or a lone ``\r``, as pyarrow reads
    them) of the last line that holds anything else (``size`` if that line has none).

    Reads backwards from the end in small blocks, so it costs the trailing blank lines only.
    """
    with open(path, "rb") as f:
        end = size
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            kept = len(f.read(end - start).rstrip(_TAIL_BLANK))
            if kept:
                last = start + kept  # one past the last byte that is not blank
                f.seek(last)
                while piece := f.read(chunk):  # the line end of that line
                    found = _LINE_END.search(piece)
                    if found is None:
                        last += len(piece)
                        continue
                    if found.end() == len(piece) and found.group() == b"\r":
                        return last + found.end() + (f.read(1) == b"\n")  # \r | \n cut
                    return last + found.end()
                return size
            end = start
    return 0


def _parse_range(
    path: Path,
    chunk: memoryview,
    first_row: int,
    rows: int,
    arrays: tuple[np.ndarray, ...] | None,
    out: _NpyWriter | None = None,
) -> None:
    """Parse one range of whole lines into rows ``first_row ..`` of ``arrays``, validated, or
    with ``out``, validate its blocks and write them to the cache's files."""
    read_options = pacsv.ReadOptions(
        column_names=list(COLUMNS), block_size=_PARSE_BLOCK, use_threads=False
    )
    try:
        table = pacsv.read_csv(pa.BufferReader(pa.py_buffer(chunk)), read_options, _PARSE, _CONVERT)
    except pa.ArrowInvalid as err:
        # pyarrow also ends lines at a lone \r, the line counting here at \n only: such line
        # ends shift every line number, so they are named first.
        odd = _line_end_problem(path, bytes(chunk), first_row + 2)
        raise odd or _with_line(_explain_arrow_error(path, err, first_row), first_row) from None
    if table.num_rows != rows:  # cannot happen with \n or \r\n line endings
        raise _line_end_problem(path, bytes(chunk), first_row + 2) or DataError(
            path,
            f"parsed {table.num_rows} rows where {rows} lines were counted",
            line=first_row + 2,
            hint="use \\n or \\r\\n line endings",
        )
    row = first_row
    for batch in table.to_batches():
        end = row + batch.num_rows
        blocks = tuple(
            np.asarray(batch.select(idx).to_tensor()) for idx in (_CAT_IDX, _NUM_IDX, _LAB_IDX)
        )
        if out is not None:
            _validate_block(path, row, *blocks)
            out.write(row, blocks)
        else:
            assert arrays is not None
            for array, block in zip(arrays, blocks, strict=True):
                array[row:end] = block
            _validate_block(path, row, *(array[row:end] for array in arrays))
        row = end
    if out is not None:
        out.range_written()


_PARSE_BLOCK = 1 << 20  # pyarrow's block: a cache-friendly unit of parsing and of copying
_PARSE = pacsv.ParseOptions(ignore_empty_lines=False)
_CONVERT = pacsv.ConvertOptions(
    column_types={
        **{c: pa.int64() for c in CATEGORICAL_COLUMNS},
        **{c: pa.float32() for c in (*NUMERICAL_COLUMNS, *LABEL_COLUMNS)},
    },
    include_columns=list(_FEATURE_COLUMNS),
    null_values=[],
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
)
_CAT_IDX = list(range(N_CATEGORICAL))
_NUM_IDX = list(range(N_CATEGORICAL, N_CATEGORICAL + N_NUMERICAL))
_LAB_IDX = list(range(N_CATEGORICAL + N_NUMERICAL, len(_FEATURE_COLUMNS)))


def _check_header(path: Path) -> None:
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first:
        raise DataError(path, "the file is empty", hint="expected a header line and data rows")
    _check_text(path, first)
    if first.endswith(b"\r\r\n"):  # the header's line end: the whole file's, surely
        raise _odd_line_end(path, _CR_CR_LF, 1)
    if not first.endswith(b"\n") and _LONE_CR.search(first):  # no \n in 1 MiB: lone \r's
        raise _odd_line_end(path, _CR, 1)
    text = first.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    if not text.strip():
        raise DataError(path, "the header line is empty", line=1, hint=_EXPECTED_HEADER)
    got = [c.strip().strip('"') for c in text.split(",")]
    if got == list(COLUMNS):
        return
    _check_shifted_header(path, got)
    missing = [c for c in COLUMNS if c not in got]
    extra = [c for c in got if c not in COLUMNS]
    dupes = sorted({c for c in got if got.count(c) > 1})
    parts = []
    if missing:
        parts.append(f"missing {_names(missing)}")
    if extra:
        parts.append(f"unexpected {_names(extra)}")
    if dupes:
        parts.append(f"repeated {_names(dupes)}")
    column = None
    if not parts:
        k = next(i for i, (a, b) in enumerate(zip(got, COLUMNS, strict=True)) if a != b)
        column = got[k]
        parts.append(f"columns out of order: column {k + 1} is {got[k]!r}, expected {COLUMNS[k]!r}")
    raise DataError(
        path,
        "header is not the 82 processed AliExpress columns: " + "; ".join(parts),
        line=1,
        column=column,
        hint=_EXPECTED_HEADER,
    )


def _check_shifted_header(path: Path, got: list[str]) -> None:
    """Raise for a header that is the expected one but for its first or last column: a pandas
    index column before it, a first column without its name, an unnamed column after it."""
    extra = len(got) - len(COLUMNS)
    if extra > 0 and got[extra:] == list(COLUMNS) and _second_line_cells(path) == len(COLUMNS):
        names = _names([_quoted(c) for c in got[:extra]])
        many = "an extra name" if extra == 1 else f"{extra} extra names"
        raise DataError(
            path,
            f"the header has {many} before search_id ({names}), which the rows lack: they "
            f"have {len(COLUMNS)} cells",
            line=1,
            hint=f"delete {'it' if extra == 1 else 'them'} from the header",
        )
    if extra > 0 and got[extra:] == list(COLUMNS):  # the whole header, shifted right
        if extra == 1:
            what = f"is {_quoted(got[0])}, before search_id" if got[0] else "has no name"
            problem = f"the first column {what}: a pandas index column"
        else:
            problem = f"the first {extra} columns come before search_id: pandas index columns"
        raise DataError(
            path,
            f"{problem}, as DataFrame.to_csv() writes {'it' if extra == 1 else 'them'} "
            "without index=False",
            line=1,
            hint="write the file with df.to_csv(path, index=False), or delete "
            + ("its first column" if extra == 1 else f"its first {extra} columns"),
        )
    if extra == 0 and got[1:] == list(COLUMNS[1:]):  # only the first name is wrong
        what = f"is {_quoted(got[0])}" if got[0] else "has no name"
        raise DataError(
            path,
            f"the first column {what}, expected {COLUMNS[0]}",
            line=1,
            hint=f"name it {COLUMNS[0]} in the header: its cells are the search ids",
        )
    if extra == 1 and got[:-1] == list(COLUMNS) and _PANDAS_INDEX.fullmatch(got[-1]):
        raise DataError(
            path,
            f"the header has an unnamed column after {COLUMNS[-1]}",
            line=1,
            hint="remove that column: a comma at the end of every line, or one a tool added",
        )


def _second_line_cells(path: Path) -> int | None:
    """Cells of the file's second line (the first row), or None without one."""
    with open(path, "rb") as f:
        f.readline(1 << 20)
        row = f.readline(1 << 20)
    return row.count(b",") + 1 if row.strip(_BLANK) else None


_EXPECTED_HEADER = "expected: search_id, categorical_1..16, numerical_1..63, click, conversion"
#: The header cell of the index column pandas writes: empty, or "Unnamed: 0" once such a file
#: has been read back and written again.
_PANDAS_INDEX = re.compile(r"|Unnamed: \d+")

#: Leading bytes of files that users mistake for the CSV, and what to do with each.
_NOT_CSV = (
    (b"\x1f\x8b", "a gzip archive: decompress it first"),
    (b"PK\x03\x04", "a zip archive: extract it, or prepare it with mtl_clippy.data.prepare"),
    (b"\xff\xfe", "UTF-16 text: save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text: save it as UTF-8"),
)


def _check_text(path: Path, head: bytes) -> None:
    """Raise unless ``head`` (the first line) is UTF-8 text: a binary, compressed or UTF-16
    file would otherwise be reported as a header of garbage names."""
    for magic, what in _NOT_CSV:
        if head.startswith(magic):
            raise DataError(path, f"not a CSV text file: it looks like {what}", line=1)
    bad = head.find(b"\x00")
    try:
        # Incremental: a character cut by readline's length limit is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head if bad < 0 else head[:bad])
    except UnicodeDecodeError as err:
        bad = err.start
    if bad >= 0:
        raise DataError(
            path,
            f"not a CSV text file: byte {bad + 1} of the first line (0x{head[bad]:02x}) "
            "is not UTF-8 text",
            line=1,
            hint="expected the processed AliExpress CSV; is this a binary file?",
        )


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(_printable(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _printable(text: str, limit: int = 40) -> str:
    """``text`` as is when it is a plain name, else quoted with control characters escaped
    (a message stays one line), cut to ``limit`` characters."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return cut if cut and cut.isprintable() else repr(cut)


def _validate_block(
    path: Path, first_row: int, cat: np.ndarray, num: np.ndarray, lab: np.ndarray
) -> None:
    """Raise on the earliest bad cell of one block (vectorised; masks only on failure)."""
    problems: list[tuple[int, int, str, str]] = []  # (row, column index in file, problem, hint)
    if cat.min() < 0:
        r, c = _first_true(cat < 0)
        problems.append((r, 1 + c, f"negative categorical id {cat[r, c]}", "ids must be >= 0"))
    if not np.isfinite(num).all():
        r, c = _first_true(~np.isfinite(num))
        problems.append(
            (
                r,
                1 + N_CATEGORICAL + c,
                f"numerical value {num[r, c]} is not finite",
                "numerical features must be finite numbers",
            )
        )
    bad_label = (lab != 0) & (lab != 1)
    if bad_label.any():
        r, c = _first_true(bad_label)
        problems.append(
            (r, 1 + N_CATEGORICAL + N_NUMERICAL + c, f"label {lab[r, c]:g} is not 0 or 1", "")
        )
    orphan = (lab[:, 1] == 1) & (lab[:, 0] == 0)
    if orphan.any():
        r = int(np.flatnonzero(orphan)[0])
        problems.append(
            (
                r,
                len(COLUMNS) - 1,
                "conversion = 1 with click = 0",
                "conversion is click AND purchase, so it implies a click",
            )
        )
    if problems:
        r, c, problem, hint = min(problems)
        raise DataError(path, problem, line=first_row + r + 2, column=COLUMNS[c], hint=hint or None)


def _first_true(mask: np.ndarray) -> tuple[int, int]:
    flat = int(np.flatnonzero(mask.ravel())[0])
    r, c = divmod(flat, mask.shape[1])
    return r, c


# ----------------------------------------------------------------------------- error location

_CONVERSION_ERROR = re.compile(
    r"column #(\d+): (?:Row #(\d+): )?CSV conversion error to (\w+): invalid value '(.*)'"
)
_WIDTH_ERROR = re.compile(r"Expected (\d+) columns, got (\d+)")


def _explain_arrow_error(path: Path, err: pa.ArrowInvalid, first_row: int = 0) -> DataError:
    """Turn pyarrow's message into a DataError with the line and column.

    ``first_row`` is the data row where the parsed range started; pyarrow's ``Row #`` (when
    given) counts lines from there, 1-based. Without it the cell is located by re-reading.
    """
    message = str(err)
    conversion = _CONVERSION_ERROR.search(message)
    if conversion:
        column = COLUMNS[int(conversion.group(1))]
        value = conversion.group(4)
        if conversion.group(2) is not None:
            row: int | None = first_row + int(conversion.group(2)) - 1
        else:
            row = _first_unconvertible(path, column)
        shown = _quoted(value)
        if column in CATEGORICAL_COLUMNS:
            problem, hint = f"categorical id {shown} is not a non-negative integer", None
        elif column in LABEL_COLUMNS:
            problem, hint = f"label {shown} is not 0 or 1", None
        else:
            problem, hint = f"numerical value {shown} is not a number", None
        if value == "":
            problem, hint = "empty cell", "every cell must hold a number"
        elif "\ufffd" in value:  # pyarrow shows bytes that are not UTF-8 as U+FFFD
            problem = f"cell {shown} holds bytes that are not UTF-8 text"
            hint = "is this a binary file, or text in another encoding?"
        line = None if row is None else row + 2
        if value == "" and line is not None:
            empty = _no_values(path, line)  # pyarrow reads an empty line as one empty cell
            if empty is not None:
                return empty
        if line is not None and column == COLUMNS[-1] and _cut_short(path, line):
            hint = _CUT_SHORT  # a line cut within its last cell still has all its cells
        return DataError(path, problem, line=line, column=column, hint=hint)
    width = _WIDTH_ERROR.search(message)
    if width:
        line = _first_line_with_wrong_width(path, len(COLUMNS))
        empty = None if line is None else _no_values(path, line)  # spaces: one cell
        if empty is not None:
            return empty
        hint = None
        if line is not None and _cut_short(path, line):
            hint = _CUT_SHORT
        elif line is not None and int(width.group(2)) == len(COLUMNS) + 1:
            if (_line_text(path, line) or b"").rstrip(_BLANK).endswith(b","):
                hint = "the line ends with a comma, an empty column after conversion: remove it"
        return DataError(
            path,
            f"expected {width.group(1)} comma-separated cells, got {width.group(2)}",
            line=line,
            hint=hint,
        )
    return DataError(path, f"cannot parse the CSV: {message}")


_CUT_SHORT = "the file ends in the middle of this line: was it cut short by an interrupted copy?"


_ONLY_END_BLANK = "rows must follow each other; only the end of the file may have empty lines"


def _no_values(path: Path, line: int) -> DataError | None:
    """The error for editor ``line`` if it holds no values (empty, whitespace, or only commas,
    a spreadsheet's empty row), else None."""
    text = _line_text(path, line)
    if text is None or text.strip(_TAIL_BLANK):
        return None
    if text.strip(_BLANK):
        return DataError(
            path,
            "the line has no values (only commas)",
            line=line,
            hint=f"{_ONLY_END_BLANK} or lines of only commas: delete this one",
        )
    return DataError(
        path, "the line is empty", line=line, hint=f"{_ONLY_END_BLANK}: delete this one"
    )


def _line_text(path: Path, line: int, chunk: int = 1 << 24) -> bytes | None:
    r"""The bytes of editor ``line`` (1-based, lines ended by ``\n``) of ``path``, at most the
    first 64 KiB of it; None past the end. Called on an error only: skips whole blocks by
    counting their newlines, then finds the line."""
    current = 1  # the editor number of the line at ``start`` in the block
    text = bytearray()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            start = 0
            if current < line:
                newlines = block.count(b"\n")
                if current + newlines < line:
                    current += newlines
                    continue
                while current < line:
                    start = block.index(b"\n", start) + 1
                    current += 1
            end = block.find(b"\n", start)
            text += block[start : end if end >= 0 else len(block)]
            if end >= 0 or len(text) > 1 << 16:
                break
    return bytes(text[: 1 << 16]) if current == line else None


#: A ``\r`` followed by anything but ``\n``: pyarrow ends a line there, an editor may not.
_LONE_CR = re.compile(rb"\r(?=[^\n])")


def _line_end_problem(path: Path, data: bytes, first_line: int) -> DataError | None:
    r"""The error for the first line end of ``data`` (whole lines, the first of them editor
    line ``first_line``) that is neither ``\n`` nor ``\r\n``, or None.

    ``\r\r\n`` is what Python's ``csv.writer`` writes on Windows into a file opened without
    ``newline=''`` (its ``\r\n`` line end, then text mode's), and a lone ``\r`` what old Mac
    programs write (Excel's "CSV (Macintosh)"). pyarrow ends a line at each ``\r``, so both
    would be reported as empty lines, empty cells or lines of the wrong width at line
    numbers no editor shows. A ``\r`` that ends ``data`` (the file's last line end) is fine.
    """
    double = data.find(b"\r\r\n")
    lone = _LONE_CR.search(data)  # also the first \r of a \r\r\n: the same position
    if lone is not None and (double < 0 or lone.start() < double):
        at, kind = lone.start(), _CR
    elif double >= 0:
        at, kind = double, _CR_CR_LF
    else:
        return None
    return _odd_line_end(path, kind, first_line + data.count(b"\n", 0, at))


_CR_CR_LF = "\\r\\r\\n (a file written by Python's csv module without newline='')"
_CR = "\\r only (old Mac format)"


def _odd_line_end(path: Path, kind: str, line: int) -> DataError:
    r"""The error for ``\r\r\n`` (``kind`` ``_CR_CR_LF``) or lone ``\r`` (``_CR``) line ends,
    found in the header (line 1: the whole file's line ends) or at ``line``."""
    if kind == _CR_CR_LF:
        hint = "write it with newline='' or convert it"
    else:
        hint = "save with \\n or \\r\\n line ends"
    if line == 1:
        problem = f"line ends are {kind}"
    else:
        problem = f"the line ends with {kind.replace('a file written by', 'as written by')}"
    return DataError(path, problem, line=line, hint=hint)


def _with_line(err: DataError, first_row: int) -> DataError:
    """``err``, or where its line could not be found, the same error at the first line of the
    range it was found in (``first_row``: that range's first data row)."""
    if err.line is not None:
        return err
    return DataError(
        err.path,
        f"{err.problem} (in this line or one of the following)",
        line=first_row + 2,
        column=err.column,
        hint=err.hint,
    )


def _quoted(value: str, limit: int = 40) -> str:
    """A cell's text, quoted and escaped for a one-line message, cut to ``limit`` characters."""
    return repr(value[:limit] + ("..." if len(value) > limit else ""))


def _cut_short(path: Path, line: int, chunk: int = 1 << 24) -> bool:
    """Whether ``line`` (editor numbering) is the file's last line and lacks its newline: the
    mark of a file truncated by an interrupted copy or download."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        lines = 1 + sum(block.count(b"\n") for block in iter(lambda: f.read(chunk), b""))
    return line == lines


def _first_unconvertible(path: Path, column: str) -> int | None:
    """0-based data row of the first cell of ``column`` that pyarrow cannot convert.

    Re-reads only that column as strings, then bisects with vectorised casts, so finding the
    cell costs about two passes over one column, never a Python loop over rows.
    """
    target = pa.int64() if column in CATEGORICAL_COLUMNS else pa.float32()
    with pa.memory_map(str(path)) as source:
        strings = pacsv.read_csv(
            # without the trailing blank lines: a line of spaces would be a width error
            source.get_stream(0, _content_end(path, path.stat().st_size)),
            pacsv.ReadOptions(column_names=list(COLUMNS), skip_rows=1),
            pacsv.ParseOptions(ignore_empty_lines=False),
            pacsv.ConvertOptions(include_columns=[column], column_types={column: pa.string()}),
        ).column(0)
    values = strings.combine_chunks() if strings.num_chunks != 1 else strings.chunk(0)

    def fails(lo: int, hi: int) -> bool:
        try:
            pc.cast(values.slice(lo, hi - lo), target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return True
        return False

    lo, hi = 0, len(values)
    if hi == 0 or not fails(lo, hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(lo, mid):
            hi = mid
        else:
            lo = mid
    return lo


def _first_line_with_wrong_width(path: Path, expected: int, chunk: int = 1 << 26) -> int | None:
    """Editor line number (1-based) of the first line without ``expected`` cells.

    Counts commas between newlines with NumPy over large blocks of bytes (no per-line Python).
    """
    line_base = 1  # editor number of the first line starting in the current block
    carry = 0  # commas seen so far on a line that started in an earlier block
    pending = False  # bytes seen after the last newline so far
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            buf = np.frombuffer(data, dtype=np.uint8)
            newlines = np.flatnonzero(buf == ord("\n"))
            commas = np.cumsum(buf == ord(","), dtype=np.int64)
            ends = commas[newlines] if len(newlines) else np.empty(0, np.int64)
            starts = np.concatenate(([0], ends[:-1]))
            per_line = ends - starts
            if len(per_line):
                per_line[0] += carry
                bad = np.flatnonzero(per_line != expected - 1)
                if len(bad):
                    return line_base + int(bad[0])
            tail = int(commas[-1] - (ends[-1] if len(ends) else 0))
            carry = tail + (carry if not len(newlines) else 0)
            pending = int(newlines[-1]) < len(buf) - 1 if len(newlines) else True
            line_base += len(newlines)
        if pending and carry != expected - 1:
            return line_base  # a last line without a newline
    return None

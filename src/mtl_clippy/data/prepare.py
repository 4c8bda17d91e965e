"""Turn the raw Tianchi AliExpress files into the processed ``train.csv`` / ``test.csv``.

``python -m mtl_clippy.data.prepare --raw RAW_DIR_OR_ZIP --country NL --out data/AliExpress_NL``

The raw files (no header) are ``{cc}_user_{train,test}.csv`` (search id, ``user_2..user_33``)
and ``{cc}_item_{train,test}.csv`` (search id, ``item_2..item_48``, label 0/1/2). Each item row
is inner-joined to its search's user row and written with the standard column mapping of
``schema.py`` and the label mapping 0 -> (0, 0), 1 -> (1, 0), 2 -> (1, 1). Rows keep the item
file's (time) order.

The item file, by far the larger, is streamed in blocks, so memory is bounded by the user
table (one row per search) plus one block, whatever the item file's size. Numerical cells are
copied verbatim (never re-formatted), so preparation loses no precision. Output is written to
a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from mtl_clippy.data.errors import DataError
from mtl_clippy.data.schema import (
    COLUMNS,
    ID_COLUMN,
    RAW_ITEM_CATEGORICAL,
    RAW_ITEM_COLUMNS,
    RAW_ITEM_NUMERICAL,
    RAW_USER_CATEGORICAL,
    RAW_USER_COLUMNS,
    RAW_USER_NUMERICAL,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


class _CountingReader(io.RawIOBase):
    """Wraps a binary file to advance a progress bar by the bytes pyarrow reads."""

    def __init__(self, f: IO[bytes], bar: tqdm) -> None:
        super().__init__()
        self._f = f
        self._bar = bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._f.readinto(buffer)
        self._bar.update(n or 0)
        return n


class _RawSource:
    """The raw files, from a folder or straight from the downloaded zip."""

    def __init__(self, raw: Path) -> None:
        self.raw = raw
        self._zip = zipfile.ZipFile(raw) if raw.is_file() else None
        if self._zip is None and not raw.is_dir():
            raise DataError(raw, "raw data not found", hint="give the folder or the .zip")

    def names(self) -> list[str]:
        if self._zip is not None:
            return [Path(n).name for n in self._zip.namelist()]
        return [p.name for p in self.raw.iterdir()]

    def _member(self, name: str) -> str:
        assert self._zip is not None
        for member in self._zip.namelist():
            if Path(member).name == name:
                return member
        raise DataError(self.raw, f"the zip holds no {name}")

    def label(self, name: str) -> str:
        return f"{self.raw}:{name}" if self._zip is not None else str(self.raw / name)

    def size(self, name: str) -> int:
        if self._zip is not None:
            return self._zip.getinfo(self._member(name)).file_size
        path = self.raw / name
        if not path.is_file():
            raise DataError(path, "raw file not found")
        return path.stat().st_size

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._zip is not None:
            with self._zip.open(self._member(name)) as f:
                yield f
        else:
            with open(self.raw / name, "rb") as f:
                yield f


def detect_country(source: _RawSource) -> str:
    """The single country code present in the raw folder or zip."""
    codes = sorted(
        {m.group(1) for n in source.names() if (m := re.match(r"(\w+)_item_train\.csv$", n))}
    )
    if len(codes) != 1:
        found = ", ".join(codes) or "none"
        raise DataError(
            source.raw, f"cannot tell the country (found: {found})", hint="pass --country"
        )
    return codes[0]


def _stream(
    source: _RawSource, name: str, columns: tuple[str, ...], categorical: tuple[str, ...],
    block_size: int, bar: tqdm,
) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """Typed record batches of one raw file: ids as int64, numerical cells as verbatim text."""
    types: dict[str, pa.DataType] = {c: pa.string() for c in columns}
    types.update({c: pa.int64() for c in (ID_COLUMN, *categorical)})
    if "label" in columns:
        types["label"] = pa.int64()
    with source.open(name) as f:
        reader = pacsv.open_csv(
            _CountingReader(f, bar),
            pacsv.ReadOptions(column_names=list(columns), block_size=block_size),
            pacsv.ParseOptions(),
            pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False),
        )
        try:
            yield from reader
        except pa.ArrowInvalid as err:
            raise DataError(source.label(name), f"cannot parse the raw CSV: {err}") from None


def _check_nonnegative(
    label: str, batch: pa.RecordBatch, columns: tuple[str, ...], first_line: int
) -> None:
    for c in columns:
        values = batch.column(c).to_numpy()
        if len(values) and values.min() < 0:
            row = int(np.flatnonzero(values < 0)[0])
            raise DataError(
                label, f"negative categorical id {values[row]}", line=first_line + row, column=c
            )


def _prepare_split(
    source: _RawSource, country: str, split: str, out: Path, block_size: int, progress: bool
) -> dict[str, int]:
    user_name, item_name = f"{country}_user_{split}.csv", f"{country}_item_{split}.csv"
    total = source.size(user_name) + source.size(item_name)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"{country} {split}", disable=not progress
    ) as bar:
        # 1. The user table, whole (one row per search), sorted by search id for lookups.
        batches, line = [], 1
        for batch in _stream(
            source, user_name, RAW_USER_COLUMNS, RAW_USER_CATEGORICAL, block_size, bar
        ):
            _check_nonnegative(source.label(user_name), batch, RAW_USER_CATEGORICAL, line)
            line += batch.num_rows
            batches.append(batch)
        users = pa.Table.from_batches(batches, schema=batches[0].schema if batches else None)
        if users.num_rows == 0:
            raise DataError(source.label(user_name), "the file is empty")
        user_ids = users.column(ID_COLUMN).to_numpy()
        order = np.argsort(user_ids, kind="stable")
        sorted_ids = user_ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if len(dup):
            raise DataError(
                source.label(user_name), f"search id {sorted_ids[dup[0]]} appears twice",
                line=int(order[dup[0] + 1]) + 1, column=ID_COLUMN,
            )  # fmt: skip
        user_part = users.select([*RAW_USER_CATEGORICAL, *RAW_USER_NUMERICAL])

        # 2. Stream the item file, join, map, write.
        tmp = out / f".{split}.csv.tmp-{os.getpid()}"
        rows = dropped = 0
        line = 1
        write_options = pacsv.WriteOptions(quoting_style="none", quoting_header="none")
        schema = None
        writer = None
        try:
            for batch in _stream(
                source, item_name, RAW_ITEM_COLUMNS, RAW_ITEM_CATEGORICAL, block_size, bar
            ):
                label_name = source.label(item_name)
                _check_nonnegative(label_name, batch, RAW_ITEM_CATEGORICAL, line)
                raw_label = batch.column("label").to_numpy()
                bad = np.flatnonzero((raw_label < 0) | (raw_label > 2))
                if len(bad):
                    raise DataError(
                        label_name, f"label {raw_label[bad[0]]} is not 0, 1 or 2",
                        line=line + int(bad[0]), column="label (column 49)",
                    )  # fmt: skip
                line += batch.num_rows
                ids = batch.column(ID_COLUMN).to_numpy()
                pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
                found = sorted_ids[pos] == ids
                dropped += int(len(ids) - found.sum())
                if not found.all():
                    batch = batch.filter(pa.array(found))
                    raw_label = raw_label[found]
                joined = user_part.take(pa.array(order[pos[found]]))
                arrays = [batch.column(ID_COLUMN)]
                arrays += [joined.column(c).combine_chunks() for c in RAW_USER_CATEGORICAL]
                arrays += [batch.column(c) for c in RAW_ITEM_CATEGORICAL]
                arrays += [joined.column(c).combine_chunks() for c in RAW_USER_NUMERICAL]
                arrays += [batch.column(c) for c in RAW_ITEM_NUMERICAL]
                arrays += [
                    pa.array((raw_label >= 1).astype(np.int8)),
                    pa.array((raw_label == 2).astype(np.int8)),
                ]
                table = pa.Table.from_arrays(arrays, names=list(COLUMNS))
                if writer is None:
                    schema = table.schema
                    writer = pacsv.CSVWriter(tmp, schema, write_options=write_options)
                writer.write_table(table.cast(schema))
                rows += table.num_rows
            if writer is None:
                raise DataError(source.label(item_name), "the file is empty")
            writer.close()
            writer = None
            os.replace(tmp, out / f"{split}.csv")
        finally:
            if writer is not None:
                writer.close()
            if tmp.exists():
                tmp.unlink()
    if dropped:
        log.warning(
            "%s: %d item rows had no user row and were dropped (inner join)", item_name, dropped
        )
    return {"rows": rows, "dropped": dropped}


def prepare_raw(
    raw: str | os.PathLike[str],
    out: str | os.PathLike[str],
    country: str | None = None,
    block_size: int = 1 << 24,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Write ``out/train.csv`` and ``out/test.csv`` from the raw files in ``raw`` (folder or zip).

    Returns, per split, the rows written and the item rows dropped for lack of a user row.
    """
    source = _RawSource(Path(raw))
    country = country or detect_country(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        split: _prepare_split(source, country, split, out, block_size, progress) for split in SPLITS
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m mtl_clippy.data.prepare --raw RAW --country NL --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, help="folder with the raw CSVs, or the .zip")
    parser.add_argument("--country", default=None, help="country code (NL, FR, ES, US, RU)")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/AliExpress_NL")
    parser.add_argument("--block-mb", type=int, default=16, help="parse block size in MB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = prepare_raw(args.raw, args.out, args.country, args.block_mb << 20)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    for split, counts in summary.items():
        print(f"{split}: {counts['rows']} rows written, {counts['dropped']} dropped")


if __name__ == "__main__":
    main()

"""Common shapes of a processed AliExpress CSV (issue 12, item 5).

Editors, spreadsheets and pandas write the same data in several ways. The reader accepts
those that leave the numbers unambiguous and reads them to exactly the arrays of the plain
file: ``\\r\\n`` line ends, a UTF-8 byte order mark, quoted cells, scientific notation,
labels written ``1.0`` / ``0.0``, no final newline, and empty or whitespace-only lines at
the end (before the fix these were "empty cell" on a line past the data). An empty line
between rows and a pandas index column are errors that say what they are.

A property test draws files and combinations of these variations (hypothesis); the
examples below pin each shape on the real sample rows.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_fixtures import SAMPLE_DIR, sample_lines
from mtl_clippy.data import DataError, generate_dataset, read_split
from mtl_clippy.data.schema import COLUMNS, N_CATEGORICAL, N_NUMERICAL

ARRAYS = ("categorical", "numerical", "labels")
NUM = slice(1 + N_CATEGORICAL, 1 + N_CATEGORICAL + N_NUMERICAL)


def _assert_same(split, reference) -> None:
    assert len(split) == len(reference)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(split, name), getattr(reference, name))


def _write(path, lines: list[str], end: str = "\n", tail: str = "", bom: bool = False):
    text = ("\ufeff" if bom else "") + "".join(line + end for line in lines) + tail
    path.write_bytes(text.encode())
    return path


@pytest.fixture(scope="module")
def plain():
    return read_split(SAMPLE_DIR / "train.csv", cache=False)


# ----------------------------------------------------------------------------- drawn files


@st.composite
def _rows(draw):
    """Rows as (search id, 16 ids, 63 float32 values, (click, conversion)): drawn values of
    every magnitude (hypothesis), the rest filled from a drawn seed (cheap to draw)."""
    n = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bits = rng.integers(1, 64, size=(n, N_CATEGORICAL))
    ids = (rng.random((n, N_CATEGORICAL)) * 2.0**bits).astype(np.uint64).astype(np.int64)
    ids = np.minimum(ids, (1 << 63) - 1)
    values = rng.choice([-1, 1], (n, N_NUMERICAL)) * 10 ** rng.uniform(-38, 38, (n, N_NUMERICAL))
    values = values.astype(np.float32)
    values[rng.random((n, N_NUMERICAL)) < 0.3] = 0
    floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
    for x in draw(st.lists(floats, max_size=8)):  # zeros, subnormals, extremes, ...
        values[rng.integers(n), rng.integers(N_NUMERICAL)] = x
    for i in draw(st.lists(st.integers(0, (1 << 63) - 1), max_size=4)):
        ids[rng.integers(n), rng.integers(N_CATEGORICAL)] = i
    labels = [[(0, 0), (1, 0), (1, 1)][k] for k in rng.integers(0, 3, n)]
    return [
        (int(rng.integers(10**9)), ids[r].tolist(), values[r].tolist(), labels[r]) for r in range(n)
    ]


#: How a file may write the same rows; each is drawn independently.
VARIANTS = st.fixed_dictionaries(
    {
        "line_end": st.sampled_from(["\n", "\r\n", "mixed"]),  # mixed: alternating
        "bom": st.booleans(),
        "quote": st.sampled_from(["none", "all", "ids", "header"]),
        "numbers": st.sampled_from(["repr", "%.16e", "%.17E", "numpy"]),
        "float_labels": st.booleans(),
        # blank lines after the last row (empty, spaces, tabs, only commas: a spreadsheet's
        # empty rows), or none and no final newline
        "tail": st.lists(st.sampled_from(["", " ", "\t", "  \t ", "," * 81, ",, ,"]), max_size=3),
        "final_newline": st.booleans(),
        "block_size": st.sampled_from([1 << 25, 1 << 12, 1 << 10]),
    }
)


def _canonical(rows) -> list[str]:
    return [",".join(COLUMNS)] + [
        ",".join([str(sid), *map(str, ids), *(repr(float(v)) for v in values), *map(str, labels)])
        for sid, ids, values, labels in rows
    ]


def _variant(rows, v) -> bytes:
    def number(x: float) -> str:
        if v["numbers"] == "repr":
            return repr(float(x))
        if v["numbers"] == "numpy":  # shortest scientific: 1.e-03
            return np.format_float_scientific(np.float64(x))
        return v["numbers"] % x

    def q(cell: str, quoted: bool) -> str:
        return f'"{cell}"' if quoted else cell

    header = [q(c, v["quote"] in ("all", "header")) for c in COLUMNS]
    lines = [",".join(header)]
    for sid, ids, values, labels in rows:
        cells = [q(str(sid), v["quote"] == "all")]
        cells += [q(str(i), v["quote"] in ("all", "ids")) for i in ids]
        cells += [q(number(x), v["quote"] == "all") for x in values]
        cells += [q(f"{k}.0" if v["float_labels"] else str(k), v["quote"] == "all") for k in labels]
        lines.append(",".join(cells))
    ends = ["\n", "\r\n"] if v["line_end"] == "mixed" else [v["line_end"]]
    text = "".join(line + ends[k % len(ends)] for k, line in enumerate(lines))
    text += "".join(blank + ends[0] for blank in v["tail"])
    if not (v["tail"] or v["final_newline"]):
        text = text.rstrip("\r\n")  # the last row without its line end
    return (("\ufeff" if v["bom"] else "") + text).encode()


def _drawn_case(folder, rows, variant):
    """The canonical file's split (checked against the drawn values) and the variant's path."""
    canonical = _write(folder / "canonical.csv", _canonical(rows))
    path = folder / "train.csv"
    path.write_bytes(_variant(rows, variant))
    reference = read_split(canonical, cache=False)
    np.testing.assert_array_equal(reference.categorical, [r[1] for r in rows])
    np.testing.assert_array_equal(reference.numerical, np.float32([r[2] for r in rows]))
    np.testing.assert_array_equal(reference.labels, np.float32([r[3] for r in rows]))
    return reference, path


@given(rows=_rows(), variant=VARIANTS)
def test_variant_file_parses_to_the_same_arrays_as_the_canonical_file(
    tmp_path_factory, rows, variant
):
    """A drawn file written in a drawn combination of the accepted shapes reads to the
    arrays of its canonical form, which are the drawn values."""
    reference, path = _drawn_case(tmp_path_factory.mktemp("shape"), rows, variant)
    _assert_same(read_split(path, cache=False, block_size=variant["block_size"]), reference)


@settings(max_examples=12)
@given(rows=_rows(), variant=VARIANTS)
def test_variant_file_is_cached_with_the_same_arrays(tmp_path_factory, rows, variant):
    """The parse cache of a variant holds the canonical arrays, not a row more (its
    ``cache.json`` counts the rows), and a later read maps them."""
    folder = tmp_path_factory.mktemp("cached")
    reference, path = _drawn_case(folder, rows, variant)
    first = read_split(path, cache_dir=folder / "cache", block_size=variant["block_size"])
    again = read_split(path, cache_dir=folder / "cache")
    assert not first.from_cache and first.cached and again.from_cache
    _assert_same(first, reference)
    _assert_same(again, reference)
    (meta,) = (folder / "cache").glob("*/cache.json")
    assert json.loads(meta.read_text())["rows"] == len(rows)


# ----------------------------------------------------------------------------- trailing lines

TAILS = {
    "one empty line": "\n",
    "three empty lines": "\n\n\n",
    "CRLF empty lines": "\r\n\r\n",
    "whitespace-only lines": "  \n\t\n \t \n",
    "spaces without a final newline": "\n   ",
    "100 KiB of empty lines": "\n" * 100_000,
    # Excel's formatted but empty rows below the data (review of issue 12: "empty cell")
    "a line of only commas": "\n" + "," * 81 + "\n",
    "three lines of only commas, CRLF": "\r\n" + ("," * 81 + "\r\n") * 3,
    "commas and spaces, no final newline": "\n , ,,\n,,,",
}


@pytest.mark.parametrize("tail", TAILS.values(), ids=TAILS.keys())
@pytest.mark.parametrize("block_size", [1 << 25, 1 << 12])
def test_trailing_empty_lines_are_not_rows(tmp_path, plain, tail, block_size):
    """What editors and tools leave at the end (before the fix: "empty cell" on the line
    after the last row)."""
    end = "\r\n" if "\r" in tail else "\n"
    path = _write(tmp_path / "train.csv", sample_lines(), end=end, tail=tail)
    _assert_same(read_split(path, cache=False, block_size=block_size), plain)


#: What may follow the last row's last cell (no line end before it) with a lone ``\r`` as
#: the line end: pyarrow ends a line at a lone ``\r``, so what follows is a blank tail.
CR_TAILS = {
    "a lone CR": "\r",
    "a lone CR, then spaces": "\r  ",
    "a lone CR, then a tab and a newline": "\r\t\n",
    "CR, space, LF": "\r \n",
    "CR CR LF": "\r\r\n",
    "CR CR": "\r\r",
    "spaces and CRs": " \r \r",
}


@pytest.mark.parametrize("tail", CR_TAILS.values(), ids=CR_TAILS.keys())
@pytest.mark.parametrize("block_size", [1 << 25, 1 << 10])
def test_a_lone_cr_then_blanks_ends_the_file(tmp_path, plain, tail, block_size):
    """Before the fix ``\\r  `` after the last row was "expected 82 comma-separated cells,
    got 1" without a line number, ``\\r\\r`` "empty cell" on line 102."""
    lines = sample_lines()
    path = tmp_path / "train.csv"
    path.write_bytes(("\n".join(lines) + tail).encode())
    _assert_same(read_split(path, cache=False, block_size=block_size), plain)


def test_header_and_only_empty_lines_has_no_data_rows(tmp_path):
    path = _write(tmp_path / "train.csv", sample_lines()[:1], tail="\n\n  \n")
    with pytest.raises(DataError, match="no data rows") as info:
        read_split(path, cache=False)
    assert info.value.line == 2


def test_a_bad_cell_before_trailing_blank_lines_is_still_found(tmp_path):
    """Locating a bad cell re-reads its column: the blank tail must not break that."""
    lines = sample_lines()
    cells = lines[30].split(",")
    cells[40] = "x1"
    lines[30] = ",".join(cells)
    path = _write(tmp_path / "train.csv", lines, tail="   \n\n")
    with pytest.raises(DataError) as info:
        read_split(path, cache=False)
    assert (info.value.line, info.value.column) == (31, COLUMNS[40])


# ----------------------------------------------------------------------------- empty lines inside

INSIDE = {"empty": "", "spaces": "   ", "a tab": "\t"}


@pytest.mark.parametrize("blank", INSIDE.values(), ids=INSIDE.keys())
@pytest.mark.parametrize("line", [2, 11, 101])
@pytest.mark.parametrize("end", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_empty_line_between_rows_is_named(tmp_path, blank, line, end):
    """One line naming the file and the empty line (editor numbering, header = 1); before
    the fix an empty line was "empty cell" in categorical_1, a line of spaces "expected 82
    comma-separated cells, got 1"."""
    lines = sample_lines()
    lines.insert(line - 1, blank)  # line 101: just before the last row
    path = _write(tmp_path / "train.csv", lines, end=end, tail="\n")
    with pytest.raises(DataError) as info:
        read_split(path, cache_dir=tmp_path / "cache")
    err = info.value
    assert str(err) == (
        f"{path}, line {line}: the line is empty (rows must follow each other; only the end "
        "of the file may have empty lines: delete this one)"
    )
    assert err.line == line and err.column is None and "\n" not in str(err)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_empty_line_deep_in_a_large_file_gets_its_line(tmp_path):
    """In a later range of a file parsed in many ranges (and before trailing blank lines)."""
    generate_dataset(tmp_path / "gen", train_rows=3000, test_rows=10, seed=3)
    path = tmp_path / "gen" / "train.csv"
    lines = path.read_text().splitlines()
    lines.insert(2500, "")  # becomes line 2501
    path.write_text("\n".join(lines) + "\n\n\n")
    with pytest.raises(DataError, match="the line is empty") as info:
        read_split(path, cache=False, block_size=1 << 16)
    assert info.value.line == 2501


COMMAS = {
    "81 commas (a spreadsheet's empty row)": "," * 81,
    "commas and spaces": " ,  ,",
    "one": ",",
}


@pytest.mark.parametrize("blank", COMMAS.values(), ids=COMMAS.keys())
@pytest.mark.parametrize("line", [2, 57])
@pytest.mark.parametrize("end", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_line_of_only_commas_between_rows_is_named(tmp_path, blank, line, end):
    """Before the fix: "column 'categorical_1': empty cell" (81 commas), or "expected 82
    comma-separated cells, got 4" (fewer)."""
    lines = sample_lines()
    lines.insert(line - 1, blank)
    path = _write(tmp_path / "train.csv", lines, end=end)
    with pytest.raises(DataError) as info:
        read_split(path, cache=False, block_size=1 << 12)
    assert str(info.value) == (
        f"{path}, line {line}: the line has no values (only commas) (rows must follow each "
        "other; only the end of the file may have empty lines or lines of only commas: "
        "delete this one)"
    )


# ----------------------------------------------------------------------------- line ends

LINE_END_ERRORS = {
    # Python's csv.writer on Windows into a file opened without newline=''
    "CR CR LF": (
        "\r\r\n",
        "line ends are \\r\\r\\n (a file written by Python's csv module "
        "without newline='') (write it with newline='' or convert it)",
    ),
    # Excel for Mac's "CSV (Macintosh)"
    "lone CR": (
        "\r",
        "line ends are \\r only (old Mac format) (save with \\n or \\r\\n line ends)",
    ),
}


@pytest.mark.parametrize(("end", "message"), LINE_END_ERRORS.values(), ids=LINE_END_ERRORS.keys())
@pytest.mark.parametrize("final", [True, False], ids=["final line end", "none"])
def test_odd_line_ends_are_named_at_line_1(tmp_path, end, message, final):
    """Before the fix: "line 3, column 'categorical_1': empty cell" for CR CR LF (line 3
    holds all 82 cells), and a 361-character header complaint for lone CRs."""
    lines = sample_lines()
    path = tmp_path / "train.csv"
    path.write_bytes((end.join(lines) + (end if final else "")).encode())
    with pytest.raises(DataError) as info:
        read_split(path, cache=False)
    assert str(info.value) == f"{path}, line 1: {message}"


@pytest.mark.parametrize(
    ("end", "what"),
    [
        ("\r\r\n", "\\r\\r\\n (as written by Python's csv module without newline='')"),
        ("\r", "\\r only (old Mac format)"),
    ],
    ids=["CR CR LF", "lone CR"],
)
@pytest.mark.parametrize("line", [2, 40, 100])
@pytest.mark.parametrize("block_size", [1 << 25, 1 << 10])
def test_an_odd_line_end_between_rows_is_named_with_its_line(tmp_path, end, what, line, block_size):
    """One such line end in a file of ``\\n`` (rows pasted from another file): its line, not
    an "empty cell" or a row count that does not match."""
    lines = sample_lines()
    text = "".join(row + (end if k == line else "\n") for k, row in enumerate(lines, 1))
    path = tmp_path / "train.csv"
    path.write_bytes(text.encode())
    with pytest.raises(DataError) as info:
        read_split(path, cache=False, block_size=block_size)
    assert info.value.line == line
    assert info.value.problem == f"the line ends with {what}"


BAD_WITH_CR = {
    "bad cell after a lone CR": lambda L: L[:50] + [L[50].replace(",", ",x", 1)] + L[51:],
    "short row after a lone CR": lambda L: L[:50] + [L[50].rsplit(",", 3)[0]] + L[51:],
    "empty line after a lone CR": lambda L: L[:50] + [""] + L[50:],
    # row 20, a lone CR, spaces, LF: before the fix "expected 82 cells, got 1" and no line
    "spaces between the lone CR and the next LF": lambda L: L[:20] + ["  "] + L[20:],
}


@pytest.mark.parametrize("edit", BAD_WITH_CR.values(), ids=BAD_WITH_CR.keys())
@pytest.mark.parametrize("block_size", [1 << 25, 1 << 10])
def test_every_error_near_a_lone_cr_has_a_line(tmp_path, edit, block_size):
    """pyarrow counts a lone CR as a line end, the reader's line search does not: whatever
    else is wrong, the error names a line (before the fix some had none)."""
    lines = edit(sample_lines())
    path = tmp_path / "train.csv"
    path.write_bytes(("\n".join(lines[:20]) + "\r" + "\n".join(lines[20:]) + "\n").encode())
    with pytest.raises(DataError) as info:
        read_split(path, cache=False, block_size=block_size)
    assert info.value.line is not None, str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- pandas index


def test_pandas_index_column_says_how_to_fix_it(tmp_path, plain):
    """What ``df.to_csv(path)`` writes (an unnamed first column), and what a second
    round-trip through pandas writes (``Unnamed: 0``); ``index=False`` reads as the plain
    file."""
    frame = pd.read_csv(SAMPLE_DIR / "train.csv")
    frame.to_csv(tmp_path / "indexed.csv")
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "indexed.csv", cache=False)
    assert str(info.value) == (
        f"{tmp_path / 'indexed.csv'}, line 1: the first column has no name: a pandas index "
        "column, as DataFrame.to_csv() writes it without index=False (write the file with "
        "df.to_csv(path, index=False), or delete its first column)"
    )
    pd.read_csv(tmp_path / "indexed.csv").to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(DataError, match=r"line 1: the first column is 'Unnamed: 0', before "):
        read_split(tmp_path / "twice.csv", cache=False)
    frame.rename_axis("row").to_csv(tmp_path / "named.csv")
    with pytest.raises(DataError, match=r"first column is 'row', before search_id: a pandas"):
        read_split(tmp_path / "named.csv", cache=False)
    frame.to_csv(tmp_path / "fixed.csv", index=False)
    _assert_same(read_split(tmp_path / "fixed.csv", cache=False), plain)


def _header_case(tmp_path, header: list[str], rows: list[str]) -> DataError:
    path = tmp_path / "train.csv"
    path.write_text("\n".join([",".join(header), *rows]) + "\n")
    with pytest.raises(DataError) as info:
        read_split(path, cache=False)
    assert info.value.line == 1 and "\n" not in str(info.value)
    return info.value


def test_a_first_column_without_its_name_is_not_called_an_index(tmp_path):
    """``,categorical_1,...,conversion``: the 82 columns, the search ids' name missing.
    Before the fix the message said "a pandas index column ... or delete its first column",
    which would delete the search ids."""
    err = _header_case(tmp_path, ["", *COLUMNS[1:]], sample_lines()[1:])
    assert err.problem == "the first column has no name, expected search_id"
    assert err.hint == "name it search_id in the header: its cells are the search ids"
    err = _header_case(tmp_path, ["Unnamed: 0", *COLUMNS[1:]], sample_lines()[1:])
    assert err.problem == "the first column is 'Unnamed: 0', expected search_id"


def test_index_names_only_in_the_header(tmp_path):
    """A header shifted by a name its rows do not have (82 cells): delete the name, not a
    column of the rows."""
    err = _header_case(tmp_path, ["Unnamed: 0", *COLUMNS], sample_lines()[1:])
    assert str(err).endswith(
        "line 1: the header has an extra name before search_id ('Unnamed: 0'), which the "
        "rows lack: they have 82 cells (delete it from the header)"
    )


def test_two_index_columns(tmp_path):
    """``df.set_index([a, b]).to_csv()`` writes two unnamed index columns."""
    rows = [f"{k},{k},{row}" for k, row in enumerate(sample_lines()[1:])]
    err = _header_case(tmp_path, ["", "", *COLUMNS], rows)
    assert err.problem == (
        "the first 2 columns come before search_id: pandas index columns, as "
        "DataFrame.to_csv() writes them without index=False"
    )
    assert (
        err.hint
        == "write the file with df.to_csv(path, index=False), or delete its first 2 columns"
    )


def test_an_unnamed_last_column(tmp_path):
    """A comma at the end of every line: an 83rd, unnamed column. Named in the header;
    where only the rows have it, the width error says what the extra cell is."""
    rows = [row + "," for row in sample_lines()[1:]]
    err = _header_case(tmp_path, [*COLUMNS, ""], rows)
    assert str(err).endswith(
        "line 1: the header has an unnamed column after conversion (remove that column: a "
        "comma at the end of every line, or one a tool added)"
    )
    path = _write(tmp_path / "rows.csv", [",".join(COLUMNS), *rows])
    with pytest.raises(DataError) as info:
        read_split(path, cache=False)
    assert str(info.value) == (
        f"{path}, line 2: expected 82 comma-separated cells, got 83 (the line ends with a "
        "comma, an empty column after conversion: remove it)"
    )


# ----------------------------------------------------------------------------- pinned shapes


def _cells(edit):
    def apply(lines: list[str]) -> list[str]:
        out = [lines[0]]
        for line in lines[1:]:
            cells = line.split(",")
            edit(cells)
            out.append(",".join(cells))
        return out

    return apply


def _quote_all(lines: list[str]) -> list[str]:
    return [",".join(f'"{c}"' for c in line.split(",")) for line in lines]


def _scientific(cells: list[str]) -> None:
    cells[NUM] = [f"{float(c):.16e}" for c in cells[NUM]]


def _float_labels(cells: list[str]) -> None:
    cells[-2:] = [f"{c}.0" for c in cells[-2:]]


ACCEPTED = {
    "CRLF": (lambda L: L, {"end": "\r\n"}),
    "UTF-8 BOM": (lambda L: L, {"bom": True}),
    "BOM, CRLF, no final newline": (lambda L: L[:-1], {"end": "\r\n", "bom": True}),
    "quoted numbers": (_quote_all, {}),
    "scientific notation": (_cells(_scientific), {}),
    "labels 1.0 and 0.0": (_cells(_float_labels), {}),
}


@pytest.mark.parametrize(("edit", "how"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_shape_reads_as_the_plain_file(tmp_path, plain, edit, how):
    lines = edit(sample_lines())
    path = tmp_path / "train.csv"
    if lines[-1:] == sample_lines()[-2:-1]:  # "no final newline": the last row written bare
        lines = [*lines, sample_lines()[-1]]
        text = ("\ufeff" if how.get("bom") else "") + how.get("end", "\n").join(lines)
        path.write_bytes(text.encode())
    else:
        _write(path, lines, **how)
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") == bool(how.get("bom"))
    _assert_same(read_split(path, cache=False), plain)

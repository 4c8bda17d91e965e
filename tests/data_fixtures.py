"""Helpers shared by the data tests: the real sample rows and small file surgery."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SAMPLE_DIR = Path(__file__).parent / "data" / "aliexpress_sample"


def sample_lines(name: str = "train.csv") -> list[str]:
    """The lines of a real sample file, without line endings."""
    return (SAMPLE_DIR / name).read_text().splitlines()


def set_cell(lines: list[str], line: int, column: int, value: str) -> None:
    """Set the cell at editor ``line`` (1-based) and 0-based ``column`` of a CSV in place."""
    cells = lines[line - 1].split(",")
    cells[column] = value
    lines[line - 1] = ",".join(cells)


def write_variant(
    folder: Path, edit: Callable[[list[str]], object], name: str = "train.csv"
) -> Path:
    """A copy of the real train sample with ``edit`` applied to its lines."""
    lines = sample_lines()
    edit(lines)
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines))
    return path

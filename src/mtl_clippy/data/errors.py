"""The one exception type for bad input data, carrying where the problem is."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A user's data file is malformed; the message says what, where, and what to do.

    ``line`` is numbered as an editor shows it (the header is line 1) and ``column`` is the
    column's name, so that a user can open the file at the right place. Either may be ``None``
    when the problem concerns the whole file (for example an empty file).
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        line: int | None = None,
        column: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.problem = problem
        self.line = line
        self.column = column
        self.hint = hint
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        message = f"{where}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

"""Every exception cnidose raises, in one tree.

::

    CnidoseError
    ├── InputError            bad input from a user: exit code 2 in the CLI
    │   ├── DataError         a data set record/field is wrong (names row and column)
    │   └── ModelFileError    a model file is malformed (names file and field)
    │       └── ExpressionError   an expression in a model file does not parse
    └── NumericalError        a solver failed; the message says what to try

The CLI maps the tree to exit codes in one place (:mod:`cnidose.cli`); later
the web layer maps it to HTTP codes in one handler.
"""

from __future__ import annotations

__all__ = [
    "CnidoseError",
    "DataError",
    "ExpressionError",
    "InputError",
    "ModelFileError",
    "NumericalError",
]


class CnidoseError(Exception):
    """Base of every error raised on purpose by cnidose."""


class InputError(CnidoseError):
    """Input supplied by the user cannot be used as it is."""


class DataError(InputError):
    """A record of a data set is invalid.

    Parameters
    ----------
    message : str
        What is wrong and what was expected.
    row : int or None
        1-based line number in the source file (header is line 1), or the
        1-based record number where no file is involved.
    column : str or None
        Name of the offending column (data item or model parameter).
    """

    def __init__(self, message: str, *, row: int | None = None, column: str | None = None):
        self.row = row
        self.column = column
        self.detail = message
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelFileError(InputError):
    """A model file (or model definition) is malformed.

    Parameters
    ----------
    message : str
        What is wrong.
    source : str or None
        File path or library id.
    field : str or None
        Dotted path of the offending field, e.g. ``pk.CL``.
    line : int or None
        1-based line of the field in the file, where it can be located.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None,
                 line: int | None = None):
        self.source = source
        self.field = field
        self.line = line
        self.detail = message
        loc = f"{source}:{line}" if source and line else source
        where = " ".join(p for p in (loc, f"[{field}]" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class ExpressionError(ModelFileError):
    """An expression of the model language does not parse or uses a forbidden construct."""


class NumericalError(CnidoseError):
    """A numerical method failed; the message carries a remedy."""

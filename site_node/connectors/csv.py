"""The CSV connector: a hospital's extract, read once at start."""

from __future__ import annotations

import math

import pandas as pd

from protocol.config import DataSource
from protocol.errors import ConfigError


def read_csv(source: DataSource) -> pd.DataFrame:
    """Read the file a site's ``data`` section points at (header or given column names)."""
    try:
        frame = pd.read_csv(
            source.path,
            header=0 if source.header else None,
            names=source.column_names,
            na_values=source.na_values or None,
            low_memory=False,
        )
    except FileNotFoundError:
        raise ConfigError(f"data.path: {str(source.path)!r}: file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"data.path: {str(source.path)!r}: not a readable CSV ({first})"
        ) from None
    frame = frame.drop(columns=[c for c in source.drop if c in frame.columns])
    return numeric_missing(frame, source.na_values)


def numeric_na_values(na_values: list[str]) -> list[float]:
    """The ``na_values`` entries that are numbers (finite or infinite, never NaN)."""
    numbers = []
    for value in na_values:
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isnan(number):
            numbers.append(number)
    return numbers


def numeric_missing(frame: pd.DataFrame, na_values: list[str]) -> pd.DataFrame:
    """A number equal to a numeric ``na_values`` entry is missing however it is spelled.

    pandas does this by itself in a column it parses as numbers; in a column that also holds
    text it matches only the spellings it knows ('-9', '-9.0'), so '-09' or '+-9e0' would
    survive as -9 once ``harmonize.conform`` coerces the column. The pushdown CSV reader
    applies the same rule in SQL, so both paths read a file the same way.
    """
    numbers = numeric_na_values(na_values)
    if not numbers:
        return frame
    out = frame.copy()
    for name in out.columns:
        if out[name].dtype == object or pd.api.types.is_string_dtype(out[name]):
            coded = pd.to_numeric(out[name], errors="coerce").isin(numbers)
            if coded.any():
                out[name] = out[name].mask(coded)
    return out

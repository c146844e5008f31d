"""The site's row restriction (``data.where``): checked against the source's columns, compiled
to SQL with bound parameters where the source runs SQL, else applied right after reading."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from protocol.config import DataSource
from protocol.errors import ConfigError, FilterError
from protocol.filters import RowFilter, parse_filter


def row_filter(source: DataSource, columns: Iterable[str]) -> RowFilter | None:
    """``data.where`` parsed against the source's columns, or None.

    Raises:
        ConfigError: it reads a column the source does not have, or is not a filter.
    """
    if source.where is None:
        return None
    try:
        return parse_filter(source.where, {str(c) for c in columns})
    except FilterError as exc:
        raise ConfigError(f"data.where: {exc}") from None


def apply_where(source: DataSource, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` that pass ``data.where`` (read-then-filter sources)."""
    rule = row_filter(source, frame.columns)
    if rule is None:
        return frame
    numbers = {
        name: pd.to_numeric(frame[name], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        for name in rule.variables
    }
    return frame.loc[rule.mask(numbers, len(frame))].reset_index(drop=True)

"""The CSV connector: a hospital's extract, read once at start."""

from __future__ import annotations

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
    return frame.drop(columns=[c for c in source.drop if c in frame.columns])

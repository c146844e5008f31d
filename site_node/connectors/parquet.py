"""The Parquet connector: DuckDB scans the file in place and reads only the needed columns."""

from __future__ import annotations

from collections.abc import Set

import pandas as pd

from protocol.config import DataSource
from protocol.errors import ConfigError


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def read_parquet(source: DataSource, columns: Set[str] | None = None) -> pd.DataFrame:
    """Read a Parquet file (or a glob of them): the needed columns only.

    Raises:
        ConfigError: the file is missing or not Parquet.
    """
    import duckdb

    assert source.path is not None
    where = f"data.path: {str(source.path)!r}"
    if not any(ch in str(source.path) for ch in "*?[") and not source.path.exists():
        raise ConfigError(f"{where}: file not found")
    con = duckdb.connect(":memory:")
    try:
        # The path is a bound parameter: file names never become SQL text.
        scan = "read_parquet($path)"
        try:
            present = [
                row[0]
                for row in con.execute(
                    f"DESCRIBE SELECT * FROM {scan}", {"path": str(source.path)}
                ).fetchall()
            ]
        except duckdb.Error as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{where}: not a readable Parquet file ({first})") from None
        keep = [c for c in present if (columns is None or c in columns) and c not in source.drop]
        listed = ", ".join(_quoted(c) for c in keep) or "NULL AS _none"
        frame = con.execute(f"SELECT {listed} FROM {scan}", {"path": str(source.path)}).df()
    finally:
        con.close()
    return frame if keep else frame.iloc[:, :0]

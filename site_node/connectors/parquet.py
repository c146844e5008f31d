"""The Parquet connector: DuckDB scans the file in place, reading only the needed columns and
only the rows ``data.where`` lets through (compiled to SQL with bound parameters)."""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING, Any

import pandas as pd

from protocol.config import DataSource
from protocol.errors import ConfigError
from protocol.filters import to_sql
from site_node.connectors.rows import row_filter

if TYPE_CHECKING:
    import duckdb

VIEW = "source_rows"


def open_parquet_relation(
    source: DataSource, *, row_order: bool = False
) -> tuple[duckdb.DuckDBPyConnection, duckdb.DuckDBPyRelation]:
    """Open the Parquet file (or glob of them) at ``source.path`` in a new in-memory DuckDB.

    The path goes through DuckDB's API, never into SQL text. A path with glob characters
    (``*``, ``?``, ``[``) is not checked for existence here; DuckDB reports a glob that
    matches nothing.

    Args:
        source: The data source; its ``path`` must be set.
        row_order: Also give the relation DuckDB's ``file_row_number`` and ``filename``
            columns, which give the rows a fixed order.

    Returns:
        The new connection and the relation over the file(s). The caller closes the
        connection; on an error it is closed here.

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
        if row_order:
            relation = con.read_parquet(str(source.path), file_row_number=True, filename=True)
        else:
            relation = con.read_parquet(str(source.path))
    except duckdb.Error as exc:
        con.close()
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not a readable Parquet file ({first})") from None
    except BaseException:
        con.close()
        raise
    return con, relation


def read_parquet(source: DataSource, columns: Set[str] | None = None) -> pd.DataFrame:
    """Read a Parquet file (or a glob of them): the needed columns and rows only.

    Raises:
        ConfigError: the file is missing or not Parquet, or ``data.where`` names a column the
            file does not have.
    """
    import sqlalchemy as sa
    from sqlalchemy.dialects import sqlite

    # file_row_number and filename give the rows a fixed order: the differencing guard knows
    # records by their position, so it must not change between starts.
    con, relation = open_parquet_relation(source, row_order=True)
    try:
        relation.create_view(VIEW)
        present = [str(c) for c in relation.columns if c not in ("file_row_number", "filename")]
        order: list[Any] = [sa.column("filename"), sa.column("file_row_number")]
        keep = [c for c in present if (columns is None or c in columns) and c not in source.drop]
        table = sa.table(VIEW, *(sa.column(c) for c in present))
        query = sa.select(*(table.c[c] for c in keep) if keep else [sa.literal(1)])
        query = query.select_from(table).order_by(*order)
        rule = row_filter(source, present)
        if rule is not None:
            query = query.where(to_sql(rule, lambda name: table.c[name]))
        # DuckDB reads SQLite's SQL for a plain select: double-quoted names, `?` parameters.
        compiled = query.compile(
            dialect=sqlite.dialect(), compile_kwargs={"render_postcompile": True}
        )
        parameters = [compiled.params[name] for name in compiled.positiontup or []]
        frame = con.execute(str(compiled), parameters).df()
    finally:
        con.close()
    return frame if keep else frame.iloc[:, :0]

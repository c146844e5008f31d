"""Connectors: read a hospital's records, read only, into a DataFrame.

``csv`` reads a file with pandas; ``parquet`` scans a file with DuckDB (embedded, no server);
``omop`` builds one row per person from an OMOP CDM database (``connectors/omop.py``);
``sql`` reads a table through SQLAlchemy in a read-only session (PostgreSQL, SQLite, MySQL and
MariaDB are made read-only by the connector; for any other dialect the site's database user
must be read-only, and the site says so when it starts). ``columns`` limits what is read to
the columns the site needs (the dictionary's and the mapping's), where the source can project.
"""

from __future__ import annotations

from collections.abc import Set

import pandas as pd

from protocol.config import DataSource
from site_node.connectors.csv import read_csv
from site_node.connectors.omop import read_omop
from site_node.connectors.parquet import read_parquet
from site_node.connectors.rows import apply_where
from site_node.connectors.sql import read_sql, reading


def load(source: DataSource, columns: Set[str] | None = None) -> pd.DataFrame:
    """Read the records a site's ``data`` section describes (only ``columns``, where given)."""
    if source.connector == "parquet":
        return read_parquet(source, columns)  # data.where runs in DuckDB
    if source.connector == "sql":
        return read_sql(source, columns)  # data.where runs in the database
    if source.connector == "omop":
        return apply_where(source, read_omop(source, columns))
    return apply_where(source, read_csv(source))


def source_columns(source: DataSource) -> list[str] | None:
    """The columns a parquet or sql source holds (None for csv and omop, which are read whole),
    so that ``alliance site check`` can name those it does not read."""
    if source.connector == "parquet":
        import duckdb

        con = duckdb.connect(":memory:")
        try:
            return [str(c) for c in con.read_parquet(str(source.path)).columns]
        finally:
            con.close()
    if source.connector == "sql":
        import sqlalchemy as sa

        with reading(source.url or "", f"table {source.table!r}") as connection:
            names = sa.inspect(connection).get_columns(source.table, schema=source.db_schema)
        return [str(c["name"]) for c in names]
    return None

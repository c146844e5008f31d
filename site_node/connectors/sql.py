"""The SQL connector: a table through SQLAlchemy, in a session that cannot write; only the
needed columns, and only the rows ``data.where`` lets through (run in the database)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Set
from contextlib import contextmanager
from typing import Any

import pandas as pd

from protocol.config import DataSource
from protocol.errors import ConfigError
from protocol.filters import to_sql
from site_node.connectors.rows import row_filter

log = logging.getLogger("alliance.site")

#: dialects whose sessions the connector itself makes read-only
READ_ONLY_DIALECTS = ("postgresql", "sqlite", "mysql", "mariadb")


def shown_url(url: Any) -> str:
    """A URL as it may be printed: the password hidden."""
    return str(url.render_as_string(hide_password=True))


def read_only_engine(url_text: str) -> Any:
    """An engine whose every connection refuses to write.

    PostgreSQL: ``default_transaction_read_only``; SQLite: the file opened in mode ``ro``;
    MySQL and MariaDB: ``SET SESSION TRANSACTION READ ONLY`` on connect. Other dialects get a
    warning: their database user must be read-only.

    Raises:
        ConfigError: the URL cannot be parsed or names no installed driver.
    """
    import sqlalchemy as sa

    try:
        url = sa.engine.make_url(url_text)
    except sa.exc.ArgumentError:
        raise ConfigError(
            "data.url: not a SQLAlchemy URL (dialect+driver://user@host/db)"
        ) from None
    dialect = url.get_backend_name()
    kwargs: dict[str, Any] = {}
    if dialect == "postgresql":
        kwargs["connect_args"] = {"options": "-c default_transaction_read_only=on"}
    elif dialect == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:"):
            raise ConfigError("data.url: a sqlite source needs a database file")
        url = url.set(database=f"file:{database}?mode=ro", query={"uri": "true"})
    try:
        engine = sa.create_engine(url, **kwargs)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"data.url: {shown_url(url)}: no driver for it is installed ({exc})"
        ) from None
    if dialect in ("mysql", "mariadb"):

        @sa.event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION TRANSACTION READ ONLY")
            cursor.close()

    elif dialect not in READ_ONLY_DIALECTS:
        log.warning(
            "the %s connector cannot make its session read-only; give this site a database "
            "user that can only read",
            dialect,
        )
    return engine


@contextmanager
def reading(url: str, what: str, no_table: str = "no such table") -> Iterator[Any]:
    """A read-only connection to ``url``; a missing table or any SQLAlchemy error becomes one
    ConfigError naming ``what`` and the database with its password hidden. ``no_table`` may
    hold ``{table}``."""
    import sqlalchemy as sa

    engine = read_only_engine(url)
    where = f"data: {what} at {shown_url(sa.engine.make_url(url))}"
    try:
        with engine.connect() as connection:
            yield connection
    except sa.exc.NoSuchTableError as exc:
        raise ConfigError(f"{where}: {no_table.format(table=exc.args[0])}") from None
    except sa.exc.SQLAlchemyError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: cannot be read ({type(exc).__name__}: {first})") from None
    finally:
        engine.dispose()


def _row_order(source: DataSource, table: Any) -> list[Any]:
    """The columns that fix the rows' order: ``data.order_by``, else the primary key. The
    differencing guard knows records by their position, so it must not change between starts;
    without either, the site warns that the database does not promise an order."""
    names = source.order_by or [c.name for c in table.primary_key.columns]
    missing = sorted(set(names) - set(table.columns.keys()))
    if missing:
        raise ConfigError(f"data.order_by: {missing} are not columns of {source.table!r}")
    if not names:
        log.warning(
            "table %r has no primary key and data.order_by is not set: its rows come in the "
            "order the database chooses, which may change, and sdc's differencing guard knows "
            "records by their position; set data.order_by to a unique column",
            source.table,
        )
    return [table.c[name] for name in names]


def _copy_out(connection: Any, query: Any, keep: list[Any]) -> pd.DataFrame:
    """PostgreSQL through psycopg: the query's rows as CSV from ``COPY ... TO STDOUT``, parsed
    by pandas (7 times faster than fetching row objects at 200,000 rows). The query's numbers
    stay parameters: psycopg binds them; nothing is pasted into the text here."""
    import sqlalchemy as sa

    compiled = query.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    statement = f"COPY ({compiled.string}) TO STDOUT WITH (FORMAT CSV, HEADER)"
    # Spooled to a temporary file past 64 MiB: the CSV text and the parsed frame are then not
    # both in memory.
    with tempfile.SpooledTemporaryFile(max_size=64 * 2**20) as buffer:
        cursor = connection.connection.driver_connection.cursor()
        try:
            with cursor.copy(statement, compiled.params or None) as copy:
                for block in copy:
                    buffer.write(block)
        finally:
            cursor.close()
        buffer.seek(0)
        frame = pd.read_csv(buffer, keep_default_na=False, na_values=[""], low_memory=False)
    for column in keep:
        if isinstance(column.type, sa.Boolean):  # CSV writes t / f
            frame[column.name] = frame[column.name].map({"t": 1.0, "f": 0.0})
    return frame


def read_sql(source: DataSource, columns: Set[str] | None = None) -> pd.DataFrame:
    """Read the table a site's ``data`` section names: the needed columns only, read only.

    Raises:
        ConfigError: the database or table cannot be read (the URL shown without password).
    """
    import sqlalchemy as sa

    assert source.url is not None and source.table is not None
    with reading(source.url, f"table {source.table!r}") as connection:
        table = sa.Table(
            source.table, sa.MetaData(), schema=source.db_schema, autoload_with=connection
        )
        keep = [
            c
            for c in table.columns
            if (columns is None or c.name in columns) and c.name not in source.drop
        ]
        query = sa.select(*keep) if keep else sa.select(sa.literal(1))
        query = query.select_from(table).order_by(*_row_order(source, table))
        rule = row_filter(source, table.columns.keys())
        if rule is not None:  # run in the database, every number a bound parameter
            query = query.where(to_sql(rule, lambda name: table.c[name]))
        names = [c.name for c in keep] or ["_none"]
        if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
            frame = _copy_out(connection, query, keep)
        else:
            frame = pd.DataFrame(connection.execute(query).fetchall(), columns=names)
    return frame if keep else frame.iloc[:, :0]

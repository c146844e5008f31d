"""Aggregates computed where the data lives: a Parquet file through DuckDB, a SQL table through
SQLAlchemy (``data.pushdown: true``).

A pushdown site does not read its records at start. Each dictionary variable becomes a SQL
expression over the source's columns that conforms it exactly as ``harmonize.conform`` does in
memory: renamed, cast to a double, NULL where missing (SQL NULL or a float NaN) or outside the
dictionary's bounds or levels; ``data.derive`` variables are compiled from the filter
language. ``data.where`` and the task's filter run in the same query, every number a bound
parameter, and sessions are read-only (``connectors.sql.read_only_engine``; DuckDB reads a
file). An analysis's :class:`analyses.pushdown.Pushdown` then runs as aggregate queries, so only
sums and counts leave the source and the site's memory stays flat in the number of rows.

What is not pushed down is computed in memory, from the site's dictionary columns read once on
first need (as a site without pushdown reads them at start): sdc releases (the differencing
guard and the dominance rule need the records), analyses without a pushdown (quantiles, the
other tests and models, scripts, the quality profile), queries wider than
``analyses.pushdown.MAX_COLUMNS``, variables held in a column that is not numeric. A
configuration that cannot be pushed down at all (a consent source, a mapping file, several
rows per patient kept as first or last) is loaded at start, with the reason in the log and in
``alliance site check``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from analyses import get_analysis, registered_analyses
from analyses.base import Analysis
from analyses.pushdown import AggregateQuery, Pushdown, Rows
from protocol.config import DataDictionary, NumericVariable, SiteConfig
from protocol.errors import ConfigError
from protocol.filters import RowFilter, parse_filter, to_sql
from site_node.connectors.csv import numeric_na_values
from site_node.connectors.parquet import open_parquet_relation
from site_node.connectors.rows import row_filter as source_row_filter
from site_node.connectors.sql import read_only_engine, shown_url

log = logging.getLogger("alliance.site")

VIEW = "source_rows"


def why_not_pushdown(config: SiteConfig) -> str | None:
    """Why this site's configuration cannot be pushed down at all (None: it can)."""
    if config.consent is not None:
        return (
            "a consent source is configured, and consent is applied by patient id to records "
            "in memory"
        )
    if config.data.mapping is not None:
        return "a mapping file is configured, and mappings are applied to records in memory"
    return None


def pushdown_analyses() -> list[str]:
    """The registered analyses that can compute in the source (they define ``pushdown``)."""
    return [
        name
        for name in registered_analyses()
        if type(get_analysis(name)).pushdown is not Analysis.pushdown
    ]


@dataclass
class _Column:
    """A source column as a dictionary variable reads it."""

    raw: Any  # the value as a double, NULL where missing
    numeric: bool  # the source holds numbers (else: not pushed down)


def pushdown_lines(config: SiteConfig, dictionary: DataDictionary) -> list[str]:
    """What ``alliance site check`` says about pushdown for this site.

    Raises:
        ConfigError: the source cannot be opened.
    """
    if not config.data.pushdown:
        if config.data.connector in ("csv", "parquet", "sql"):
            return [
                "pushdown: off: the records are read into memory at start (data.pushdown: "
                "true computes dp aggregates in the source)"
            ]
        return []
    reason = why_not_pushdown(config)
    if reason is None:
        source = PushdownSource.open(config, dictionary)
        try:
            if source.duplicate_patients and config.data.duplicate_patients != "refuse":
                reason = (
                    "several rows share a patient id and data.duplicate_patients keeps one "
                    "row per patient in memory"
                )
            else:
                held = set(dictionary.variables) - source.unmapped
                names = pushdown_analyses()
                listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
                lines = [
                    f"pushdown: on: dp {listed} run in "
                    f"{source.describe}; {len(source.pushable)} of {len(held)} held variables "
                    "can be computed there; everything else reads the dictionary's columns "
                    "once, on first need"
                ]
                other = sorted(held - source.pushable)
                if other:
                    lines.append(
                        f"pushdown: not numeric in the source, so computed in memory: "
                        f"{', '.join(other)}"
                    )
                return lines
        finally:
            source.close()
    return [f"pushdown: not used: {reason}; the records are read into memory at start"]


@dataclass(frozen=True)
class _Connection:
    """An open source: its table, how to run a query on it, how to close it."""

    describe: str
    table: Any
    run_query: Callable[[Any], Rows]
    close: Callable[[], None]
    source_columns: list[str]
    dialect: str


@dataclass
class PushdownSource:
    """A site's records in place, queried for aggregates only."""

    config: SiteConfig
    dictionary: DataDictionary
    connection: _Connection
    conformed: dict[str, Any] = field(default_factory=dict)
    pushable: frozenset[str] = frozenset()
    unmapped: frozenset[str] = frozenset()
    rows: int = 0
    duplicate_patients: bool = False
    _usable: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, config: SiteConfig, dictionary: DataDictionary) -> PushdownSource:
        """Connect (read-only), conform every dictionary variable in SQL, count the rows and
        check patient ids.

        Raises:
            ConfigError: the source cannot be read, or a patient id is missing.
        """
        source = config.data
        if source.connector == "parquet":
            made = _duckdb_parquet(config)
        elif source.connector == "csv":
            made = _duckdb_csv(config, dictionary)
        elif source.connector == "sql":
            made = _sqlalchemy_table(config)
        else:  # the config model allows pushdown on csv, parquet and sql only
            raise ConfigError(f"data.pushdown: not available for connector {source.connector!r}")
        pushdown = cls(config, dictionary, made)
        try:
            pushdown._conform()
            pushdown._count()
        except BaseException:
            pushdown.close()
            raise
        return pushdown

    @property
    def table(self) -> Any:
        return self.connection.table

    @property
    def source_columns(self) -> list[str]:
        return self.connection.source_columns

    @property
    def describe(self) -> str:
        return self.connection.describe

    def run_query(self, query: Any) -> Rows:
        """One query's rows."""
        return self.connection.run_query(query)

    def close(self) -> None:
        """Close the connection (DuckDB) or the engine's pool (SQL)."""
        self.connection.close()

    def _raw_columns(self) -> dict[str, _Column]:
        """Each dictionary variable's source column (after ``rename``), as a double."""
        import sqlalchemy as sa

        renamed = {
            self.config.data.rename.get(name, name): name
            for name in self.source_columns
            if name not in self.config.data.drop
        }
        out: dict[str, _Column] = {}
        for dictionary_name, local in renamed.items():
            if dictionary_name not in self.dictionary.variables:
                continue
            column = self.table.c[local]
            kind = column.type
            if isinstance(kind, sa.Boolean):
                value = sa.case((column.is_(True), 1.0), (column.is_(False), 0.0))
                out[dictionary_name] = _Column(value, True)
            elif isinstance(kind, (sa.Integer, sa.Numeric, sa.Float)):
                # A float NaN is a value to SQL (above every number in PostgreSQL and DuckDB;
                # NULL in SQLite): the bounds and levels checks of _conform make it NULL.
                out[dictionary_name] = _Column(column, True)
            else:
                out[dictionary_name] = _Column(sa.null(), False)
        return out

    def _conform(self) -> None:
        """Every dictionary variable as a conformed SQL expression (``harmonize.conform``)."""
        import sqlalchemy as sa

        raw = self._raw_columns()
        for name, expression in self.config.data.derive.items():
            self.dictionary.variable(name)
            rule = parse_filter(expression, set(raw))
            inputs = [raw[n] for n in rule.variables]
            # Missing inputs make the derived value missing; a NaN equals NaN in PostgreSQL
            # and DuckDB (and is NULL in SQLite), so it is caught by the second test.
            nan = sa.bindparam(None, float("nan"), type_=sa.Double)
            present = sa.and_(*(sa.and_(c.raw.is_not(None), sa.not_(c.raw == nan)) for c in inputs))
            value = sa.case(
                (sa.not_(present), None),
                (to_sql(rule, lambda n: raw[n].raw), 1.0),
                else_=0.0,
            )
            raw[name] = _Column(value, all(c.numeric for c in inputs))
        pushable = set()
        for name, variable in self.dictionary.variables.items():
            found = raw.get(name)
            if found is None:
                self.conformed[name] = sa.null()
                continue
            value = found.raw
            if isinstance(variable, NumericVariable):
                allowed = sa.and_(
                    value >= sa.bindparam(None, float(variable.min), type_=sa.Double),
                    value <= sa.bindparam(None, float(variable.max), type_=sa.Double),
                )
            else:
                levels = [float(v) for v in variable.levels]
                allowed = value.in_(sa.bindparam(None, levels, expanding=True, type_=sa.Double))
            # Cast once, where the value is kept: integer sums would otherwise be exact
            # numerics (slow), and a NaN has failed the check above.
            self.conformed[name] = sa.case((allowed, sa.cast(value, sa.Double)), else_=None)
            if found.numeric:
                pushable.add(name)
        self.pushable = frozenset(pushable)
        self.unmapped = frozenset(set(self.dictionary.variables) - set(raw))

    def _count(self) -> None:
        """The rows the site exposes, and whether a patient id repeats (or is missing)."""
        import sqlalchemy as sa

        aggregates = [sa.func.count()]
        id_name = self.dictionary.patient_id
        if id_name is not None:
            local = {self.config.data.rename.get(c, c): c for c in self.source_columns}
            if id_name not in local:
                raise ConfigError(
                    f"the data has no patient id column {id_name!r} (the dictionary's "
                    f"patient_id); its columns: {', '.join(self.source_columns)}"
                )
            ids = sa.func.trim(sa.cast(self.table.c[local[id_name]], sa.String))
            aggregates += [sa.func.count(ids), sa.func.count(sa.distinct(ids))]
        row = self.run_query(self._where(sa.select(*aggregates).select_from(self.table), None))[0]
        self.rows = int(row[0])
        if id_name is not None:
            if int(row[1]) < self.rows:
                raise ConfigError(
                    f"patient id column {id_name!r} has missing ids; every record needs one"
                )
            self.duplicate_patients = int(row[2]) < self.rows

    def _where(self, query: Any, task_filter: RowFilter | None) -> Any:
        """``query`` restricted to ``data.where``'s rows and the task filter's."""
        rule = source_row_filter(self.config.data, self.source_columns)
        if rule is not None:
            query = query.where(to_sql(rule, lambda name: self.table.c[name]))
        if task_filter is not None:
            query = query.where(to_sql(task_filter, self.column))
        return query

    # ------------------------------------------------------------------ serving
    def column(self, name: str) -> Any:
        """A dictionary variable, conformed (double, NULL when missing or not allowed)."""
        return self.conformed[name]

    def serves(self, variables: Iterable[str]) -> bool:
        """Whether every variable is held in a column the source can compute on."""
        return all(name in self.pushable for name in variables)

    def run(self, plan: Pushdown, task_filter: RowFilter | None) -> Any:
        """The plan's arrays, computed by the source over the task's rows."""
        return plan.finish([self.run_query(self.compile(q, task_filter)) for q in plan.queries])

    def compile(self, query: AggregateQuery, task_filter: RowFilter | None) -> Any:
        """One aggregate query as a SELECT over the source (stages as nested subqueries)."""
        import sqlalchemy as sa

        stages = [dict(stage) for stage in query.stages]
        keys: list[Any] = [sa.column(f"_k{i}") for i in range(len(query.keys))]
        if query.keys:  # grouped: the keys computed once, so GROUP BY names what is selected
            stages.append({f"_k{i}": key for i, key in enumerate(query.keys)})
        labelled = [value.label(label) for label, value in query.aggregates.items()]
        if not stages:
            select = sa.select(*labelled).select_from(self.table)
            return self._where(select, task_filter).where(*query.where)
        first = sa.select(*(value.label(n) for n, value in stages[0].items()))
        inner = self._where(first.select_from(self.table), task_filter).where(*query.where)
        names = list(stages[0])
        for number, stage in enumerate(stages[1:]):
            previous = self._fence(inner, query).subquery(f"stage{number}")
            carried = [previous.c[n] for n in names]
            inner = sa.select(*carried, *(v.label(n) for n, v in stage.items())).select_from(
                previous
            )
            names += list(stage)
        rows = self._fence(inner, query).subquery("rows")
        final = sa.select(*keys, *labelled).select_from(rows)
        return final.group_by(*keys) if keys else final

    def _fence(self, select: Any, query: AggregateQuery) -> Any:
        """PostgreSQL flattens subqueries and would repeat a stage's expression in every
        aggregate that reads it (a GLM round at 1M rows: 359 s instead of 1.6 s). It does not
        flatten a subquery whose select list calls a volatile function, so each stage selects
        ``clock_timestamp()`` (volatile, parallel safe, never read) and is computed once per
        row. ``OFFSET 0`` fences too, but forces a serial plan: measured 3.3 s against 2.6 s
        for the GLM round of ``simulations.bench_pushdown`` at 2M rows on 2 cores."""
        if self.connection.dialect == "postgresql" and query.stages:
            import sqlalchemy as sa

            return select.add_columns(sa.func.clock_timestamp().label("_fence"))
        return select

    def usable_share(self, variable: str) -> float:
        """``harmonize.usable_share`` in the source: allowed and plausible values over rows."""
        import sqlalchemy as sa

        with self._lock:
            found = self._usable.get(variable)
        if found is not None:
            return found
        value = self.column(variable)
        good = value.is_not(None)
        var = self.dictionary.variable(variable)
        if isinstance(var, NumericVariable) and var.plausible is not None:
            low, high = (sa.bindparam(None, float(v), type_=sa.Double) for v in var.plausible)
            good = sa.and_(good, value >= low, value <= high)
        query = self._where(sa.select(sa.func.count()).select_from(self.table).where(good), None)
        count = int(self.run_query(query)[0][0])
        share = count / self.rows if self.rows else 0.0
        with self._lock:
            self._usable[variable] = share
        return share


#: pandas.read_csv's default missing-value strings (its documentation lists them; a test
#: checks this copy against pandas): a csv site reads them as missing in DuckDB too.
PANDAS_NA_STRINGS = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
)  # fmt: skip


def _duckdb_parquet(config: SiteConfig) -> _Connection:
    """A DuckDB view over the Parquet file(s), and how to run a query on it."""
    import sqlalchemy as sa

    source = config.data
    con, relation = open_parquet_relation(source)  # the path never enters SQL text
    where = f"data.path: {str(source.path)!r}"
    relation.create_view(VIEW)
    names = [str(c) for c in relation.columns]
    types = [_duck_type(str(t)) for t in relation.types]
    table = sa.table(VIEW, *(sa.column(n, t) for n, t in zip(names, types, strict=True)))
    return _duckdb_connection(con, table, names, where, f"Parquet {source.path}")


def _duckdb_csv(config: SiteConfig, dictionary: DataDictionary) -> _Connection:
    """The CSV file scanned in place by DuckDB, each value read as the csv connector reads it.

    Every column is read as text. A value is missing when it is one of pandas' missing-value
    strings or a ``na_values`` entry, or when it is a number equal to a numeric ``na_values``
    entry however spelled ('-9.0', '-09', '-9e0'; ``read_csv.numeric_missing`` does the same
    in memory). Otherwise it is parsed as a number where it is one (``TRY_CAST``, as
    ``harmonize.conform`` coerces per value, with digit separators such as '1_000' refused as
    pandas refuses them), except the patient id, which stays text.
    """
    import duckdb
    import sqlalchemy as sa

    source = config.data
    assert source.path is not None
    where = f"data.path: {str(source.path)!r}"
    if not source.path.exists():
        raise ConfigError(f"{where}: file not found")
    con = duckdb.connect(":memory:")
    try:
        relation = con.read_csv(  # the path never enters SQL text
            str(source.path),
            header=source.header,
            names=source.column_names,
            sep=",",
            quotechar='"',
            all_varchar=True,
        )
        names = [str(c) for c in relation.columns]
    except duckdb.Error as exc:
        con.close()
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not a readable CSV ({first})") from None
    relation.create_view(VIEW)
    raw = sa.table(VIEW, *(sa.column(n, sa.String()) for n in names))
    missing: Any = sa.bindparam(
        "na_strings", [*PANDAS_NA_STRINGS, *source.na_values], expanding=True
    )
    numeric_missing = numeric_na_values(source.na_values)
    patient_id = dictionary.patient_id
    columns = []
    for name in names:
        text = raw.c[name]
        number = sa.func.try_cast(text.op("AS")(sa.literal_column("DOUBLE")), type_=sa.Double)
        when_missing: list[tuple[Any, None]] = [(text.in_(missing), None)]
        if numeric_missing:
            coded = sa.bindparam(None, numeric_missing, expanding=True, type_=sa.Double)
            when_missing.append((number.in_(coded), None))
        if patient_id is not None and source.rename.get(name, name) == patient_id:
            columns.append(
                sa.type_coerce(sa.case(*when_missing, else_=text), sa.String).label(name)
            )
            continue
        separated = sa.func.strpos(text, "_") > 0
        # type_coerce: SQLAlchemy 2.0.0 types a CASE by its first branch (NULL here).
        value = sa.case(*when_missing, (separated, None), else_=number)
        columns.append(sa.type_coerce(value, sa.Double).label(name))
    table = sa.select(*columns).select_from(raw).subquery("records")
    return _duckdb_connection(con, table, names, where, f"CSV {source.path}")


def _duckdb_connection(
    con: Any, table: Any, names: list[str], where: str, describe: str
) -> _Connection:
    """How to run a query on a DuckDB connection (one cursor per query)."""
    import duckdb
    from sqlalchemy.dialects import sqlite

    dialect = sqlite.dialect()

    def run(query: Any) -> Rows:
        # DuckDB reads SQLite's SQL for these queries: double-quoted names, `?` parameters.
        compiled = query.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        parameters = [compiled.params[name] for name in compiled.positiontup or []]
        cursor = con.cursor()  # one per query: DuckDB connections are not shared by threads
        try:
            return [tuple(row) for row in cursor.execute(str(compiled), parameters).fetchall()]
        except duckdb.Error as exc:
            raise _query_failed(where, exc) from None
        finally:
            cursor.close()

    return _Connection(describe, table, run, con.close, names, "duckdb")


def _query_failed(where: str, exc: Exception) -> ConfigError:
    """The refusal for a failed query: the database's message may quote a value from the
    data, so it goes to the site's log only; the reply names the error's type."""
    log.error("%s: a pushdown query failed: %s", where, exc)
    return ConfigError(
        f"{where}: the query failed ({type(exc).__name__}; the site's log has the "
        "database's message)"
    )


def _duck_type(text: str) -> Any:
    import sqlalchemy as sa

    upper = text.upper()
    if upper == "BOOLEAN":
        return sa.Boolean()
    if upper.startswith(("DECIMAL", "NUMERIC")):
        return sa.Numeric()
    if upper in ("FLOAT", "DOUBLE", "REAL"):
        return sa.Float()
    if upper in (
        "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
        "UINTEGER", "UBIGINT",
    ):  # fmt: skip
        return sa.Integer()
    return sa.String()


def _sqlalchemy_table(config: SiteConfig) -> _Connection:
    """The reflected table in a read-only engine, and how to run a query on it."""
    import sqlalchemy as sa

    source = config.data
    assert source.url is not None and source.table is not None
    engine = read_only_engine(source.url)
    where = f"data: table {source.table!r} at {shown_url(engine.url)}"
    dialect = engine.dialect.name
    if dialect == "sqlite":
        _sqlite_math(engine)
    try:
        with engine.connect() as connection:
            table = sa.Table(
                source.table, sa.MetaData(), schema=source.db_schema, autoload_with=connection
            )
    except sa.exc.NoSuchTableError:
        engine.dispose()
        raise ConfigError(f"{where}: no such table") from None
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise ConfigError(f"{where}: cannot be read ({type(exc).__name__})") from None

    def run(query: Any) -> Rows:
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(query).fetchall()]
        except sa.exc.SQLAlchemyError as exc:
            raise _query_failed(where, exc) from None

    names = [str(c.name) for c in table.columns]
    return _Connection(f"table {source.table!r}", table, run, engine.dispose, names, dialect)


def _sqlite_math(engine: Any) -> None:
    """SQLite builds without math functions lack exp, ln and ceil: each connection gets Python's."""
    import math

    import sqlalchemy as sa

    def safe(function: Callable[[float], float]) -> Callable[[float | None], float | None]:
        def apply(value: float | None) -> float | None:
            if value is None:
                return None
            try:
                return function(value)
            except (ValueError, OverflowError):
                return None

        return apply

    @sa.event.listens_for(engine, "connect")
    def _functions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("exp", 1, safe(math.exp), deterministic=True)
        dbapi_connection.create_function("ln", 1, safe(math.log), deterministic=True)
        dbapi_connection.create_function("ceil", 1, safe(math.ceil), deterministic=True)

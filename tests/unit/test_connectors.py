"""Connectors: Parquet through DuckDB and SQL tables through SQLAlchemy (SQLite, and
PostgreSQL for real), read only and only the needed columns, giving the same site data as the
CSV; a write through a connector's session fails; hostile names stay data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pydantic
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.dialects import sqlite

from protocol.config import DataSource, SiteConfig, load_yaml
from protocol.errors import ConfigError
from protocol.filters import parse_filter, to_sql
from simulations.heart import DICTIONARY_PATH, heart_dictionary, read_raw
from site_node.connectors import load
from site_node.connectors.sql import read_only_engine
from site_node.harmonize import conform
from site_node.runtime import SiteRuntime
from tests.attacks.harness import ALL_ANALYSES, Researcher
from tests.unit.conftest import PG_URL


@pytest.fixture(scope="module")
def cleveland() -> pd.DataFrame:
    # The hospital's table, plus a column no dictionary variable needs.
    return read_raw("cleveland").assign(notes="free text the site never reads")


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    con = duckdb.connect(":memory:")
    con.from_df(frame).write_parquet(str(path))  # the relation API: the path is no SQL text
    con.close()


def site_from(tmp_path: Path, data: dict[str, Any]) -> SiteRuntime:
    config = {
        "name": "cleveland",
        "coordinator": "127.0.0.1:1",
        "dictionary": str(DICTIONARY_PATH),
        "data": data,
        "state_dir": str(tmp_path / "state"),
        "insecure": True,
        "policy": {
            "allowed_analyses": ALL_ANALYSES,
            "studies": [{"id": "s1", "mode": "sdc", "sdc_filters": "free"}],
        },
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return SiteRuntime.from_config(load_yaml(path, SiteConfig))


def assert_same_site_data(site: SiteRuntime, cleveland: pd.DataFrame) -> None:
    # Reference: the site's own check on the table read by pandas from the UCI file.
    expected, _ = conform(cleveland.drop(columns="notes"), heart_dictionary())
    pd.testing.assert_frame_equal(site.data, expected[site.data.columns], check_dtype=False)
    r = Researcher({"cleveland": site}, heart_dictionary())
    mean = r.run("mean", variable="chol")
    assert mean.mean == pytest.approx(expected["chol"].mean(), rel=1e-12)  # type: ignore[union-attr]


def test_a_parquet_file_gives_the_csvs_site_data_reading_only_needed_columns(
    tmp_path: Path, cleveland: pd.DataFrame
) -> None:
    path = tmp_path / "cleveland.parquet"
    write_parquet(cleveland, path)
    read = load(DataSource(connector="parquet", path=path), {"age", "chol", "nothing_like_it"})
    assert list(read.columns) == ["age", "chol"] and len(read) == len(cleveland)
    site = site_from(tmp_path, {"connector": "parquet", "path": str(path)})
    try:
        assert "notes" not in site.data.columns and site.report.unknown_columns == []
        assert_same_site_data(site, cleveland)
    finally:
        site.close()


def test_a_parquet_path_that_looks_like_sql_stays_a_path(
    tmp_path: Path, cleveland: pd.DataFrame
) -> None:
    path = tmp_path / 'it\'s "odd"; DROP TABLE x; --.parquet'
    write_parquet(cleveland.head(20), path)
    assert len(load(DataSource(connector="parquet", path=path), {"age"})) == 20
    with pytest.raises(ConfigError, match="file not found"):
        load(DataSource(connector="parquet", path=tmp_path / "absent.parquet"))
    (tmp_path / "text.parquet").write_text("age,chol\n1,2\n")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        load(DataSource(connector="parquet", path=tmp_path / "text.parquet"))


def test_a_sqlite_table_gives_the_same_site_data_and_cannot_be_written(
    tmp_path: Path, cleveland: pd.DataFrame
) -> None:
    db = tmp_path / "ehr.db"
    writer = sa.create_engine(f"sqlite:///{db}")
    cleveland.to_sql("heart", writer, index=False)
    writer.dispose()
    before = db.read_bytes()
    url = f"sqlite:///{db}"
    site = site_from(tmp_path, {"connector": "sql", "url": url, "table": "heart"})
    try:
        assert_same_site_data(site, cleveland)
    finally:
        site.close()
    engine = read_only_engine(url)
    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError, match="readonly"):
        connection.execute(sa.text("DELETE FROM heart"))
    engine.dispose()
    assert db.read_bytes() == before  # the hospital's database, byte for byte


def test_a_postgresql_table_gives_the_same_site_data_in_a_read_only_session(
    tmp_path: Path, cleveland: pd.DataFrame, pg_schema: str
) -> None:
    writer = sa.create_engine(PG_URL)
    cleveland.to_sql("heart", writer, schema=pg_schema, index=False)
    source = {"connector": "sql", "url": PG_URL, "table": "heart", "db_schema": pg_schema}
    site = site_from(tmp_path, source)
    try:
        assert_same_site_data(site, cleveland)
    finally:
        site.close()
    # data.where runs in PostgreSQL (COPY of a query whose numbers psycopg binds).
    for text in FILTERS:
        rule = parse_filter(text)
        numbers = {c: cleveland[c].to_numpy(dtype=float) for c in rule.variables}
        restricted = DataSource(connector="sql", url=PG_URL, table="heart",
                                db_schema=pg_schema, where=text)  # fmt: skip
        got = load(restricted, {"age", "chol"})
        expected = cleveland.loc[rule.mask(numbers, len(cleveland)), ["age", "chol"]]
        np.testing.assert_array_equal(got.to_numpy(float), expected.to_numpy(float))
    engine = read_only_engine(PG_URL)
    with engine.connect() as connection, pytest.raises(sa.exc.InternalError, match="read-only"):
        connection.execute(sa.text(f"DELETE FROM {pg_schema}.heart"))
    engine.dispose()
    with writer.connect() as connection:
        count = connection.execute(sa.text(f"SELECT count(*) FROM {pg_schema}.heart")).scalar()
    writer.dispose()
    assert count == len(cleveland)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"connector": "sql", "url": "sqlite:///x.db", "table": "heart; DROP TABLE heart"},
         "data.table: 'heart; DROP TABLE heart': String should match pattern"),
        ({"connector": "sql", "url": "sqlite:///x.db"}, "a sql source needs url"),
        ({"connector": "parquet"}, "a parquet source needs path"),
    ],
)  # fmt: skip
def test_bad_sources_are_one_line_errors(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "a", "coordinator": "x:1", "dictionary": "d.yaml", "data": data,
             "insecure": True}
        )
    )  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_yaml(path, SiteConfig)
    assert message in str(caught.value)


def test_a_missing_sql_table_names_the_database_without_its_password(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    sa.create_engine(f"sqlite:///{db}").connect().close()
    with pytest.raises(ConfigError, match=r"table 'heart' at sqlite:///.*empty\.db: no such table"):
        load(DataSource(connector="sql", url=f"sqlite:///{db}", table="heart"))
    secret = "postgresql+psycopg://alice:s3cret@127.0.0.1:1/ehr"
    with pytest.raises(ConfigError) as caught:
        load(DataSource(connector="sql", url=secret, table="heart"))
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)


FILTERS = [
    "age >= 50",
    "not (chol > 250)",
    "age >= 50 and not (chol > 250) or cp in [1, 2]",
    "cp not in [4] and 40 < age <= 60",
    "trestbps != 130 or not (thalach < 150 and oldpeak >= 1)",
    "ca == 0 or ca > 1.5",
]


@pytest.mark.parametrize("text", FILTERS)
def test_compiled_filters_select_the_rows_the_filter_language_selects(
    tmp_path: Path, cleveland: pd.DataFrame, text: str
) -> None:
    # Reference: RowFilter.mask on the same table in memory (a comparison with a missing value
    # is false; `not` makes it true). ca holds missing values in this table.
    frame = cleveland.drop(columns="notes").assign(row=range(len(cleveland)))
    assert frame["ca"].isna().sum() > 0
    rule = parse_filter(text)
    numbers = {c: frame[c].to_numpy(dtype=float) for c in rule.variables}
    expected = frame.loc[rule.mask(numbers, len(frame)), "row"].tolist()
    parquet = tmp_path / "t.parquet"
    write_parquet(frame, parquet)
    db = tmp_path / "t.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    frame.to_sql("heart", engine, index=False)
    engine.dispose()
    for source in (
        DataSource(connector="parquet", path=parquet, where=text),
        DataSource(connector="sql", url=f"sqlite:///{db}", table="heart", where=text),
        DataSource(connector="csv", path=write_csv(frame, tmp_path / "t.csv"), where=text),
    ):
        assert load(source, {"row"})["row"].tolist() == expected, source.connector
    assert 0 < len(expected) < len(frame)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_filter_values_are_bound_parameters_never_sql_text() -> None:
    table = sa.table("t", sa.column("age"), sa.column("cp"))
    rule = parse_filter("age >= 12345.5 and cp in [777, 888]")
    compiled = (
        sa.select(table.c.age)
        .where(to_sql(rule, lambda n: table.c[n]))
        .compile(dialect=sqlite.dialect(), compile_kwargs={"render_postcompile": True})
    )
    text = str(compiled)
    assert "12345" not in text and "777" not in text and text.count("?") == 3
    assert sorted(compiled.params.values()) == [777.0, 888.0, 12345.5]


@pytest.mark.parametrize(
    "attack",
    [
        "age > 1; DROP TABLE heart",
        "age > 1 -- and everything else",
        "age > '1' or '1' == '1'",
        "age > 1 or __import__('os').system('id')",
        "age > (SELECT 1)",
        "heart.age > 1",
    ],
)
def test_a_where_that_tries_sql_injection_is_refused_at_start(attack: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        DataSource(connector="sql", url="sqlite:///x.db", table="heart", where=attack)
    assert "allowed:" in str(caught.value)  # what was wrong, and what the language allows


def test_hostile_column_names_are_quoted_and_the_table_survives(
    tmp_path: Path, cleveland: pd.DataFrame
) -> None:
    hostile = 'x"; DROP TABLE heart; --'
    frame = cleveland.drop(columns="notes").assign(**{hostile: 1.0})
    db = tmp_path / "t.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    frame.to_sql("heart", engine, index=False)
    parquet = tmp_path / "t.parquet"
    write_parquet(frame, parquet)
    for source in (
        DataSource(connector="sql", url=f"sqlite:///{db}", table="heart", where="age >= 60"),
        DataSource(connector="parquet", path=parquet, where="age >= 60"),
    ):
        read = load(source, {"age", hostile})
        assert list(read.columns) == ["age", hostile] and (read["age"] >= 60).all()
        assert len(read) == (frame["age"] >= 60).sum()
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM heart")).scalar() == len(frame)
    engine.dispose()


def test_a_where_naming_an_absent_column_is_one_clear_error(tmp_path: Path) -> None:
    parquet = tmp_path / "t.parquet"
    write_parquet(pd.DataFrame({"age": [50.0, 60.0]}), parquet)
    with pytest.raises(ConfigError, match=r"data.where: filter 'agee >= 18' uses 'agee'"):
        load(DataSource(connector="parquet", path=parquet, where="agee >= 18"))


def test_rows_come_in_a_fixed_order_the_primary_key_or_order_by(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The differencing guard knows records by position: a database that returns them in
    # another order after a restart would misalign its memory. Rows inserted out of order come
    # back by primary key, or by data.order_by.
    db = tmp_path / "keyed.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, age REAL, k REAL)"))
        for key in (5, 1, 4, 2, 3):
            connection.execute(
                sa.text("INSERT INTO t VALUES (:id, :age, :k)"), {"id": key, "age": key, "k": -key}
            )
        connection.execute(sa.text("CREATE TABLE loose (age REAL)"))
    engine.dispose()
    url = f"sqlite:///{db}"
    assert load(DataSource(connector="sql", url=url, table="t"))["id"].tolist() == [1, 2, 3, 4, 5]
    by_k = load(DataSource(connector="sql", url=url, table="t", order_by=["k"]))
    assert by_k["id"].tolist() == [5, 4, 3, 2, 1]
    with pytest.raises(ConfigError, match=r"data.order_by: \['kk'\] are not columns of 't'"):
        load(DataSource(connector="sql", url=url, table="t", order_by=["kk"]))
    load(DataSource(connector="sql", url=url, table="loose"))
    assert any(
        "has no primary key and data.order_by is not set" in r.message for r in caplog.records
    )


def test_site_check_names_the_source_columns_it_does_not_read(
    tmp_path: Path, cleveland: pd.DataFrame
) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    path = tmp_path / "cleveland.parquet"
    write_parquet(cleveland.assign(cholesterol_hdl=50.0), path)
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {"name": "cleveland", "coordinator": "127.0.0.1:1", "dictionary": str(DICTIONARY_PATH),
             "data": {"connector": "parquet", "path": str(path), "where": "age >= 40"},
             "insecure": True}
        )
    )  # fmt: skip
    result = CliRunner().invoke(app, ["site", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert (
        "data: source columns not read (nothing needs them): notes, cholesterol_hdl "
        "(did you mean chol?)" in lines
    )
    assert "data: only rows where age >= 40 (in the source)" in lines
    assert f"data: {(cleveland['age'] >= 40).sum()} records loaded" in lines

"""Connectors: Parquet through DuckDB and SQL tables through SQLAlchemy (SQLite, and
PostgreSQL for real), read only and only the needed columns, giving the same site data as the
CSV; a write through a connector's session fails; hostile names stay data."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from protocol.config import DataSource, SiteConfig, load_yaml
from protocol.errors import ConfigError
from simulations.heart import DICTIONARY_PATH, heart_dictionary, read_raw
from site_node.connectors import load
from site_node.connectors.sql import read_only_engine
from site_node.harmonize import conform
from site_node.runtime import SiteRuntime
from tests.attacks.harness import ALL_ANALYSES, Researcher

PG_URL = os.environ.get("ALLIANCE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def cleveland() -> pd.DataFrame:
    # The hospital's table, plus a column no dictionary variable needs.
    return read_raw("cleveland").assign(notes="free text the site never reads")


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    con = duckdb.connect(":memory:")
    con.register("frame", frame)
    con.execute("COPY frame TO $path (FORMAT PARQUET)", {"path": str(path)})
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


@pytest.fixture
def pg_schema() -> Iterator[str]:
    try:
        admin = sa.create_engine(PG_URL)
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any failure means: not available here
        problem = f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}"
        if os.environ.get("ALLIANCE_REQUIRE_PG") == "1":
            pytest.fail(f"ALLIANCE_REQUIRE_PG=1 but {problem}")
        pytest.skip(problem)
    schema = f"ehr_{uuid.uuid4().hex[:8]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


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

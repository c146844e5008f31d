"""Shared fixtures of the unit tests: the synthetic survival cohort (``simulations.bench_cox``)
and a fresh PostgreSQL schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pandas as pd
import pytest
import sqlalchemy as sa

from protocol.config import DataDictionary
from simulations.bench_cox import synthetic_dictionary, synthetic_sites


@pytest.fixture(scope="module")
def syn_dict() -> DataDictionary:
    """The synthetic cohort's data dictionary."""
    return synthetic_dictionary()


@pytest.fixture(scope="module")
def sites() -> dict[str, pd.DataFrame]:
    """Three synthetic sites of about 400 records each (seed 5)."""
    return synthetic_sites(3, 400, seed=5)


PG_URL = os.environ.get("ALLIANCE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema at ``PG_URL``, dropped afterwards; the test skips where
    PostgreSQL is absent, and fails instead under ALLIANCE_REQUIRE_PG=1 (as in CI)."""
    try:
        admin = sa.create_engine(PG_URL)
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any failure means: not available here
        problem = f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}"
        if os.environ.get("ALLIANCE_REQUIRE_PG") == "1":
            pytest.fail(f"ALLIANCE_REQUIRE_PG=1 but {problem}")
        pytest.skip(problem)
    schema = f"alliance_{uuid.uuid4().hex[:8]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

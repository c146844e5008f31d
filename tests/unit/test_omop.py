"""The OMOP CDM adapter on a generated OMOP-shaped database (SQLite, and PostgreSQL for real):
one row per person equal to the same rules written out in pandas over the source tables."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from protocol.config import DataDictionary, DataSource, SiteConfig, load_yaml, parse_model
from protocol.errors import ConfigError
from site_node.connectors import load
from site_node.runtime import SiteRuntime
from tests.attacks.harness import ALL_ANALYSES, Refused, Researcher
from tests.unit.conftest import PG_URL

MALE, FEMALE, CHOLESTEROL, DIABETES, STATIN = 8507, 8532, 3027114, 201826, 1539403

OMOP = {
    "variables": {
        "age": {"kind": "age"},
        "sex": {"kind": "gender", "codes": {MALE: 1, FEMALE: 0}},
        "chol": {"kind": "measurement", "concepts": [CHOLESTEROL], "value": "last"},
        "chol_mean": {"kind": "measurement", "concepts": [CHOLESTEROL], "value": "mean"},
        "diabetes": {"kind": "condition", "concepts": [DIABETES]},
        "statin": {"kind": "drug", "concepts": [STATIN]},
        "died": {"kind": "death"},
        "time": {"kind": "follow_up"},
    }
}
DICTIONARY = {
    "patient_id": "person_id",
    "variables": {
        "age": {"type": "numeric", "min": 0, "max": 120},
        "sex": {"type": "categorical", "levels": [0, 1]},
        "chol": {"type": "numeric", "min": 50, "max": 700},
        "chol_mean": {"type": "numeric", "min": 50, "max": 700},
        "diabetes": {"type": "binary"},
        "statin": {"type": "binary"},
        "died": {"type": "binary"},
        "time": {"type": "numeric", "min": 0, "max": 30000},
    },
}


def cdm_tables(persons: int = 300, seed: int = 8) -> dict[str, pd.DataFrame]:
    """An OMOP-shaped extract: the CDM 5.4 columns the adapter reads, with noise concepts."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, persons + 1)
    person = pd.DataFrame(
        {
            "person_id": ids,
            "gender_concept_id": rng.choice([MALE, FEMALE, 0], persons, p=[0.48, 0.48, 0.04]),
            "year_of_birth": rng.integers(1930, 1985, persons),
            "month_of_birth": rng.choice([None, *range(1, 13)], persons),
            "day_of_birth": rng.choice([None, *range(1, 29)], persons),
        }
    )
    day0 = dt.date(2010, 1, 1)

    def date(days: Any) -> dt.date:
        return day0 + dt.timedelta(days=int(days))

    periods, conditions, drugs, measurements, deaths = [], [], [], [], []
    for pid in ids[10:]:  # the first ten have no observation period
        start = int(rng.integers(0, 2000))
        for k in range(int(rng.integers(1, 3))):
            periods.append((pid * 10 + k, pid, date(start + 900 * k), date(start + 900 * k + 600)))
        for _ in range(int(rng.integers(0, 3))):
            concept = DIABETES if rng.random() < 0.3 else 4329847  # or another condition
            conditions.append((len(conditions) + 1, pid, concept, date(start + 30)))
        if rng.random() < 0.35:
            drugs.append((len(drugs) + 1, pid, STATIN, date(start + 60)))
        drugs.append((len(drugs) + 1, pid, 1112807, date(start + 90)))  # aspirin, not asked
        for j in range(int(rng.integers(0, 5))):
            value = None if rng.random() < 0.1 else round(float(rng.normal(200, 40)), 1)
            concept = CHOLESTEROL if rng.random() < 0.8 else 3004410  # or HbA1c
            measurements.append(
                (len(measurements) + 1, pid, concept, date(start + 100 * j + 5), value)
            )
        if rng.random() < 0.15:
            deaths.append((pid, date(start + int(rng.integers(100, 500)))))
    return {
        "person": person,
        "observation_period": pd.DataFrame(periods, columns=[
            "observation_period_id", "person_id", "observation_period_start_date",
            "observation_period_end_date"]),
        "condition_occurrence": pd.DataFrame(conditions, columns=[
            "condition_occurrence_id", "person_id", "condition_concept_id",
            "condition_start_date"]),
        "drug_exposure": pd.DataFrame(drugs, columns=[
            "drug_exposure_id", "person_id", "drug_concept_id", "drug_exposure_start_date"]),
        "measurement": pd.DataFrame(measurements, columns=[
            "measurement_id", "person_id", "measurement_concept_id", "measurement_date",
            "value_as_number"]),
        "death": pd.DataFrame(deaths, columns=["person_id", "death_date"]),
    }  # fmt: skip


def expected_frame(t: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The adapter's rules written out in pandas over the source tables."""
    op = (
        t["observation_period"]
        .groupby("person_id")
        .agg(
            start=("observation_period_start_date", "min"),
            end=("observation_period_end_date", "max"),
        )
    )
    p = t["person"].set_index("person_id").join(op, how="inner")
    birth = pd.to_datetime(
        pd.DataFrame({"year": p["year_of_birth"], "month": p["month_of_birth"].fillna(7),
                      "day": p["day_of_birth"].fillna(1)}).astype(int)
    )  # fmt: skip
    start, end = pd.to_datetime(p["start"]), pd.to_datetime(p["end"])
    out = pd.DataFrame(index=p.index)
    out["age"] = (start - birth).dt.days / 365.25
    out["sex"] = p["gender_concept_id"].map({MALE: 1.0, FEMALE: 0.0, 0: 0.0 + np.nan})
    m = t["measurement"]
    m = m[(m["measurement_concept_id"] == CHOLESTEROL) & m["value_as_number"].notna()]
    m = m.sort_values(["person_id", "measurement_date", "measurement_id"])
    out["chol"] = m.groupby("person_id")["value_as_number"].last()
    out["chol_mean"] = m.groupby("person_id")["value_as_number"].mean()
    c = t["condition_occurrence"]
    out["diabetes"] = out.index.isin(c.loc[c["condition_concept_id"] == DIABETES, "person_id"])
    d = t["drug_exposure"]
    out["statin"] = out.index.isin(d.loc[d["drug_concept_id"] == STATIN, "person_id"])
    death = pd.to_datetime(t["death"].set_index("person_id")["death_date"]).reindex(out.index)
    out["died"] = death.notna()
    out["time"] = (death.where(death.notna(), end) - start).dt.days
    return out.astype(float)


def write_cdm(engine: Any, tables: dict[str, pd.DataFrame], schema: str | None = None) -> None:
    for name, frame in tables.items():
        frame.to_sql(name, engine, schema=schema, index=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def cdm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    tables = cdm_tables()
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cdm.db'}"
        engine = sa.create_engine(url)
        write_cdm(engine, tables)
        engine.dispose()
        yield url, None
        return
    schema = request.getfixturevalue("pg_schema")
    admin = sa.create_engine(PG_URL)
    try:
        write_cdm(admin, tables, schema)
    finally:
        admin.dispose()
    yield PG_URL, schema


def test_one_row_per_person_equals_pandas_on_the_cdm_tables(
    cdm: tuple[str, str | None], tmp_path: Path
) -> None:
    url, schema = cdm
    source = DataSource.model_validate(
        {"connector": "omop", "url": url, "db_schema": schema, "omop": OMOP}
    )
    frame = load(source).set_index("person_id")
    expected = expected_frame(cdm_tables())
    assert list(frame.index) == [str(i) for i in expected.index]  # ten without a period left out
    frame.index = expected.index
    unknown = frame["sex"].astype(str).str.startswith("unmapped code")
    assert (unknown == expected["sex"].isna()).all()  # gender concept 0 is no level
    frame["sex"] = pd.to_numeric(frame["sex"], errors="coerce")
    pd.testing.assert_frame_equal(frame.astype(float), expected, check_names=False, rtol=1e-12)
    assert frame["diabetes"].sum() > 20 and frame["chol"].notna().sum() > 100  # not vacuous

    # Through a site: the dictionary's check and a pooled mean, against pandas.
    (tmp_path / "dictionary.yaml").write_text(yaml.safe_dump(DICTIONARY))
    config = {
        "name": "omop-site",
        "coordinator": "127.0.0.1:1",
        "dictionary": "dictionary.yaml",
        "data": source.model_dump(mode="json", exclude_none=True),
        "state_dir": "state",
        "insecure": True,
        "policy": {
            "allowed_analyses": ALL_ANALYSES,
            "studies": [{"id": "s1", "mode": "sdc", "sdc_filters": "free"}],
        },
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(config))
    site = SiteRuntime.from_config(load_yaml(tmp_path / "site.yaml", SiteConfig))
    try:
        r = Researcher({"omop-site": site}, DataDictionary.model_validate(DICTIONARY))
        mean = r.run("mean", variable="chol", filter="diabetes == 1")
        assert not isinstance(mean, Refused), mean
        chosen = expected.loc[expected["diabetes"] == 1, "chol"]
        chosen = chosen[chosen.between(50, 700)]
        assert mean.n == len(chosen)
        assert mean.mean == pytest.approx(chosen.mean(), rel=1e-12)  # type: ignore[attr-defined]
        # Gender concept 0 (unknown) has no code: the check reports it, never as a level.
        genders = cdm_tables()["person"]["gender_concept_id"][10:]
        assert site.report.not_numeric["sex"] == (genders == 0).sum() > 0
    finally:
        site.close()


def test_a_database_without_the_cdm_tables_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    sa.create_engine(url).connect().close()
    source = DataSource.model_validate({"connector": "omop", "url": url, "omop": OMOP})
    with pytest.raises(ConfigError, match=r"no table 'person' \(an OMOP CDM 5.x schema\)"):
        load(source)
    bad = {"connector": "omop", "url": url, "omop": {"variables": {"x": {"kind": "measurement"}}}}
    with pytest.raises(ConfigError, match=r"data: omop\.variables\.x: kind measurement"):
        parse_model(DataSource, bad, "data")

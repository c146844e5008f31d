"""Aggregate pushdown: a pushdown site computes, in its source, exactly the aggregates the
site computes in memory (``Analysis.local``) on the same records, for every analysis that
pushes down, with and without a task filter; over Parquet (DuckDB), SQLite and PostgreSQL.

Reference: each analysis's own ``local`` on the site's records read into memory by the
connector and conformed by ``harmonize.conform`` (the path every site took before pushdown).
Counts must match exactly; sums to a relative 1e-9 (the source adds in another order).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from analyses import AnalysisContext, get_analysis
from analyses.descriptive import MeanResult
from analyses.glm.formula import glm_model
from analyses.glm.result import GLMResult
from analyses.pushdown import MAX_COLUMNS
from analyses.survival import CoxResult, KaplanMeierResult
from protocol.budget import PureDP
from protocol.config import SiteConfig, load_yaml
from protocol.errors import ConfigError
from protocol.filters import parse_filter
from simulations.heart import COLUMNS, DATA_DIR, DERIVE, DICTIONARY_PATH, heart_dictionary, read_raw
from simulations.heart import SITES as HEART_FILES
from simulations.synthetic import generate_sites, write_sites
from site_node.pushdown import PANDAS_NA_STRINGS
from site_node.runtime import SiteRuntime
from tests.attacks.harness import ALL_ANALYSES, Refused, Researcher
from tests.unit.conftest import PG_URL

#: (analysis, params, round, beta) pushed down; beta on the standardised scale
CASES: list[tuple[str, dict[str, Any], int, list[float] | None]] = [
    ("count", {}, 0, None),
    ("count", {"variable": "chol"}, 0, None),
    ("mean", {"variable": "chol"}, 0, None),
    ("mean", {"variable": "oldpeak"}, 0, None),
    ("histogram", {"variable": "age", "edges": [0, 30, 40, 50, 60, 70, 120]}, 0, None),
    ("histogram", {"variable": "chol", "edges": [100, 200, 300, 400], "group": "sex"}, 0, None),
    ("table", {"rows": "cp"}, 0, None),
    ("table", {"rows": "cp", "cols": "sex"}, 0, None),
    ("glm", {"formula": "disease ~ age + sex + chol", "family": "binomial"}, 0, None),
    (
        "glm",
        {"formula": "disease ~ age + sex + chol + thalach + oldpeak", "family": "binomial"},
        1,
        [-0.3, 0.8, 1.1, 0.4, -1.5, 2.0],
    ),
    (
        "glm",
        {"formula": "disease ~ age * sex + cp", "family": "binomial"},
        2,
        [0.1, -0.2] * 3 + [0.5],
    ),
    ("glm", {"formula": "chol ~ age + sex", "family": "gaussian"}, 0, None),
    ("glm", {"formula": "ca ~ age + sex", "family": "poisson"}, 0, None),
    ("glm", {"formula": "ca ~ age + sex", "family": "poisson"}, 1, [-0.5, 0.7, 0.3]),
]
FILTERS = [None, "age >= 50", "not (chol > 250) and sex == 1"]
SITES = ["cleveland", "switzerland", "va"]  # chol out of range (0) at switzerland and va


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    con = duckdb.connect(":memory:")
    con.from_df(frame).write_parquet(str(path))
    con.close()


def site_config(
    tmp_path: Path,
    data: dict[str, Any],
    mode: str = "dp",
    dictionary: Path = DICTIONARY_PATH,
    derive: dict[str, str] = DERIVE,
) -> SiteConfig:
    config = {
        "name": "h",
        "coordinator": "127.0.0.1:1",
        "dictionary": str(dictionary),
        "data": {**data, "pushdown": True, "derive": derive},
        "state_dir": str(tmp_path / "state"),
        "insecure": True,
        "policy": {
            "allowed_analyses": ALL_ANALYSES,
            "studies": [
                {"id": "s1", "mode": mode, "budget": 100, "epsilon_per_request": 1}
                if mode == "dp"
                else {"id": "s1", "mode": "sdc", "sdc_filters": "free"}
            ],
        },
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_yaml(path, SiteConfig)


@pytest.fixture(params=["parquet", "sqlite", "csv"])
def source_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_site(
    tmp_path: Path,
    kind: str,
    frame: pd.DataFrame,
    schema: str = "",
    mode: str = "dp",
    where: str | None = None,
    **config: Any,
) -> SiteRuntime:
    if kind == "parquet":
        path = tmp_path / "records.parquet"
        write_parquet(frame, path)
        data: dict[str, Any] = {"connector": "parquet", "path": str(path)}
    elif kind == "csv":
        path = tmp_path / "records.csv"
        frame.to_csv(path, index=False)
        data = {"connector": "csv", "path": str(path)}
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'records.db'}"
        engine = sa.create_engine(url)
        frame.to_sql("records", engine, index_label="row_id")
        engine.dispose()
        data = {"connector": "sql", "url": url, "table": "records"}
    else:
        engine = sa.create_engine(PG_URL)
        frame.to_sql("records", engine, schema=schema, index_label="row_id")
        engine.dispose()
        data = {"connector": "sql", "url": PG_URL, "table": "records", "db_schema": schema}
    if where is not None:
        data["where"] = where
    return SiteRuntime.from_config(site_config(tmp_path, data, mode, **config), record_start=False)


def in_memory(site: SiteRuntime, text: str | None) -> pd.DataFrame:
    data = site.data
    if text is None:
        return data
    rule = parse_filter(text, set(site.dictionary.variables))
    return data.loc[rule.mask({c: data[c].to_numpy() for c in rule.variables}, len(data))]


def assert_pushdown_matches_local(
    site: SiteRuntime,
    cases: list[tuple[str, dict[str, Any], int, Any]] = CASES,
    filters: list[str | None] = FILTERS,
) -> int:
    """Each case's pushdown arrays against ``local``'s, under each filter; a case's last item
    is a GLM's coefficients or a round state."""
    assert site.pushdown is not None
    compared = 0
    for name, raw_params, round_, beta in cases:
        analysis = get_analysis(name)
        params = analysis.parse_params(raw_params, site.dictionary)
        state = beta if isinstance(beta, dict) else {"beta": beta} if beta is not None else {}
        ctx = AnalysisContext(site.dictionary, "dp", round=round_, state=state)
        analysis.check_state(analysis.state_model.model_validate(state), params, ctx)
        if name == "glm" and beta is not None:
            assert len(beta) == glm_model(params, site.dictionary).p, raw_params
        for text in filters:
            rule = parse_filter(text, set(site.dictionary.variables)) if text else None
            plan = analysis.pushdown(params, ctx, site.pushdown.column)
            assert plan is not None, (name, raw_params)
            pushed = site.pushdown.run(plan, rule)
            expected = analysis.local(in_memory(site, text), params, ctx)
            assert set(pushed) == set(expected), (name, raw_params)
            for key, value in expected.items():
                got = np.asarray(pushed[key], dtype=np.float64)
                assert got.shape == np.shape(value), (name, raw_params, key)
                np.testing.assert_allclose(
                    got, value, rtol=1e-9, atol=1e-9, err_msg=f"{name} {raw_params} {key} {text}"
                )
            compared += 1
    return compared


@pytest.mark.parametrize("hospital", SITES)
def test_pushdown_computes_what_local_computes_on_the_same_records(
    tmp_path: Path, source_kind: str, hospital: str
) -> None:
    site = make_site(tmp_path, source_kind, read_raw(hospital))
    try:
        assert site._records is None  # nothing read at start
        assert site.report.rows == len(read_raw(hospital))
        assert assert_pushdown_matches_local(site) == len(CASES) * len(FILTERS)
    finally:
        site.close()


def cox_state(grid_points: int, beta: list[float]) -> dict[str, Any]:
    """A dp Cox round's public state: every grid point an event time (as dp starts it)."""
    return {"phase": "newton", "event_idx": list(range(grid_points)), "beta": beta}


#: Survival rounds pushed down (dp), on the synthetic cohorts' time and event.
SURVIVAL = {"time": "time", "event": "event"}
SURVIVAL_CASES: list[tuple[str, dict[str, Any], int, Any]] = [
    ("kaplan_meier", SURVIVAL, 0, {"phase": "counts"}),
    ("kaplan_meier", {**SURVIVAL, "group": "stage", "horizon": 900}, 0, {"phase": "counts"}),
    ("logrank", {**SURVIVAL, "group": "sex", "dp_intervals": 50}, 0, {"phase": "counts"}),
    ("kaplan_meier", {**SURVIVAL, "dp_intervals": 1000}, 0, {"phase": "counts"}),
    ("cox", {**SURVIVAL, "covariates": ["age", "sex", "bmi"]}, 0, cox_state(11, [0.0] * 3)),
    (
        "cox",
        {**SURVIVAL, "covariates": ["age", "stage", "smoker"], "ties": "breslow"},
        0,
        cox_state(11, [0.0] * 4),
    ),
    (
        "cox",
        {**SURVIVAL, "covariates": ["age", "stage", "smoker"], "horizon": 1000},
        1,
        cox_state(11, [0.9, -0.4, 0.6, 0.3]),
    ),
    (
        "cox",
        {**SURVIVAL, "covariates": ["sbp", "sex"], "dp_intervals": 30},
        2,
        cox_state(31, [-1.5, 2.0]),
    ),
]


def synthetic_cohort(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    """One synthetic site's records, with times moved onto grid points (where rounding up
    is decided by the last bit) and a few out of bounds (missing), and its dictionary."""
    files = write_sites(tmp_path / "synthetic", generate_sites(1, 1500, seed=5))
    frame = next(iter(generate_sites(1, 1500, seed=5).values()))
    frame.loc[::7, "time"] = np.round(frame.loc[::7, "time"] / 182.5) * 182.5  # km's grid
    frame.loc[::11, "time"] = np.round(frame.loc[::11, "time"] / 365.0) * 365.0  # cox's
    # On the 1,000-interval grid (width 3.65) to two decimals, as a record would hold them:
    # t / 3.65 is then often k plus a bit, which only the grid's slack puts back on point k.
    frame.loc[::3, "time"] = np.round(np.round(frame.loc[::3, "time"] / 3.65) * 3.65, 2)
    frame.loc[5, "time"], frame.loc[6, "bmi"] = 4000.0, -1.0
    return frame, files.dictionary


def test_survival_rounds_push_down_exactly(tmp_path: Path, source_kind: str) -> None:
    frame, dictionary = synthetic_cohort(tmp_path)
    site = make_site(tmp_path, source_kind, frame, dictionary=dictionary, derive={})
    try:
        filters = [None, "age >= 60", "not (bmi > 30) and sex == 1"]
        compared = assert_pushdown_matches_local(site, SURVIVAL_CASES, filters)
        assert compared == len(SURVIVAL_CASES) * len(filters)
    finally:
        site.close()


def test_pushdown_on_postgresql(tmp_path: Path, pg_schema: str) -> None:
    frame = pd.concat([read_raw(h) for h in SITES], ignore_index=True)
    site = make_site(tmp_path, "postgresql", frame, pg_schema)
    try:
        assert site.pushdown is not None and site.pushdown.connection.dialect == "postgresql"
        assert assert_pushdown_matches_local(site) == len(CASES) * len(FILTERS)
    finally:
        site.close()


def test_survival_requests_run_in_the_source_through_every_round(tmp_path: Path) -> None:
    frame, dictionary = synthetic_cohort(tmp_path)
    site = make_site(tmp_path, "parquet", frame, dictionary=dictionary, derive={})
    try:
        researcher = Researcher({"h": site}, site.dictionary, mode="dp")
        curve = researcher.run("kaplan_meier", epsilon=0.5, time="time", event="event")
        assert isinstance(curve, KaplanMeierResult), curve
        model = researcher.run(
            "cox", epsilon=1.0, time="time", event="event", covariates=["age", "sex"]
        )
        assert isinstance(model, CoxResult), model
        assert site._records is None  # every round computed in the source
        assert site.store.spent("s1") == PureDP(1.5)
    finally:
        site.close()


def test_survival_rounds_push_down_exactly_on_postgresql(tmp_path: Path, pg_schema: str) -> None:
    frame, dictionary = synthetic_cohort(tmp_path)
    site = make_site(tmp_path, "postgresql", frame, pg_schema, dictionary=dictionary, derive={})
    try:
        compared = assert_pushdown_matches_local(site, SURVIVAL_CASES, [None, "age >= 60"])
        assert compared == len(SURVIVAL_CASES) * 2
    finally:
        site.close()


def test_nan_in_a_float_column_is_missing_as_in_memory(tmp_path: Path, source_kind: str) -> None:
    # A Parquet double may hold NaN (not NULL): the site treats it as missing, in SQL too.
    frame = read_raw("cleveland").astype({"chol": "float64", "age": "float64"})
    frame.loc[::7, "chol"] = math.nan
    frame.loc[::11, "age"] = math.nan
    frame.loc[3, "chol"] = math.inf  # outside the dictionary's bounds: missing, as in memory
    site = make_site(tmp_path, source_kind, frame)
    try:
        assert assert_pushdown_matches_local(site) == len(CASES) * len(FILTERS)
    finally:
        site.close()


def test_data_where_restricts_the_rows_in_the_source_as_in_memory(
    tmp_path: Path, source_kind: str
) -> None:
    frame = read_raw("cleveland")
    site = make_site(tmp_path, source_kind, frame, where="age >= 50 and chol < 260")
    try:
        assert site._records is None
        # Reference: the same restriction applied by pandas to the raw records.
        kept = frame[(frame["age"] >= 50) & (frame["chol"] < 260)]
        assert site.report.rows == len(kept) < len(frame)
        assert assert_pushdown_matches_local(site) == len(CASES) * len(FILTERS)
        assert len(site.data) == len(kept)
    finally:
        site.close()


def test_a_pushdown_site_answers_dp_tasks_in_the_source_and_charges_its_ledger(
    tmp_path: Path, source_kind: str
) -> None:
    site = make_site(tmp_path, source_kind, read_raw("cleveland"))
    try:
        researcher = Researcher({"h": site}, heart_dictionary(), mode="dp")
        fitted = researcher.run(
            "glm", epsilon=1.0, formula="disease ~ age + sex + chol", family="binomial"
        )
        assert isinstance(fitted, GLMResult), fitted
        mean = researcher.run("mean", filter="age >= 50", epsilon=0.5, variable="chol")
        assert isinstance(mean, MeanResult), mean
        assert site._records is None  # both computed in the source: nothing read
        assert site.store.spent("s1") == PureDP(1.5)
        # An analysis without a pushdown reads the records once, then runs in memory.
        median = researcher.run("quantiles", epsilon=0.5, variable="age", probs=[0.5])
        assert not isinstance(median, Refused), median
        assert site._records is not None and len(site.data) == 303
        assert site.store.spent("s1") == PureDP(2.0)
    finally:
        site.close()


def test_sdc_requests_are_computed_in_memory_with_the_differencing_guard(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path, "parquet", read_raw("cleveland"), mode="sdc")
    try:
        researcher = Researcher({"h": site}, heart_dictionary(), mode="sdc")
        everyone = researcher.run("mean", variable="chol")
        assert isinstance(everyone, MeanResult) and site._records is not None
        expected = read_raw("cleveland")["chol"]
        # Reference: pandas' mean of the hospital's chol (all within the dictionary's bounds).
        assert everyone.mean == pytest.approx(expected.mean(), rel=1e-12)
        # The classic differencing pair: everyone, then everyone but one record.
        alone = researcher.run("mean", filter="not (age == 77)", variable="chol")
        assert isinstance(alone, Refused), "the guard must see pushdown sites' record sets too"
        assert alone.codes == {"h": "disclosure"}, alone
    finally:
        site.close()


def test_min_quality_is_measured_in_the_source(tmp_path: Path) -> None:
    # Switzerland's chol is 0 in every record: below the dictionary's 50, so missing.
    site = make_site(tmp_path, "parquet", read_raw("switzerland"))
    try:
        researcher = Researcher(
            {"h": site}, heart_dictionary(), mode="dp", min_quality={"chol": 0.5}
        )
        refused = researcher.run("mean", epsilon=0.5, variable="chol")
        assert isinstance(refused, Refused) and refused.codes == {"h": "quality"}
        assert "chol" in refused.reasons["h"] and site._records is None
        fine = researcher.run("mean", epsilon=0.5, variable="age")
        assert isinstance(fine, MeanResult)
    finally:
        site.close()


def test_a_write_through_the_pushdown_session_fails(tmp_path: Path, pg_schema: str) -> None:
    frame = read_raw("cleveland")
    for kind in ("sqlite", "postgresql"):
        folder = tmp_path / kind
        folder.mkdir()
        site = make_site(folder, kind, frame, pg_schema)
        assert site.pushdown is not None
        try:
            with pytest.raises(ConfigError, match="the query failed"):
                site.pushdown.run_query(sa.delete(site.pushdown.table))
            count = site.pushdown.run_query(
                sa.select(sa.func.count()).select_from(site.pushdown.table)
            )
            assert count[0][0] == len(frame)
        finally:
            site.close()


def test_a_failing_source_is_a_refusal_whose_reason_quotes_nothing_from_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = make_site(tmp_path, "sqlite", read_raw("cleveland"))
    try:
        # A careless admin renames the table under a running site.
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'records.db'}")
        with engine.begin() as connection:
            connection.execute(sa.text("ALTER TABLE records RENAME TO records_old"))
        engine.dispose()
        researcher = Researcher({"h": site}, heart_dictionary(), mode="dp")
        with caplog.at_level("ERROR", logger="alliance.site"):
            failed = researcher.run("mean", epsilon=0.5, variable="chol")
        assert isinstance(failed, Refused) and failed.codes == {"h": "error"}, failed
        reason = failed.reasons["h"]
        assert "the query failed (OperationalError; the site's log has" in reason
        assert "no such table" not in reason and "SELECT" not in reason  # the log only
        assert "no such table" in caplog.text
        assert site.store.spent("s1") == PureDP(0)  # nothing released, nothing charged
    finally:
        site.close()


def test_a_query_too_wide_for_the_database_is_computed_in_memory(tmp_path: Path) -> None:
    site = make_site(tmp_path, "sqlite", read_raw("cleveland"))
    try:
        researcher = Researcher({"h": site}, heart_dictionary(), mode="dp")
        formula = "disease ~ cp * restecg * slope * sex"  # 72 design columns
        analysis = get_analysis("glm")
        params = analysis.parse_params({"formula": formula}, site.dictionary)
        ctx = AnalysisContext(site.dictionary, "dp")
        assert site.pushdown is not None
        plan = analysis.pushdown(params, ctx, site.pushdown.column)
        assert plan is not None and plan.queries[0].width > MAX_COLUMNS  # SQLite allows 2,000
        result = researcher.run("glm", epsilon=1.0, formula=formula, family="binomial")
        assert site._records is not None  # read for this request: the SQL was never sent
        assert not isinstance(result, Refused) or "error" not in result.codes.values(), result
    finally:
        site.close()


def test_hostile_names_and_filters_stay_data(tmp_path: Path) -> None:
    hostile = 'chol"); DROP TABLE records; --'
    frame = read_raw("cleveland").rename(columns={"chol": hostile})
    url = f"sqlite:///{tmp_path / 'records.db'}"
    engine = sa.create_engine(url)
    frame.to_sql("records", engine, index_label="row_id")
    data = {"connector": "sql", "url": url, "table": "records", "rename": {hostile: "chol"}}
    site = SiteRuntime.from_config(site_config(tmp_path, data), record_start=False)
    try:
        researcher = Researcher({"h": site}, heart_dictionary(), mode="dp")
        assert isinstance(researcher.run("mean", epsilon=0.5, variable="chol"), MeanResult)
        # The filter language admits dictionary names and numbers only: refused, not run.
        sneaky = researcher.run(
            "mean", filter="age >= 50); DROP TABLE records; --", epsilon=0.5, variable="chol"
        )
        assert isinstance(sneaky, Refused) and sneaky.codes == {"h": "validation"}
        assert site.pushdown is not None
        assert assert_pushdown_matches_local(site) == len(CASES) * len(FILTERS)
    finally:
        site.close()
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT count(*) FROM records")).scalar()
    engine.dispose()
    assert rows == len(frame)


def test_configurations_pushdown_cannot_serve_read_the_records_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "records.parquet"
    write_parquet(read_raw("cleveland"), path)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"variables": {"chol": {"missing": [0]}}}))
    data = {"connector": "parquet", "path": str(path), "mapping": str(mapping)}
    with caplog.at_level("WARNING", logger="alliance.site"):
        site = SiteRuntime.from_config(site_config(tmp_path, data), record_start=False)
    try:
        assert site.pushdown is None and site._records is not None
        assert "a mapping file is configured" in caplog.text
    finally:
        site.close()


def test_pushdown_needs_a_source_that_computes(tmp_path: Path) -> None:
    omop = {"variables": {"age": {"kind": "age"}}}
    with pytest.raises(
        ConfigError, match="pushdown: true needs connector csv, parquet or sql, not 'omop'"
    ):
        site_config(tmp_path, {"connector": "omop", "url": "sqlite:///x.db", "omop": omop})


@pytest.mark.parametrize("hospital", SITES)
def test_the_shipped_csv_files_are_scanned_in_place(tmp_path: Path, hospital: str) -> None:
    # The UCI files as a site reads them: no header, "?" for missing (simulations.heart).
    data = {
        "connector": "csv",
        "path": str(DATA_DIR / HEART_FILES[hospital]),
        "header": False,
        "column_names": COLUMNS,
        "na_values": ["?"],
    }
    site = SiteRuntime.from_config(site_config(tmp_path, data), record_start=False)
    try:
        assert site.pushdown is not None and site.pushdown.describe.startswith("CSV ")
        assert site.report.rows == len(read_raw(hospital))
        assert assert_pushdown_matches_local(site) == len(CASES) * len(FILTERS)
    finally:
        site.close()


def test_a_messy_csv_reads_as_pandas_reads_it(tmp_path: Path) -> None:
    # Each value as a careless export might hold it; the site reads it with pandas in memory
    # (the reference) and with DuckDB in place, and both must agree value by value.
    # 99 and 555 mean missing here, however spelled; '1_000' is not a number to pandas.
    chol = [" 250", "abc", "NA", "555", "", "inf", "2.4e2", "+300", "199.", "N/A", "nan", "1,5"]
    chol += ["555.0", "0555", "5.55e2", "2_00", "-9", " 555 "]
    age = ["54", "61 ", "NULL", "99", "70", "None", "45", "n/a", "66", "58", "#N/A", "49"]
    age += ["99.0", "099", "+60", "1_0", "9.9e1", " 99"]
    rows = [
        f'{a},"{c}",{i % 2},{1 + i % 4},{i % 3}'
        for i, (a, c) in enumerate(zip(age, chol, strict=True))
    ]
    path = tmp_path / "messy.csv"
    path.write_text("\n".join(["age,chol,sex,cp,num", *(rows * 30)]) + "\n")
    data = {"connector": "csv", "path": str(path), "na_values": ["99", "555"]}
    site = SiteRuntime.from_config(site_config(tmp_path, data), record_start=False)
    try:
        assert site.pushdown is not None
        assert assert_pushdown_matches_local(site) == len(CASES) * len(FILTERS)
        # Reference: the rule itself on the raw strings (pandas' number parsing, the
        # dictionary's range for chol, 555 missing).
        expected = (
            pd.to_numeric(pd.Series(chol * 30), errors="coerce")
            .where(lambda v: v.between(50, 700) & (v != 555))
            .rename("chol")
        )
        assert site.data["chol"].equals(expected)
        assert site.data["chol"].notna().sum() == 4 * 30  # ' 250', '2.4e2', '+300', '199.'
        # 4 missing-value strings, 5 spellings of 99 and 1 digit-separated number:
        assert site.data["age"].isna().sum() == 10 * 30
    finally:
        site.close()


def test_the_csv_missing_strings_are_pandas_defaults() -> None:
    from pandas._libs.parsers import STR_NA_VALUES  # pandas' own list (read_csv's na_values)

    assert set(PANDAS_NA_STRINGS) == set(STR_NA_VALUES)


def test_site_check_says_what_runs_in_the_source(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    path = tmp_path / "records.parquet"
    write_parquet(read_raw("cleveland").assign(thal=lambda f: f["thal"].astype(str)), path)
    config = site_config(tmp_path, {"connector": "parquet", "path": str(path)})
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["site", "check", "--config", str(tmp_path / "site.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # 15 dictionary variables are held (disease derived); thal is text in this file.
    assert (
        "data: pushdown: on: dp count, cox, glm, histogram, kaplan_meier, logrank, mean and "
        f"table run in Parquet "
        f"{path}; 14 of 15 held variables can be computed there; everything else reads the "
        "dictionary's columns once, on first need" in lines
    ), result.stdout
    assert "data: pushdown: not numeric in the source, so computed in memory: thal" in lines

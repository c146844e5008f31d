"""The site mapping file: renames, unit conversions, recoding, derived variables and local
missing codes, checked against pandas on a hospital's own table; clear errors for bad
mappings; `alliance site check` reports coverage; unmappable variables are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from analyses.quality import QualityResult
from protocol.config import DataDictionary, SiteConfig, SiteMapping
from protocol.errors import ConfigError
from simulations.cli import app
from site_node.mapping import apply_mapping, evaluate, parse_expression
from site_node.runtime import SiteRuntime
from tests.attacks.harness import ALL_ANALYSES, Refused, Researcher

runner = CliRunner()

DICTIONARY: dict[str, Any] = {
    "patient_id": "pid",
    "variables": {
        "sex": {"type": "categorical", "levels": [0, 1], "labels": ["female", "male"]},
        "chol": {"type": "numeric", "min": 50, "max": 700, "unit": "mg/dL"},
        "glucose": {"type": "numeric", "min": 20, "max": 800, "unit": "mg/dL"},
        "bmi": {"type": "numeric", "min": 10, "max": 80, "unit": "kg/m2"},
        "age": {"type": "numeric", "min": 0, "max": 120, "unit": "years"},
        "sbp": {"type": "numeric", "min": 60, "max": 250, "unit": "mm Hg"},
        "thal": {"type": "categorical", "levels": [3, 6, 7]},
    },
}

MAPPING: dict[str, Any] = {
    "variables": {
        "pid": {"column": "MRN"},
        "sex": {"column": "gender", "codes": {"M": 1, "F": 0}},
        "chol": {"column": "CHOL_MMOL", "unit": "mmol/L", "missing": [0]},
        "glucose": {"column": "GLU", "unit": "mmol/L"},
        "bmi": {"derive": "weight_kg / (height_cm / 100) ** 2"},
        "age": {"derive": "years_between(birth_date, visit_date)"},
        "sbp": {"column": "SYSTOLIC", "missing": [-9, "NA"]},
    },
    "conversions": [
        # One unit pair, two analytes: cholesterol and glucose convert by different factors.
        {"from": "mmol/L", "to": "mg/dL", "factor": 38.67, "variables": ["chol"]},
        {"from": "mmol/L", "to": "mg/dL", "factor": 18.016, "variables": ["glucose"]},
    ],
}


def hospital_table(rows: int = 400, seed: int = 11) -> pd.DataFrame:
    """A hospital's own table: its column names, units, codes and missing-value codes."""
    rng = np.random.default_rng(seed)
    birth = pd.Timestamp("1940-01-01") + pd.to_timedelta(rng.integers(0, 20000, rows), unit="D")
    visit = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, rows), unit="D")
    chol = rng.normal(5.2, 1.0, rows).round(2)
    chol[rng.random(rows) < 0.05] = 0.0  # this lab writes 0 for "not measured"
    sbp = rng.normal(130, 15, rows).round().astype(object)
    sbp[rng.random(rows) < 0.04] = -9
    sbp[rng.random(rows) < 0.02] = "NA"
    return pd.DataFrame(
        {
            "MRN": [f"H{i:06d}" for i in range(rows)],
            "gender": rng.choice(["M", "F", "X"], rows, p=[0.48, 0.48, 0.04]),
            "CHOL_MMOL": chol,
            "GLU": rng.normal(5.5, 0.8, rows).round(1),
            "weight_kg": rng.normal(78, 14, rows).round(1),
            "height_cm": rng.normal(170, 9, rows).round(),
            "birth_date": birth.strftime("%Y-%m-%d"),
            "visit_date": visit.strftime("%Y-%m-%d"),
            "SYSTOLIC": sbp,
            "cholesterol_note": "",  # a column nobody maps
        }
    )


def write_site(tmp_path: Path, table: pd.DataFrame, mapping: dict[str, Any]) -> Path:
    (tmp_path / "dictionary.yaml").write_text(yaml.safe_dump(DICTIONARY))
    (tmp_path / "mapping.yaml").write_text(yaml.safe_dump(mapping))
    table.to_csv(tmp_path / "local.csv", index=False)
    config = {
        "name": "h1",
        "coordinator": "127.0.0.1:1",
        "dictionary": "dictionary.yaml",
        "data": {"path": "local.csv", "mapping": "mapping.yaml"},
        "state_dir": "state",
        "insecure": True,
        "policy": {
            "allowed_analyses": ALL_ANALYSES,
            "studies": [{"id": "s1", "mode": "sdc", "sdc_filters": "free"}],
        },
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_mapped_data_equal_pandas_on_the_hospitals_table(tmp_path: Path) -> None:
    table = hospital_table()
    from protocol.config import load_yaml

    site = SiteRuntime.from_config(load_yaml(write_site(tmp_path, table, MAPPING), SiteConfig))
    try:
        data = site.data
        # Reference: the same rules written out in pandas.
        chol = table["CHOL_MMOL"].where(table["CHOL_MMOL"] != 0) * 38.67
        chol = chol.where(chol.between(50, 700))
        np.testing.assert_allclose(data["chol"], chol, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(data["glucose"], table["GLU"] * 18.016, rtol=1e-12)
        sex = table["gender"].map({"M": 1.0, "F": 0.0})
        np.testing.assert_array_equal(data["sex"], sex)
        bmi = table["weight_kg"] / (table["height_cm"] / 100) ** 2
        np.testing.assert_allclose(data["bmi"], bmi.where(bmi.between(10, 80)), rtol=1e-12)
        days = pd.to_datetime(table["visit_date"]) - pd.to_datetime(table["birth_date"])
        np.testing.assert_allclose(data["age"], days.dt.days / 365.25, rtol=1e-12)
        sbp = pd.to_numeric(table["SYSTOLIC"], errors="coerce")
        sbp = sbp.where(sbp != -9)
        np.testing.assert_allclose(data["sbp"], sbp.where(sbp.between(60, 250)), equal_nan=True)
        ids = site.consent.patient_ids
        assert ids is not None and list(ids[:2]) == ["H000000", "H000001"]
        # The quality profile sees the local codes as missing and the unmapped code X as a
        # value the dictionary does not allow.
        r = Researcher({"h1": site}, DataDictionary.model_validate(DICTIONARY))
        profile = r.run("quality", variables=["chol", "sex", "sbp"])
        assert isinstance(profile, QualityResult), profile
        assert profile.profiles["h1"]["sex"]["out_of_range"] == (table["gender"] == "X").sum()
        assert profile.profiles["h1"]["chol"]["missing"] == (table["CHOL_MMOL"] == 0).sum()
        local_missing = table["SYSTOLIC"].isin([-9, "NA"]).sum()
        assert profile.profiles["h1"]["sbp"]["missing"] == local_missing
        mean = r.run("mean", variable="chol")
        assert not isinstance(mean, Refused)
        assert mean.mean == pytest.approx(chol.mean(), rel=1e-12)  # type: ignore[attr-defined]
        # A dictionary variable the site cannot map is refused in plain words.
        absent = r.run("mean", variable="bmi", filter="thal == 3")
        assert isinstance(absent, Refused)
        assert absent.codes["h1"] == "mapping"
        assert "cannot serve 'thal': its data has no column for it" in absent.reasons["h1"]
    finally:
        site.close()


def test_site_check_reports_the_mapping_coverage_and_suggests_names(tmp_path: Path) -> None:
    table = hospital_table(100)
    result = runner.invoke(
        app, ["site", "check", "--config", str(write_site(tmp_path, table, MAPPING))]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    zeros = int((table["CHOL_MMOL"] == 0).sum())
    assert (
        f"mapping: chol: column CHOL_MMOL; mmol/L -> mg/dL (x 38.67); {zeros} local missing "
        "codes set missing" in lines
    )
    xs = int((table["gender"] == "X").sum())
    assert f"mapping: sex: column gender; {xs} values with a code not in codes" in lines
    assert "mapping: bmi: derived: weight_kg / (height_cm / 100) ** 2" in lines
    assert (
        "data: columns not in the dictionary (ignored): cholesterol_note (did you mean chol?)"
        in lines
    )
    assert f"data: sex: {xs} values not numbers (set missing)" in lines
    assert (
        "coverage: 6 of 7 dictionary variables held here (tasks reading the others are refused)"
        in lines
    )
    assert "data: dictionary variables absent here: thal" in lines
    assert "coverage thal: not held here (no column, no mapping)" in lines
    # Reference: pandas on the hospital's table (chol in mmol/L, 0 meaning not measured).
    chol = table["CHOL_MMOL"].where(table["CHOL_MMOL"] != 0) * 38.67
    held = int(chol.between(50, 700).sum())
    assert f"coverage chol: {held} of 100 records hold an allowed value" in lines


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variables": {"cholesterol": {"column": "CHOL_MMOL"}}},
         "mapping: cholesterol: not a dictionary variable (did you mean 'chol'?)"),
        ({"variables": {"chol": {"column": "CHOL_MMOLL"}}},
         "mapping: chol: the local data has no column 'CHOL_MMOLL' (did you mean 'CHOL_MMOL'?)"),
        ({"variables": {"bmi": {"derive": "__import__('os').system('id')"}}},
         "mapping: bmi: derive: \"__import__('os').system('id')\" is not allowed in a derive"),
        ({"variables": {"bmi": {"derive": "weight_kg.__class__"}}},
         "mapping: bmi: derive: 'weight_kg.__class__' is not allowed in a derive"),
        ({"variables": {"bmi": {"derive": "[w for w in weight_kg]"}}},
         "is not allowed in a derive; allowed: local columns, numbers"),
        ({"variables": {"chol": {"column": "CHOL_MMOL", "unit": "mmol/l"}}},
         "mapping: chol: unit 'mmol/l': no conversion mmol/l -> mg/dL is declared for it; add "
         "one to conversions: {from: mmol/l, to: mg/dL, factor: ...}"),
        ({"variables": {"sex": {"column": "gender", "codes": {"M": 1, "F": 2}}}},
         "mapping: sex: codes map to [2.0], not levels of sex ([0, 1])"),
        ({"variables": {"chol": {"column": "CHOL_MMOL", "codes": {"0": 1}}}},
         "mapping: chol: codes need a categorical or binary variable"),
    ],
)  # fmt: skip
def test_a_bad_mapping_is_one_clear_error_at_start(change: dict[str, Any], message: str) -> None:
    mapping = SiteMapping.model_validate({**MAPPING, **change})
    with pytest.raises(ConfigError) as caught:
        apply_mapping(hospital_table(20), mapping, DataDictionary.model_validate(DICTIONARY))
    assert message in str(caught.value)


def test_derived_values_are_missing_where_an_input_is_or_the_arithmetic_fails() -> None:
    frame = pd.DataFrame(
        {"w": [70.0, np.nan, 80.0, 60.0], "h": [175.0, 180.0, 0.0, 160.0],
         "born": ["1950-01-01", "1960-06-30", "not a date", "1970-01-01"],
         "seen": ["2020-01-01", "2020-06-30", "2020-01-01", ""]}
    )  # fmt: skip
    bmi = evaluate(parse_expression("w / (h / 100) ** 2", "t"), frame)
    assert bmi[0] == pytest.approx(70 / 1.75**2) and np.isnan(bmi[1:3]).all()
    assert bmi[3] == pytest.approx(60 / 1.6**2)
    age = evaluate(parse_expression("years_between(born, seen)", "t"), frame)
    assert age[0] == pytest.approx(25567 / 365.25) and np.isnan(age[2:]).all()
    assert evaluate(parse_expression("-w + 2 * 3", "t"), frame)[0] == -64.0

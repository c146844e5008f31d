"""The site's data path under pandas' copy-on-write (always on from pandas 3).

Under copy-on-write `Series.to_numpy()` may return a read-only view; code that writes into it
dies with "assignment destination is read-only". pandas 3 is what `pip install .` gets, so each
test here runs with copy-on-write on: pandas 3 has it always, pandas 2 switches it on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from protocol.config import DataDictionary, SiteConfig, dump_yaml
from site_node.harmonize import conform
from site_node.runtime import SiteRuntime

PANDAS_MAJOR = int(pd.__version__.split(".")[0])


@pytest.fixture(autouse=True)
def copy_on_write() -> Iterator[None]:
    """pandas 3 behaviour on pandas 2 too (setting the option on pandas 3 only warns)."""
    if PANDAS_MAJOR >= 3:
        yield
    else:
        with pd.option_context("mode.copy_on_write", True):
            yield


@pytest.fixture
def dictionary() -> DataDictionary:
    return DataDictionary.model_validate(
        {
            "variables": {
                "age": {"type": "numeric", "min": 0, "max": 120},
                "chol": {"type": "numeric", "min": 50, "max": 700},
                "sex": {"type": "categorical", "levels": [0, 1]},
                "num": {"type": "categorical", "levels": [0, 1, 2, 3, 4]},
                "disease": {"type": "binary"},
            }
        }
    )


def test_conform_sets_out_of_range_values_missing_under_copy_on_write(
    dictionary: DataDictionary,
) -> None:
    # One frame per column kind that pandas hands back as a view: float64 already, integers,
    # and text read from a CSV (pandas 3's string dtype).
    raw = pd.DataFrame(
        {
            "age": [30.0, 200.0, 50.0, -1.0],
            "chol": [0, 250, 300, 800],
            "sex": ["0", "1", "7", "x"],
            "num": [0, 2, 1, 0],
            "site_code": ["a", "b", "c", "d"],
        }
    )
    before = raw.copy()
    data, report = conform(raw, dictionary, derive={"disease": "num > 0"})
    assert data["age"].tolist()[::2] == [30.0, 50.0]
    assert data["age"].isna().tolist() == [False, True, False, True]
    assert data["chol"].isna().tolist() == [True, False, False, True]
    assert data["sex"].isna().tolist() == [False, False, True, True]
    assert data["disease"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert report.below_min == {"age": 1, "chol": 1}
    assert report.above_max == {"age": 1, "chol": 1}
    assert report.unknown_levels == {"sex": 1}
    assert report.not_numeric == {"sex": 1}
    assert report.unknown_columns == ["site_code"]
    # The caller's frame is never written through a shared buffer.
    pd.testing.assert_frame_equal(raw, before)


def test_a_site_starts_on_its_csv_under_copy_on_write(
    tmp_path: Path, dictionary: DataDictionary
) -> None:
    # The failure a hospital saw on pandas 3: the site died reading its CSV at start.
    (tmp_path / "dictionary.yaml").write_text(dump_yaml(dictionary))
    (tmp_path / "data.csv").write_text("age,chol,sex,num\n30,0,1,0\n200,250,0,2\n55,,1,1\n")
    config = SiteConfig.model_validate(
        {
            "name": "testsite",
            "coordinator": "127.0.0.1:1",
            "dictionary": str(tmp_path / "dictionary.yaml"),
            "data": {"path": str(tmp_path / "data.csv"), "derive": {"disease": "num > 0"}},
            "state_dir": str(tmp_path / "state"),
            "insecure": True,
        }
    )
    runtime = SiteRuntime.from_config(config, record_start=False)
    assert runtime.report.above_max == {"age": 1}
    assert runtime.report.below_min == {"chol": 1}
    assert runtime.data["chol"].isna().tolist() == [True, False, True]
    assert runtime.data["age"].isna().tolist() == [False, True, False]
    assert runtime.data["disease"].tolist() == [0.0, 1.0, 1.0]

"""A site reply can only hold aggregates of declared shapes: row-level data cannot be built."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from protocol.errors import RecordError
from protocol.records import MAX_CELLS, AggregateRecord, ArraySpec, RecordSpec, Release

# Ages of 303 patients (the size of the Cleveland cohort): the thing a reply must never carry.
AGES = np.random.default_rng(0).integers(29, 78, size=303).astype(float)


@pytest.fixture
def spec() -> RecordSpec:
    return RecordSpec(
        {
            "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True),
            "sum_age": ArraySpec((), kind="sum", sensitivity=120.0),
            "table": ArraySpec((2, 2), kind="count", sensitivity=1.0, integer=True),
            "xtx": ArraySpec((3, 3)),
        }
    )


def valid_arrays() -> dict[str, Any]:
    return {
        "n": 303,
        "sum_age": float(AGES.sum()),
        "table": [[10, 20], [30, 40]],
        "xtx": np.eye(3, dtype=np.float32),
    }


# --------------------------------------------------------------------------- valid records


def test_valid_record_builds_as_float64(spec: RecordSpec) -> None:
    record = AggregateRecord(spec, valid_arrays())
    assert record["n"].shape == () and record["n"] == 303.0
    assert record["table"].shape == (2, 2) and record["table"][1, 0] == 30.0
    assert all(arr.dtype == np.float64 for arr in record.arrays.values())
    # Every declared array gets release metadata, "none" by default.
    assert record.releases["xtx"] == Release()
    assert record.epsilon == 0.0


def test_arrays_are_read_only_and_copied(spec: RecordSpec) -> None:
    source = np.array([[1.0, 2.0], [3.0, 4.0]])
    arrays = valid_arrays() | {"table": source}
    record = AggregateRecord(spec, arrays)
    with pytest.raises(ValueError, match="read-only"):
        record["table"][0, 0] = 99.0
    with pytest.raises(ValueError, match="read-only"):
        record["n"][...] = 1.0
    source[0, 0] = 99.0  # the caller's array is not aliased
    assert record["table"][0, 0] == 1.0


def test_record_is_frozen(spec: RecordSpec) -> None:
    record = AggregateRecord(spec, valid_arrays())
    with pytest.raises(AttributeError):
        record.arrays = {"n": AGES}  # type: ignore[misc]
    with pytest.raises(AttributeError):
        record.spec = RecordSpec({"n": ArraySpec((303,))})  # type: ignore[misc]


def test_arrays_mapping_cannot_be_changed_after_construction(spec: RecordSpec) -> None:
    record = AggregateRecord(spec, valid_arrays())
    with pytest.raises(TypeError):
        record.arrays["n"] = AGES  # type: ignore[index]


def test_releases_and_epsilon(spec: RecordSpec) -> None:
    releases = {
        "n": Release("discrete_laplace", 2.0, 0.25),
        "sum_age": Release("laplace", 240.0, 0.25),
    }
    record = AggregateRecord(spec, valid_arrays(), releases)
    assert record.epsilon == pytest.approx(0.5)
    assert record.releases["table"].mechanism == "none"
    private = record.with_values(
        {name: np.asarray(arr) + 1 for name, arr in record.arrays.items()}, releases
    )
    assert private["n"] == 304.0 and private.spec is record.spec


# --------------------------------------------------------------------------- row-level data


def test_column_of_patient_ages_where_a_scalar_was_declared(spec: RecordSpec) -> None:
    with pytest.raises(RecordError) as info:
        AggregateRecord(spec, valid_arrays() | {"sum_age": AGES})
    message = str(info.value)
    assert "'sum_age' has shape (303,) but () was declared" in message
    assert "one value per patient" in message


@pytest.mark.parametrize(
    "value",
    [AGES.reshape(-1, 1), AGES[:4], pd.Series(AGES), pd.DataFrame({"age": AGES})],
    ids=["column-vector", "first-4-patients", "series", "dataframe"],
)
def test_any_other_shape_is_refused(spec: RecordSpec, value: object) -> None:
    # Even four patients' ages fit a 2x2 table's cell count, but not its shape.
    with pytest.raises(RecordError, match=r"'table' has shape .* but \(2, 2\) was declared"):
        AggregateRecord(spec, valid_arrays() | {"table": value})


@pytest.mark.parametrize(
    "value",
    [
        "MRN-000123",
        b"MRN-000123",
        ["MRN-1", "MRN-2"],
        np.array([["MRN-1", "MRN-2"], ["MRN-3", "MRN-4"]]),
        pd.Series(["MRN-1", "MRN-2", "MRN-3", "MRN-4"]).to_numpy().reshape(2, 2),
    ],
    ids=["str", "bytes", "list-of-str", "unicode-array", "object-array"],
)
def test_string_identifiers_are_refused(spec: RecordSpec, value: object) -> None:
    with pytest.raises(RecordError, match="numbers only"):
        AggregateRecord(spec, valid_arrays() | {"table": value})


@pytest.mark.parametrize(
    "value",
    [
        np.array([[1.0, 2.0], [3.0, 4.0]], dtype=object),  # numbers, but object dtype
        np.array([[1, None], [3, 4]], dtype=object),
        np.array([["2024-01-01", "2024-01-02"]] * 2, dtype="datetime64[D]"),
        np.array([[1 + 1j, 0], [0, 0]]),
    ],
    ids=["object-numbers", "object-none", "dates", "complex"],
)
def test_object_dates_and_complex_dtypes_are_refused(spec: RecordSpec, value: object) -> None:
    with pytest.raises(RecordError, match=r"has dtype .*; a reply carries numbers only"):
        AggregateRecord(spec, valid_arrays() | {"table": value})


def test_undeclared_array_is_refused(spec: RecordSpec) -> None:
    with pytest.raises(RecordError) as info:
        AggregateRecord(spec, valid_arrays() | {"ages": AGES})
    assert "['ages'] were not declared before the analysis ran" in str(info.value)
    assert "declared: ['n', 'sum_age', 'table', 'xtx']" in str(info.value)


def test_missing_declared_array_is_refused(spec: RecordSpec) -> None:
    arrays = valid_arrays()
    del arrays["xtx"]
    with pytest.raises(RecordError, match=r"declared arrays \['xtx'\] are missing"):
        AggregateRecord(spec, arrays)


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (-1,)}, "dimensions must be integers >= 0"),
        ({"shape": (2.0,)}, "dimensions must be integers >= 0"),
        ({"shape": (True,)}, "dimensions must be integers >= 0"),
        ({"shape": (MAX_CELLS + 1,)}, f"an aggregate may have at most {MAX_CELLS}"),
        ({"shape": (1001, 1000)}, "has 1001000 cells"),
        ({"shape": (), "kind": "rows"}, "kind 'rows' is not one of: count, sum, statistic"),
        ({"shape": (), "budget_share": 0.0}, "budget_share must be finite and > 0"),
        ({"shape": (), "budget_share": float("nan")}, "budget_share must be finite and > 0"),
        ({"shape": (), "sensitivity": -1.0}, "sensitivity must be finite and >= 0"),
        ({"shape": (), "sensitivity": float("inf")}, "sensitivity must be finite and >= 0"),
    ],
)
def test_array_spec_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ArraySpec(**kwargs)  # type: ignore[arg-type]


def test_array_spec_normalises_shape() -> None:
    spec = ArraySpec([np.int64(2), 3])  # type: ignore[arg-type]
    assert spec.shape == (2, 3) and spec.size == 6
    assert ArraySpec(()).size == 1


@pytest.mark.parametrize("name", ["not an identifier", "1st", "a-b", ""])
def test_record_spec_names_must_be_identifiers(name: str) -> None:
    with pytest.raises(RecordError, match="must be a plain identifier"):
        RecordSpec({name: ArraySpec(())})


def test_record_spec_needs_array_specs() -> None:
    with pytest.raises(RecordError, match="must be declared with an ArraySpec"):
        RecordSpec({"n": (303,)})  # type: ignore[dict-item]


def test_release_mechanism_must_be_known() -> None:
    with pytest.raises(RecordError, match="mechanism 'rounding' is not one of: none, laplace"):
        Release("rounding")


@pytest.mark.parametrize(
    ("mechanism", "scale", "closed_form"),
    [
        ("laplace", 2.5, 2 * 2.5**2),
        # discrete Laplace: q = exp(-1/b), variance 2q / (1 - q)^2
        ("discrete_laplace", 3.0, 2 * np.exp(-1 / 3) / (1 - np.exp(-1 / 3)) ** 2),
        ("gaussian", 1.7, 1.7**2),
        ("none", 0.0, 0.0),
    ],
)
def test_one_noise_model_variance_and_redraw_agree(
    mechanism: str, scale: float, closed_form: float
) -> None:
    release = Release(mechanism, scale, 0.1)
    assert release.variance() == pytest.approx(closed_form, rel=1e-12)
    draws = release.redraw(np.random.default_rng(11), (200_000,))
    assert draws.shape == (200_000,)
    # 200,000 draws estimate a variance within about 1% (Laplace's kurtosis is 6).
    assert np.var(draws) == pytest.approx(closed_form, rel=0.03, abs=1e-12)
    if mechanism == "discrete_laplace":
        assert np.array_equal(draws, np.rint(draws))


def test_a_release_refuses_an_unknown_mechanism_or_a_bad_scale() -> None:
    with pytest.raises(RecordError, match="mechanism 'exponential' is not one of"):
        Release("exponential", 1.0, 0.1)
    with pytest.raises(RecordError, match="noise scale must be finite and >= 0"):
        Release("laplace", float("inf"), 0.1)

"""Helpers every analysis may use, so that no analysis imports another.

Dictionary lookups (levels and their display names, numeric checks), column extraction, the
pooling of the sites' records (sums and their noise), and packed upper triangles of symmetric
matrices (each cell released once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from analyses._lazy import stats
from protocol.config import DataDictionary, NumericVariable
from protocol.errors import ValidationError
from protocol.records import AggregateRecord

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# ----------------------------------------------------------------------------- the dictionary


def require_numeric(dictionary: DataDictionary, name: str) -> NumericVariable:
    """The numeric variable ``name``, or a ValidationError saying what it is instead."""
    var = dictionary.variable(name)
    if not isinstance(var, NumericVariable):
        raise ValidationError(
            f"variable {name!r} is {var.type}; this analysis needs a numeric variable"
        )
    return var


def require_levels(dictionary: DataDictionary, name: str, what: str) -> list[int]:
    """Levels of a categorical or binary variable, or a ValidationError naming ``what``."""
    var = dictionary.variable(name)
    if isinstance(var, NumericVariable):
        raise ValidationError(
            f"{what} {name!r} is numeric; it must be a categorical or binary variable"
        )
    return list(var.levels)


def level_names(dictionary: DataDictionary, name: str) -> list[str]:
    """Display names of a variable's levels: ``level (label)`` when the dictionary has labels."""
    var = dictionary.variable(name)
    levels = dictionary.levels(name)
    labels = getattr(var, "labels", None)
    if labels:
        return [f"{level} ({label})" for level, label in zip(levels, labels, strict=True)]
    return [str(level) for level in levels]


# ----------------------------------------------------------------------------- site data


def column(data: pd.DataFrame, name: str) -> FloatArray:
    """A dictionary column as float64 with missing values as NaN (a fresh, writable array)."""
    return np.array(data[name].to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)


def one_hot(values: FloatArray, levels: Sequence[int]) -> FloatArray:
    """Indicator matrix (rows x levels); a missing value matches no level."""
    matches = values[:, None] == np.asarray(levels, dtype=np.float64)[None, :]
    return np.asarray(matches, dtype=np.float64)


# ----------------------------------------------------------------------------- pooling


def pooled(records: Mapping[str, AggregateRecord], name: str) -> FloatArray:
    """The sum over sites of array ``name`` (a zero scalar when no site answered)."""
    arrays = [r[name] for r in records.values()]
    if not arrays:
        return np.zeros(())
    return np.asarray(np.sum(arrays, axis=0), dtype=np.float64)


def pooled_noise_variance(records: Mapping[str, AggregateRecord], name: str) -> float:
    """Noise variance of one cell of the pooled array ``name`` (independent site noises)."""
    return float(sum(r.releases[name].variance() for r in records.values()))


# ----------------------------------------------------------------------------- estimates


def wald_row(estimate: float, std_error: float, crit: float) -> dict[str, float]:
    """One coefficient's row of a model summary: the estimate, its standard error, the Wald
    z (NaN when the error is 0) and two-sided p, and the interval estimate +/- crit * error."""
    estimate, std_error = float(estimate), float(std_error)
    z = estimate / std_error if std_error > 0 else float("nan")
    return {
        "estimate": estimate,
        "std_error": std_error,
        "z": z,
        "p": float(2 * stats.norm.sf(abs(z))),
        "ci_lower": estimate - crit * std_error,
        "ci_upper": estimate + crit * std_error,
    }


# ----------------------------------------------------------------------------- packed triangles


def packed_index(p: int) -> tuple[IntArray, IntArray]:
    """Row and column indices of a p x p upper triangle, in the order a packed array holds."""
    rows, cols = np.triu_indices(p)
    return rows.astype(np.int64), cols.astype(np.int64)


def unpack(packed: FloatArray, p: int) -> FloatArray:
    """(..., p(p+1)/2) packed upper triangles -> (..., p, p) symmetric matrices."""
    rows, cols = packed_index(p)
    out = np.zeros((*packed.shape[:-1], p, p))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out

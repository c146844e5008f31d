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
from protocol.errors import DisclosureError, ValidationError
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


# ----------------------------------------------------------------------------- sdc model checks

#: A record whose leverage is this close to 1 is fitted exactly: the model is saturated there.
SATURATED_LEVERAGE = 1 - 1e-6


def check_model_cells(indicators: Mapping[str, FloatArray], min_cell: int, model: str) -> None:
    """sdc: every 0/1 column of a model (a binary term, a level's dummy, an interaction cell, a
    categorical level's own indicator) holds at least ``min_cell`` records at each of its two
    values, zero included, so that refused versus empty is no oracle.

    Raises:
        DisclosureError: saying which rule, never a count.
    """
    for values in indicators.values():
        ones = int(np.count_nonzero(values == 1))
        if ones < min_cell or values.size - ones < min_cell:
            raise DisclosureError(
                f"refused by disclosure control: in the rows of {model} at this site, a level, "
                f"an interaction cell or a value of a 0/1 term holds fewer than {min_cell} "
                "records (a coefficient would describe them alone). Coarsen or drop the term"
            )


def zero_one_columns(matrix: FloatArray, names: Sequence[str]) -> dict[str, FloatArray]:
    """The columns of a raw design whose values are all 0 or 1 (an intercept excluded)."""
    out: dict[str, FloatArray] = {}
    for j, name in enumerate(names):
        values = matrix[:, j]
        if np.all((values == 0) | (values == 1)) and not np.all(values == 1):
            out[str(name)] = values
    return out


def check_not_saturated(x: FloatArray, model: str) -> None:
    """sdc: refuse a fit that reproduces a record exactly: a record whose design row lies
    outside the span of the other rows has leverage 1, whatever the (positive) weights.

    Raises:
        DisclosureError: saying so, never which record or how many.
    """
    if x.shape[0] == 0:
        return
    # Leverages from X'X's eigendecomposition (one pass over the rows: 0.1 s at 1M x 11, where
    # an SVD of X takes 0.5 s); a record that comes near 1 is confirmed from the SVD of X
    # itself, which does not square the condition number.
    values, vectors = np.linalg.eigh(x.T @ x)
    keep = values > values.max() * x.shape[1] * 1e-12
    basis = x @ (vectors[:, keep] / np.sqrt(values[keep]))
    if float(np.einsum("ij,ij->i", basis, basis).max()) < 0.999:
        return
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    rank = int(np.count_nonzero(s > s[0] * max(x.shape) * np.finfo(float).eps)) if s.size else 0
    leverage = np.einsum("ij,ij->i", u[:, :rank], u[:, :rank])
    if leverage.size and float(leverage.max()) >= SATURATED_LEVERAGE:
        raise DisclosureError(
            f"refused by disclosure control: {model} would be saturated at a record of this "
            "site (the fit reproduces it exactly, so its coefficients disclose it). Drop or "
            "coarsen the term that isolates it"
        )

"""The models training fits: their arrays, the public design encoding and predictions.

Everything here is fixed by the request and the data dictionary, never by a site's data: the
design matrix scales each numeric variable to [0, 1] by the dictionary's public bounds and
one-hot encodes categorical levels (the first level is the reference), so every site builds
the same columns and an update's shape is known before any data is seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocol.config import BinaryVariable, CategoricalVariable, DataDictionary, NumericVariable

Weights = dict[str, npt.NDArray[np.float64]]


def design_columns(features: list[str], dictionary: DataDictionary) -> list[str]:
    """The design matrix's column names, in order."""
    columns: list[str] = []
    for name in features:
        variable = dictionary.variable(name)
        if isinstance(variable, CategoricalVariable):
            columns += [f"{name}[{level}]" for level in variable.levels[1:]]
        else:
            columns.append(name)
    return columns


def design(
    frame: pd.DataFrame, features: list[str], dictionary: DataDictionary
) -> npt.NDArray[np.float64]:
    """The encoded design matrix of ``frame``'s rows (which must be complete cases)."""
    parts: list[npt.NDArray[np.float64]] = []
    for name in features:
        variable = dictionary.variable(name)
        values = frame[name].to_numpy(dtype=float, copy=True)
        if isinstance(variable, NumericVariable):
            span = variable.max - variable.min
            parts.append(
                ((np.clip(values, variable.min, variable.max) - variable.min) / span)[:, None]
            )
        elif isinstance(variable, CategoricalVariable):
            parts.append(np.stack([values == level for level in variable.levels[1:]], axis=1))
        elif isinstance(variable, BinaryVariable):
            parts.append((values == 1)[:, None].astype(float))
    if not parts:
        return np.zeros((len(frame), 0))
    return np.hstack(parts).astype(float)


def array_shapes(kind: str, columns: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The model's arrays and their shapes, in the order the flat vector lists them."""
    if kind == "logistic":
        return {"coef": (columns,), "intercept": (1,)}
    return {"w1": (columns, hidden), "b1": (hidden,), "w2": (hidden,), "b2": (1,)}


def model_size(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Numbers in the flat vector of a model with these arrays."""
    return int(sum(int(np.prod(shape)) for shape in shapes.values()))


def initial_weights(kind: str, columns: int, hidden: int, seed: int) -> Weights:
    """The public starting model: zeros for logistic regression; for the MLP, small random
    weights from the request's seed (the same at the coordinator and every site)."""
    shapes = array_shapes(kind, columns, hidden)
    if kind == "logistic":
        return {name: np.zeros(shape) for name, shape in shapes.items()}
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0.0, 1.0 / np.sqrt(max(columns, 1)), shapes["w1"]),
        "b1": np.zeros(shapes["b1"]),
        "w2": rng.normal(0.0, 1.0 / np.sqrt(hidden), shapes["w2"]),
        "b2": np.zeros(shapes["b2"]),
    }


def flatten(
    weights: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> npt.NDArray[np.float64]:
    """The arrays as one vector, in the order of ``shapes``."""
    return np.concatenate([np.asarray(weights[name], dtype=float).reshape(-1) for name in shapes])


def unflatten(vector: npt.ArrayLike, shapes: Mapping[str, tuple[int, ...]]) -> Weights:
    """One vector back into named arrays (fresh, writable copies)."""
    flat = np.array(vector, dtype=float).reshape(-1)
    out: Weights = {}
    start = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = flat[start : start + size].reshape(shape).copy()
        start += size
    return out


def predict_proba(
    weights: Mapping[str, npt.NDArray[np.float64]], x: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The model's probability of outcome 1 for each row of the design matrix."""
    if "coef" in weights:
        z = x @ weights["coef"] + weights["intercept"][0]
    else:
        hidden = np.tanh(x @ weights["w1"] + weights["b1"])
        z = hidden @ weights["w2"] + weights["b2"][0]
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0))))


#: Score bins of the evaluation histogram (federated AUC, calibration).
EVAL_BINS = 20


def evaluation_counts(
    p: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """One site's evaluation arrays: per score bin the positives, the negatives and the sum of
    predicted probabilities, then the Brier sum. One row moves at most one cell of each of the
    first three blocks and the Brier sum, each by at most 1: L2 sensitivity sqrt(3)."""
    bins = np.minimum((p * EVAL_BINS).astype(int), EVAL_BINS - 1)
    positives = np.bincount(bins[y == 1], minlength=EVAL_BINS).astype(float)
    negatives = np.bincount(bins[y == 0], minlength=EVAL_BINS).astype(float)
    score_sum = np.bincount(bins, weights=p, minlength=EVAL_BINS)
    brier = float(np.sum((p - y) ** 2))
    return np.concatenate([positives, negatives, score_sum, [brier]])


def pooled_metrics(counts: npt.NDArray[np.float64]) -> dict[str, Any]:
    """AUC, Brier score and calibration from the sum of sites' evaluation arrays (noisy counts
    are clipped at 0 first). The AUC is the binned ROC's (ties within a bin count one half),
    within 1/EVAL_BINS-ish of the exact AUC for smooth score distributions."""
    b = EVAL_BINS
    total = float(counts[: 2 * b].sum())  # unbiased under noise: clipping would inflate it
    positives = np.clip(counts[:b], 0.0, None)
    negatives = np.clip(counts[b : 2 * b], 0.0, None)
    score_sum = counts[2 * b : 3 * b]
    brier_sum = float(counts[3 * b])
    n_pos, n_neg = positives.sum(), negatives.sum()
    if n_pos > 0 and n_neg > 0:
        below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
        auc = float(np.sum(positives * (below + 0.5 * negatives)) / (n_pos * n_neg))
    else:
        auc = float("nan")
    per_bin = positives + negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(per_bin > 0, score_sum / per_bin, np.nan)
        observed = np.where(per_bin > 0, positives / per_bin, np.nan)
    return {
        "auc": auc,
        "brier": brier_sum / total if total > 0 else float("nan"),
        "n": total,
        "calibration": {
            "bin_upper": [float((i + 1) / b) for i in range(b)],
            "records": [float(v) for v in per_bin],
            "mean_predicted": [float(v) for v in mean_predicted],
            "observed": [float(v) for v in observed],
        },
    }

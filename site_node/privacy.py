"""The site's privacy engine: what leaves the site is decided here, not in the analysis.

* ``dp``: every array passes OpenDP's Laplace mechanism (discrete Laplace for integer counts),
  with its scale calibrated so that OpenDP's own privacy map certifies at most the array's share
  of the task's epsilon, given the array's L1 sensitivity to adding or removing one patient row
  (declared from the dictionary's public bounds). By sequential composition the task's release
  is epsilon-DP per patient row at this site. Assumes: one row per patient, bounds that are
  public and enforced (values outside are set missing on load and clamped by the analysis).
* ``sdc``: exact releases; any count cell in 1 .. min_cell - 1 refuses the whole release.
* ``off``: exact releases, no thresholds (only when the site's policy names it for the study).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import opendp.prelude as dp

from protocol.config import SDCThresholds
from protocol.errors import DisclosureError, InternalError
from protocol.records import AggregateRecord, RecordSpec, Release

dp.enable_features("contrib")

Arrays = dict[str, np.ndarray]


@functools.lru_cache(maxsize=512)
def _measurement(integer: bool, scale: float, d_in: float) -> tuple[Any, float]:
    """OpenDP's Laplace measurement and the epsilon its privacy map certifies for ``d_in``.

    Cached: building a measurement costs more than the release itself for small aggregates,
    and the same (type, scale, sensitivity) recurs for every task of a study.
    """
    if integer:
        domain = dp.vector_domain(dp.atom_domain(T="i64"))
        metric = dp.l1_distance(T="i64")
        meas = dp.m.make_laplace(domain, metric, scale)
        return meas, float(meas.map(int(d_in)))  # type: ignore[no-untyped-call]
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False))
    metric = dp.l1_distance(T=float)
    meas = dp.m.make_laplace(domain, metric, scale)
    return meas, float(meas.map(float(d_in)))  # type: ignore[no-untyped-call]


def _laplace(
    values: np.ndarray, sensitivity: float, epsilon: float, integer: bool
) -> tuple[np.ndarray, Release]:
    """Release ``values`` through OpenDP's Laplace mechanism within ``epsilon``."""
    flat = values.ravel()
    if sensitivity == 0:
        return values.copy(), Release("none", 0.0, 0.0)
    if integer:
        d_in: float | int = math.ceil(sensitivity)  # integer cells move in whole steps
        scale = d_in / epsilon
        data = np.rint(flat).astype(np.int64)
        mechanism = "discrete_laplace"
    else:
        scale = sensitivity / epsilon
        d_in = float(sensitivity)
        data = flat.astype(np.float64)
        mechanism = "laplace"
    meas, spent = _measurement(integer, scale, d_in)
    if spent > epsilon * (1 + 1e-9):  # OpenDP's float rounding slack: widen once and re-check
        scale *= spent / epsilon * (1 + 1e-9)
        meas, spent = _measurement(integer, scale, d_in)
    if spent > epsilon * (1 + 1e-6):
        raise InternalError(f"OpenDP certifies epsilon {spent} above the share {epsilon}")
    noisy = np.asarray(meas(data), dtype=np.float64).reshape(values.shape)
    return noisy, Release(mechanism, float(scale), spent)


def privatize(
    spec: RecordSpec,
    arrays: Arrays,
    mode: str,
    epsilon: float,
    sdc: SDCThresholds,
) -> AggregateRecord:
    """Turn an analysis's exact arrays into the record that may leave the site.

    Raises:
        DisclosureError: in sdc mode, when a count cell is non-zero and below ``min_cell``.
        RecordError: when the arrays break the declared spec (row-level data, wrong shape).
    """
    exact = AggregateRecord(spec, arrays)  # validates shapes before anything else
    if mode == "off":
        return exact
    if mode == "sdc":
        for name, arr_spec in spec.arrays.items():
            if arr_spec.kind != "count":
                continue
            cells = exact[name]
            small = (cells > 0) & (cells < sdc.min_cell)
            if small.any():
                raise DisclosureError(
                    f"{int(small.sum())} of {cells.size} cells of '{name}' hold between 1 and "
                    f"{sdc.min_cell - 1} records; this site releases no count below "
                    f"{sdc.min_cell}. Coarsen the bins or levels, or widen the filter"
                )
        return exact
    if mode != "dp":
        raise InternalError(f"privacy mode {mode!r} reached the engine")
    total_share = sum(s.budget_share for s in spec.arrays.values())
    values: Arrays = {}
    releases: dict[str, Release] = {}
    for name, arr_spec in spec.arrays.items():
        if arr_spec.sensitivity is None:
            raise DisclosureError(
                f"array '{name}' has no declared sensitivity, so it cannot be released under "
                "differential privacy; ask for sdc mode or another analysis"
            )
        share = epsilon * arr_spec.budget_share / total_share
        values[name], releases[name] = _laplace(
            exact[name], arr_spec.sensitivity, share, arr_spec.integer
        )
    return exact.with_values(values, releases)

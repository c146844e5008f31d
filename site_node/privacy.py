"""The site's privacy engine: what leaves the site is decided here, not in the analysis.

* ``dp``: every array passes OpenDP's Laplace mechanism (discrete Laplace for integer counts),
  with its scale calibrated so that OpenDP's own privacy map certifies at most the array's share
  of the task's epsilon, given the array's L1 sensitivity to adding or removing one patient row
  (declared from the dictionary's public bounds). By sequential composition the task's release
  is epsilon-DP per patient row at this site. Assumes: one row per patient, bounds that are
  public and enforced (values outside are set missing on load and clamped by the analysis).
* ``dp`` with arrays declared ``norm="l2"`` (a researcher's script with an L2 bound): OpenDP's
  Gaussian mechanism, its scale calibrated so that OpenDP's zCDP map certifies at most the
  array's share of the task's rho given the array's L2 sensitivity: the release is
  **rho-zCDP per patient row at this site** (and its Laplace arrays, if any, epsilon-DP; the two
  compose to (epsilon^2 / 2 + rho)-zCDP).
* ``sdc``: exact releases; any count cell in 1 .. min_cell - 1 refuses the whole release, and
  the refusal says "fewer than min_cell", never the count, the cell or how many cells.
* ``off``: exact releases, no thresholds (only when the site's policy names it for the study).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

# The submodules, not opendp.prelude: the prelude pulls in scikit-learn and scipy.stats
# (~0.7 s at every site start) for extras the site does not use.
from opendp import domains, measurements, metrics
from opendp.mod import enable_features

from protocol.config import SDCThresholds
from protocol.errors import DisclosureError, InternalError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec, Release

enable_features("contrib")

Arrays = dict[str, np.ndarray]


@functools.lru_cache(maxsize=512)
def _measurement(integer: bool, scale: float, d_in: float) -> tuple[Any, float]:
    """OpenDP's Laplace measurement and the epsilon its privacy map certifies for ``d_in``.

    Cached: building a measurement costs more than the release itself for small aggregates,
    and the same (type, scale, sensitivity) recurs for every task of a study.
    """
    if integer:
        domain = domains.vector_domain(domains.atom_domain(T="i64"))
        metric = metrics.l1_distance(T="i64")
        meas = measurements.make_laplace(domain, metric, scale)
        return meas, float(meas.map(int(d_in)))  # type: ignore[no-untyped-call]
    domain = domains.vector_domain(domains.atom_domain(T=float, nan=False))
    metric = metrics.l1_distance(T=float)
    meas = measurements.make_laplace(domain, metric, scale)
    return meas, float(meas.map(float(d_in)))  # type: ignore[no-untyped-call]


def _release(
    blocks: list[tuple[str, np.ndarray, float, float]], integer: bool
) -> tuple[Arrays, dict[str, Release]]:
    """Release several arrays through ONE OpenDP Laplace measurement.

    ``blocks`` holds (name, values, sensitivity, epsilon share). Float arrays are divided by
    their own scale (sensitivity / share) so that one unit-scale mechanism serves them all: the
    concatenated vector's L1 sensitivity is the sum of the shares, which OpenDP's privacy map
    then certifies as a whole. Integer arrays cannot be rescaled, so each call takes integer
    arrays of one scale. One call instead of one per array: OpenDP's FFI costs more than the
    noise for small aggregates.
    """
    target = sum(share for _, _, _, share in blocks)
    if integer:
        d_unit = math.ceil(blocks[0][2])  # integer cells move in whole steps
        scale = d_unit / blocks[0][3]
        d_in: float = d_unit * len(blocks)
        data = np.concatenate([np.rint(v.ravel()) for _, v, _, _ in blocks]).astype(np.int64)
        unit_scales = [scale] * len(blocks)
        mechanism_scale = scale
    else:
        unit_scales = [sens / share for _, _, sens, share in blocks]
        data = np.concatenate(
            [v.ravel() / unit for (_, v, _, _), unit in zip(blocks, unit_scales, strict=True)]
        )
        d_in = target
        mechanism_scale = 1.0
    meas, spent = _measurement(integer, mechanism_scale, d_in)
    for _ in range(4):  # OpenDP rounds its privacy map up: widen until it certifies the target
        if spent <= target:
            break
        mechanism_scale *= spent / target * (1 + 1e-12)
        meas, spent = _measurement(integer, mechanism_scale, d_in)
    if spent > target:
        raise InternalError(f"OpenDP certifies epsilon {spent} above the budget {target}")
    noisy = np.asarray(meas(data), dtype=np.float64)
    widen = mechanism_scale / (scale if integer else 1.0)
    values: Arrays = {}
    releases: dict[str, Release] = {}
    start = 0
    for (name, v, _, share), unit in zip(blocks, unit_scales, strict=True):
        part = noisy[start : start + v.size]
        start += v.size
        values[name] = (part if integer else part * unit).reshape(v.shape)
        releases[name] = Release(
            "discrete_laplace" if integer else "laplace",
            float(unit * widen),
            float(share * spent / target),
        )
    return values, releases


@functools.lru_cache(maxsize=512)
def _gaussian(scale: float, d_in: float) -> tuple[Any, float]:
    """OpenDP's Gaussian measurement (zCDP) and the rho its map certifies for ``d_in``."""
    domain = domains.vector_domain(domains.atom_domain(T=float, nan=False))
    meas = measurements.make_gaussian(domain, metrics.l2_distance(T=float), scale)
    return meas, float(meas.map(float(d_in)))  # type: ignore[no-untyped-call]


def _release_gaussian(
    values: np.ndarray, sensitivity: float, rho: float
) -> tuple[np.ndarray, Release]:
    """One array through OpenDP's Gaussian mechanism at the smallest scale whose certified
    rho is at most ``rho`` (sigma = sensitivity / sqrt(2 rho), widened while OpenDP's rounding
    certifies more)."""
    scale = sensitivity / math.sqrt(2.0 * rho)
    meas, spent = _gaussian(scale, sensitivity)
    for _ in range(4):
        if spent <= rho:
            break
        scale *= math.sqrt(spent / rho) * (1 + 1e-12)
        meas, spent = _gaussian(scale, sensitivity)
    if spent > rho:
        raise InternalError(f"OpenDP certifies rho {spent} above the budget {rho}")
    # A fresh, writable copy: OpenDP cannot take a record's read-only arrays.
    noisy = np.asarray(meas(np.array(values, dtype=np.float64).ravel()), dtype=np.float64)
    return noisy.reshape(values.shape), Release("gaussian", float(scale), 0.0, float(spent))


def privatize(
    spec: RecordSpec,
    arrays: Arrays,
    mode: str,
    epsilon: float,
    sdc: SDCThresholds,
    rho: float = 0.0,
) -> AggregateRecord:
    """Turn an analysis's exact arrays into the record that may leave the site (``rho``: the
    task's zCDP budget for arrays declared ``norm="l2"``).

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
            if np.any((cells > 0) & (cells < sdc.min_cell)):
                raise DisclosureError(
                    f"'{name}' would hold a count of fewer than {sdc.min_cell} records, and "
                    f"this site releases no non-zero count below {sdc.min_cell}. Coarsen the "
                    "bins or levels, or widen the filter"
                )
        return exact
    if mode != "dp":
        raise InternalError(f"privacy mode {mode!r} reached the engine")
    l1 = {name: a for name, a in spec.arrays.items() if a.norm == "l1"}
    l2 = {name: a for name, a in spec.arrays.items() if a.norm == "l2"}
    values, releases = _release_l2(l2, exact, rho)
    laplace_values, laplace_releases = _release_l1(l1, exact, epsilon)
    values.update(laplace_values)
    releases.update(laplace_releases)
    return exact.with_values(values, releases)


def _release_l2(
    l2: dict[str, ArraySpec], exact: AggregateRecord, rho: float
) -> tuple[Arrays, dict[str, Release]]:
    """The Gaussian arrays, each with its share of ``rho``."""
    values: Arrays = {}
    releases: dict[str, Release] = {}
    if not l2:
        return values, releases
    if not (math.isfinite(rho) and rho > 0):
        raise DisclosureError(
            "this release adds Gaussian noise and needs a zCDP budget (rho) above 0; the "
            "request gives none"
        )
    # A hair under the task's rho, as for epsilon below.
    rho_share = sum(s.budget_share for s in l2.values()) * (1 + 1e-12)
    for name, arr_spec in l2.items():
        if arr_spec.sensitivity is None:
            raise InternalError(f"l2 array '{name}' declares no sensitivity")
        share = rho * arr_spec.budget_share / rho_share
        if arr_spec.sensitivity == 0:
            values[name], releases[name] = exact[name].copy(), Release("none", 0.0, 0.0)
            continue
        values[name], releases[name] = _release_gaussian(exact[name], arr_spec.sensitivity, share)
    return values, releases


def _release_l1(
    l1: dict[str, ArraySpec], exact: AggregateRecord, epsilon: float
) -> tuple[Arrays, dict[str, Release]]:
    """The Laplace arrays: the task's epsilon split by budget share, a hair under the whole, so
    float rounding in the shares can never make the certified total exceed the charge."""
    total_share = sum(s.budget_share for s in l1.values()) * (1 + 1e-12)
    values: Arrays = {}
    releases: dict[str, Release] = {}
    floats: list[tuple[str, np.ndarray, float, float]] = []
    integers: dict[tuple[int, float], list[tuple[str, np.ndarray, float, float]]] = {}
    for name, arr_spec in l1.items():
        if arr_spec.sensitivity is None:
            raise DisclosureError(
                f"array '{name}' has no declared sensitivity, so it cannot be released under "
                "differential privacy; ask for sdc mode or another analysis"
            )
        share = epsilon * arr_spec.budget_share / total_share
        block = (name, exact[name], arr_spec.sensitivity, share)
        if arr_spec.sensitivity == 0:  # nothing about a patient can move it
            values[name], releases[name] = exact[name].copy(), Release("none", 0.0, 0.0)
        elif arr_spec.integer:
            integers.setdefault((math.ceil(arr_spec.sensitivity), share), []).append(block)
        else:
            floats.append(block)
    for group in ([floats] if floats else []) + list(integers.values()):
        released, metadata = _release(group, integer=group is not floats)
        values.update(released)
        releases.update(metadata)
    return values, releases

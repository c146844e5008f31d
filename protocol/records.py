"""``AggregateRecord``: the only payload a site reply can carry.

A record holds named numeric arrays whose shapes an analysis declared *before* it saw any data
(a scalar, a 2x2 table, a p-by-p matrix, one value per point of a coordinator-chosen grid).
Construction fails for anything else: a vector whose length is the number of patients, text such
as an identifier, a name that was not declared. Each array also carries the privacy metadata of
its release (mechanism, noise scale, budget spent), so the coordinator can report the noise each
result carries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import numpy.typing as npt

from protocol.errors import RecordError

#: Additive noise mechanisms a release may carry ("none": exact).
MECHANISMS: tuple[str, ...] = ("none", "laplace", "discrete_laplace", "gaussian")

#: No declared array may hold more cells than this; aggregates are small by nature.
MAX_CELLS = 1_000_000


@dataclass(frozen=True)
class ArraySpec:
    """The declared shape of one released array and how it may be released.

    Attributes:
        shape: exact shape; ``()`` for a scalar. Fixed by the analysis's parameters and the
            data dictionary, never by the site's data.
        kind: ``count`` (cells are record counts: disclosure control applies), ``sum`` (sums of
            bounded values) or ``statistic`` (anything else, such as a matrix of sums).
        sensitivity: L1 sensitivity of the whole array to adding or removing one patient row,
            derived from the dictionary's public bounds; ``None`` means the array cannot be
            released under differential privacy.
        integer: whether cells are integers (counts), so the discrete mechanism applies.
        budget_share: this array's relative share of the task's epsilon in dp mode (the site
            splits the task's epsilon across arrays in proportion to their shares).
        norm: ``l1``: ``sensitivity`` is an L1 sensitivity and dp adds Laplace noise under the
            task's epsilon; ``l2``: an L2 sensitivity, and dp adds Gaussian noise under the
            task's zCDP rho (shared among the l2 arrays by ``budget_share``).
    """

    shape: tuple[int, ...]
    kind: Literal["count", "sum", "statistic"] = "statistic"
    sensitivity: float | None = None
    integer: bool = False
    budget_share: float = 1.0
    norm: Literal["l1", "l2"] = "l1"

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
                raise RecordError(f"array dimensions must be integers >= 0, got shape {shape!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        if self.size > MAX_CELLS:
            raise RecordError(
                f"declared shape {shape} has {self.size} cells; an aggregate may have at most "
                f"{MAX_CELLS}"
            )
        if self.norm not in ("l1", "l2"):
            raise RecordError(f"array norm {self.norm!r} is not one of: l1, l2")
        if self.kind not in ("count", "sum", "statistic"):
            raise RecordError(f"array kind {self.kind!r} is not one of: count, sum, statistic")
        if not (math.isfinite(self.budget_share) and self.budget_share > 0):
            raise RecordError(f"budget_share must be finite and > 0, got {self.budget_share!r}")
        if self.sensitivity is not None and not (
            math.isfinite(self.sensitivity) and self.sensitivity >= 0
        ):
            raise RecordError(f"sensitivity must be finite and >= 0, got {self.sensitivity!r}")

    @property
    def size(self) -> int:
        """Number of cells."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class RecordSpec:
    """The arrays an analysis will release from one site for one task, declared up front."""

    arrays: Mapping[str, ArraySpec]

    def __post_init__(self) -> None:
        for name, spec in self.arrays.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise RecordError(f"array name {name!r} must be a plain identifier")
            if not isinstance(spec, ArraySpec):
                raise RecordError(f"array {name!r} must be declared with an ArraySpec")
        object.__setattr__(self, "arrays", MappingProxyType(dict(self.arrays)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)


@dataclass(frozen=True)
class Release:
    """Privacy metadata of one released array, and the one noise model every analysis uses.

    Each cell of the array carries independent noise of ``mechanism`` at ``scale``: Laplace
    with density proportional to exp(-|x| / scale), discrete Laplace with P(k) proportional to
    exp(-|k| / scale) on the integers, Gaussian with standard deviation ``scale``.
    """

    mechanism: str = "none"
    scale: float = 0.0
    epsilon: float = 0.0
    rho: float = 0.0

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise RecordError(
                f"mechanism {self.mechanism!r} is not one of: {', '.join(MECHANISMS)}"
            )
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise RecordError(f"noise scale must be finite and >= 0, got {self.scale!r}")

    @property
    def noisy(self) -> bool:
        """Whether the cells carry noise at all."""
        return self.mechanism != "none" and self.scale > 0

    def variance(self) -> float:
        """Variance of the noise in one cell: Laplace 2 b^2; discrete Laplace 2 q / (1 - q)^2
        with q = exp(-1 / b); Gaussian b^2; 0 when exact."""
        if not self.noisy:
            return 0.0
        if self.mechanism == "discrete_laplace":
            q = math.exp(-1.0 / self.scale)
            return 2.0 * q / (1.0 - q) ** 2
        if self.mechanism == "gaussian":
            return self.scale * self.scale
        return 2.0 * self.scale * self.scale

    def redraw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
        """Fresh noise of this mechanism and scale (a parametric bootstrap's draws)."""
        if not self.noisy:
            return np.zeros(shape)
        if self.mechanism == "discrete_laplace":
            p = 1.0 - math.exp(-1.0 / self.scale)  # a difference of two geometrics
            diff = rng.geometric(p, shape) - rng.geometric(p, shape)
            return np.asarray(diff, dtype=np.float64)
        if self.mechanism == "gaussian":
            return rng.normal(0.0, self.scale, shape)
        return rng.laplace(0.0, self.scale, shape)


def _as_numeric_array(name: str, value: object) -> npt.NDArray[np.float64]:
    if isinstance(value, (str, bytes)):
        raise RecordError(
            f"array {name!r} holds text ({value!r:.40}); a reply carries numbers only"
        )
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise RecordError(
            f"array {name!r} has dtype {arr.dtype}; a reply carries numbers only "
            "(no text, identifiers, dates or objects)"
        )
    # Backed by immutable bytes: the array cannot be made writable again after the checks.
    return np.frombuffer(np.asarray(arr, dtype=np.float64).tobytes(), dtype=np.float64).reshape(
        arr.shape
    )


@dataclass(frozen=True)
class AggregateRecord:
    """Named numeric arrays of declared shapes, with the privacy metadata of their release.

    Raises:
        RecordError: at construction, when an array was not declared, has another shape than
            declared (such as one value per patient), or is not numeric.
    """

    spec: RecordSpec
    arrays: Mapping[str, npt.NDArray[np.float64]]
    releases: Mapping[str, Release] = field(default_factory=dict)

    def __post_init__(self) -> None:
        declared = set(self.spec.arrays)
        given = set(self.arrays)
        if given - declared:
            raise RecordError(
                f"arrays {sorted(given - declared)} were not declared before the analysis ran; "
                f"declared: {sorted(declared)}"
            )
        if declared - given:
            raise RecordError(f"declared arrays {sorted(declared - given)} are missing")
        checked: dict[str, npt.NDArray[np.float64]] = {}
        for name, value in self.arrays.items():
            arr = _as_numeric_array(name, value)
            want = self.spec.arrays[name].shape
            if arr.shape != want:
                raise RecordError(
                    f"array {name!r} has shape {arr.shape} but {want} was declared; a reply "
                    "cannot carry one value per patient or any shape chosen by the data"
                )
            checked[name] = arr
        object.__setattr__(self, "arrays", MappingProxyType(checked))
        releases = {name: self.releases.get(name, Release()) for name in checked}
        object.__setattr__(self, "releases", MappingProxyType(releases))

    def __getitem__(self, name: str) -> npt.NDArray[np.float64]:
        return self.arrays[name]

    @property
    def epsilon(self) -> float:
        """Total epsilon spent by this record's releases (sequential composition)."""
        return float(sum(r.epsilon for r in self.releases.values()))

    def with_values(
        self, values: Mapping[str, npt.NDArray[np.float64]], releases: Mapping[str, Release]
    ) -> AggregateRecord:
        """A copy with privatised values and their release metadata (same declared spec)."""
        return AggregateRecord(self.spec, dict(values), dict(releases))

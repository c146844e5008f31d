"""Typed privacy budgets: a budget is a value with a type, never a bare float.

``PureDP(epsilon)`` is epsilon-differential privacy per patient row at one site, under the
add/remove-one-row neighbouring relation. ``ZCDP(rho)`` is rho-zero-concentrated DP under the
same relation. Budgets of different types never mix silently: convert first.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from protocol.errors import BudgetError

_EPS_TOLERANCE = 1e-12


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BudgetError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@dataclass(frozen=True, order=True)
class PureDP:
    """Pure differential privacy: a loss of ``epsilon`` per patient row at one site."""

    epsilon: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_non_negative("epsilon", self.epsilon))

    def __add__(self, other: PureDP) -> PureDP:
        if not isinstance(other, PureDP):
            raise TypeError(f"cannot add {type(other).__name__} to PureDP; convert first")
        return PureDP(self.epsilon + other.epsilon)

    def __sub__(self, other: PureDP) -> PureDP:
        if not isinstance(other, PureDP):
            raise TypeError(f"cannot subtract {type(other).__name__} from PureDP; convert first")
        return PureDP(max(0.0, self.epsilon - other.epsilon))

    def __mul__(self, factor: float) -> PureDP:
        return PureDP(self.epsilon * float(factor))

    def split(self, parts: int) -> PureDP:
        """The budget of one of ``parts`` equal shares (sequential composition)."""
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise BudgetError(f"cannot split a budget into {parts} parts; use 1 or more")
        return PureDP(self.epsilon / parts)

    def covers(self, other: PureDP) -> bool:
        """Whether this budget is at least ``other`` (up to float rounding)."""
        if not isinstance(other, PureDP):
            raise TypeError(f"cannot compare {type(other).__name__} with PureDP; convert first")
        return self.epsilon + _EPS_TOLERANCE >= other.epsilon

    def __str__(self) -> str:
        return f"epsilon {self.epsilon:.4g}"


@dataclass(frozen=True, order=True)
class ZCDP:
    """Zero-concentrated differential privacy with parameter ``rho`` per patient row."""

    rho: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _check_non_negative("rho", self.rho))

    def __add__(self, other: ZCDP) -> ZCDP:
        if not isinstance(other, ZCDP):
            raise TypeError(f"cannot add {type(other).__name__} to ZCDP; convert first")
        return ZCDP(self.rho + other.rho)

    def to_approx_dp_epsilon(self, delta: float) -> float:
        """The epsilon of (epsilon, delta)-DP implied by rho-zCDP (Bun and Steinke 2016)."""
        if not 0 < delta < 1:
            raise BudgetError(f"delta must be in (0, 1), got {delta!r}")
        return self.rho + 2 * math.sqrt(self.rho * math.log(1 / delta))

    def __str__(self) -> str:
        return f"rho {self.rho:.4g}"


def over_request_cap(study_id: str, requested: PureDP, cap: PureDP) -> str:
    """The one message for a request above a study's epsilon per request.

    The coordinator refuses such a request before any task leaves, and every site refuses the
    task again with its approval's own cap, in the same words (a site prefixes its name).
    """
    return (
        f"study {study_id} allows epsilon {cap.epsilon:.4g} per request at each site; this "
        f"request asks for {requested.epsilon:.4g} (over by "
        f"{requested.epsilon - cap.epsilon:.4g}). Lower `epsilon` in the request, or ask the "
        "alliance lead to amend the study"
    )

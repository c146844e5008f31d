"""Typed privacy budgets: a budget is a value with a type, never a bare float.

``PureDP(epsilon)`` is epsilon-differential privacy per patient row at one site, under the
add/remove-one-row neighbouring relation. ``ZCDP(rho)`` is rho-zero-concentrated DP under the
same relation. Budgets of different types never mix silently: convert first.

Arithmetic on ``PureDP`` is exact. An epsilon means the decimal number a person wrote (the
float's shortest decimal form, so ``0.1 + 0.2`` is exactly ``0.3``), and the site's ledger keeps
whole nano-epsilon units (:data:`UNITS_PER_EPSILON`): a charge is rounded *up* to the next unit
and a budget or cap *down*, so rounding can only ever refuse a hair more, never spend more.
:func:`check_budget` is the one predicate every budget decision uses, at the coordinator and at
the site, before the work and inside the ledger's transaction alike.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from protocol.errors import BudgetError

#: The ledger's unit: one nano-epsilon. Every value with up to 9 decimals is held exactly.
UNITS_PER_EPSILON = 10**9


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BudgetError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@functools.lru_cache(maxsize=4096)
def _exact(value: float) -> Fraction:
    """The decimal a float stands for (its shortest round-trip form), as an exact fraction."""
    return Fraction(Decimal(repr(value)))


def format_epsilon(value: float) -> str:
    """An epsilon for people: up to 15 significant digits, so 1.200000000001 shows as such
    (and 0.1 + 0.2 as 0.3)."""
    return f"{value:.15g}"


@dataclass(frozen=True)
class PureDP:
    """Pure differential privacy: a loss of ``epsilon`` per patient row at one site."""

    epsilon: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_non_negative("epsilon", self.epsilon))

    @classmethod
    def from_units(cls, units: int) -> PureDP:
        """The budget of ``units`` nano-epsilon (the ledger's integer unit)."""
        if isinstance(units, bool) or not isinstance(units, int) or units < 0:
            raise BudgetError(f"ledger units must be an integer >= 0, got {units!r}")
        return cls(float(Fraction(units, UNITS_PER_EPSILON)))

    @property
    def exact(self) -> Fraction:
        """The epsilon as an exact fraction (the decimal it was written as)."""
        return _exact(self.epsilon)

    def charge_units(self) -> int:
        """Nano-epsilon units to charge for spending this: rounded up, never under."""
        return math.ceil(self.exact * UNITS_PER_EPSILON)

    def limit_units(self) -> int:
        """Nano-epsilon units this allows as a budget or cap: rounded down, never over."""
        return math.floor(self.exact * UNITS_PER_EPSILON)

    def _other(self, other: object, verb: str) -> PureDP:
        if not isinstance(other, PureDP):
            joiner = {"add": "to", "subtract": "from"}.get(verb, "with")
            raise TypeError(f"cannot {verb} {type(other).__name__} {joiner} PureDP; convert first")
        return other

    def __add__(self, other: PureDP) -> PureDP:
        other = self._other(other, "add")
        return PureDP(float(self.exact + other.exact))

    def __sub__(self, other: PureDP) -> PureDP:
        other = self._other(other, "subtract")
        return PureDP(float(max(Fraction(0), self.exact - other.exact)))

    def __mul__(self, factor: float) -> PureDP:
        if isinstance(factor, PureDP) or not isinstance(factor, numbers.Real):
            return NotImplemented
        return PureDP(self.epsilon * float(factor))

    def __lt__(self, other: PureDP) -> bool:
        return self.exact < self._other(other, "compare").exact

    def __le__(self, other: PureDP) -> bool:
        return self.exact <= self._other(other, "compare").exact

    def __gt__(self, other: PureDP) -> bool:
        return self.exact > self._other(other, "compare").exact

    def __ge__(self, other: PureDP) -> bool:
        return self.exact >= self._other(other, "compare").exact

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PureDP) and self.exact == other.exact

    def __hash__(self) -> int:
        return hash(self.exact)

    def split(self, parts: int) -> PureDP:
        """One of ``parts`` equal shares (sequential composition), rounded down to a ledger
        unit, so the shares never add up to more than the whole."""
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise BudgetError(f"cannot split a budget into {parts} parts; use 1 or more")
        return PureDP.from_units(self.limit_units() // parts)

    def covers(self, other: PureDP) -> bool:
        """Whether spending ``other`` fits within this, in whole ledger units."""
        if not isinstance(other, PureDP):
            raise TypeError(f"cannot compare {type(other).__name__} with PureDP; convert first")
        return other.charge_units() <= self.limit_units()

    def __str__(self) -> str:
        return f"epsilon {self.epsilon:.4g}"


@dataclass(frozen=True)
class BudgetCheck:
    """The outcome of :func:`check_budget`: whether ``requested`` fits, and the figures."""

    limit: PureDP
    spent: PureDP
    requested: PureDP
    allowed: bool

    @property
    def remaining(self) -> PureDP:
        """What is left of the limit."""
        return self.limit - self.spent

    @property
    def short(self) -> PureDP:
        """How much more than what is left the request needs (0 when it fits)."""
        return self.requested - self.remaining


def check_budget(limit: PureDP, spent_units: int, requested: PureDP) -> BudgetCheck:
    """The one budget predicate: does ``requested`` fit in ``limit`` after ``spent_units``?

    Exact integer arithmetic on ledger units: the charge rounded up, the limit rounded down.
    """
    if isinstance(spent_units, bool) or not isinstance(spent_units, int) or spent_units < 0:
        raise BudgetError(f"ledger units must be an integer >= 0, got {spent_units!r}")
    allowed = spent_units + requested.charge_units() <= limit.limit_units()
    return BudgetCheck(limit, PureDP.from_units(spent_units), requested, allowed)


@dataclass(frozen=True)
class ZCDP:
    """Zero-concentrated differential privacy: ``rho`` per patient row at one site.

    Kept in the ledger in whole nano-rho units, rounded as epsilon is (a charge up, a limit
    down). By Bun and Steinke (2016), epsilon-DP implies (epsilon^2 / 2)-zCDP, and rho-zCDP
    implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP for every delta in (0, 1).
    """

    rho: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _check_non_negative("rho", self.rho))

    @classmethod
    def from_units(cls, units: int) -> ZCDP:
        """The budget of ``units`` nano-rho (the ledger's integer unit)."""
        if isinstance(units, bool) or not isinstance(units, int) or units < 0:
            raise BudgetError(f"ledger units must be an integer >= 0, got {units!r}")
        return cls(float(Fraction(units, UNITS_PER_EPSILON)))

    @property
    def exact(self) -> Fraction:
        """The rho as an exact fraction (the decimal it was written as)."""
        return _exact(self.rho)

    def charge_units(self) -> int:
        """Nano-rho units to charge for spending this: rounded up, never under."""
        return math.ceil(self.exact * UNITS_PER_EPSILON)

    def limit_units(self) -> int:
        """Nano-rho units this allows as a budget or cap: rounded down, never over."""
        return math.floor(self.exact * UNITS_PER_EPSILON)

    def _other(self, other: object, verb: str) -> ZCDP:
        if not isinstance(other, ZCDP):
            joiner = {"add": "to", "subtract": "from"}.get(verb, "with")
            raise TypeError(f"cannot {verb} {type(other).__name__} {joiner} ZCDP; convert first")
        return other

    def __add__(self, other: ZCDP) -> ZCDP:
        other = self._other(other, "add")
        return ZCDP(float(self.exact + other.exact))

    def __sub__(self, other: ZCDP) -> ZCDP:
        other = self._other(other, "subtract")
        return ZCDP(float(max(Fraction(0), self.exact - other.exact)))

    def __lt__(self, other: ZCDP) -> bool:
        return self.exact < self._other(other, "compare").exact

    def __le__(self, other: ZCDP) -> bool:
        return self.exact <= self._other(other, "compare").exact

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZCDP) and self.exact == other.exact

    def __hash__(self) -> int:
        return hash(("zcdp", self.exact))

    def split(self, parts: int) -> ZCDP:
        """One of ``parts`` equal shares, rounded down to a ledger unit."""
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise BudgetError(f"cannot split a budget into {parts} parts; use 1 or more")
        return ZCDP.from_units(self.limit_units() // parts)

    def to_approx_dp_epsilon(self, delta: float) -> float:
        """The epsilon of (epsilon, delta)-DP implied by rho-zCDP (Bun and Steinke 2016)."""
        if not 0 < delta < 1:
            raise BudgetError(f"delta must be in (0, 1), got {delta!r}")
        return self.rho + 2 * math.sqrt(self.rho * math.log(1 / delta))

    def __str__(self) -> str:
        return f"rho {self.rho:.4g}"


@dataclass(frozen=True)
class RhoCheck:
    """The outcome of :func:`check_rho`: whether ``requested`` fits, and the figures."""

    limit: ZCDP
    spent: ZCDP
    requested: ZCDP
    allowed: bool

    @property
    def remaining(self) -> ZCDP:
        """What is left of the limit."""
        return self.limit - self.spent

    @property
    def short(self) -> ZCDP:
        """How much more than what is left the request needs (0 when it fits)."""
        return self.requested - self.remaining


def check_rho(limit: ZCDP, spent_units: int, requested: ZCDP) -> RhoCheck:
    """:func:`check_budget` for zCDP: exact integer arithmetic on nano-rho units."""
    if isinstance(spent_units, bool) or not isinstance(spent_units, int) or spent_units < 0:
        raise BudgetError(f"ledger units must be an integer >= 0, got {spent_units!r}")
    allowed = spent_units + requested.charge_units() <= limit.limit_units()
    return RhoCheck(limit, ZCDP.from_units(spent_units), requested, allowed)


def over_request_cap(study_id: str, requested: PureDP, cap: PureDP) -> str:
    """The one message for a request above a study's epsilon per request.

    The coordinator refuses such a request before any task leaves, and every site refuses the
    task again with its approval's own cap, in the same words (a site prefixes its name).
    """
    return (
        f"study {study_id} allows epsilon {format_epsilon(cap.epsilon)} per request at each "
        f"site; this request asks for {format_epsilon(requested.epsilon)} (over by "
        f"{format_epsilon((requested - cap).epsilon)}). Lower `epsilon` in the request, or ask "
        "the alliance lead to amend the study"
    )

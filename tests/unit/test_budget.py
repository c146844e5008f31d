"""Typed privacy budgets: validated on construction, arithmetic within a type, never across."""

from __future__ import annotations

import math

import pytest

from protocol.budget import ZCDP, PureDP, check_budget, over_request_cap
from protocol.errors import BudgetError

BAD_VALUES = [-0.1, float("nan"), float("inf"), -float("inf")]
NOT_NUMBERS: list[object] = [True, "0.5", None, [0.5]]


@pytest.mark.parametrize("budget_type", [PureDP, ZCDP])
@pytest.mark.parametrize("value", BAD_VALUES)
def test_non_finite_or_negative_is_refused(budget_type: type, value: float) -> None:
    name = "epsilon" if budget_type is PureDP else "rho"
    with pytest.raises(BudgetError, match=f"{name} must be a finite number >= 0, got"):
        budget_type(value)


@pytest.mark.parametrize("budget_type", [PureDP, ZCDP])
@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_non_numbers_are_refused(budget_type: type, value: object) -> None:
    with pytest.raises(BudgetError, match="must be a number, got"):
        budget_type(value)


def test_valid_values_are_stored_as_float() -> None:
    assert PureDP(1).epsilon == 1.0 and isinstance(PureDP(1).epsilon, float)
    assert PureDP(0).epsilon == 0.0
    assert ZCDP(0.25).rho == 0.25
    assert str(PureDP(0.123456)) == "epsilon 0.1235"
    assert str(ZCDP(0.5)) == "rho 0.5"


def test_budgets_are_immutable_values() -> None:
    budget = PureDP(1.0)
    with pytest.raises(AttributeError):
        budget.epsilon = 5.0  # type: ignore[misc]
    assert PureDP(1.0) == PureDP(1) and hash(PureDP(1.0)) == hash(PureDP(1))
    assert PureDP(0.5) < PureDP(1.0) and ZCDP(0.1) < ZCDP(0.2)


def test_pure_dp_arithmetic() -> None:
    assert PureDP(0.5) + PureDP(0.25) == PureDP(0.75)
    assert PureDP(1.0) - PureDP(0.25) == PureDP(0.75)
    assert PureDP(0.5) * 3 == PureDP(1.5)
    # Sequential composition: the parts add back up to the whole.
    part = PureDP(1.0).split(3)
    assert part == PureDP(0.333333333)  # rounded down to a ledger unit (a nano-epsilon)
    assert PureDP(1.0).covers(part + part + part)
    assert PureDP(0.5).split(4) == PureDP(0.125)


def test_subtraction_floors_at_zero() -> None:
    # What the type does today: overspending is not negative, it is empty.
    assert PureDP(0.1) - PureDP(0.5) == PureDP(0.0)


def test_multiplying_into_a_bad_budget_is_refused() -> None:
    with pytest.raises(BudgetError, match=r"finite number >= 0, got -1\.0"):
        PureDP(1.0) * -1
    with pytest.raises(BudgetError):
        PureDP(1.0) * math.inf


def test_covers_tolerates_float_rounding_only() -> None:
    three_tenths = PureDP(0.1) + PureDP(0.2)  # 0.30000000000000004
    assert PureDP(0.3).covers(three_tenths)
    assert three_tenths.covers(PureDP(0.3))
    assert not PureDP(0.3).covers(PureDP(0.300001))
    assert PureDP(0.0).covers(PureDP(0.0))


@pytest.mark.parametrize("parts", [0, -1])
def test_split_needs_one_or_more_parts(parts: int) -> None:
    with pytest.raises(
        BudgetError, match=f"cannot split a budget into {parts} parts; use 1 or more"
    ):
        PureDP(1.0).split(parts)


def test_zcdp_arithmetic_is_exact_on_the_decimals_people_write() -> None:
    assert ZCDP(0.1) + ZCDP(0.2) == ZCDP(0.3)
    assert ZCDP(0.3) - ZCDP(0.5) == ZCDP(0.0)
    assert ZCDP(1e-10).charge_units() == 1 and ZCDP(1e-10).limit_units() == 0
    assert ZCDP(1.0).split(3) == ZCDP.from_units(333_333_333)


def test_a_zcdp_check_refuses_a_hair_over_and_says_by_how_much() -> None:
    from protocol.budget import check_rho

    fits = check_rho(ZCDP(0.5), ZCDP(0.3).charge_units(), ZCDP(0.2))
    assert fits.allowed
    over = check_rho(ZCDP(0.5), ZCDP(0.3).charge_units(), ZCDP(0.2 + 1e-9))
    assert not over.allowed and over.short == ZCDP(1e-9)


def test_zcdp_to_approx_dp() -> None:
    # Bun and Steinke (2016), Proposition 1.3: rho-zCDP implies
    # (rho + 2 sqrt(rho log(1/delta)), delta)-DP. rho = 0.5, delta = 1e-6:
    # 0.5 + 2 * sqrt(0.5 * 13.815510557964274) = 5.756521...
    expected = 0.5 + 2 * math.sqrt(0.5 * math.log(1e6))
    assert ZCDP(0.5).to_approx_dp_epsilon(1e-6) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(5.7565, abs=1e-4)
    assert ZCDP(0.0).to_approx_dp_epsilon(1e-6) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-9, 2.0])
def test_zcdp_delta_must_be_a_probability(delta: float) -> None:
    with pytest.raises(BudgetError, match=r"delta must be in \(0, 1\)"):
        ZCDP(0.5).to_approx_dp_epsilon(delta)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (PureDP(1.0), ZCDP(0.5)),
        (ZCDP(0.5), PureDP(1.0)),
        (PureDP(1.0), 0.5),
        (ZCDP(0.5), 0.5),
    ],
)
def test_adding_across_types_raises_type_error(left: object, right: object) -> None:
    with pytest.raises(TypeError, match="convert first"):
        left + right  # type: ignore[operator]


def test_other_mixing_raises_type_error() -> None:
    with pytest.raises(TypeError, match="cannot subtract ZCDP from PureDP; convert first"):
        PureDP(1.0) - ZCDP(0.5)  # type: ignore[operator]
    with pytest.raises(TypeError):
        PureDP(1.0) < ZCDP(0.5)  # type: ignore[operator]  # noqa: B015
    with pytest.raises(TypeError):
        PureDP(1.0) * PureDP(2.0)  # type: ignore[operator]
    with pytest.raises(TypeError):
        sum([PureDP(1.0), PureDP(2.0)])  # type: ignore[list-item]  # sum starts at int 0
    assert sum([PureDP(1.0), PureDP(2.0)], PureDP(0.0)) == PureDP(3.0)
    assert PureDP(1.0) != ZCDP(1.0)  # type: ignore[comparison-overlap]


def test_covers_across_types_raises_type_error() -> None:
    with pytest.raises(TypeError):
        PureDP(1.0).covers(ZCDP(0.5))  # type: ignore[arg-type]


def test_arithmetic_is_exact_on_the_decimals_people_write() -> None:
    # 0.1 + 0.2 is 0.30000000000000004 in floats; a budget means the decimal.
    assert PureDP(0.1) + PureDP(0.2) == PureDP(0.3)
    assert PureDP(1.8) - PureDP(0.1) - PureDP(0.5) == PureDP(1.2)
    assert not PureDP(1.2).covers(PureDP(1.200000000001))
    assert PureDP(1.2).covers(PureDP(1.2))


def test_charges_round_up_and_limits_round_down_to_ledger_units() -> None:
    third = PureDP(1 / 3)  # 0.3333333333333333
    assert third.charge_units() == 333_333_334
    assert third.limit_units() == 333_333_333
    assert PureDP(0.5).charge_units() == PureDP(0.5).limit_units() == 500_000_000
    assert PureDP.from_units(166_666_666) == PureDP(0.166666666)
    with pytest.raises(BudgetError, match="ledger units must be an integer >= 0"):
        PureDP.from_units(-1)


def test_check_budget_is_one_exact_predicate() -> None:
    spent = PureDP(0.1).charge_units() + PureDP(0.5).charge_units()
    refused = check_budget(PureDP(1.8), spent, PureDP(1.200000000001))
    assert not refused.allowed
    assert refused.remaining == PureDP(1.2)
    assert refused.short == PureDP(1e-12)
    fits = check_budget(PureDP(1.8), spent, PureDP(1.2))
    assert fits.allowed and fits.spent == PureDP(0.6)
    # Three equal shares of a split never exceed the whole.
    share = PureDP(0.5).split(3)
    assert check_budget(PureDP(0.5), 2 * share.charge_units(), share).allowed


def test_over_request_cap_message_says_cap_request_and_difference() -> None:
    text = over_request_cap("s1", PureDP(3.0), PureDP(0.5))
    assert text.startswith("study s1 allows epsilon 0.5 per request at each site; this request")
    assert "asks for 3 (over by 2.5)" in text

"""The row-filter language: valid filters select the right rows (missing values never pass a
comparison); everything outside the language is refused when parsed, never evaluated."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from protocol.errors import FilterError
from protocol.filters import MAX_FILTER_LENGTH, parse_filter

KNOWN = frozenset({"age", "sex", "cp", "chol"})
#               row:    0     1       2      3      4
COLUMNS: dict[str, npt.NDArray[Any]] = {
    "age": np.array([30.0, np.nan, 50.0, 70.0, 45.0]),
    "sex": np.array([1.0, 0.0, np.nan, 1.0, 0.0]),
    "cp": np.array([1.0, 2.0, 3.0, np.nan, 4.0]),
    "chol": np.array([200.0, 310.0, np.nan, 250.0, 180.0]),
}
N = 5


def rows(text: str) -> list[int]:
    """Indices of the rows that pass ``text``."""
    mask = parse_filter(text, KNOWN).mask(COLUMNS, N)
    assert mask.dtype == np.bool_ and mask.shape == (N,)
    return [int(i) for i in np.flatnonzero(mask)]


# --------------------------------------------------------------------------- valid filters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("age >= 40", [2, 3, 4]),  # row 1's missing age does not pass
        ("age < 40", [0]),  # ... nor the opposite comparison
        ("age >= 40 and sex == 1", [3]),
        ("age < 40 or sex == 0", [0, 1, 4]),  # row 1 passes on sex alone
        ("cp in [1, 2]", [0, 1]),
        ("cp in (3, 4)", [2, 4]),
        ("cp not in [1, 2]", [2, 4]),  # row 3's missing cp is in no list
        ("cp in [1, 2] and not (chol > 300)", [0]),
        ("40 <= age < 60", [2, 4]),  # chained
        ("age > -1 and chol >= 1.8e2", [0, 3, 4]),
        ("(age > 60 or age < 35) and sex == 1", [0, 3]),
        ("sex == 1 and sex == 0", []),
        ("1 < 2", [0, 1, 2, 3, 4]),  # a constant filter keeps every row
        ("1 > 2", []),
    ],
)
def test_valid_filters_select_rows(text: str, expected: list[int]) -> None:
    assert rows(text) == expected


def test_not_of_a_missing_comparison_passes() -> None:
    # Two-valued logic, as in pandas' ~(s > 40): the comparison is false, so `not` is true.
    assert rows("not (age > 40)") == [0, 1]


def test_variables_are_recorded() -> None:
    rule = parse_filter("cp in [1, 2] and not (chol > 300) or age < 3", KNOWN)
    assert rule.variables == frozenset({"cp", "chol", "age"})
    assert rule.text == "cp in [1, 2] and not (chol > 300) or age < 3"


def test_without_known_variables_any_name_parses() -> None:
    assert parse_filter("weight > 3").variables == frozenset({"weight"})


def test_not_equal_with_missing_is_false() -> None:
    assert rows("age != 50") == rows("age not in [50]") == [0, 3, 4]


# --------------------------------------------------------------------------- refused filters


@pytest.mark.parametrize(
    "text",
    [
        # calls
        "len(age) > 1",
        "__import__('os').system('rm -rf /') == 0",
        "age > float('nan')",
        "open('/etc/passwd') == 1",
        # attributes
        "age.real > 1",
        "age.__class__ == 1",
        "sex == age.__class__.__mro__",
        # arithmetic
        "age + 1 > 2",
        "age > 1 + 2",
        "age * 2 == 4",
        "age ** 99999 > 1",
        "-age > 1",
        "~age > 1",
        "+age > 1",
        # subscripts
        "age[0] > 1",
        "cp in [1, 2][0:1]",
        # lambdas and other expressions
        "(lambda: 1)() == 1",
        "age == (lambda x: x)",
        "(x := 1) == 1",
        "age if sex else chol",
        "age in [x for x in cp]",
        "age in {1, 2}",
        "age in []",
        "age in [sex]",
        "age in ['a']",
        f"age == {'{'}1: 2{'}'}",
        # dunder names and unknown variables
        "__builtins__ == 1",
        "__class__ > 0",
        "weight > 80",
        "Age > 80",
        # other constants and forms
        "sex == 'male'",
        "sex == b'1'",
        "sex == True",
        "age == None",
        "age is None",
        "age is not 1",
        "age > 1j",
        "age == ...",
        "f'{age}' == 1",
        "age",
        "not age",
        "age > 1 and sex",
        # not expressions at all
        "import os",
        "age > 1; age < 2",
        "age >",
        "",
        "   ",
    ],
)
def test_unsafe_or_unknown_constructs_raise(text: str) -> None:
    with pytest.raises(FilterError):
        parse_filter(text, KNOWN)


def test_refusal_names_the_bad_part_and_what_is_allowed() -> None:
    with pytest.raises(FilterError) as info:
        parse_filter("age > 40 and len(age) > 1", KNOWN)
    message = str(info.value)
    assert message.startswith(
        "filter 'age > 40 and len(age) > 1': expected a number, got 'len(age)'"
    )
    assert message.endswith(
        "allowed: variables, numbers, == != < <= > >=, in [..], and, or, not, parentheses"
    )
    with pytest.raises(FilterError, match=r"'lambda: 1' is not allowed here; allowed: "):
        parse_filter("age > 1 or (lambda: 1)", KNOWN)


def test_unknown_variable_lists_known_ones() -> None:
    with pytest.raises(FilterError) as info:
        parse_filter("weight > 80 and __class__ == 1", KNOWN)
    assert "uses '__class__', 'weight', not in the data dictionary" in str(info.value)
    assert "known: age, chol, cp, sex" in str(info.value)


def test_non_text_filter_raises() -> None:
    with pytest.raises(FilterError, match="non-empty text expression"):
        parse_filter(42, KNOWN)  # type: ignore[arg-type]


def test_overlong_input_raises_before_parsing() -> None:
    text = " or ".join(["age > 1"] * 200)
    assert len(text) > MAX_FILTER_LENGTH
    with pytest.raises(FilterError, match=f"characters long; at most {MAX_FILTER_LENGTH}"):
        parse_filter(text, KNOWN)
    fits = " or ".join(["age > 1"] * 90)
    assert len(fits) <= MAX_FILTER_LENGTH and rows(fits) == [0, 2, 3, 4]


def test_deeply_nested_parentheses_raise() -> None:
    text = "(" * 300 + "age > 1" + ")" * 300
    assert len(text) <= MAX_FILTER_LENGTH
    with pytest.raises(FilterError, match="not a valid expression"):
        parse_filter(text, KNOWN)


def test_many_nots_within_the_limit_still_work() -> None:
    text = "not " * 240 + "age > 40"
    assert len(text) <= MAX_FILTER_LENGTH
    assert rows(text) == [2, 3, 4]  # an even number of nots


def test_long_chain_of_unary_minus_is_read_without_recursion() -> None:
    # A loop, not recursion, reads the signs: ~990 of them are safe and exact.
    minus = MAX_FILTER_LENGTH - 7
    text = "age > " + "-" * minus + "5"
    expected = -5.0 if minus % 2 else 5.0
    assert rows(text) == rows(f"age > {expected}")


def test_list_operand_outside_in_is_refused_when_parsed() -> None:
    with pytest.raises(FilterError):
        parse_filter("[open('/etc/passwd')] == age", KNOWN)


def test_list_operand_outside_in_is_refused_with_the_rule() -> None:
    with pytest.raises(FilterError, match="a list may only follow 'in' or 'not in'"):
        parse_filter("age == [1, 2]", KNOWN)

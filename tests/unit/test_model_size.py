"""A model's columns are counted from its formula, without building its design (hole 8)."""

from __future__ import annotations

import random
import time

import pytest
from formulaic import Formula

from analyses import get_analysis
from analyses.glm.formula import glm_model
from analyses.model_size import (
    COLUMN_COUNT_CAP,
    categorical_levels,
    count_columns,
    formula_terms,
    model_columns,
)
from protocol.config import DataDictionary
from protocol.errors import ValidationError

TWELVE = "disease ~ age*sex*cp*trestbps*chol*fbs*restecg*thalach*exang*oldpeak*slope*thal"

# Where formulaic's reading of a formula is easy to get wrong: intercepts inside parentheses,
# unary minus, zero, nesting, powers, calls and quoted names.
EDGE_CASES = [
    "y ~ (0 + a)", "y ~ (a - 1)", "y ~ b + (a - 1)", "y ~ (-1 + a)", "y ~ a*(b - 1)",
    "y ~ a - 0", "y ~ (a + 0):b", "y ~ a + (b + 0)", "y ~ a:(b-1)", "y ~ (a-1)**2",
    "y ~ a + -1 + 1", "y ~ a - 1 + 1", "y ~ -a + b", "y ~ a + b - a", "y ~ 1", "y ~ 0",
    "y ~ -1", "y ~ a + (-1)", "y ~ a*b - 1 - a", "y ~ a + 0:b", "y ~ (a - 1)/b", "y ~ +1",
    "y ~ a + (1 - 1)", "y ~ a:2", "y ~ a/b", "y ~ a %in% b", "y ~ (a+b)/c",
    "y ~ (a+b)**3 - a:b", "y ~ a:b:c + a - 1", "y ~ -1 + a", "y ~ 0 + a", "y ~ a + 0",
    "y ~ np.log(a) * b", "y ~ `a b` + c", "y ~ (a+b+c)^2", "y ~ a/(b+c)", "y ~ a:a",
]  # fmt: skip


@pytest.mark.parametrize("formula", EDGE_CASES)
def test_the_terms_are_formulaics(formula: str) -> None:
    reference = {frozenset(str(f) for f in term.factors) - {"1"} for term in Formula(formula).rhs}
    assert set(formula_terms(formula)) == reference


def test_the_count_equals_the_built_designs_columns(heart_dict: DataDictionary) -> None:
    names = ["age", "sex", "cp", "chol", "fbs", "restecg", "slope", "thal", "oldpeak"]
    levels = categorical_levels(heart_dict)
    rng = random.Random(6)
    for _ in range(150):
        parts = rng.sample(names, rng.randint(1, 5))
        expression = parts[0]
        for name in parts[1:]:
            if rng.random() < 0.3:
                expression = f"({expression})"
            expression += rng.choice([" + ", " * ", ":", " / "]) + name
        if rng.random() < 0.2:
            expression += " - 1"
        if rng.random() < 0.1:
            expression = f"({expression})**2"
        formula = f"disease ~ {expression}"
        params = get_analysis("glm").parse_params({"formula": formula}, heart_dict)
        built = glm_model(params, heart_dict).p
        assert count_columns(formula_terms(formula), levels) == built, formula


def test_twelve_interacting_variables_count_without_building(heart_dict: DataDictionary) -> None:
    started = time.perf_counter()
    assert model_columns("glm", {"formula": TWELVE}, heart_dict) == (
        27_648,
        f"formula {TWELVE!r} has",
    )
    assert time.perf_counter() - started < 2.0  # 0.2 s here; building it took 16 s


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("y ~ (a + b + c + d + e + f + g)**7", "**7 of 7 terms forms 7**7 products"),
        ("y ~ " + "*".join(f"x{i}" for i in range(40)), "too large to expand"),
        ("y ~ " + "(" * 40 + "a" + ")" * 40, "parentheses nested deeper than 32"),
        ("y ~ " + "- " * 900 + "a", "signs or parentheses nested deeper than 32"),
        ("y ~ a + ", "a term is missing at the end"),
        ("y ~ a ~ b", "more than one '~'"),
        ("a + b", "no response"),
        ("y ~ a | b", "unexpected '|'"),
        ("y ~ a ** 0.5", "must be a positive integer"),
    ],
)
def test_a_formula_too_costly_to_expand_or_malformed_is_refused_at_once(
    formula: str, message: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(ValidationError, match=message.replace("*", r"\*").replace("|", r"\|")):
        formula_terms(formula)
    assert time.perf_counter() - started < 2.0  # milliseconds here; minutes in formulaic


def test_the_count_stops_at_its_cap() -> None:
    levels = {f"x{i}": 10 for i in range(6)}
    terms = formula_terms("y ~ " + "*".join(levels))  # 10**6 columns
    assert count_columns(terms, levels) == COLUMN_COUNT_CAP + 1


def test_cox_counts_a_categorical_covariate_as_its_levels_minus_one(
    heart_dict: DataDictionary,
) -> None:
    counted = model_columns("cox", {"covariates": ["age", "cp", "sex"]}, heart_dict)
    assert counted == (1 + 3 + 1, "covariates age, cp, sex have")
    assert model_columns("mean", {"variable": "age"}, heart_dict) is None
    assert model_columns("glm", {"formula": 3}, heart_dict) is None  # params name that

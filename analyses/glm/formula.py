"""A ``glm`` formula, checked against the dictionary, and the model spec every site builds
the same columns from (levels and bounds from the dictionary, never from data)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from analyses.base import Params
from protocol.config import BinaryVariable, DataDictionary, NumericVariable
from protocol.errors import InternalError, ValidationError

FloatArray = npt.NDArray[np.float64]

Family = Literal["gaussian", "binomial", "poisson"]

FORMULA_HELP = (
    "write it as 'y ~ x1 + x2' with dictionary variables, interactions 'x1*x2' or 'x1:x2', "
    "and '- 1' to drop the intercept"
)


class GLMParams(Params):
    """Parameters of ``glm``."""

    formula: str = Field(min_length=3, max_length=2000, description="'y ~ x1 + x2*x3'")
    family: Family = "gaussian"
    max_iter: int = Field(default=25, ge=1, le=100, description="IRLS steps before giving up")
    tol: float = Field(default=1e-8, gt=0, le=1e-2, description="largest step at convergence")
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    dp_iterations: int = Field(default=4, ge=2, le=20, description="fixed rounds in dp mode")


# ----------------------------------------------------------------------------- formula


@dataclass(frozen=True)
class ParsedFormula:
    """A parsed formula: its response and right-hand-side variables (formulaic's terms)."""

    text: str
    response: str
    rhs: Any  # formulaic SimpleFormula
    variables: tuple[str, ...]  # right-hand-side variables in order of appearance


@lru_cache(maxsize=256)
def parse_formula(text: str) -> ParsedFormula:
    """Parse ``text`` with formulaic; only plain variables, ``+ * : - 1`` are accepted."""
    from formulaic import Formula

    try:
        parsed = Formula(text)
        lhs = getattr(parsed, "lhs", None)
        rhs = getattr(parsed, "rhs", None)
        rhs_terms = list(rhs) if rhs is not None else []
        factor_lists = [list(term.factors) for term in rhs_terms]
        lhs_terms = list(lhs) if lhs is not None else []
    except Exception as exc:  # formulaic raises several types; all mean a bad formula
        raise ValidationError(
            f"formula {text!r} cannot be parsed ({exc}); {FORMULA_HELP}"
        ) from None
    if lhs is None or rhs is None:
        raise ValidationError(f"formula {text!r} has no response; {FORMULA_HELP}")
    lhs_factors = [f for term in lhs_terms for f in term.factors]
    if len(lhs_terms) != 1 or len(lhs_factors) != 1 or factor_kind(lhs_factors[0]) != "lookup":
        raise ValidationError(
            f"formula {text!r}: the response must be one dictionary variable, got {str(lhs)!r}"
        )
    response = str(lhs_factors[0].expr)
    variables: list[str] = []
    for factors in factor_lists:
        for factor in factors:
            kind, expr = factor_kind(factor), str(factor.expr)
            if kind == "literal" and expr == "1":
                continue
            if kind != "lookup":
                hint = " (categorical dictionary variables need no C())" if "C(" in expr else ""
                raise ValidationError(
                    f"formula {text!r}: term {expr!r} is not a dictionary variable{hint}; "
                    f"transforms are not supported; {FORMULA_HELP}"
                )
            if expr not in variables:
                variables.append(expr)
    if not rhs_terms:
        raise ValidationError(f"formula {text!r} has no terms and no intercept; {FORMULA_HELP}")
    if response in variables:
        raise ValidationError(f"formula {text!r}: the response {response!r} is also a predictor")
    return ParsedFormula(text=text, response=response, rhs=rhs, variables=tuple(variables))


def glm_key(formula: str) -> str:
    """A formula's canonical form: ``response ~ terms``, the terms and each interaction's
    variables sorted (what an sdc site compares with the models it approved)."""
    parsed = parse_formula(formula)
    terms = sorted(":".join(sorted(str(term).split(":"))) for term in parsed.rhs)
    return f"{parsed.response} ~ {' + '.join(terms)}"


def factor_kind(factor: Any) -> str:
    method = factor.eval_method
    return str(getattr(method, "value", method))


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class GLMModel:
    """A formula bound to the dictionary: columns, public scaling, formulaic's ModelSpec."""

    formula: ParsedFormula
    family: str
    spec: Any  # formulaic ModelSpec built from a template of public levels and bounds
    columns: tuple[str, ...]
    intercept: int | None
    centre: FloatArray
    half: FloatArray
    y_centre: float
    y_half: float
    y_bounds: tuple[float, float]
    numeric: dict[str, tuple[float, float]]
    levels: dict[str, list[int]]
    key: tuple[str, str, str]

    @property
    def p(self) -> int:
        """Number of model parameters."""
        return len(self.columns)

    def transform(self) -> FloatArray:
        """A with beta = A beta'' (beta'' on the original response scale, see ``to_original``)."""
        a = np.diag(1.0 / self.half)
        if self.intercept is not None:
            for j in range(self.p):
                if j != self.intercept:
                    a[self.intercept, j] = -self.centre[j] / self.half[j]
        return a

    def to_original(self, beta: FloatArray, cov: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Coefficients and covariance from the standardised scale to the original one."""
        beta = beta * self.y_half
        cov = cov * self.y_half**2
        if self.y_centre != 0.0 and self.intercept is not None:
            beta = beta.copy()
            beta[self.intercept] += self.y_centre
        a = self.transform()
        return a @ beta, a @ cov @ a.T


MODELS: OrderedDict[tuple[str, str, str], GLMModel] = OrderedDict()

MODELS_LOCK = threading.Lock()


def glm_model(params: GLMParams, dictionary: DataDictionary) -> GLMModel:
    """The model of ``params`` over ``dictionary`` (cached: it depends on no data)."""
    key = (params.formula, params.family, dictionary.digest())
    with MODELS_LOCK:
        if key in MODELS:
            MODELS.move_to_end(key)
            return MODELS[key]
    model = build_model(params, dictionary, key)
    with MODELS_LOCK:
        MODELS[key] = model
        while len(MODELS) > 64:
            MODELS.popitem(last=False)
    return model


def interval_product(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    corners = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return (min(corners), max(corners))


def _template(
    formula: ParsedFormula, numeric: dict[str, tuple[float, float]], levels: dict[str, list[int]]
) -> pd.DataFrame:
    """Rows that hold every public level and both bounds of every numeric variable."""
    rows = max([2] + [len(v) for v in levels.values()])
    template: dict[str, Any] = {}
    for name in formula.variables:
        if name in levels:
            codes = [i % len(levels[name]) for i in range(rows)]
            template[name] = pd.Categorical.from_codes(codes, categories=levels[name])
        else:
            low, high = numeric[name]
            template[name] = np.array([low if i % 2 == 0 else high for i in range(rows)])
    return pd.DataFrame(template, index=range(rows))


def _column_bounds(
    spec: Any, columns: tuple[str, ...], numeric: dict[str, tuple[float, float]]
) -> tuple[dict[str, tuple[float, float]], int | None]:
    """Each design column's public range (products of bounds for interactions; 0/1 dummies
    widen it to include 0 and 1), and the intercept's index."""
    bounds: dict[str, tuple[float, float]] = {}
    intercept: int | None = None
    for structure in spec.structure:
        names = [str(f.expr) for f in structure.term.factors if factor_kind(f) == "lookup"]
        interval = (1.0, 1.0)
        indicator = False
        for name in names:
            if name in numeric:
                interval = interval_product(interval, numeric[name])
            else:
                indicator = True  # treatment-coded levels: each column is 0 or 1 per factor
        if indicator:
            interval = (min(interval[0], 0.0), max(interval[1], 0.0))
        for column in structure.columns:
            bounds[str(column)] = interval
            if not names:
                intercept = columns.index(str(column))
    return bounds, intercept


def _standardisation(
    values: FloatArray,
    columns: tuple[str, ...],
    bounds: dict[str, tuple[float, float]],
    intercept: int | None,
) -> tuple[FloatArray, FloatArray]:
    """Public centre and half-range of each column, so that |x'| <= 1 (0/1 columns kept)."""
    centre = np.zeros(len(columns))
    half = np.ones(len(columns))
    for j, column in enumerate(columns):
        low, high = bounds[column]
        if values[:, j].min() < low - 1e-9 or values[:, j].max() > high + 1e-9:
            raise InternalError(f"column {column!r} leaves its derived bounds [{low}, {high}]")
        if j == intercept or (low >= 0.0 and high <= 1.0):
            continue
        if intercept is not None:
            centre[j], half[j] = (low + high) / 2, (high - low) / 2
        else:
            half[j] = max(abs(low), abs(high))
        if half[j] <= 0:
            centre[j], half[j] = 0.0, 1.0
    return centre, half


def build_model(
    params: GLMParams, dictionary: DataDictionary, key: tuple[str, str, str]
) -> GLMModel:
    """The model spec from the formula and the dictionary's public levels and bounds only."""
    from formulaic import model_matrix

    formula = parse_formula(params.formula)
    numeric: dict[str, tuple[float, float]] = {}
    levels: dict[str, list[int]] = {}
    for name in formula.variables:
        var = dictionary.variable(name)
        if isinstance(var, (NumericVariable, BinaryVariable)):
            # A 0/1 variable enters as the number it is, as in statsmodels on pooled data.
            numeric[name] = dictionary.bounds(name)
        else:
            levels[name] = list(var.levels)
    try:
        matrix = model_matrix(formula.rhs, _template(formula, numeric, levels))
    except Exception as exc:
        raise ValidationError(f"formula {params.formula!r} cannot be built: {exc}") from None
    spec = matrix.model_spec
    columns = tuple(str(c) for c in spec.column_names)
    bounds, intercept = _column_bounds(spec, columns, numeric)
    centre, half = _standardisation(
        np.asarray(matrix, dtype=np.float64), columns, bounds, intercept
    )
    y_low, y_high = dictionary.bounds(formula.response)
    y_centre, y_half = 0.0, 1.0
    if params.family == "gaussian":
        if intercept is not None:
            y_centre, y_half = (y_low + y_high) / 2, (y_high - y_low) / 2
        else:
            y_half = max(abs(y_low), abs(y_high)) or 1.0
    return GLMModel(
        formula=formula,
        family=params.family,
        spec=spec,
        columns=columns,
        intercept=intercept,
        centre=centre,
        half=half,
        y_centre=y_centre,
        y_half=y_half,
        y_bounds=(y_low, y_high),
        numeric=numeric,
        levels=levels,
        key=key,
    )


# ----------------------------------------------------------------------------- site design


def dp_round_count(params: GLMParams) -> int:
    """Rounds a dp fit takes: one for gaussian (its IRLS step is exact), else dp_iterations."""
    return 1 if params.family == "gaussian" else params.dp_iterations

"""A small, safe row-filter language: parsed into a tree and interpreted, never eval'd.

Allowed: variable names from the dictionary, numbers, comparisons (``== != < <= > >=``),
``in`` / ``not in`` with a list of numbers, ``and``, ``or``, ``not`` and parentheses, e.g.
``age >= 40 and sex == 1`` or ``cp in [1, 2] and not (chol > 300)``.
A comparison with a missing value is false, as in pandas.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.errors import FilterError

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
MAX_FILTER_LENGTH = 1000
ALLOWED = "variables, numbers, == != < <= > >=, in [..], and, or, not, parentheses"


@dataclass(frozen=True)
class RowFilter:
    """A parsed filter; ``variables`` are the names it reads."""

    text: str
    tree: ast.expr
    variables: frozenset[str]

    @property
    def canonical(self) -> str:
        """The filter's canonical text (whitespace and redundant parentheses removed): two
        spellings of one population compare equal."""
        return ast.unparse(self.tree)

    def mask(self, columns: Mapping[str, npt.NDArray[Any]], n_rows: int) -> npt.NDArray[np.bool_]:
        """Boolean mask of the rows that pass."""
        result = _evaluate(self.tree, columns)
        if isinstance(result, (bool, np.bool_)):
            return np.full(n_rows, bool(result))
        return np.asarray(result, dtype=bool)


def _number(node: ast.expr, text: str) -> float:
    sign = 1.0
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        sign, node = -sign, node.operand  # a loop, not recursion: long chains stay safe
    value = node.value if isinstance(node, ast.Constant) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return sign * float(value)
    raise FilterError(
        f"filter {text!r}: expected a number, got {ast.unparse(node)!r}; allowed: {ALLOWED}"
    )


def _check_operator(op: ast.cmpop, right: ast.expr, text: str) -> None:
    """One comparison's operator and right-hand side: ``in`` takes a list of numbers."""
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(right, (ast.List, ast.Tuple)) or not right.elts:
            raise FilterError(f"filter {text!r}: 'in' needs a non-empty list like [1, 2]")
        for element in right.elts:
            _number(element, text)
    elif isinstance(right, (ast.List, ast.Tuple)):
        raise FilterError(f"filter {text!r}: a list may only follow 'in' or 'not in'")
    elif type(op) not in _COMPARE:
        raise FilterError(
            f"filter {text!r}: operator {type(op).__name__} is not allowed; allowed: {ALLOWED}"
        )


def _check_compare(node: ast.Compare, text: str, names: set[str]) -> None:
    for op, right in zip(node.ops, node.comparators, strict=True):
        _check_operator(op, right, text)
    if isinstance(node.left, (ast.List, ast.Tuple)):
        raise FilterError(f"filter {text!r}: a list may only follow 'in' or 'not in'")
    for operand in [node.left, *node.comparators]:
        if isinstance(operand, ast.Name):
            names.add(operand.id)
        elif not isinstance(operand, (ast.List, ast.Tuple)):
            _number(operand, text)


def _check(node: ast.expr, text: str, names: set[str]) -> None:
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, text, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, text, names)
    elif isinstance(node, ast.Compare):
        _check_compare(node, text, names)
    else:
        raise FilterError(
            f"filter {text!r}: {ast.unparse(node)!r} is not allowed here; allowed: {ALLOWED}"
        )


def parse_filter(text: str, known_variables: set[str] | frozenset[str] | None = None) -> RowFilter:
    """Parse a filter; raise FilterError naming the bad part and what is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise FilterError(f"filter must be a non-empty text expression, got {text!r}")
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"filter is {len(text)} characters long; at most {MAX_FILTER_LENGTH}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise FilterError(
            f"filter {text!r} is not a valid expression; allowed: {ALLOWED}"
        ) from None
    names: set[str] = set()
    _check(tree, text, names)
    if known_variables is not None:
        unknown = sorted(names - set(known_variables))
        if unknown:
            raise FilterError(
                f"filter {text!r} uses {', '.join(map(repr, unknown))}, not in the data "
                f"dictionary; known: {', '.join(sorted(known_variables))}"
            )
    return RowFilter(text, tree, frozenset(names))


def _evaluate(node: ast.expr, columns: Mapping[str, npt.NDArray[Any]]) -> Any:
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, columns) for v in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        joined = values[0]
        for value in values[1:]:
            joined = combine(joined, value)
        return joined
    if isinstance(node, ast.UnaryOp):  # only `not` passes _check
        return np.logical_not(_evaluate(node.operand, columns))
    if isinstance(node, ast.Compare):
        out: Any = True
        left = _operand(node.left, columns)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, (ast.In, ast.NotIn)):
                assert isinstance(right_node, (ast.List, ast.Tuple))
                allowed = [_number(e, "") for e in right_node.elts]
                hit = np.isin(left, allowed)
                out = np.logical_and(out, hit if isinstance(op, ast.In) else ~hit & ~np.isnan(left))
                continue
            right = _operand(right_node, columns)
            with np.errstate(invalid="ignore"):
                hit = _COMPARE[type(op)](left, right)
            # A comparison with a missing value is false, `!=` included (numpy says nan != x).
            hit = hit & ~np.isnan(left) & ~np.isnan(right)
            out = np.logical_and(out, hit)
            left = right
        return out
    raise FilterError(f"cannot evaluate {ast.unparse(node)!r}")  # unreachable after _check


def _operand(node: ast.expr, columns: Mapping[str, npt.NDArray[Any]]) -> Any:
    if isinstance(node, ast.Name):
        if node.id not in columns:
            raise FilterError(f"filter uses {node.id!r}, which is not a column here")
        return np.asarray(columns[node.id], dtype=float)
    return _number(node, "")


def to_sql(row_filter: RowFilter, column: Callable[[str], Any]) -> Any:
    """The filter as a SQLAlchemy boolean expression, with every number a bound parameter.

    ``column(name)`` gives the SQL column for a name the filter reads. Each comparison is
    guarded with ``IS NOT NULL`` on its columns, so that, as in :meth:`RowFilter.mask`, a
    comparison with a missing value is false (not SQL's unknown) and ``not`` turns it true.
    SQL sources must hold missing values as NULL (a float NaN is a value to SQL).
    """
    import sqlalchemy as sa

    def operand(node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return column(node.id)
        return sa.bindparam(None, _number(node, row_filter.text), type_=sa.Float)

    def compile_node(node: ast.expr) -> Any:
        if isinstance(node, ast.BoolOp):
            parts = [compile_node(v) for v in node.values]
            return sa.and_(*parts) if isinstance(node.op, ast.And) else sa.or_(*parts)
        if isinstance(node, ast.UnaryOp):  # only `not` passes _check
            return sa.not_(compile_node(node.operand))
        if not isinstance(node, ast.Compare):
            raise FilterError(f"cannot compile {ast.unparse(node)!r}")  # unreachable
        clauses = []
        left_node = node.left
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            left = operand(left_node)
            present = [operand(n).is_not(None) for n in (left_node,) if isinstance(n, ast.Name)]
            if isinstance(op, (ast.In, ast.NotIn)):
                assert isinstance(right_node, (ast.List, ast.Tuple))
                values = [_number(e, row_filter.text) for e in right_node.elts]
                listed = sa.bindparam(None, values, expanding=True, type_=sa.Float)
                hit = left.in_(listed) if isinstance(op, ast.In) else left.not_in(listed)
                clauses.append(sa.and_(*present, hit))
                continue
            right = operand(right_node)
            if isinstance(right_node, ast.Name):
                present.append(right.is_not(None))
            clauses.append(sa.and_(*present, _COMPARE[type(op)](left, right)))
            left_node = right_node
        return sa.and_(*clauses)

    return compile_node(row_filter.tree)

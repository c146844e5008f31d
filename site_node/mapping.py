"""A site's mapping file: local columns, units and codes to the alliance dictionary.

Applied to the local table before the dictionary's check (``harmonize.conform``), in this
order for each mapped variable: read its local column (``column``, default the same name) or
compute it (``derive``); set the local missing-value codes (``missing``) missing; recode
(``codes``: a local code without an entry becomes text, so the check reports it as a value the
dictionary does not allow); convert the unit (``unit``, by the one declared conversion for
the pair). Variables the file does not name pass through under their own (or renamed) names.

``derive`` is a small arithmetic language, parsed into a tree and interpreted, never eval'd:
local column names, numbers, ``+ - * / **``, unary minus, parentheses, and
``years_between(start, end)`` / ``days_between(start, end)`` over date columns (ISO dates or
anything pandas parses; an unparsable date is missing). Division by zero and any non-finite
result are missing.
"""

from __future__ import annotations

import ast
import difflib
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocol.config import (
    BinaryVariable,
    CategoricalVariable,
    DataDictionary,
    DataSource,
    SiteMapping,
    UnitConversion,
    VariableMapping,
)
from protocol.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
MAX_EXPRESSION_LENGTH = 500
DAYS_PER_YEAR = 365.25

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_FUNCTIONS = ("years_between", "days_between")
ALLOWED = "local columns, numbers, + - * / **, parentheses, years_between(a, b), days_between(a, b)"


def code_key(value: Any) -> str:
    """A local value as the text a code or missing-value list is matched on: ``1``, ``1.0``
    and ``"1"`` are one code; text is stripped."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
        if np.isfinite(number) and number.is_integer():
            return str(int(number))
        return repr(number)
    return str(value).strip()


def unmapped_code(value: Any) -> str:
    """What a local code without an entry becomes: text, which the dictionary's check counts as
    a value it does not allow (kept as a number, a code ``0`` could pass as level 0)."""
    return f"unmapped code {code_key(value)}"


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most like ``name`` (case-insensitive), if any is close enough: by spelling,
    else the longest choice of 3 or more letters that starts it (``cholesterol`` -> ``chol``)."""
    options = {c.lower(): c for c in choices}
    lower = name.lower()
    found = difflib.get_close_matches(lower, list(options), n=1, cutoff=0.6)
    if found:
        return options[found[0]]
    prefixes = [c for c in options if len(c) >= 3 and lower.startswith(c)]
    return options[max(prefixes, key=len)] if prefixes else None


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    match = closest(name, choices)
    return f" (did you mean {match!r}?)" if match else ""


# ----------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Expression:
    """A parsed ``derive`` expression; ``columns`` are the local columns it reads."""

    text: str
    tree: ast.expr
    columns: frozenset[str]
    date_columns: frozenset[str]


def parse_expression(text: str, where: str) -> Expression:
    """Parse a derive expression.

    Raises:
        ConfigError: naming ``where``, the construct and what is allowed.
    """
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ConfigError(f"{where}: the expression is longer than {MAX_EXPRESSION_LENGTH}")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ConfigError(f"{where}: {text!r} is not an expression ({exc.msg})") from None
    columns: set[str] = set()
    dates: set[str] = set()

    def visit(node: ast.expr) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            visit(node.left)
            visit(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            visit(node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return
        elif isinstance(node, ast.Name):
            columns.add(node.id)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and len(node.args) == 2
            and not node.keywords
            and all(isinstance(a, ast.Name) for a in node.args)
        ):
            for arg in node.args:
                assert isinstance(arg, ast.Name)
                dates.add(arg.id)
        else:
            shown = ast.unparse(node)
            raise ConfigError(f"{where}: {shown!r} is not allowed in a derive; allowed: {ALLOWED}")

    visit(tree)
    return Expression(text, tree, frozenset(columns | dates), frozenset(dates))


def _dates(raw: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_datetime(raw[name], errors="coerce", format="mixed")


def evaluate(expression: Expression, raw: pd.DataFrame) -> FloatArray:
    """The expression over every row of ``raw``: float64, missing where any input is."""

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp):
            operand = value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Constant):
            return float(node.value)  # type: ignore[arg-type]  # parse: int or float only
        if isinstance(node, ast.Name):
            return pd.to_numeric(raw[node.id], errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        start, end = (_dates(raw, a.id) for a in node.args if isinstance(a, ast.Name))
        days = (end - start).dt.days.to_numpy(dtype=np.float64, na_value=np.nan)
        return days / DAYS_PER_YEAR if node.func.id == "years_between" else days

    with np.errstate(all="ignore"):
        out = np.asarray(value(expression.tree), dtype=np.float64)
    out = np.broadcast_to(out, (len(raw),)).copy()
    out[~np.isfinite(out)] = np.nan
    return out


# ----------------------------------------------------------------------------- the mapping


@dataclass
class MappingReport:
    """What the mapping did, in counts only."""

    #: dictionary variable -> where its values come from, in words
    sources: dict[str, str] = field(default_factory=dict)
    #: dictionary variable -> the unit conversion applied, in words
    converted: dict[str, str] = field(default_factory=dict)
    #: dictionary variable -> values that were a local missing-value code
    local_missing: dict[str, int] = field(default_factory=dict)
    #: dictionary variable -> values whose local code has no entry in ``codes``
    unmapped_codes: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for name, source in self.sources.items():
            extra = []
            if name in self.converted:
                extra.append(self.converted[name])
            if self.local_missing.get(name):
                extra.append(f"{self.local_missing[name]} local missing codes set missing")
            if self.unmapped_codes.get(name):
                extra.append(f"{self.unmapped_codes[name]} values with a code not in codes")
            out.append(f"{name}: {source}" + (f"; {'; '.join(extra)}" if extra else ""))
        return out


def _conversion(
    name: str, entry: VariableMapping, mapping: SiteMapping, dictionary: DataDictionary
) -> UnitConversion | None:
    """The one conversion from the local unit to the dictionary's, or None when they agree."""
    var = dictionary.variables[name]
    target = getattr(var, "unit", None)
    if entry.unit is None or entry.unit == target:
        return None
    where = f"mapping: {name}: unit {entry.unit!r}"
    if target is None:
        raise ConfigError(f"{where}: the dictionary gives {name} no unit to convert to")
    found = [
        c
        for c in mapping.conversions
        if c.from_unit == entry.unit
        and c.to == target
        and (c.variables is None or name in c.variables)
    ]
    if not found:
        raise ConfigError(
            f"{where}: no conversion {entry.unit} -> {target} is declared for it; add one to "
            f"conversions: {{from: {entry.unit}, to: {target}, factor: ...}}"
        )
    specific = [c for c in found if c.variables is not None]
    chosen = specific or found
    if len(chosen) > 1:
        raise ConfigError(f"{where}: {len(chosen)} conversions {entry.unit} -> {target} apply")
    return chosen[0]


def check_mapping(mapping: SiteMapping, dictionary: DataDictionary, columns: list[str]) -> None:
    """Check a mapping against the dictionary and the local table's columns, once at start.

    Raises:
        ConfigError: naming the variable, the problem and, for a name, the closest one.
    """
    known = [*dictionary.variables, *([dictionary.patient_id] if dictionary.patient_id else [])]
    for name, entry in mapping.variables.items():
        where = f"mapping: {name}"
        if name not in known:
            raise ConfigError(
                f"{where}: not a dictionary variable{_did_you_mean(name, known)}; the mapping "
                "names dictionary variables and says where each comes from"
            )
        if entry.derive is not None:
            expression = parse_expression(entry.derive, f"{where}: derive")
            reads = sorted(expression.columns)
        else:
            reads = [entry.column or name]
        for column in reads:
            if column not in columns:
                raise ConfigError(
                    f"{where}: the local data has no column {column!r}"
                    f"{_did_you_mean(column, columns)}"
                )
        if name == dictionary.patient_id:
            continue
        var = dictionary.variables[name]
        if entry.codes is not None:
            if not isinstance(var, (CategoricalVariable, BinaryVariable)):
                raise ConfigError(f"{where}: codes need a categorical or binary variable")
            wrong = sorted({v for v in entry.codes.values() if v not in var.levels})
            if wrong:
                raise ConfigError(
                    f"{where}: codes map to {wrong}, not levels of {name} ({var.levels})"
                )
        _conversion(name, entry, mapping, dictionary)


def apply_mapping(
    raw: pd.DataFrame, mapping: SiteMapping, dictionary: DataDictionary
) -> tuple[pd.DataFrame, MappingReport]:
    """The local table with the mapped variables under their dictionary names.

    Raises:
        ConfigError: the mapping does not fit the dictionary or the table (``check_mapping``).
    """
    check_mapping(mapping, dictionary, [str(c) for c in raw.columns])
    report = MappingReport()
    read: set[str] = set()
    out: dict[str, Any] = {}
    for name, entry in mapping.variables.items():
        if entry.derive is not None:
            expression = parse_expression(entry.derive, f"mapping: {name}: derive")
            values: pd.Series = pd.Series(evaluate(expression, raw), index=raw.index)
            read |= expression.columns
            report.sources[name] = f"derived: {entry.derive}"
        else:
            column = entry.column or name
            values = raw[column]
            read.add(column)
            report.sources[name] = f"column {column}" if column != name else "same name"
        if name == dictionary.patient_id:
            out[name] = values
            continue
        keys = values.map(code_key, na_action="ignore")
        if entry.missing:
            local = keys.isin({code_key(m) for m in entry.missing})
            report.local_missing[name] = int(local.sum())
            values = values.mask(local)
            keys = keys.mask(local)
        if entry.codes is not None:
            recoded = keys.map(entry.codes)
            unmapped = keys.notna() & recoded.isna()
            report.unmapped_codes[name] = int(unmapped.sum())
            # A code without an entry becomes text: the dictionary's check then reports it as
            # a value it does not allow, rather than as a missing one or as a level.
            values = recoded.astype(object).where(~unmapped, keys.map(unmapped_code))
        conversion = _conversion(name, entry, mapping, dictionary)
        if conversion is not None:
            numbers = pd.to_numeric(values, errors="coerce")
            text = values.notna() & numbers.isna()  # kept so the check counts it as not numeric
            values = (
                (numbers * conversion.factor + conversion.offset)
                .astype(object)
                .where(~text, values)
            )
            report.converted[name] = (
                f"{conversion.from_unit} -> {conversion.to} (x {conversion.factor:g}"
                + (f" + {conversion.offset:g})" if conversion.offset else ")")
            )
        out[name] = values
    passed = [c for c in raw.columns if c not in out and str(c) not in read]
    frame = pd.concat([raw[passed], pd.DataFrame(out, index=raw.index)], axis=1)
    return frame, report


def columns_needed(
    source: DataSource, dictionary: DataDictionary, mapping: SiteMapping | None
) -> set[str]:
    """The local columns a site reads: the dictionary's names (and its patient id), the local
    names of ``rename``, the names ``derive`` reads, and the mapping's columns and inputs. A
    connector that can project reads only these."""
    needed = set(dictionary.variables) | set(source.rename)
    if source.where is not None:  # csv and omop filter after reading
        needed |= {
            n.id for n in ast.walk(ast.parse(source.where, mode="eval")) if isinstance(n, ast.Name)
        }
    if dictionary.patient_id:
        needed.add(dictionary.patient_id)
    for text in source.derive.values():
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError:
            continue  # conform names the problem
        needed |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    for name, entry in (mapping.variables if mapping else {}).items():
        if entry.derive is not None:
            needed |= set(parse_expression(entry.derive, f"mapping: {name}: derive").columns)
        else:
            needed.add(entry.column or name)
    return needed

"""How many design columns a model request asks for, counted without building the design.

A GLM formula with twelve interacting dictionary variables has 27,648 columns; formulaic builds
such a design (or expands ``(a + ... + g)**7``) for seconds to minutes, and a site would then be
asked for a 27,648 x 27,648 matrix. The coordinator counts first, from the formula's terms and
the dictionary's levels, and refuses a request above the study's ``max_model_columns``.

The count follows formulaic's full-rank coding (as patsy's): a term's numeric factors give one
column each; its categorical factors are coded by treatment contrasts wherever a lower-order
term spans the rest, so the design holds, per set of numeric factors, one block of
``prod(levels - 1)`` columns for every subset of categorical factors that some term reaches.
The count is order-independent and equals the built design's (a unit test compares them).

Formulaic's expansion is itself exponential (``A:B`` forms every product, ``A**n`` all
``len(A)**n`` of them), so the count also refuses a formula whose expansion would take longer
than building a legitimate model, before formulaic ever sees it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.config import CategoricalVariable, DataDictionary
from protocol.errors import ValidationError

#: Counting stops above this many columns ("more than 100,000").
COLUMN_COUNT_CAP = 100_000
#: Term products formulaic may form while expanding one formula (about 36 us each here).
EXPANSION_WORK = 50_000
_MAX_PARENS = 32

Term = frozenset[str]
_TOKEN = re.compile(
    r"\s*(?:(?P<op>\*\*|%in%|[~+\-*/:^()])|(?P<number>\d+(?:\.\d*)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)|(?P<quoted>`[^`]*`)|(?P<other>\S))"
)
_BINARY = {"+": 100, "-": 100, "*": 200, "/": 200, "%in%": 200, ":": 300, "**": 500, "^": 500}


@dataclass(frozen=True)
class _Terms:
    """A formula fragment: its terms (the empty term is the intercept), and the terms a unary
    minus (``-1``, ``-a``) or a ``0`` removes from what a ``+`` has gathered on its left."""

    terms: frozenset[Term]
    removes: frozenset[Term] = frozenset()


class _Parser:
    """Precedence climbing over formulaic's operators, with every product's work counted."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.tokens = self._tokenize(source)
        self.at = 0
        self.work = 0

    def _fail(self, why: str) -> ValidationError:
        return ValidationError(f"formula {self.text!r} cannot be parsed ({why})")

    def _tokenize(self, source: str) -> list[tuple[str, str]]:
        tokens: list[tuple[str, str]] = []
        pos = 0
        while match := _TOKEN.match(source, pos):
            kind = str(match.lastgroup)  # every alternative is a named group
            value, pos = match.group(kind), match.end()
            if (kind == "name" and source.startswith("(", pos)) or value == "{":
                # A call such as np.log(x), or a {python} expression: one opaque factor, which
                # formulaic refuses later as a transform (after the count let it through).
                start = pos if kind == "name" else pos - 1
                pos = self._group_end(source, start)
                kind, value = "name", source[match.start(kind) : pos]
            elif kind == "other":
                raise self._fail(f"unexpected {value!r} at position {match.start(kind) + 1}")
            tokens.append((kind, value))
        return tokens

    def _group_end(self, source: str, start: int) -> int:
        """Just past the bracket group that opens at ``source[start]``."""
        opening = source[start]
        closing = {"(": ")", "{": "}"}[opening]
        depth = 0
        for i in range(start, len(source)):
            depth += {opening: 1, closing: -1}.get(source[i], 0)
            if depth == 0:
                return i + 1
        raise self._fail(f"unbalanced {opening!r}")

    def parse(self) -> _Terms:
        if not self.tokens:
            raise self._fail("no terms after '~'")
        # As formulaic does: the intercept is a leading '1 +', which a top-level '- 1', '-1 + '
        # or '0' removes and a '+ 1' after them brings back; inside parentheses they do not.
        self.tokens[:0] = [("number", "1"), ("op", "+")]
        value = self._expression(0, 0)
        if self.at < len(self.tokens):
            raise self._fail(f"unexpected {self.tokens[self.at][1]!r}")
        return value

    def _expression(self, min_precedence: int, depth: int) -> _Terms:
        left = self._unary(depth)
        while self.at < len(self.tokens):
            kind, op = self.tokens[self.at]
            precedence = _BINARY.get(op) if kind == "op" else None
            if precedence is None or precedence < min_precedence:
                break
            self.at += 1
            if op in ("**", "^"):
                left = self._power(left, op)
                continue
            right = self._expression(precedence + 1, depth)
            left = self._combine(op, left, right)
        return left

    def _unary(self, depth: int) -> _Terms:
        if self.at >= len(self.tokens):
            raise self._fail("a term is missing at the end")
        kind, value = self.tokens[self.at]
        self.at += 1
        if kind == "op" and value in "+-":
            if depth >= _MAX_PARENS:
                raise self._fail(f"signs or parentheses nested deeper than {_MAX_PARENS}")
            inner = self._expression(_BINARY["+"] + 1, depth + 1)
            return inner if value == "+" else _Terms(frozenset(), removes=inner.terms)
        if kind == "op" and value == "(":
            if depth >= _MAX_PARENS:
                raise self._fail(f"signs or parentheses nested deeper than {_MAX_PARENS}")
            inner = self._expression(0, depth + 1)
            if self.at >= len(self.tokens) or self.tokens[self.at][1] != ")":
                raise self._fail("a ')' is missing")
            self.at += 1
            return _Terms(inner.terms)
        if kind == "number" and float(value) in (0.0, 1.0):
            if float(value) == 1.0:
                return _Terms(frozenset({frozenset()}))
            return _Terms(frozenset(), removes=frozenset({frozenset()}))
        if kind == "op":
            raise self._fail(f"unexpected {value!r}")
        return _Terms(frozenset({frozenset({value.strip("`")})}))

    def _products(self, left: frozenset[Term], right: frozenset[Term]) -> frozenset[Term]:
        self.work += len(left) * len(right)
        if self.work > EXPANSION_WORK:
            raise ValidationError(
                f"formula {self.text!r} is too large to expand (more than "
                f"{EXPANSION_WORK:,} products of terms); write out only the interactions you "
                "need"
            )
        return frozenset(a | b for a in left for b in right)

    def _combine(self, op: str, left: _Terms, right: _Terms) -> _Terms:
        if op == "+":
            return _Terms((left.terms | right.terms) - right.removes)
        if op == "-":
            return _Terms(left.terms - right.terms)
        if op == ":":
            return _Terms(self._products(left.terms, right.terms))
        if op == "*":
            both = self._products(left.terms, right.terms)
            return _Terms(left.terms | right.terms | both)
        # a / b is a + (all of a's factors):b; a %in% b is b / a (formulaic's reading).
        outer, inner = (left, right) if op == "/" else (right, left)
        union: Term = frozenset().union(*outer.terms)
        return _Terms(outer.terms | self._products(frozenset({union}), inner.terms))

    def _power(self, base: _Terms, op: str) -> _Terms:
        if self.at >= len(self.tokens) or self.tokens[self.at][0] != "number":
            raise self._fail(f"the right side of {op} must be a positive integer")
        exponent_text = self.tokens[self.at][1]
        self.at += 1
        if not exponent_text.isdigit() or int(exponent_text) < 1:
            raise self._fail(f"the right side of {op} must be a positive integer")
        exponent = int(exponent_text)
        # formulaic forms all len(base)**exponent products before it removes duplicates.
        work = len(base.terms) ** min(exponent, 64)
        if self.work + work > EXPANSION_WORK:
            raise ValidationError(
                f"formula {self.text!r}: {op}{exponent} of {len(base.terms)} terms forms "
                f"{len(base.terms)}{op}{exponent} products, more than {EXPANSION_WORK:,} to "
                "expand; write out only the interactions you need"
            )
        self.work += work
        result = base.terms
        for _ in range(exponent - 1):
            result = result | frozenset(a | b for a in result for b in base.terms)
        return _Terms(result)


def formula_terms(formula: str) -> frozenset[Term]:
    """The right-hand side's terms after expansion, the intercept as the empty term.

    Raises:
        ValidationError: the formula has no single ``~``, does not parse, or would take too
            long to expand.
    """
    if formula.count("~") != 1:
        what = "no response" if "~" not in formula else "more than one '~'"
        raise ValidationError(
            f"formula {formula!r} cannot be parsed ({what}); write it as 'y ~ x1 + x2'"
        )
    return _Parser(formula, formula.split("~", 1)[1]).parse().terms


def count_columns(terms: frozenset[Term], levels: Mapping[str, int]) -> int:
    """Columns of the full-rank design of ``terms``; ``levels`` gives the categorical factors.

    Any factor not in ``levels`` is numeric (one column). Stops above COLUMN_COUNT_CAP and then
    returns COLUMN_COUNT_CAP + 1.
    """
    reached: set[tuple[Term, Term]] = set()
    total = 0
    for term in terms:
        numeric = frozenset(f for f in term if f not in levels)
        pending = [frozenset(f for f in term if f in levels)]
        while pending:  # every subset of the term's categorical factors, each once
            subset = pending.pop()
            if (numeric, subset) in reached:
                continue
            reached.add((numeric, subset))
            columns = 1
            for factor in subset:
                columns *= levels[factor] - 1
            total += columns
            if total > COLUMN_COUNT_CAP:
                return COLUMN_COUNT_CAP + 1
            pending.extend(subset - {factor} for factor in subset)
    return total


def categorical_levels(dictionary: DataDictionary) -> dict[str, int]:
    """Number of levels of each categorical variable (binary ones enter as numbers)."""
    return {
        name: len(var.levels)
        for name, var in dictionary.variables.items()
        if isinstance(var, CategoricalVariable)
    }


def model_columns(
    analysis: str, params: Mapping[str, Any], dictionary: DataDictionary
) -> tuple[int, str] | None:
    """Columns a model request asks for and what to name in a refusal, from raw parameters.

    ``glm`` counts its formula's design; ``cox`` one column per numeric or binary covariate
    and ``levels - 1`` per categorical one. Other analyses, and parameters of the wrong type
    (the analysis's own validation names those), give ``None``.
    """
    levels = categorical_levels(dictionary)
    if analysis == "glm":
        formula = params.get("formula")
        if not isinstance(formula, str) or len(formula) > 2000:
            return None
        return count_columns(formula_terms(formula), levels), f"formula {formula!r} has"
    if analysis == "cox":
        covariates = params.get("covariates")
        if not isinstance(covariates, Sequence) or isinstance(covariates, str):
            return None
        names = [c for c in covariates if isinstance(c, str)]
        count = sum(levels.get(name, 2) - 1 for name in dict.fromkeys(names))
        return count, f"covariates {', '.join(names)} have"
    return None

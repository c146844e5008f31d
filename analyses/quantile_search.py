"""The exact quantile search's machinery: the public value grid, each site's admissible
boundaries (its disclosure rule), the round state's intervals, and the choice of the next
query's points. ``analyses.quantiles`` holds the analysis and the method's description.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.errors import ValidationError

FloatArray = npt.NDArray[np.float64]

#: Levels of the grid: points are L + (U - L) k / 2^DEPTH.
DEPTH: int = 52
GRID: int = 2**DEPTH
#: The search stops after this many rounds (about 14 suffice for any data in off mode).
MAX_ROUNDS = 64
MAX_BRACKETS = 256


# ----------------------------------------------------------------------------- the grid


class ValueGrid:
    """The public grid of one variable: x(k) = L + (U - L) k / 2^52, x(0) = -inf, x(2^52) = inf.

    ``k / 2^52`` is exact in binary, so both sides compute the same float for the same k.
    """

    def __init__(self, low: float, high: float) -> None:
        self.low: float = float(low)
        self.width: float = float(high - low)

    def x(self, k: int) -> float:
        if k <= 0:
            return -math.inf
        if k >= GRID:
            return math.inf
        return self.low + self.width * (k / GRID)

    def ceil(self, value: float) -> int:
        """The smallest k with x(k) >= value."""
        k = min(max(math.ceil((value - self.low) / self.width * GRID), 1), GRID)
        while k > 1 and self.x(k - 1) >= value:
            k -= 1
        while self.x(k) < value:
            k += 1
        return k


def multiples(lo: int, hi: int, level: int) -> tuple[int, int, int]:
    """First and last multiple of the level's step strictly inside (lo, hi), and the step."""
    step: int = 2 ** (DEPTH - level)
    return (lo // step + 1) * step, ((hi - 1) // step) * step, step


class SiteBoundaries:
    """One site's admissible boundaries under its disclosure rule (see the module's notes).

    Level ``l`` keeps level ``l - 1``'s boundaries and scans each of their cells (a, z] from
    the left, admitting a level-``l`` point c when (last admitted, c] and (c, z] both hold 0 or
    at least ``min_cell`` values. With ``min_cell <= 1`` every grid point is admissible.
    """

    def __init__(self, values: FloatArray, grid: ValueGrid, min_cell: int) -> None:
        self.values, self.grid, self.m = values, grid, min_cell

    def le(self, k: int) -> int:
        """Values at or below x(k)."""
        return int(np.searchsorted(self.values, self.grid.x(k), side="right"))

    def count(self, lo: int, hi: int) -> int:
        return self.le(hi) - self.le(lo)

    def admitted(self, k: int, level: int) -> bool:
        """Whether grid point k is an admissible boundary at ``level`` (nested in the level)."""
        if k <= 0 or k >= GRID or self.m <= 1:
            return True
        a, z = 0, GRID
        for current in range(1, level + 1):
            found = self._scan(a, z, current, k)
            if found is None:
                return True
            a, z = found
        return False

    def _scan(self, a: int, z: int, level: int, k: int) -> tuple[int, int] | None:
        """Scan cell (a, z] of the previous level at ``level``: None when k is admitted, else
        the admitted boundaries on either side of k (the cell holding k at this level)."""
        m, values = self.m, self.values
        total = self.le(z)
        last = a
        while True:
            first, final, step = multiples(last, z, level)
            if first > final:
                return last, z  # no candidate left in this cell
            below = self.le(last)
            if below == total:  # nothing left in the cell: every candidate is admitted
                return self._among(last, first, final, step, z, k)
            # Candidates before the next value close an empty cell: all admitted.
            empty_final = min(((self.grid.ceil(float(values[below])) - 1) // step) * step, final)
            if empty_final >= first:
                if k <= empty_final:
                    return self._among(last, first, empty_final, step, z, k)
                last = empty_final
                continue
            # Otherwise the next boundary closes a cell of at least m values, leaving 0 or >= m.
            if below + m > total:
                return last, z
            c = max(ceil_to(self.grid.ceil(float(values[below + m - 1])), step), first)
            rest = total - self.le(c) if c < z else 0
            if 0 < rest < m:
                c = ceil_to(self.grid.ceil(float(values[total - 1])), step)
            if c >= z:
                return last, z
            if k < c:
                return last, c
            if k == c:
                return None
            last = c

    @staticmethod
    def _among(
        last: int, first: int, final: int, step: int, z: int, k: int
    ) -> tuple[int, int] | None:
        """k among consecutive admitted candidates first..final (step apart) after ``last``."""
        if k < first:
            return last, first
        if k > final:
            return final, z
        if k % step == 0:
            return None
        below = (k // step) * step
        return below, below + step

    def single(self, lo: int, hi: int) -> tuple[bool, float]:
        """Whether the values in (x(lo), x(hi)] are one value, and that value."""
        first, last = self.le(lo), self.le(hi) - 1
        if last < first or self.values[first] != self.values[last]:
            return False, 0.0
        return True, float(self.values[first])


def ceil_to(k: int, step: int) -> int:
    return -(-k // step) * step


def checked_brackets(state: Mapping[str, Any], limit: int) -> list[tuple[int, int, int, list[int]]]:
    """This round's intervals and points, checked: a site must not trust the state blindly."""
    raw = state.get("brackets")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_BRACKETS:
        raise ValidationError(
            f"quantiles round state needs 1 to {MAX_BRACKETS} intervals, got {raw!r:.80}"
        )
    out = []
    for item in raw:
        if not bracket_valid(item, limit):
            raise ValidationError(
                f"quantiles interval {item!r:.120} is not [lo, hi, level, points]: integers "
                f"0 <= lo < hi <= 2^52, level 1 to 52, at most {limit} increasing points of that "
                "level strictly inside (lo, hi)"
            )
        out.append((int(item[0]), int(item[1]), int(item[2]), [int(k) for k in item[3]]))
    return out


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bracket_valid(item: Any, limit: int) -> bool:
    if not (isinstance(item, (list, tuple)) and len(item) == 4 and isinstance(item[3], list)):
        return False
    lo, hi, level, points = item
    if not (all(map(is_int, (lo, hi, level))) and all(map(is_int, points))):
        return False
    if not (0 <= lo < hi <= GRID and 1 <= level <= DEPTH and len(points) <= limit):
        return False
    step: int = 2 ** (DEPTH - level)
    inside = all(lo < k < hi and k % step == 0 for k in points)
    return inside and all(a < b for a, b in itertools.pairwise(points))


def lerp(a: float, b: float, g: float) -> float:
    """numpy's linear interpolation, in the same floating-point form."""
    diff = b - a
    return b - diff * (1 - g) if g >= 0.5 else a + diff * g


def order_ranks(n: int, p: float) -> tuple[int, int, float]:
    """The two 0-based ranks around probability p, and the weight of the upper one."""
    h = (n - 1) * p
    if h >= n - 1:
        return n - 1, n - 1, 0.0
    j = math.floor(h)
    if h == j:
        return j, j, 0.0  # numpy's a + (b - a) * 0 is a: the upper rank is not needed
    return j, j + 1, h - j


def new_target(rank: int, n: int, levels: int) -> dict[str, Any]:
    """A target rank's search state: the interval (x(lo), x(hi)] holding it, with ``below``
    pooled values at or below x(lo) and ``count`` inside; ``level`` at which lo and hi are
    admitted everywhere; ``step``, the levels the next query goes down."""
    return {
        "rank": rank,
        "lo": 0,
        "hi": GRID,
        "below": 0,
        "count": n,
        "level": 0,
        "step": levels,
        "status": "open",
        "value": None,
    }


# ----------------------------------------------------------------------------- result


def levels_per_query(candidates: int) -> int:
    """Levels one query goes down: log2(candidates + 1)."""
    return (candidates + 1).bit_length() - 1


def span(target: Mapping[str, Any], grid: ValueGrid) -> tuple[float, float]:
    """A target's interval in values, within the dictionary's bounds."""
    high = grid.low + grid.width
    return max(grid.x(target["lo"]), grid.low), min(grid.x(target["hi"]), high)


def next_query(
    group: list[dict[str, Any]], grid: ValueGrid, limit: int
) -> tuple[int, list[int]] | None:
    """Level and points of the next query for one interval: every point of the level
    inside it, or, when there are more than ``limit``, the ``limit`` nearest the targets'
    interpolated positions. None when the interval cannot be cut on the grid."""
    lo, hi = group[0]["lo"], group[0]["hi"]
    level = min(DEPTH, group[0]["level"] + group[0]["step"])
    first, final, step = multiples(lo, hi, level)
    while first > final and level < DEPTH:
        level += 1
        first, final, step = multiples(lo, hi, level)
    if first > final:
        return None
    count = (final - first) // step + 1
    if count <= limit:
        return level, list(range(first, final + 1, step))
    estimates = []
    for target in group:
        a, b = span(target, grid)
        share = (target["rank"] - target["below"] + 0.5) / target["count"]
        estimates.append((a + share * (b - a) - grid.low) / grid.width * GRID)
    centre = round((float(np.mean(estimates)) - first) / step)
    start = min(max(centre - limit // 2, 0), count - limit)
    return level, [first + step * (start + i) for i in range(limit)]

"""Fair credit for training: each site's contribution to the model's quality.

A coalition's value ``v(S)`` is the pooled held-out AUC of a model trained, alongside the main
one and for as many rounds, on the sites in ``S`` only (FedAvg of their clipped updates,
whatever the main strategy); ``v`` of no site is the initial model's AUC. From these:

* leave-one-site-out: ``v(all) - v(all but i)``;
* Shapley value: the average of ``v(S + i) - v(S)`` over the orders in which sites could join,
  exact over every coalition for up to :data:`EXACT_SHAPLEY_SITES` sites, and estimated from
  ``permutations`` seeded random orders beyond (only the coalitions those orders visit are
  trained). The values add up to ``v(all) - v(none)`` (exactly when enumerated).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

#: Up to this many sites, Shapley values are exact (every coalition is trained).
EXACT_SHAPLEY_SITES = 6
#: The most coalition models one training request trains besides the main one.
MAX_COALITIONS = 256


def _orders(sites: Sequence[str], permutations: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[sites[j] for j in rng.permutation(len(sites))] for _ in range(permutations)]


def coalitions_for(
    method: str, sites: Sequence[str], permutations: int, seed: int
) -> list[tuple[str, ...]]:
    """The proper, non-empty coalitions to train besides all sites (each in ``sites``' order).

    Raises:
        ValueError: more coalitions than :data:`MAX_COALITIONS`.
    """
    order = {site: i for i, site in enumerate(sites)}
    chosen: set[frozenset[str]] = set()
    n = len(sites)
    if method == "none" or n < 2:
        return []
    chosen.update(frozenset(s for s in sites if s != left) for left in sites)
    if method == "shapley":
        if n <= EXACT_SHAPLEY_SITES:
            for size in range(1, n - 1):
                chosen.update(frozenset(c) for c in itertools.combinations(sites, size))
        else:
            for joined in _orders(sites, permutations, seed):
                chosen.update(frozenset(joined[:k]) for k in range(1, n - 1))
    if len(chosen) > MAX_COALITIONS:
        raise ValueError(
            f"{len(chosen)} coalition models would be trained; at most {MAX_COALITIONS} are "
            "allowed (fewer permutations)"
        )
    return sorted(
        (tuple(sorted(c, key=order.__getitem__)) for c in chosen),
        key=lambda c: (len(c), [order[s] for s in c]),
    )


def leave_one_out(values: Mapping[frozenset[str], float], sites: Sequence[str]) -> dict[str, float]:
    """``v(all) - v(all but i)`` for each site."""
    everyone = frozenset(sites)
    return {site: values[everyone] - values[everyone - {site}] for site in sites}


def shapley(
    values: Mapping[frozenset[str], float],
    sites: Sequence[str],
    permutations: int,
    seed: int,
) -> dict[str, float]:
    """Each site's Shapley value of ``values`` (which must hold the empty coalition): exact
    when every coalition is there, else over the same seeded orders :func:`coalitions_for`
    trained."""
    n = len(sites)
    if n <= EXACT_SHAPLEY_SITES:
        out = {}
        for site in sites:
            others = [s for s in sites if s != site]
            total = 0.0
            for size in range(n):
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                for coalition in itertools.combinations(others, size):
                    base = frozenset(coalition)
                    total += weight * (values[base | {site}] - values[base])
            out[site] = total
        return out
    sums = dict.fromkeys(sites, 0.0)
    orders = _orders(sites, permutations, seed)
    for joined in orders:
        for k, site in enumerate(joined):
            sums[site] += values[frozenset(joined[: k + 1])] - values[frozenset(joined[:k])]
    return {site: total / len(orders) for site, total in sums.items()}

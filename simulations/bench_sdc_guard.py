"""Benchmark: the sdc differencing guard's cost per release at 1M rows and 1,000 earlier releases.

    python -m simulations.bench_sdc_guard [--rows 1000000] [--earlier 1000] [--repeat 21]

A site's study has ``--earlier`` remembered releases over ``--rows`` rows (random populations of
10% to 90% of the rows, stored as Roaring bitmaps in the site's SQLite file). Each new release
pays for: building its record set from the rows that contribute (a boolean mask to a bitmap),
the guard's check against every remembered set, and remembering it (serialise and insert,
inside the reply's transaction). Two checks are timed: a typical one (the sizes differ, so the
cardinality pre-filter skips most sets) and the worst case (every remembered set within
``min_subset`` records in size, so every intersection is computed). Medians and 95th
percentiles of ``--repeat`` runs (the dominance rule on one sum of ``--rows`` values is timed
too); the first load of the study's memory from the file is timed
once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from protocol.config import SDCThresholds
from site_node.disclosure import DifferencingGuard, RecordSet, check_dominance
from site_node.ledger import SiteStore


def timed(work: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and 95th percentile of ``repeat`` runs, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def fill(store: SiteStore, rows: int, earlier: int, sizes: list[int], seed: int) -> None:
    """Remember ``earlier`` random populations of the given sizes (one transaction each)."""
    rng = np.random.default_rng(seed)
    with store._transaction() as db:  # one transaction: setting up, not what is measured
        for i in range(earlier):
            positions = np.sort(rng.choice(rows, size=sizes[i % len(sizes)], replace=False))
            store.guard.remember(db, RecordSet.of("bench", f"population {i}", positions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--earlier", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    rows, earlier, repeat = args.rows, args.earlier, args.repeat
    thresholds = SDCThresholds()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "site.db"
        store = SiteStore(path, actor="bench")
        started = time.perf_counter()
        spread = [int(rows * f) for f in np.linspace(0.1, 0.9, earlier)]
        fill(store, rows, earlier, spread, seed=2)
        setup = time.perf_counter() - started
        size_mb = path.stat().st_size / 2**20
        store.close()

        store = SiteStore(path, actor="bench")  # a restarted site: memory loaded on first use
        mask = rng.random(rows) < 0.5
        mask_positions = np.flatnonzero(mask)
        build = timed(lambda: RecordSet.of("bench", "new", mask_positions), repeat)
        mask_to_positions = timed(lambda: np.flatnonzero(mask), repeat)
        values = rng.lognormal(5.0, 0.5, rows)  # one released sum's contributions (a mean's)
        dominance = timed(lambda: check_dominance([values], thresholds), repeat)
        new = RecordSet.of("bench", "new", mask_positions)
        started = time.perf_counter()
        store.precheck_release(new, thresholds)
        first_load = (time.perf_counter() - started) * 1000
        typical = timed(lambda: store.precheck_release(new, thresholds), repeat)
        blob_kb = len(new.serialise()[0]) / 1024
        store.close()

        # Worst case: every remembered set within min_subset records of the new one's size.
        worst_path = Path(folder) / "worst.db"
        worst_store = SiteStore(worst_path, actor="bench")
        fill(worst_store, rows, earlier, [len(new.rows) + 1], seed=3)
        worst_store.guard.forget_cache("bench")
        worst_store.precheck_release(new, thresholds)  # load
        worst = timed(lambda: worst_store.precheck_release(new, thresholds), repeat)

        def persist() -> None:
            fresh = RecordSet.of("bench", f"p{rng.integers(1 << 62)}", mask_positions)
            with worst_store._transaction() as db:
                worst_store.guard.remember(db, fresh)

        remember = timed(persist, max(5, repeat // 3))
        worst_store.close()
    guard = DifferencingGuard.__name__
    print(f"{guard}: {rows:,} rows, {earlier:,} earlier releases of 10%-90% of the rows")
    print(f"  set-up (not per release): {setup:.1f} s, site.db {size_mb:.0f} MiB")
    print(f"  one release's set: {len(new.rows):,} rows, {blob_kb:.0f} KiB serialised")
    print("  per release, median / p95 ms:")
    for label, (median, p95) in (
        ("mask -> positions (numpy)", mask_to_positions),
        ("positions -> bitmap", build),
        ("check, typical sizes", typical),
        ("check, worst case (all compared)", worst),
        ("remember (serialise + insert)", remember),
        (f"p% rule on one sum of {rows:,} values", dominance),
    ):
        print(f"    {label:<34} {median:8.2f} / {p95:8.2f}")
    print(f"  first check after a restart (loads {earlier:,} sets): {first_load:.0f} ms")


if __name__ == "__main__":
    main()

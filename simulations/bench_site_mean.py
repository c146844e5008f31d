"""Benchmark: a site's `mean` over 1M and 10M rows against plain numpy on the same column.

    python -m simulations.bench_site_mean [--rows 1000000 10000000] [--repeat 7]

"site local" is the analysis's site half (count, clamped shifted sum and sum of squares);
"site + dp" adds the privacy engine (three OpenDP Laplace releases). The baselines are plain
numpy on the same column: `mean` alone, and the same outputs (count, mean, variance of the
non-missing values). Medians of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from analyses import AnalysisContext, get_analysis
from protocol.config import SDCThresholds
from simulations.synthetic import synthetic_dictionary
from site_node.privacy import privatize


def median_seconds(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    dictionary = synthetic_dictionary()
    mean = get_analysis("mean")
    params = mean.parse_params({"variable": "sbp"}, dictionary)
    ctx = AnalysisContext(dictionary, "dp", SDCThresholds())
    spec = mean.declare(params, ctx)
    rng = np.random.default_rng(7)
    print(
        f"{'rows':>11} {'np.mean':>9} {'numpy n/mean/var':>17} {'site local':>11} "
        f"{'site + dp':>10} {'local/numpy':>12} {'local/np.mean':>14}"
    )
    for rows in args.rows:
        column = rng.normal(130, 20, rows)
        column[rng.random(rows) < 0.05] = np.nan  # 5% missing, as in real extracts
        frame = pd.DataFrame({"sbp": column})
        col = frame["sbp"].to_numpy()

        def numpy_same_outputs(col: np.ndarray = col) -> object:
            v = col[~np.isnan(col)]
            return v.size, v.mean(), v.var(ddof=1)

        def numpy_mean(col: np.ndarray = col) -> object:
            return np.nanmean(col)

        def site_local(frame: pd.DataFrame = frame) -> object:
            return mean.local(frame, params, ctx)

        def site_dp(frame: pd.DataFrame = frame) -> object:
            return privatize(spec, mean.local(frame, params, ctx), "dp", 1.0, SDCThresholds())

        t_mean = median_seconds(numpy_mean, args.repeat)
        t_numpy = median_seconds(numpy_same_outputs, args.repeat)
        t_local = median_seconds(site_local, args.repeat)
        t_dp = median_seconds(site_dp, args.repeat)
        print(
            f"{rows:>11,} {t_mean * 1e3:>7.1f}ms {t_numpy * 1e3:>15.1f}ms "
            f"{t_local * 1e3:>9.1f}ms {t_dp * 1e3:>8.1f}ms {t_local / t_numpy:>11.2f}x "
            f"{t_local / t_mean:>13.2f}x"
        )


if __name__ == "__main__":
    main()

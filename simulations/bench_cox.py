"""Benchmark: federated Cox (exact, Efron ties) against lifelines' CoxPHFitter on pooled rows.

Synthetic cohort (numpy, seeded): per site, age ~ U(30, 85) years shifted by up to +-3 years by
site, sex ~ Bernoulli(0.5), biomarker ~ N(0, 1) clipped to [-5, 5], stage in {1, 2, 3} with
probabilities 0.5, 0.3, 0.2. Event times follow a proportional hazards model with a Weibull
baseline (shape 1.2, median about 3 years for the reference profile, times a site frailty of
0.8 to 1.25) and log hazard ratios age 0.03 per year, sex[T.1] -0.3, biomarker 0.4, stage[T.2]
0.5, stage[T.3] 1.0. Follow-up ends at a uniform administrative censoring time of 1 to 5 years.
Times are whole days (rounded up), so they are heavily TIED (at most 1,826 distinct times), which
lifelines handles in its batch Efron code and the federation on a 1-day grid exactly.

The federation runs in one process, site after site, timing every ``local`` call: the table
reports the sequential sum of site times (one machine doing every site's work) and the sum over
rounds of the slowest site per round (sites working in parallel, as in a real federation), plus
the coordinator's ``combine`` time. Run::

    python -m simulations.bench_cox                 # 10 sites x 100,000 rows
    python -m simulations.bench_cox --sites 4 --rows 20000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd

from analyses.testing import federate
from protocol.config import DataDictionary

TRUE_LOG_HR = {
    "age": 0.03,
    "sex[T.1]": -0.3,
    "biomarker": 0.4,
    "stage[T.2]": 0.5,
    "stage[T.3]": 1.0,
}
COVARIATES = ["age", "sex", "biomarker", "stage"]
FOLLOW_UP_DAYS = 1826


def synthetic_dictionary() -> DataDictionary:
    """The synthetic cohort's dictionary (public bounds)."""
    return DataDictionary.model_validate(
        {
            "variables": {
                "time": {"type": "numeric", "min": 0, "max": FOLLOW_UP_DAYS, "unit": "days"},
                "event": {"type": "binary"},
                "age": {"type": "numeric", "min": 18, "max": 100, "unit": "years"},
                "sex": {"type": "categorical", "levels": [0, 1], "labels": ["female", "male"]},
                "biomarker": {"type": "numeric", "min": -5, "max": 5},
                "stage": {"type": "categorical", "levels": [1, 2, 3]},
            }
        }
    )


def synthetic_site(rows: int, rng: np.random.Generator, site_index: int = 0) -> pd.DataFrame:
    """One site's cohort under the proportional hazards model in the module docstring."""
    shift = 3.0 * np.sin(site_index)  # sites differ a little in age and baseline hazard
    frailty = 1.25 ** np.cos(1.7 * site_index)
    age = np.clip(rng.uniform(30, 85, rows) + shift, 18, 100)
    sex = rng.integers(0, 2, rows).astype(np.float64)
    biomarker = np.clip(rng.normal(0.0, 1.0, rows), -5, 5)
    stage = rng.choice([1.0, 2.0, 3.0], size=rows, p=[0.5, 0.3, 0.2])
    eta = (
        TRUE_LOG_HR["age"] * (age - 60)
        + TRUE_LOG_HR["sex[T.1]"] * sex
        + TRUE_LOG_HR["biomarker"] * biomarker
        + TRUE_LOG_HR["stage[T.2]"] * (stage == 2)
        + TRUE_LOG_HR["stage[T.3]"] * (stage == 3)
    )
    shape, median_days = 1.2, 3 * 365.25
    scale = median_days / np.log(2) ** (1 / shape)
    latent = scale * (-np.log(rng.uniform(size=rows)) / (frailty * np.exp(eta))) ** (1 / shape)
    censor = rng.uniform(365.25, FOLLOW_UP_DAYS, rows)
    time_days = np.ceil(np.minimum(latent, censor))
    return pd.DataFrame(
        {
            "time": np.clip(time_days, 1, FOLLOW_UP_DAYS),
            "event": (latent <= censor).astype(np.float64),
            "age": age,
            "sex": sex,
            "biomarker": biomarker,
            "stage": stage,
        }
    )


def synthetic_sites(sites: int, rows: int, seed: int = 2026) -> dict[str, pd.DataFrame]:
    """``sites`` cohorts of ``rows`` records each."""
    rng = np.random.default_rng(seed)
    return {f"site{i:02d}": synthetic_site(rows, rng, i) for i in range(sites)}


def run_timed(
    name: str,
    frames: dict[str, pd.DataFrame],
    params: dict[str, Any],
    dictionary: DataDictionary,
) -> tuple[Any, list[list[float]], float]:
    """The in-process federation (the real round driver), timing each site's ``local`` per
    round and ``combine``."""
    profile: list[dict[str, Any]] = []
    result = federate(name, frames, params, dictionary, "off", profile=profile)
    site_times = [list(entry["sites"].values()) for entry in profile]
    return result, site_times, sum(entry["combine"] for entry in profile)


def pooled_design(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The pooled rows with treatment dummies named like the federation's terms."""
    pooled = pd.concat(frames.values(), ignore_index=True)
    return pd.DataFrame(
        {
            "time": pooled["time"],
            "event": pooled["event"],
            "age": pooled["age"],
            "sex[T.1]": (pooled["sex"] == 1).astype(np.float64),
            "biomarker": pooled["biomarker"],
            "stage[T.2]": (pooled["stage"] == 2).astype(np.float64),
            "stage[T.3]": (pooled["stage"] == 3).astype(np.float64),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rows", type=int, default=100_000, help="rows per site")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)

    from lifelines import CoxPHFitter

    dictionary = synthetic_dictionary()
    frames = synthetic_sites(args.sites, args.rows, args.seed)
    params = {"time": "time", "event": "event", "covariates": COVARIATES, "ties": "efron"}

    start = time.perf_counter()
    result, site_times, combine_time = run_timed("cox", frames, params, dictionary)
    federated_wall = time.perf_counter() - start
    sequential = sum(sum(r) for r in site_times)
    parallel = sum(max(r) for r in site_times)

    design = pooled_design(frames)
    start = time.perf_counter()
    # lifelines 0.30: CoxPHFitter().fit(pooled, "time", "event") (Efron ties)
    reference = CoxPHFitter().fit(design, "time", "event")
    lifelines_time = time.perf_counter() - start

    terms = list(TRUE_LOG_HR)
    diff = max(abs(result.coef(t) - float(reference.params_[t])) for t in terms)
    n_rows = args.sites * args.rows
    events = int(design["event"].sum())
    print(
        f"Cox, Efron ties: {args.sites} sites x {args.rows:,} rows = {n_rows:,} rows, "
        f"{events:,} events, {design['time'].nunique():,} distinct times, {len(terms)} terms"
    )
    print(f"rounds: {len(site_times)} (1 count round + {result.iterations} Newton rounds)")
    rows = [
        ("federated, sequential sum of site times", sequential),
        ("federated, slowest site per round, summed", parallel),
        ("federated, coordinator combine", combine_time),
        ("federated, whole in-process loop", federated_wall),
        ("lifelines CoxPHFitter on pooled rows", lifelines_time),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  seconds  x lifelines")
    for label, seconds in rows:
        print(f"{label:{width}}  {seconds:7.2f}  {seconds / lifelines_time:10.2f}")
    print(f"max |coefficient difference| vs lifelines: {diff:.2e}")
    print("term        true     federated  lifelines")
    for term in terms:
        print(
            f"{term:10}  {TRUE_LOG_HR[term]:6.3f}  {result.coef(term):9.5f}  "
            f"{float(reference.params_[term]):9.5f}"
        )


if __name__ == "__main__":
    main()

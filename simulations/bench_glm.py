"""Benchmark: federated logistic ``glm`` over synthetic sites against statsmodels on the pool.

Each site draws ``--rows`` records from a known logistic model with 10 covariates (8 numeric,
a binary ``sex`` and a 3-level ``grp``: 12 parameters). The federation runs in-process (the
loop of ``analyses.testing.federate``, mode ``off``), timing every site's ``local`` (plus its
record) per round and the coordinator's ``combine``. Two federated figures are reported: the
sequential sum of all local times (one process doing every site's work) and the sum over
rounds of the slowest site (what sites running in parallel would take); both add the combine
time. statsmodels fits the pooled rows in one process, from the formula (patsy builds the
design) and from a prebuilt design matrix.

Run: ``python -m simulations.bench_glm`` (10 sites x 1,000,000 rows; about 5 GB of memory) or
``python -m simulations.bench_glm --sites 3 --rows 100000`` for a quick run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd

import analyses  # noqa: F401  (registers every analysis)
from analyses.testing import federate
from protocol.config import DataDictionary

NUMERIC = [f"x{i}" for i in range(1, 9)]
FORMULA = "y ~ " + " + ".join([*NUMERIC, "sex", "grp"])
#: True coefficients: intercept, x1..x8 (per unit, x in [0, 10]), sex[T.1], grp[T.2], grp[T.3].
TRUTH = np.array([-1.0, 0.10, -0.08, 0.05, 0.0, 0.12, -0.03, 0.07, -0.10, 0.4, -0.3, 0.25])


def dictionary() -> DataDictionary:
    """The benchmark's public dictionary."""
    variables: dict[str, Any] = {"y": {"type": "binary"}}
    variables.update({name: {"type": "numeric", "min": 0, "max": 10} for name in NUMERIC})
    variables["sex"] = {"type": "categorical", "levels": [0, 1]}
    variables["grp"] = {"type": "categorical", "levels": [1, 2, 3]}
    return DataDictionary.model_validate({"variables": variables})


def make_site(rows: int, rng: np.random.Generator) -> pd.DataFrame:
    """One site's records from the known logistic model (float64 columns, as sites hold them)."""
    x = rng.uniform(0, 10, (rows, len(NUMERIC)))
    sex = rng.integers(0, 2, rows).astype(np.float64)
    grp = rng.integers(1, 4, rows).astype(np.float64)
    eta = TRUTH[0] + x @ TRUTH[1:9] + TRUTH[9] * sex + TRUTH[10] * (grp == 2)
    eta += TRUTH[11] * (grp == 3)
    y = (rng.random(rows) < 1 / (1 + np.exp(-eta))).astype(np.float64)
    frame = pd.DataFrame(x, columns=NUMERIC)
    frame.insert(0, "y", y)
    frame["sex"] = sex
    frame["grp"] = grp
    return frame


def run_federated(frames: dict[str, pd.DataFrame], params: dict[str, Any]) -> dict[str, Any]:
    """The in-process federation (the real round driver) with per-round, per-site timings."""
    profile: list[dict[str, Any]] = []
    result = federate("glm", frames, params, dictionary(), "off", profile=profile)
    per_round = [list(entry["sites"].values()) for entry in profile]
    combine_time = sum(entry["combine"] for entry in profile)
    return {
        "result": result,
        "rounds": len(profile),
        "sequential": sum(sum(t) for t in per_round) + combine_time,
        "parallel": sum(max(t) for t in per_round) + combine_time,
        "combine": combine_time,
        "first_round": max(per_round[0]),
    }


def make_sites(sites: int, rows: int, seed: int) -> dict[str, pd.DataFrame]:
    """Every site's records; the same seed gives the same data in every process."""
    rng = np.random.default_rng(seed)
    return {f"site{i:02d}": make_site(rows, rng) for i in range(sites)}


def fit_statsmodels(
    kind: str, sites: int, rows: int, seed: int
) -> tuple[float, list[float], float]:
    """Fit the pooled rows with statsmodels; run in a fresh process so memory is its own.

    Returns the fit's seconds (the formula path includes patsy building the design), the
    coefficients in the federated term order, and the process's peak memory in GB.
    """
    import resource

    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    pooled = pd.concat(list(make_sites(sites, rows, seed).values()), ignore_index=True)
    if kind == "formula":
        pooled["sex"] = pd.Categorical(pooled["sex"].astype(np.int64), categories=[0, 1])
        pooled["grp"] = pd.Categorical(pooled["grp"].astype(np.int64), categories=[1, 2, 3])
        start = time.perf_counter()
        fit = smf.glm(FORMULA, pooled, family=sm.families.Binomial()).fit()
        seconds = time.perf_counter() - start
        names = [*NUMERIC, "sex[T.1]", "grp[T.2]", "grp[T.3]"]
        params = [float(fit.params["Intercept"])] + [float(fit.params[t]) for t in names]
    else:
        grp = pooled["grp"].to_numpy()
        design = np.column_stack(
            [np.ones(len(pooled)), pooled[NUMERIC].to_numpy(), pooled["sex"].to_numpy()]
            + [(grp == level).astype(np.float64) for level in (2, 3)]
        )
        start = time.perf_counter()
        fit = sm.GLM(pooled["y"].to_numpy(), design, family=sm.families.Binomial()).fit()
        seconds = time.perf_counter() - start
        params = [float(v) for v in fit.params]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return seconds, params, peak


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its table."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1_000_000, help="records per site")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--skip-formula", action="store_true", help="skip smf.glm (patsy)")
    args = parser.parse_args(argv)

    frames = make_sites(args.sites, args.rows, args.seed)
    fed = run_federated(frames, {"formula": FORMULA, "family": "binomial"})
    result = fed["result"]
    estimate = np.array([result.coef(t) for t in result.terms])
    del frames  # the run's work cache went with federate: nothing is kept for statsmodels

    references: list[tuple[str, float, list[float], float]] = []
    kinds = [("arrays", "statsmodels sm.GLM (prebuilt design)")]
    if not args.skip_formula:
        kinds.insert(0, ("formula", "statsmodels smf.glm (formula + fit)"))
    spawn = multiprocessing.get_context("spawn")
    for kind, label in kinds:  # one at a time: the machine has 2 cores and finite memory
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            seconds, params, peak = pool.submit(
                fit_statsmodels, kind, args.sites, args.rows, args.seed
            ).result()
        references.append((label, seconds, params, peak))

    total = args.sites * args.rows
    print(
        f"logistic glm, {len(TRUTH)} parameters, {args.sites} sites x {args.rows:,} rows = "
        f"{total:,} rows; {fed['rounds']} rounds, {result.iterations} IRLS iterations"
    )
    heads = "".join(f" {'/ ' + label.split()[1]:>10s}" for label, *_ in references)
    print(f"{'':38s} {'seconds':>8s}{heads}")
    rows = [(label, seconds, f"peak {peak:.1f} GB") for label, seconds, _, peak in references]
    rows += [
        ("federated, sequential sum of sites", fed["sequential"], ""),
        ("federated, slowest site per round", fed["parallel"], "parallel sites"),
        ("  of which combine (coordinator)", fed["combine"], ""),
        ("  of which round 0, slowest site", fed["first_round"], "design build"),
    ]
    for label, seconds, note in rows:
        ratios = "".join(f" {seconds / base:9.2f}x" for _, base, _, _ in references)
        print(f"{label:38s} {seconds:8.2f}{ratios}  {note}")
    for label, _, params, _ in references:
        worst = float(np.max(np.abs(estimate / np.asarray(params) - 1)))
        print(f"max relative difference of coefficients vs {label.split()[1]}: {worst:.1e}")


if __name__ == "__main__":
    main()

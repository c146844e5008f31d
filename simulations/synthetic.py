"""Synthetic hospital cohorts with a known truth, for tests, benchmarks and ``alliance simulate``.

Each of N sites draws its own case mix: covariate means and spreads, the share of men and of
smokers, the stage distribution and the site's size all vary from site to site (scaled by
``heterogeneity``). The outcome models are the SAME at every site, so a pooled fit (and a
correct federated one) recovers the truth:

* ``outcome`` (binary): ``logit P(outcome = 1) = x'TRUE_COEFS`` with the terms of
  ``LOGIT_FORMULA`` (``sex`` and ``stage`` treatment-coded against level 0 and 1).
* ``time`` / ``event``: proportional hazards ``h(t | x) = h0(t) exp(x'TRUE_LOG_HR)`` (the
  covariates centred at ``COX_REFERENCE``, which only rescales h0) with a Weibull baseline of
  shape ``WEIBULL_SHAPE`` and scale ``WEIBULL_SCALE_DAYS``; administrative censoring from
  staggered entry, uniform over ``FOLLOW_UP_DAYS``; times are whole days >= 1.

Covariates are drawn, rounded as a hospital records them and clipped inside the dictionary's
public bounds *before* the outcomes are drawn, so the models hold exactly for the columns as
released. Missing values are then set completely at random (MCAR) at per-column rates, so a
complete-case analysis stays unbiased. Every column is float64 with NaN for missing, as a site
node's conformed frame.

Run ``python -m simulations.synthetic OUT --sites 4 --rows 1000000`` to write CSVs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocol.config import DataDictionary, NumericVariable, dump_yaml
from protocol.errors import ValidationError

FloatArray = npt.NDArray[np.float64]

LOGIT_FORMULA = "outcome ~ age + sex + bmi + sbp + smoker + stage"
#: The logistic model's coefficients per unit of each dictionary variable (log odds ratios).
TRUE_COEFS: dict[str, float] = {
    "Intercept": -7.0,
    "age": 0.04,
    "sex[T.1]": 0.4,
    "bmi": 0.05,
    "sbp": 0.012,
    "smoker": 0.6,
    "stage[T.2]": 0.5,
    "stage[T.3]": 1.1,
}
COX_COVARIATES: tuple[str, ...] = ("age", "sex", "bmi", "sbp", "smoker", "stage")
#: The survival model's log hazard ratios per unit (categorical terms named as in formulas).
TRUE_LOG_HR: dict[str, float] = {
    "age": 0.03,
    "sex[T.1]": 0.3,
    "bmi": 0.02,
    "sbp": 0.008,
    "smoker": 0.5,
    "stage[T.2]": 0.4,
    "stage[T.3]": 0.9,
}
#: The patient whose hazard is the Weibull baseline (centring keeps event rates sensible).
COX_REFERENCE: dict[str, float] = {"age": 60.0, "bmi": 27.0, "sbp": 130.0}
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_DAYS = 3000.0
#: Administrative censoring: each patient's follow-up ends uniformly within this window (days).
FOLLOW_UP_DAYS = (365, 1825)
#: Default MCAR rates; other columns are complete unless ``missing`` names them.
DEFAULT_MISSING: dict[str, float] = {"bmi": 0.08, "sbp": 0.05, "smoker": 0.03}

_DICTIONARY = {
    "variables": {
        "age": {"type": "numeric", "min": 18, "max": 100, "unit": "years"},
        "sex": {"type": "categorical", "levels": [0, 1], "labels": ["female", "male"]},
        "bmi": {"type": "numeric", "min": 12, "max": 70, "unit": "kg/m2"},
        "sbp": {
            "type": "numeric",
            "min": 70,
            "max": 250,
            "unit": "mm Hg",
            "description": "systolic blood pressure",
        },
        "smoker": {"type": "binary", "description": "current smoker"},
        "stage": {
            "type": "categorical",
            "levels": [1, 2, 3],
            "labels": ["early", "intermediate", "advanced"],
        },
        "outcome": {"type": "binary", "description": "binary outcome of the known logistic model"},
        "time": {
            "type": "numeric",
            "min": 0,
            "max": 3650,
            "unit": "days",
            "description": "days from entry to event or censoring",
        },
        "event": {"type": "binary", "description": "1 = event, 0 = censored"},
    }
}


def synthetic_dictionary() -> DataDictionary:
    """The data dictionary of the synthetic cohorts (public bounds fixed before any data)."""
    return DataDictionary.model_validate(_DICTIONARY)


@dataclass(frozen=True)
class SiteProfile:
    """One site's case mix (drawn from the seed; shown for documentation and debugging)."""

    rows: int
    age_mean: float
    age_sd: float
    p_male: float
    bmi_mean: float
    bmi_sd: float
    sbp_shift: float
    sbp_sd: float
    p_smoker: float
    stage_probs: tuple[float, float, float]


def _expit(x: FloatArray | float) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64))))


def _profile(rng: np.random.Generator, rows: int, spread: float, h: float) -> SiteProfile:
    """Draw a site's case mix; ``h`` scales how far sites stray from the alliance average."""
    z = rng.standard_normal(10)
    size = max(1, round(rows * (1.0 + spread * (2.0 * rng.random() - 1.0))))
    stage_logits = np.log([0.5, 0.3, 0.2]) + 0.6 * h * z[7:10]
    stage = np.exp(stage_logits) / np.exp(stage_logits).sum()
    return SiteProfile(
        rows=size,
        age_mean=62.0 + 6.0 * h * z[0],
        age_sd=12.0 * math.exp(0.15 * h * z[1]),
        p_male=float(_expit(0.4 * h * z[2])),
        bmi_mean=27.0 + 2.0 * h * z[3],
        bmi_sd=5.0 * math.exp(0.15 * h * z[4]),
        sbp_shift=6.0 * h * z[5],
        sbp_sd=15.0,
        p_smoker=float(_expit(math.log(0.2 / 0.8) + 0.5 * h * z[6])),
        stage_probs=(float(stage[0]), float(stage[1]), float(stage[2])),
    )


def _linear_predictor(
    cols: Mapping[str, FloatArray], terms: Mapping[str, float], centre: Mapping[str, float]
) -> FloatArray:
    """sum(term value x coefficient) over formula-style term names (``stage[T.2]``...)."""
    eta = np.zeros(len(cols["age"]))
    for term, coef in terms.items():
        if term == "Intercept":
            eta += coef
        elif "[T." in term:
            name, level = term[:-1].split("[T.")
            eta += coef * (cols[name] == float(level))
        else:
            eta += coef * (cols[term] - centre.get(term, 0.0))
    return eta


def _site_frame(
    rng: np.random.Generator, profile: SiteProfile, missing: Mapping[str, float]
) -> pd.DataFrame:
    n = profile.rows
    bounds = synthetic_dictionary()
    cols: dict[str, FloatArray] = {}

    def clip(name: str, values: FloatArray) -> FloatArray:
        low, high = bounds.bounds(name)
        return np.clip(values, low, high)

    cols["age"] = clip("age", np.round(rng.normal(profile.age_mean, profile.age_sd, n)))
    cols["sex"] = (rng.random(n) < profile.p_male).astype(np.float64)
    cols["bmi"] = clip("bmi", np.round(rng.normal(profile.bmi_mean, profile.bmi_sd, n), 1))
    # Blood pressure rises with age, as in every cohort; the site shifts its level.
    sbp_mean = 125.0 + 0.4 * (cols["age"] - 60.0) + profile.sbp_shift
    cols["sbp"] = clip("sbp", np.round(sbp_mean + profile.sbp_sd * rng.standard_normal(n)))
    cols["smoker"] = (rng.random(n) < profile.p_smoker).astype(np.float64)
    cols["stage"] = (rng.choice(3, size=n, p=profile.stage_probs) + 1).astype(np.float64)

    cols["outcome"] = (rng.random(n) < _expit(_linear_predictor(cols, TRUE_COEFS, {}))).astype(
        np.float64
    )

    # Inverse-CDF draw: S(t | x) = exp(-(t / scale)^shape * exp(eta)).
    eta = _linear_predictor(cols, TRUE_LOG_HR, COX_REFERENCE)
    latent = WEIBULL_SCALE_DAYS * (rng.standard_exponential(n) * np.exp(-eta)) ** (
        1.0 / WEIBULL_SHAPE
    )
    event_day = np.maximum(1.0, np.ceil(latent))
    censor_day = rng.integers(FOLLOW_UP_DAYS[0], FOLLOW_UP_DAYS[1] + 1, n).astype(np.float64)
    cols["event"] = (event_day <= censor_day).astype(np.float64)
    cols["time"] = clip("time", np.minimum(event_day, censor_day))

    for name in bounds.variables:  # fixed order: the same seed gives the same holes
        rate = missing.get(name, 0.0)
        if rate > 0:
            cols[name][rng.random(n) < rate] = np.nan
    return pd.DataFrame({name: cols[name] for name in bounds.variables})


@dataclass(frozen=True)
class SiteDraw:
    """Which sites to draw: how many, how large, from which seed, and how much they differ
    (each as ``generate_sites`` takes it)."""

    n_sites: int
    rows_per_site: int | Sequence[int]
    seed: int
    size_spread: float = 0.5
    heterogeneity: float = 1.0


def _check_args(draw: SiteDraw, missing: Mapping[str, float]) -> tuple[list[int], float]:
    """Validate; return the size each site's draw starts from and the spread applied to it."""
    n_sites, rows_per_site = draw.n_sites, draw.rows_per_site
    size_spread, heterogeneity = draw.size_spread, draw.heterogeneity
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or not 1 <= n_sites <= 9999:
        raise ValidationError(f"n_sites must be a whole number from 1 to 9999, got {n_sites!r}")
    if isinstance(rows_per_site, Sequence):
        sizes = list(rows_per_site)
        if len(sizes) != n_sites:
            raise ValidationError(
                f"rows_per_site lists {len(sizes)} sizes for {n_sites} sites; give one per site"
            )
        spread = 0.0  # exact sizes asked for
    else:
        sizes, spread = [rows_per_site] * n_sites, size_spread
    for rows in sizes:
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValidationError(f"rows per site must be whole numbers >= 1, got {rows!r}")
    if not 0.0 <= size_spread < 1.0:
        raise ValidationError(f"size_spread must be in [0, 1), got {size_spread!r}")
    if not (math.isfinite(heterogeneity) and heterogeneity >= 0):
        raise ValidationError(f"heterogeneity must be a finite number >= 0, got {heterogeneity!r}")
    known = _DICTIONARY["variables"]
    for name, rate in missing.items():
        if name not in known:
            raise ValidationError(
                f"missing names {name!r}, not a synthetic column; known: {', '.join(known)}"
            )
        if not 0.0 <= rate < 1.0:
            raise ValidationError(f"missing rate for {name!r} must be in [0, 1), got {rate!r}")
    return [int(rows) for rows in sizes], spread


def site_names(n_sites: int) -> list[str]:
    """``site01``, ``site02``, ... (valid site and certificate names)."""
    width = max(2, len(str(n_sites)))
    return [f"site{i + 1:0{width}d}" for i in range(n_sites)]


def _site_streams(draw: SiteDraw) -> list[tuple[str, SiteProfile, np.random.Generator]]:
    """Per site: name, case mix and the random stream positioned after the case-mix draws."""
    sizes, spread = _check_args(draw, {})
    out = []
    children = np.random.SeedSequence(draw.seed).spawn(draw.n_sites)
    for name, child, rows in zip(site_names(draw.n_sites), children, sizes, strict=True):
        rng = np.random.default_rng(child)
        out.append((name, _profile(rng, rows, spread, draw.heterogeneity), rng))
    return out


def site_profiles(draw: SiteDraw) -> dict[str, SiteProfile]:
    """Each site's case mix, exactly as ``generate_sites`` draws it for the same arguments."""
    return {name: profile for name, profile, _ in _site_streams(draw)}


def generate_sites(
    n_sites: int,
    rows_per_site: int | Sequence[int],
    seed: int,
    *,
    size_spread: float = 0.5,
    heterogeneity: float = 1.0,
    missing: Mapping[str, float] | None = None,
) -> dict[str, pd.DataFrame]:
    """Draw ``n_sites`` hospitals' records.

    Args:
        n_sites: number of hospitals.
        rows_per_site: the average site size (each site's size is drawn uniformly within
            +- ``size_spread`` of it), or one exact size per site.
        seed: the whole draw is a function of the seed; site i is the same whatever
            ``n_sites`` is (each site has its own spawned random stream).
        size_spread: relative spread of site sizes around ``rows_per_site``.
        heterogeneity: 0 makes every site draw from the same population; 1 is the default
            spread of case mix between sites; larger is more.
        missing: MCAR rate per column (default ``DEFAULT_MISSING``; ``{}`` for none).

    Returns:
        site name -> DataFrame with the dictionary's columns, float64, NaN for missing.

    Raises:
        ValidationError: for a bad count, size, rate or column name.
    """
    draw = SiteDraw(n_sites, rows_per_site, seed, size_spread, heterogeneity)
    rates = dict(DEFAULT_MISSING if missing is None else missing)
    _check_args(draw, rates)
    return {name: _site_frame(rng, profile, rates) for name, profile, rng in _site_streams(draw)}


@dataclass(frozen=True)
class SyntheticFiles:
    """What ``write_sites`` wrote."""

    dictionary: Path
    sites: dict[str, Path]


def write_sites(folder: str | Path, frames: Mapping[str, pd.DataFrame]) -> SyntheticFiles:
    """Write ``<folder>/<site>.csv`` per site of ``generate_sites``'s frames (empty cell =
    missing) and ``dictionary.yaml``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dictionary = folder / "dictionary.yaml"
    header = (
        "# Synthetic alliance dictionary (simulations/synthetic.py). Bounds are public and fixed\n"
        "# before any data; the generator clips every value inside them.\n"
    )
    dictionary.write_text(header + dump_yaml(synthetic_dictionary()), encoding="utf-8")
    sites = {}
    for name, frame in frames.items():
        path = folder / f"{name}.csv"
        _to_csv(frame, path)
        sites[name] = path
    return SyntheticFiles(dictionary, sites)


def _to_csv(frame: pd.DataFrame, path: Path) -> None:
    """CSV with whole-number columns as integers (3x faster to write than floats, shorter)."""
    out = frame.copy()
    for name in out.columns:
        values = out[name].to_numpy()
        present = values[~np.isnan(values)]
        if np.array_equal(present, np.round(present)):
            out[name] = out[name].astype("Int64")
    # The remaining columns hold one decimal at most, so %.10g is exact.
    out.to_csv(path, index=False, float_format="%.10g")


def _numeric_bounds_hold(frame: pd.DataFrame, dictionary: DataDictionary) -> bool:
    for name, var in dictionary.variables.items():
        values = frame[name].to_numpy()
        values = values[~np.isnan(values)]
        if isinstance(var, NumericVariable):
            if values.size and (values.min() < var.min or values.max() > var.max):
                return False
        elif not np.isin(values, var.levels).all():
            return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """Write synthetic sites and print a small table of what was generated and how fast."""
    parser = argparse.ArgumentParser(prog="python -m simulations.synthetic", description=__doc__)
    parser.add_argument("folder", type=Path, nargs="?", help="write CSVs here (omit: no files)")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1_000_000, help="average rows per site")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    dictionary = synthetic_dictionary()
    start = time.perf_counter()
    frames = generate_sites(args.sites, args.rows, args.seed)
    generated = time.perf_counter() - start
    print(f"{'site':<8} {'rows':>10} {'age':>6} {'male':>6} {'stage3':>7} {'outcome':>8} "
          f"{'events':>7} {'bounds':>7}")  # fmt: skip
    for name, frame in frames.items():
        inside = "ok" if _numeric_bounds_hold(frame, dictionary) else "BAD"
        print(
            f"{name:<8} {len(frame):>10} {frame['age'].mean():>6.1f} {frame['sex'].mean():>6.2f} "
            f"{(frame['stage'] == 3).mean():>7.2f} {frame['outcome'].mean():>8.3f} "
            f"{frame['event'].mean():>7.3f} {inside:>7}"
        )
    total = sum(len(f) for f in frames.values())
    print(f"generated {total} rows in {generated:.2f} s ({total / generated / 1e6:.1f} M rows/s)")
    if args.folder is not None:
        start = time.perf_counter()
        write_sites(args.folder, frames)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

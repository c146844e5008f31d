"""Survival analyses: ``kaplan_meier``, ``logrank`` and an exact federated ``cox``.

Time grid. Sites never release an event time. Every time is placed on a public grid
``start + k * width`` (``start`` is the dictionary's minimum of the time variable, ``width`` the
``time_resolution`` parameter, 1 unit by default) by rounding it *up* to the next grid point, and
sites release aggregates indexed by grid point. Where every observed time lies on the grid
(whole days or weeks at the default width; ``time_resolution: 0.001`` for times given to three
decimals) the results are exactly those of the pooled data; otherwise they are those of the
pooled data with times rounded up to the grid. A note in every result names the grid. Times are
clamped to the dictionary's bounds; ``horizon`` censors every later time at the horizon.

Rounds.

* ``kaplan_meier`` and ``logrank``: one round. Each site releases its event and censoring counts
  per grid point and per level of ``group`` (levels from the dictionary): one array of shape
  (levels, 2, grid points). The coordinator forms the pooled at-risk counts by reverse cumulative
  sums, then lifelines' product-limit estimate, Greenwood variance and log(-log) bands, or the
  (multivariate) log-rank statistic with its hypergeometric variance.
* ``cox``: round 0 releases the event and censoring counts per grid point; the coordinator keeps
  the m grid points where any pooled event occurred (its state, never a site's data). Each later
  round is one Newton-Raphson step at the coordinator's current coefficients b: every site
  releases, per interval between consecutive pooled event times, the sums over its rows there of
  exp(x'b), x exp(x'b) and x x' exp(x'b) (packed upper triangle), its event count at each event
  time, the sum of x over all its events and, for Efron's ties, the same three sums over its
  events at each event time. Reverse cumulative sums over the intervals give the risk-set sums
  S0, S1, S2, so the coordinator forms the exact pooled partial log-likelihood, gradient and
  Hessian; with ``strata_by_site`` each site's sums stay apart and the sites' partial
  likelihoods add. Covariates are centred and scaled by their public bounds (|x_j| <= 1;
  categorical variables become 0/1 treatment dummies against the dictionary's first level,
  ``sex[T.1]``), to which the model is invariant; coefficients are reported on the original
  scale. Step halving guards against a fall of the likelihood; the fit stops when the largest
  Newton step on the scaled covariates is below ``tol``. No events, a singular design (named
  terms: the information at b = 0 is singular) or a diverging fit (monotone likelihood) raise
  ``ModelError``. Monotone likelihood is recognised as R's ``coxph`` reports it ("Loglik
  converged before variable ..."): the log-likelihood stops rising while coefficients keep
  moving outward by steps that do not shrink. That is decided while the score and information
  along them are still orders of magnitude above their rounding (measured: about 1e6 times),
  never from whether a nearly singular solve fails, so the outcome does not depend on the
  machine's BLAS. Every declared shape follows from the parameters, the dictionary and the
  coordinator's state (grid size, m, p), and stays under ``protocol.records.MAX_CELLS``
  (checked on the parameters and on m).

Disclosure control (``sdc``). A count per grid point is often 1 or 2 on a fine grid, which the
site engine refuses (``kind="count"``, smallest non-zero cell ``min_cell``). So ``sdc`` runs a
probe round first: each site releases one 0/1 flag per candidate width (``time_resolution``
times 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, ... up to one interval
spanning the range) saying whether all its event and censoring counts (per group) at that width
would be 0 or at least its own ``min_cell``; at-risk counts are sums of those cells, so they
pass too. The coordinator takes the finest width every site accepts, runs the analysis on that
grid and says so in the notes: the result then equals the pooled analysis of times rounded up
to that grid, not of the exact times. In the Cox rounds every interval sum and every sum over
the events at one time then covers 0 or at least ``min_cell`` records for the same reason, and
a site refuses a model with more parameters than ``max_parameter_ratio`` of its records.
Limits: the flags themselves tell a little about a site's data (which widths would give small
cells); one sparse stretch of follow-up at one site coarsens the grid for every site; a site
with 1 or 2 events or censorings in total passes at no width, and the coordinator then stops
with a ``DisclosureError`` naming it. The sparse tail of follow-up is the usual culprit: a
``horizon`` before it (later times censored there, all in one cell) often allows a much finer
grid (synthetic, 3 sites of 300: width 1000 days without, 100 days with a horizon of 1000).

Differential privacy (``dp``). The grid is public and coarse: ``dp_intervals`` equal intervals
over the dictionary's time range (up to ``horizon`` if given), never finer than
``time_resolution``; the estimand is that of the times grouped on it, which a note says.

* ``kaplan_meier`` / ``logrank`` release the count array once; a record lies in one cell, so
  the L1 sensitivity is 1. Noisy counts are clipped at 0. The noise variance (from each
  release's scale) is carried by the delta method into the variance of log S(t), which widens
  the Greenwood bands and is reported as ``noise_sd``; for the log-rank test the noise
  covariance of observed minus expected is added to the hypergeometric variance, which lowers
  chi2. Accuracy, backed by ``tests/unit/test_survival_unit.py``: pooled n = 2,000 over 4
  sites, 20 intervals, epsilon = 1: the noise sd of S(t) stays under 0.01 while 150 or more
  are at risk (about 0.02 with 40 left), S(t) is within 0.02 of the noise-free grouped curve
  over that range in 95% of runs, ``noise_sd`` matches the simulated spread within 25% (up to
  50% conservative at the first points), and the log-rank test keeps its 5% level under the
  null. The error scales as 1 / (epsilon n) and as the square root of the number of sites and
  intervals.
* ``cox`` runs exactly ``dp_iterations`` rounds (default 2) on the public grid, whose every
  point counts as an event time, and ends with one more Newton step from the last round's sums.
  With |x_j| <= 1 and B the largest x'b over the scaled design's box (|b_j| per numeric
  column, the largest of 0 and a categorical variable's dummy coefficients), one record moves
  the interval sums of exp(x'b) by at most e^B, of x exp(x'b) by p e^B and of the packed
  x x' exp(x'b) by p(p+1)/2 e^B (likewise Efron's sums over events), the event counts by 1 and
  the sum of x over events by p. Round 0 (b = 0, so e^B = 1) releases everything; later rounds
  release only the gradient's sums, as the event counts and the sum of x do not depend on b and
  the round-0 Hessian steers every step (measured: several times less noise in the estimate
  than a fresh, noisier Hessian each round). Standard errors therefore use the information at
  b = 0. The coefficients sent to the sites are shrunk to sum |b_j| <= ``dp_coef_bound``
  (default 5) on the scaled covariates, which caps e^B. Noisy counts are rounded and clipped at
  0, and a noisy Hessian's eigenvalues are floored. The noise's effect on each coefficient is
  measured by a parametric bootstrap at the coordinator (re-noising the released sums with
  their known variances and redoing the last step, 200 draws, fixed seed, robust spread: pure
  post-processing), added to the standard errors and reported as ``noise_sd``. Accuracy,
  backed by the unit test: Breslow ties, two covariates, pooled n = 200,000 over 4 sites (about
  half with events), 10 intervals, epsilon = 1: the noise sd is about 0.05 and 0.2 on the
  scale of each covariate's half range (sampling standard errors 0.008 and 0.016), and
  ``noise_sd`` is within a factor of 2 of the simulated spread. At n = 20,000 and epsilon = 1
  the noise swamps the estimate (sd above 1 on that scale; epsilon = 5 brings it to about
  0.1 to 0.3). Efron's ties add two noisy arrays per round: 2 to 3 times the noise of
  Breslow's at these settings, against Breslow's bias toward 0 when grouped times tie heavily.
  The noise grows with e^B, with p and with the number of sites, and falls as 1 / (epsilon n).
"""

from __future__ import annotations

from analyses.survival.cox import Cox, CoxParams, CoxResult, CoxState
from analyses.survival.grid import TimeGrid, sdc_widths
from analyses.survival.kaplan_meier import KaplanMeier, KaplanMeierParams, KaplanMeierResult
from analyses.survival.logrank import Logrank, LogrankParams, LogrankResult

__all__ = [
    "Cox",
    "CoxParams",
    "CoxResult",
    "CoxState",
    "KaplanMeier",
    "KaplanMeierParams",
    "KaplanMeierResult",
    "Logrank",
    "LogrankParams",
    "LogrankResult",
    "TimeGrid",
    "sdc_widths",
]

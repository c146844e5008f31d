"""Logistic regression of heart disease (num > 0) on age, by Newton's method over rounds.

Each round, every record contributes its score and Hessian terms at the public coefficients;
combine takes one Newton step and sends the new coefficients out as the next round's state.
"""

import math

import numpy as np

ROUNDS = 10  # the manifest's rounds: the last round must return the result


def per_record(frame, state):
    intercept, slope = state["beta"]
    x = frame["age"].to_numpy() / 100.0
    y = (frame["num"].to_numpy() > 0).astype(float)
    p = 1.0 / (1.0 + np.exp(-(intercept + slope * x)))
    w = p * (1.0 - p)
    return np.column_stack([y - p, (y - p) * x, w, w * x, w * x * x])


def combine(total, n, state):
    g0, g1, h00, h01, h11 = total
    det = h00 * h11 - h01 * h01
    step = [(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det]
    beta = [state["beta"][0] + step[0], state["beta"][1] + step[1]]
    iteration = state["iteration"] + 1
    if max(abs(s) for s in step) > 1e-10 and iteration < ROUNDS:
        return {"state": {"beta": beta, "iteration": iteration}}
    return {
        "intercept": beta[0],
        "age_per_100_years": beta[1],
        "odds_ratio_per_10_years": math.exp(beta[1] / 10.0),
        "iterations": iteration,
    }

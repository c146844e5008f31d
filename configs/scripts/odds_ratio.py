"""Odds ratio of heart disease (num > 0) for men against women, from a 2x2 table.

Each record counts in one cell: (male, disease), (male, none), (female, disease), (female, none).
"""

import math

import numpy as np


def per_record(frame):
    male = frame["sex"].to_numpy() == 1
    disease = frame["num"].to_numpy() > 0
    return np.column_stack(
        [male & disease, male & ~disease, ~male & disease, ~male & ~disease]
    ).astype(float)


def combine(total, n):
    a, b, c, d = total
    log_or = math.log(a * d / (b * c))
    se = math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    return {
        "odds_ratio": math.exp(log_or),
        "ci_lower": math.exp(log_or - 1.959963984540054 * se),
        "ci_upper": math.exp(log_or + 1.959963984540054 * se),
        "cells": [a, b, c, d],
    }

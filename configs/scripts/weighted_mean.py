"""Weighted mean of serum cholesterol, weighted by age: sum(age * chol) / sum(age).

Each record contributes (age * chol, age); the framework clips, sums and releases the totals.
"""

import numpy as np


def per_record(frame):
    age = frame["age"].to_numpy()
    chol = frame["chol"].to_numpy()
    return np.column_stack([age * chol, age])


def combine(total, n):
    weighted_sum, weight = total
    return {"weighted_mean": weighted_sum / weight, "records": n}

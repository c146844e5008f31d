"""Local data -> the alliance dictionary: rename, derive, and check against public bounds.

The check reports problems with counts, never with values: a value out of range or a level
not in the dictionary is set missing, and the report says how many there were per column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocol.config import DataDictionary, NumericVariable
from protocol.errors import ConfigError
from protocol.filters import parse_filter
from site_node.mapping import closest

#: A value's state at the source, before the dictionary's check set it missing or kept it.
SOURCE_PRESENT, SOURCE_MISSING, SOURCE_NOT_ALLOWED = 0, 1, 2


@dataclass
class DataReport:
    """What a site's data check found, in counts only."""

    rows: int
    unknown_columns: list[str] = field(default_factory=list)
    #: unknown column -> the closest dictionary name (a likely rename)
    suggestions: dict[str, str] = field(default_factory=dict)
    missing_columns: list[str] = field(default_factory=list)
    below_min: dict[str, int] = field(default_factory=dict)
    above_max: dict[str, int] = field(default_factory=dict)
    unknown_levels: dict[str, int] = field(default_factory=dict)
    not_numeric: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    #: per dictionary variable, each loaded row's state at the source (SOURCE_PRESENT,
    #: SOURCE_MISSING, SOURCE_NOT_ALLOWED), for the quality analysis; never printed
    status: dict[str, npt.NDArray[np.int8]] = field(default_factory=dict, repr=False)

    def unknown(self, column: str, known: set[str]) -> None:
        """Note a column the dictionary does not know, with the closest name it does."""
        self.unknown_columns.append(column)
        match = closest(column, known)
        if match is not None:
            self.suggestions[column] = match

    def lines(self) -> list[str]:
        """The report in plain words, one problem per line (counts, never values)."""
        out = [f"{self.rows} records loaded"]
        if self.unknown_columns:
            shown = [
                f"{c} (did you mean {self.suggestions[c]}?)" if c in self.suggestions else c
                for c in self.unknown_columns
            ]
            out.append(f"columns not in the dictionary (ignored): {', '.join(shown)}")
        if self.missing_columns:
            out.append(f"dictionary variables absent here: {', '.join(self.missing_columns)}")
        for label, counts in (
            ("below the dictionary minimum (set missing)", self.below_min),
            ("above the dictionary maximum (set missing)", self.above_max),
            ("levels not in the dictionary (set missing)", self.unknown_levels),
            ("not numbers (set missing)", self.not_numeric),
        ):
            for column, count in counts.items():
                out.append(f"{column}: {count} values {label}")
        return out


def conform(
    raw: pd.DataFrame,
    dictionary: DataDictionary,
    rename: dict[str, str] | None = None,
    derive: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, DataReport]:
    """Map a site's table onto the dictionary's columns (float64, missing as NaN)."""
    # The patient id column is kept apart by patient_ids(): never a column analyses read.
    apart = [dictionary.patient_id] if dictionary.patient_id else []
    frame = raw.rename(columns=rename or {}).drop(columns=apart, errors="ignore")
    report = DataReport(rows=len(frame))
    known = set(dictionary.variables)
    out: dict[str, np.ndarray] = {}
    for name in frame.columns:
        if name not in known:
            report.unknown(str(name), known)
            continue
        values = pd.to_numeric(frame[name], errors="coerce")
        not_numeric = (values.isna() & frame[name].notna()).to_numpy()
        bad = int(not_numeric.sum())
        if bad:
            report.not_numeric[name] = bad
            report.status[name] = np.where(not_numeric, SOURCE_NOT_ALLOWED, 0).astype(np.int8)
        # A private copy: under copy-on-write (pandas 3) to_numpy() may return a read-only
        # view of the caller's data, and out-of-range values are set missing in place below.
        out[name] = values.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    for name, expression in (derive or {}).items():
        dictionary.variable(name)
        rule = parse_filter(expression, set(out))
        derived = rule.mask(out, len(frame)).astype(np.float64)
        inputs_missing = np.zeros(len(frame), dtype=bool)
        for source in rule.variables:
            inputs_missing |= np.isnan(out[source])
        derived[inputs_missing] = np.nan
        out[name] = derived
    for name, var in dictionary.variables.items():
        if name not in out:
            report.missing_columns.append(name)
            out[name] = np.full(len(frame), np.nan)
            report.status[name] = np.full(len(frame), SOURCE_MISSING, dtype=np.int8)
            continue
        values = out[name]
        status = report.status.get(name, np.zeros(len(frame), dtype=np.int8))
        status[np.isnan(values) & (status == SOURCE_PRESENT)] = SOURCE_MISSING
        if isinstance(var, NumericVariable):
            low = values < var.min
            high = values > var.max
            if low.any():
                report.below_min[name] = int(low.sum())
            if high.any():
                report.above_max[name] = int(high.sum())
            outside = low | high
        else:
            outside = ~np.isnan(values) & ~np.isin(values, var.levels)
            if outside.any():
                report.unknown_levels[name] = int(outside.sum())
        values[outside] = np.nan
        status[outside] = SOURCE_NOT_ALLOWED
        report.status[name] = status
        report.missing[name] = int(np.isnan(values).sum())
    columns = list(dictionary.variables)
    return pd.DataFrame({c: out[c] for c in columns}, columns=columns), report


def patient_ids(
    raw: pd.DataFrame, dictionary: DataDictionary, rename: dict[str, str] | None = None
) -> npt.NDArray[np.str_] | None:
    """The records' patient ids (as text), when the dictionary declares the column.

    Raises:
        ConfigError: the data lacks the declared column, or an id is missing.
    """
    name = dictionary.patient_id
    if name is None:
        return None
    frame = raw.rename(columns=rename or {})
    if name not in frame.columns:
        raise ConfigError(
            f"the data has no patient id column {name!r} (the dictionary's patient_id); "
            f"its columns: {', '.join(map(str, frame.columns))}"
        )
    column = frame[name]
    if column.isna().any():
        raise ConfigError(f"patient id column {name!r} has missing ids; every record needs one")
    return np.asarray(column.astype(str).str.strip().to_numpy(), dtype=np.str_)


def usable_share(data: pd.DataFrame, dictionary: DataDictionary, variable: str) -> float:
    """The share of conformed records whose ``variable`` holds an allowed, plausible value
    (what a study's ``min_quality`` compares against); 0 for no records."""
    if len(data) == 0:
        return 0.0
    values = data[variable].to_numpy(dtype=np.float64, na_value=np.nan)
    good = ~np.isnan(values)
    var = dictionary.variable(variable)
    if isinstance(var, NumericVariable) and var.plausible is not None:
        good &= (values >= var.plausible[0]) & (values <= var.plausible[1])
    return float(np.count_nonzero(good)) / len(data)

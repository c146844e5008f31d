"""The shape every analysis has: parameters, a declared record, a site half and a coordinator half.

Both sides call :meth:`Analysis.declare` with the same parameters, dictionary, round state and
privacy mode, so a reply is checked against a declaration the coordinator made itself. The site
half (:meth:`Analysis.local`) returns *exact* aggregates; the site's privacy engine, not the
analysis, decides what noise or disclosure control they get before they leave. An analysis whose
private release is not additive noise on those aggregates (the exponential mechanism for
quantiles, say) overrides :meth:`Analysis.local_private`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import pydantic
from pydantic import BaseModel, ConfigDict

from protocol.config import DataDictionary, SDCThresholds, format_validation_error
from protocol.errors import ValidationError
from protocol.records import AggregateRecord, RecordSpec, Release

P = TypeVar("P", bound=BaseModel)

Arrays = dict[str, npt.NDArray[np.float64]]


class Params(BaseModel):
    """Base of every analysis's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class AnalysisContext:
    """What both halves may know besides the parameters.

    Attributes:
        dictionary: the alliance's data dictionary (public bounds and levels).
        mode: the privacy mode of this release (at a site: the effective, stricter mode).
        sdc: the disclosure-control thresholds in force (the site's own at a site).
        round: iterative analyses: the round number, from 0.
        state: iterative analyses: the coordinator's state for this round (JSON-able).
    """

    dictionary: DataDictionary
    mode: str = "dp"
    sdc: SDCThresholds = field(default_factory=SDCThresholds)
    round: int = 0
    state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NextRound:
    """Returned by ``combine`` of an iterative analysis: run another round with ``state``."""

    state: dict[str, Any]


class Analysis(ABC, Generic[P]):
    """One registered analysis. Subclasses set ``name``, ``params_model`` and the halves."""

    name: ClassVar[str]
    params_model: ClassVar[type[BaseModel]]

    # ----------------------------------------------------------------- both sides
    def parse_params(self, raw: Mapping[str, Any], dictionary: DataDictionary) -> P:
        """Validate parameters (types, then variables against the dictionary)."""
        try:
            params = self.params_model.model_validate(dict(raw))
        except pydantic.ValidationError as exc:
            raise ValidationError(
                format_validation_error(f"analysis {self.name!r}: params", exc)
            ) from None
        for variable in self.variables(params):  # type: ignore[arg-type]
            dictionary.variable(variable)
        self.check_params(params, dictionary)  # type: ignore[arg-type]
        return params  # type: ignore[return-value]

    def check_params(self, params: P, dictionary: DataDictionary) -> None:
        """Cross-field checks against the dictionary (types of variables, say). Optional."""

    @abstractmethod
    def variables(self, params: P) -> set[str]:
        """Every dictionary variable this analysis reads (policy scopes are checked on it)."""

    @abstractmethod
    def declare(self, params: P, ctx: AnalysisContext) -> RecordSpec:
        """The arrays one site will release, with shapes fixed before any data is seen."""

    def dp_rounds(self, params: P, ctx: AnalysisContext) -> int:
        """Rounds a dp-mode run takes at most; the request's epsilon is split evenly over them,
        so the whole cost is known and charged per round before each release."""
        return 1

    def initial_state(self, params: P, ctx: AnalysisContext) -> dict[str, Any]:
        """Iterative analyses: the state of round 0. Single-round analyses need none."""
        return {}

    # ----------------------------------------------------------------- site half
    @abstractmethod
    def local(self, data: pd.DataFrame, params: P, ctx: AnalysisContext) -> Arrays:
        """Exact aggregates over this site's (filtered, consented) rows.

        ``data`` holds dictionary columns only, with missing values as NaN. Raise
        ``DisclosureError`` for analysis-specific disclosure rules (more model parameters than
        the site's records allow, say); generic small-cell rules are the site engine's job.
        """

    def local_private(
        self,
        data: pd.DataFrame,
        params: P,
        ctx: AnalysisContext,
        epsilon: float,
    ) -> tuple[Arrays, dict[str, Release]] | None:
        """Override for a dp release that is not additive noise on ``local``'s arrays.

        Returns the released arrays and their release metadata, or ``None`` to let the site
        engine add calibrated noise to ``local``'s arrays (the default).
        """
        return None

    # ----------------------------------------------------------------- coordinator half
    def site_records(self, record: AggregateRecord) -> float | None:
        """Records one site used, read from its record (noisy in dp mode); default: ``n``."""
        return float(record["n"]) if "n" in record.arrays else None

    @abstractmethod
    def combine(
        self, records: Mapping[str, AggregateRecord], params: P, ctx: AnalysisContext
    ) -> Any:
        """Pool the sites' records into a result, or a :class:`NextRound` to go on."""


def rows_used(data: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The complete cases of ``columns`` (listwise deletion, as statsmodels' default)."""
    return data.loc[data[columns].notna().all(axis=1), columns]

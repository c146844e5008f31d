"""``cox``: exact federated Cox regression (see ``analyses.survival`` for the method).

The analysis is split by concept: ``site`` (parameters, public state, declared record, the
site's half), ``sums`` (the scaled design and risk-set sums both halves rely on), ``newton``
(the coordinator's Newton-Raphson rounds and their checks) and ``result``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from analyses.base import AnalysisContext
from analyses.registry import analysis
from analyses.survival.cox.newton import combine
from analyses.survival.cox.result import CoxResult
from analyses.survival.cox.site import CoxSite, CoxState
from analyses.survival.cox.sums import CoxParams, cox_key
from protocol.records import AggregateRecord


@analysis("cox")
class Cox(CoxSite):
    """Exact federated Cox regression by Newton-Raphson over pooled risk-set sums."""

    result_type = CoxResult

    def model_key(self, params: CoxParams) -> str:
        return cox_key(params.time, params.event, params.covariates)

    def combine(
        self, records: Mapping[str, AggregateRecord], params: CoxParams, ctx: AnalysisContext
    ) -> Any:
        return combine(records, params, ctx)


__all__ = ["Cox", "CoxParams", "CoxResult", "CoxState"]

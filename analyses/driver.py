"""The one round driver: runs an analysis over a set of sites, whatever carries the tasks.

The driver is sans-IO. It says what the next round asks of the sites (:meth:`RoundDriver.
next_round`), takes their answers (:meth:`RoundDriver.receive`) and, after the last round, gives
the result (:meth:`RoundDriver.result`). The coordinator's scheduler carries the rounds over the
network; :func:`analyses.testing.federate`, the tests and the benchmarks carry them in process.
It owns what every carrier must get right the same way:

* round counting, with a hard cap (:data:`MAX_ROUNDS`);
* the public round state: only the analysis's declared, validated state leaves; the memo stays;
* dp round budgets: the request's epsilon split evenly over exactly ``dp_rounds`` rounds
  (rounded down to a ledger unit), and a dp run that asks for more rounds is a bug, caught;
* restarts: when a site leaves an iterative analysis after round 0, the iteration restarts
  without it, so every round pools the same sites (restarted dp rounds are charged again, and
  the result says so);
* the charge accounting: per site, the epsilon its ledger charged, summed over rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from analyses.base import Analysis, AnalysisContext, NextRound
from analyses.results import AnalysisResult, PrivacySummary, SiteContribution
from protocol.budget import ZCDP, PureDP
from protocol.config import DataDictionary, SDCThresholds, stricter_mode
from protocol.errors import AllianceError, InternalError, ValidationError
from protocol.records import AggregateRecord, RecordSpec

#: No analysis takes more rounds than this (exact quantiles take about 14, IRLS under 30).
MAX_ROUNDS = 200


class RequestFailed(AllianceError):
    """No result could be formed; ``sites`` says what each site did."""

    def __init__(self, message: str, sites: list[SiteContribution]) -> None:
        super().__init__(message)
        self.sites = sites


@dataclass(frozen=True)
class RoundTask:
    """What one round asks of every active site (the same for all of them).

    Attributes:
        round: the round number, from 0 (again from 0 after a restart).
        state: the public round state, validated against the analysis's declaration.
        epsilon: what each site may spend on this round in dp mode; None otherwise.
        sites: the sites to ask.
        rho: what each site may spend on this round in zCDP (Gaussian releases); else None.
    """

    round: int
    state: dict[str, Any]
    epsilon: PureDP | None
    sites: tuple[str, ...]
    rho: ZCDP | None = None


@dataclass(frozen=True)
class SiteReply:
    """A site's aggregate record for one round, rebuilt against the coordinator's declaration.

    Attributes:
        record: the released arrays.
        mode: the privacy mode the site applied (never weaker than asked).
        epsilon: what the site's ledger charged for this round.
    """

    record: AggregateRecord
    mode: str
    epsilon: PureDP = field(default_factory=lambda: PureDP(0.0))
    rho: ZCDP = field(default_factory=lambda: ZCDP(0.0))


@dataclass(frozen=True)
class SiteFailure:
    """A site gave no record for a round: ``refused``, ``timeout``, ``disconnected`` or
    ``error``, with the reason in the site's (or the link's) own words."""

    status: str
    reason: str
    code: str | None = None


SiteAnswer = SiteReply | SiteFailure


def guarantee(mode: str, epsilon: float, rho: float = 0.0) -> str:
    """The privacy guarantee of a result, in words."""
    if mode == "dp" and rho > 0:
        pure = (
            f"; with the epsilon {epsilon:.4g} of its Laplace arrays, "
            f"{epsilon * epsilon / 2 + rho:.4g}-zCDP"
            if epsilon > 0
            else ""
        )
        return (
            f"rho-zCDP per patient row at each site, rho <= {rho:.4g} for this result (add/"
            "remove one row; the declared L2 bound, enforced by clipping; OpenDP Gaussian)"
            f"{pure}; for any delta in (0, 1) it implies (rho + 2 sqrt(rho ln(1/delta)), "
            "delta)-DP"
        )
    if mode == "dp":
        return (
            f"epsilon-DP per patient row at each site, epsilon <= {epsilon:.4g} for this "
            "result (add/remove one row; the dictionary's public bounds; OpenDP Laplace)"
        )
    if mode == "sdc":
        return (
            "statistical disclosure control (exact releases, small cells refused); no "
            "formal differential-privacy guarantee"
        )
    return "none: exact releases (dummy data or one institution only)"


class RoundDriver:
    """Runs one analysis request round by round over named sites."""

    def __init__(
        self,
        analysis: Analysis[Any],
        params: Any,
        dictionary: DataDictionary,
        mode: str,
        sites: list[str],
        epsilon: PureDP | None = None,
        sdc: SDCThresholds | None = None,
        rho: ZCDP | None = None,
    ) -> None:
        """Plan the first round.

        Args:
            analysis: the registered analysis.
            params: its parsed parameters.
            dictionary: the alliance's data dictionary.
            mode: the study's privacy mode (a site may apply a stricter one).
            sites: the sites to ask, in the order results list them.
            epsilon: the request's epsilon per site (dp mode only).
            sdc: the disclosure-control thresholds the coordinator assumes.
            rho: the request's zCDP rho per site (dp mode, analyses that release with Gaussian
                noise only).

        Raises:
            ValidationError: dp mode without an epsilon, or one too small to split.
        """
        if not sites:
            raise RequestFailed("no site is connected to the coordinator", [])
        self.analysis = analysis
        self.params = params
        self.dictionary = dictionary
        self.mode = mode
        self.sdc = sdc or SDCThresholds()
        self.active = list(sites)
        self.rounds_budgeted = 1
        self.epsilon_round: PureDP | None = None
        self.rho_round: ZCDP | None = None
        if mode == "dp" and analysis.dp_measure(params) == "zcdp":
            if rho is None or rho.rho <= 0:
                raise ValidationError(
                    f"{analysis.name}: this request releases with Gaussian noise and spends "
                    "zCDP rho: give `rho` in the request or set the study's "
                    "privacy.rho_per_request"
                )
            self.rounds_budgeted = analysis.dp_rounds(params, self._ctx(0))
            self.rho_round = rho.split(self.rounds_budgeted)
            if self.rho_round.rho <= 0:
                raise ValidationError(
                    f"rho {rho.rho:g} split over {self.rounds_budgeted} rounds is below the "
                    "ledger's unit (1e-9) per round; ask for more"
                )
        elif mode == "dp":
            if epsilon is None or epsilon.epsilon <= 0:
                raise ValidationError("a dp request needs an epsilon above 0")
            self.rounds_budgeted = analysis.dp_rounds(params, self._ctx(0))
            self.epsilon_round = epsilon.split(self.rounds_budgeted)
            if self.epsilon_round.epsilon <= 0:
                raise ValidationError(
                    f"epsilon {epsilon.epsilon:g} split over {self.rounds_budgeted} rounds "
                    "is below the ledger's unit (1e-9) per round; ask for more"
                )
        self.contributions = {name: SiteContribution(name, "ok") for name in sites}
        self.rounds_run = 0
        self.restarts = 0
        self._round = 0
        self._records: dict[str, AggregateRecord] = {}
        self._specs: dict[tuple[int, str], RecordSpec] = {}
        self._result: AnalysisResult | None = None
        self._start()

    # ------------------------------------------------------------------ rounds
    def _ctx(
        self,
        round_no: int,
        state: Mapping[str, Any] | None = None,
        memo: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> AnalysisContext:
        return AnalysisContext(
            self.dictionary,
            mode or self.mode,
            self.sdc,
            round_no,
            state or {},
            memo or {},
            sites=tuple(self.active),
        )

    def _start(self) -> None:
        first = self.analysis.initial_state(self.params, self._ctx(0))
        self._set_state(first, 0)

    def _set_state(self, step: NextRound, round_no: int) -> None:
        try:
            public = self.analysis.parse_state(step.state, self.params, self._ctx(round_no))
        except ValidationError as exc:
            raise InternalError(
                f"{self.analysis.name} built a round state its sites would refuse ({exc})"
            ) from None
        self._round, self._state, self._memo = round_no, public, dict(step.memo)

    def next_round(self) -> RoundTask | None:
        """The round to run next, or None once the result is ready."""
        if self._result is not None:
            return None
        return RoundTask(
            self._round, dict(self._state), self.epsilon_round, tuple(self.active), self.rho_round
        )

    def spec(self, mode: str | None = None) -> RecordSpec:
        """The record this round declares, for a site that applied ``mode`` (declared once
        per round and mode, however many sites answer)."""
        key = (self.rounds_run, mode or self.mode)
        if key not in self._specs:
            ctx = self._ctx(self._round, self._state, None, mode)
            self._specs = {key: self.analysis.declare(self.params, ctx), **self._specs}
        return self._specs[key]

    def receive(self, answers: Mapping[str, SiteAnswer]) -> None:
        """Take one answer per asked site, then combine, restart or finish.

        Raises:
            RequestFailed: no site contributed to the round.
            InternalError: a dp run asked for more rounds than it budgeted.
        """
        self.rounds_run += 1
        records: dict[str, AggregateRecord] = {}
        modes: list[str] = []
        for site in self.active:
            answer = answers.get(site) or SiteFailure("error", f"site {site} gave no answer")
            entry = self.contributions[site]
            if isinstance(answer, SiteFailure):
                entry.status, entry.reason, entry.code = answer.status, answer.reason, answer.code
                continue
            records[site] = answer.record
            entry.epsilon += answer.epsilon
            entry.rho = float((ZCDP(entry.rho) + answer.rho).rho)
            entry.mode = answer.mode
            entry.records = self.analysis.site_records(answer.record)
            modes.append(answer.mode)
        if (
            self._round > 0
            and len(records) < len(self.active)
            and self.analysis.finishes_when_sites_leave
        ):
            # Training keeps the model of its last complete round rather than start again
            # (or fail, when every site stopped at once: all their budgets ran out together).
            gone = [s for s in self.active if s not in records]
            reason = "; ".join(f"{s}: {self.contributions[s].reason}" for s in gone)
            self.active = [s for s in self.active if s in records]
            ctx = self._ctx(self._round, self._state, self._memo)
            outcome = self.analysis.partial_result(
                self.params, ctx, f"round {self._round + 1} lost {reason}"
            )
            self._records = records
            self._result = self._finish(outcome, records, modes[0] if modes else self.mode)
            return
        if not records:
            reasons = "; ".join(
                f"{c.name}: {c.reason}" for c in self.contributions.values() if c.status != "ok"
            )
            raise RequestFailed(f"no site contributed ({reasons})", self._sites())
        left = len(records) < len(self.active)
        self.active = [s for s in self.active if s in records]
        if self._round > 0 and left:
            # The pooled sums changed under the iteration: start again without the site(s)
            # that left. Each restart drops at least one site, so restarts are bounded.
            self.restarts += 1
            self._start()
            return
        effective = modes[0]
        for m in modes[1:]:
            effective = stricter_mode(effective, m)
        if self.rounds_run > MAX_ROUNDS:
            raise RequestFailed(
                f"{self.analysis.name} did not finish in {MAX_ROUNDS} rounds", self._sites()
            )
        ctx = self._ctx(self._round, self._state, self._memo, effective)
        outcome = self.analysis.combine(records, self.params, ctx)
        if isinstance(outcome, NextRound):
            if self.mode == "dp" and self._round + 1 >= self.rounds_budgeted:
                raise InternalError(
                    f"{self.analysis.name} asked for round {self._round + 2} in dp mode but "
                    f"budgeted {self.rounds_budgeted} (dp_rounds)"
                )
            self._set_state(outcome, self._round + 1)
            return
        if (
            self.mode == "dp"
            and self._round + 1 != self.rounds_budgeted
            and not self.analysis.may_finish_early
        ):
            raise InternalError(
                f"{self.analysis.name} finished after {self._round + 1} dp rounds but budgeted "
                f"{self.rounds_budgeted} (dp_rounds)"
            )
        self._records = records
        self._result = self._finish(outcome, records, effective)

    def _sites(self) -> list[SiteContribution]:
        out = list(self.contributions.values())
        for entry in out:
            if entry.status != "ok":
                entry.records = None
        return out

    def _finish(
        self, result: AnalysisResult, records: Mapping[str, AggregateRecord], mode: str
    ) -> AnalysisResult:
        result.sites = self._sites()
        spent = max((s.epsilon for s in result.sites), default=PureDP(0.0))
        rho = max((s.rho for s in result.sites), default=0.0)
        mechanisms = sorted(
            {rel.mechanism for r in records.values() for rel in r.releases.values()} - {"none"}
        )
        result.privacy = PrivacySummary(
            mode=mode,
            mechanism=", ".join(mechanisms) or "none",
            epsilon_per_site=spent,
            guarantee=guarantee(mode, spent.epsilon, rho),
            rho_per_site=rho,
        )
        if self.restarts:
            result.notes.append(
                f"sites left during the iteration; it restarted {self.restarts} time(s) without "
                "them, so every round pooled the same sites (in dp mode the restarted rounds "
                "were charged too)"
            )
        return result

    def result(self) -> AnalysisResult:
        """The finished result.

        Raises:
            InternalError: asked before the last round was received.
        """
        if self._result is None:
            raise InternalError(f"{self.analysis.name}: the result was asked for too early")
        return self._result

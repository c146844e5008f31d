"""The shape every analysis has: parameters, a declared record, a site half and a coordinator half.

Both sides call :meth:`Analysis.declare` with the same parameters, dictionary, round state and
privacy mode, so a reply is checked against a declaration the coordinator made itself. The site
half (:meth:`Analysis.local`) returns *exact* aggregates; the site's privacy engine, not the
analysis, decides what noise or disclosure control they get before they leave.

Round state has two parts. The *public* state is the only thing a task carries to the sites: it
is declared by the analysis's :attr:`Analysis.state_model` (a pydantic model that forbids any
other key and any non-finite number), bounded by :meth:`Analysis.check_state`, and validated by
every site before it computes anything (:meth:`Analysis.parse_state`), since a hostile
coordinator chooses it. The *memo* is the coordinator's own memory between rounds (earlier
estimates, released sums kept for later rounds) and never leaves the coordinator.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

from analyses.results import AnalysisResult
from protocol.config import DataDictionary, SDCThresholds, format_validation_error
from protocol.errors import ValidationError
from protocol.records import AggregateRecord, RecordSpec

if TYPE_CHECKING:
    from analyses.pushdown import ColumnOf, Pushdown

P = TypeVar("P", bound=BaseModel)
T = TypeVar("T")

Arrays = dict[str, npt.NDArray[np.float64]]


class Params(BaseModel):
    """Base of every analysis's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _distinct(names: list[str], info: ValidationInfo) -> list[str]:
    if len(set(names)) != len(names):
        raise ValueError(f"{info.field_name} must be distinct, got {names}")
    return names


#: A parameter listing variables, none twice (the error names the field).
DistinctNames = Annotated[list[str], AfterValidator(_distinct)]


class RoundState(BaseModel):
    """Base of an analysis's public round state: every field a task may carry to a site.

    Unknown keys and non-finite numbers are refused, so a site computes only on what the
    analysis declared; bounds that depend on the parameters go in :meth:`Analysis.check_state`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class NoState(RoundState):
    """The public state of single-round analyses: nothing."""


class WorkCache:
    """Memory a site lends its analyses between rounds (a GLM's built design matrix).

    The site owns it: one per site node, bounded in entries and bytes (least recently used
    first out, though the newest entry is always kept), with one *scope* per data frame it
    serves (the unfiltered data, each filter's rows). When the site drops a frame it drops the
    frame's scope, so nothing built from one frame is ever served for another.
    """

    def __init__(self, max_entries: int = 16, max_bytes: int = 4 << 30) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, Hashable], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def scope(self, name: str) -> ScopedCache:
        """The part of the cache for one data frame."""
        return ScopedCache(self, name)

    def get(
        self, scope: str, key: Hashable, build: Callable[[], T], nbytes: Callable[[T], int]
    ) -> T:
        """The value cached under ``(scope, key)``, built (outside the lock) when missing."""
        full = (scope, key)
        with self._lock:
            found = self._entries.get(full)
            if found is not None:
                self._entries.move_to_end(full)
                return found[0]  # type: ignore[no-any-return]
        value = build()
        with self._lock:
            self._entries[full] = (value, int(nbytes(value)))
            self._entries.move_to_end(full)
            while len(self._entries) > 1 and (
                len(self._entries) > self.max_entries
                or sum(size for _, size in self._entries.values()) > self.max_bytes
            ):
                self._entries.popitem(last=False)
        return value

    def drop(self, scope: str) -> None:
        """Forget everything built from one frame."""
        with self._lock:
            for full in [k for k in self._entries if k[0] == scope]:
                del self._entries[full]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@dataclass(frozen=True)
class ScopedCache:
    """The view of a :class:`WorkCache` an analysis gets for the frame it computes on."""

    cache: WorkCache
    name: str

    def get(self, key: Hashable, build: Callable[[], T], nbytes: Callable[[T], int]) -> T:
        """The value cached under ``key`` for this frame, built when missing."""
        return self.cache.get(self.name, key, build, nbytes)


@dataclass(frozen=True)
class AnalysisContext:
    """What both halves may know besides the parameters.

    Attributes:
        dictionary: the alliance's data dictionary (public bounds and levels).
        mode: the privacy mode of this release (at a site: the effective, stricter mode).
        sdc: the disclosure-control thresholds in force (the site's own at a site).
        round: iterative analyses: the round number, from 0.
        state: iterative analyses: this round's public state (JSON-able), the same at every
            site and validated there.
        memo: iterative analyses: the coordinator's memory between rounds. Always empty at a
            site: it never leaves the coordinator.
        cache: at a site, the site's work cache for the frame ``local`` computes on (None:
            nothing is kept between rounds).
        source: at a site, for analyses that set ``reads_source``: each row's state at the
            source, aligned with the frame ``local`` computes on (a column per dictionary
            variable: 0 present, 1 missing, 2 not allowed by the dictionary; and
            ``DUPLICATE_ID``: the row is the first of a patient id with several rows).
        sandbox: the limits (``analyses.sandbox.SandboxLimits``) for analyses that run a
            researcher's code; None: the defaults.
        sites: at the coordinator, the sites the round driver is asking (in its order).
        site: at a site, its own name.
    """

    dictionary: DataDictionary
    mode: str = "dp"
    sdc: SDCThresholds = field(default_factory=SDCThresholds)
    round: int = 0
    state: Mapping[str, Any] = field(default_factory=dict)
    memo: Mapping[str, Any] = field(default_factory=dict)
    cache: ScopedCache | None = None
    source: pd.DataFrame | None = None
    sandbox: Any = None
    sites: tuple[str, ...] = ()
    site: str = ""


#: The column of ``AnalysisContext.source`` that flags a duplicated patient id (no dictionary
#: variable can be called this: names start with a letter).
DUPLICATE_ID = "_duplicate_id"


@dataclass(frozen=True)
class NextRound:
    """Round state: returned by ``initial_state`` (round 0) and by ``combine`` to go on.

    Attributes:
        state: the public state every site receives; only fields of the analysis's
            ``state_model``.
        memo: what the coordinator keeps for itself until the next ``combine``.
    """

    state: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)


class Analysis(ABC, Generic[P]):
    """One registered analysis. Subclasses set ``name``, ``params_model`` and the halves."""

    #: the site passes each row's state at the source in ``ctx.source`` (the quality profile)
    reads_source: ClassVar[bool] = False
    #: a dp run may finish before its budgeted ``dp_rounds`` (spending less than asked)
    may_finish_early: ClassVar[bool] = False
    #: when a site leaves after round 0, finish with :meth:`partial_result` instead of
    #: restarting without it (training keeps the model of its last complete round)
    finishes_when_sites_leave: ClassVar[bool] = False

    name: ClassVar[str]
    params_model: ClassVar[type[BaseModel]]
    #: The public round state this analysis may send to sites (none by default).
    state_model: ClassVar[type[RoundState]] = NoState
    #: The class of this analysis's results (rebuilt from JSON by the researcher's client).
    result_type: ClassVar[type[AnalysisResult]]

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

    def coarsened_variables(self, params: P) -> set[str]:
        """The variables this analysis reads only through public bins or levels (a histogram's
        variable on its public edges, a table's rows and columns). In sdc a quasi-identifier
        may be read only this way; every other variable's exact values reach the release."""
        return set()

    def model_key(self, params: P) -> str | None:
        """The canonical form of the model a model-fitting analysis (glm, cox) fits, else None.
        In sdc a site fits only the models its approval lists (``analyses.models``)."""
        return None

    def complete_case_variables(self, params: P) -> set[str]:
        """The variables whose complete cases a release covers (the differencing guard's record
        set). Default: every variable read. An analysis that counts missing values covers every
        row of its frame and returns none."""
        return self.variables(params)

    def dp_measure(self, params: P) -> str:
        """What a dp release of this request spends: ``pure`` (epsilon, Laplace) or ``zcdp``
        (rho, Gaussian: arrays declared ``norm="l2"``)."""
        return "pure"

    def reviewed_code(self, params: P) -> Any:
        """The researcher's code this request would run (an ``analyses.scripts.ScriptBundle``),
        which a site runs only when its admin approved that code's hash; None: no such code."""
        return None

    def magnitude_cells(
        self, data: pd.DataFrame, params: P, ctx: AnalysisContext
    ) -> list[npt.NDArray[np.float64]]:
        """Each released sum's per-record contributions (for the dominance rule in sdc): the
        values a mean, a t-test or a gaussian or poisson GLM adds up. Default: none (counts)."""
        return []

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

    def initial_state(self, params: P, ctx: AnalysisContext) -> NextRound:
        """Iterative analyses: the public state and memo of round 0. Single-round: none."""
        return NextRound()

    def check_state(self, state: Any, params: P, ctx: AnalysisContext) -> None:
        """Bounds of the public state that depend on the parameters, the dictionary, the mode
        or the round (a coefficient vector's length and size, a grid index's range). Raise
        :class:`ValidationError` naming the field. ``state`` is a ``state_model`` instance."""

    def parse_state(self, raw: Any, params: P, ctx: AnalysisContext) -> dict[str, Any]:
        """The public state of a task, validated: declared fields only, finite, in bounds.

        A site calls this on every task before computing anything; the coordinator calls it
        on what it is about to send, so an analysis cannot put an undeclared key in a task.

        Raises:
            ValidationError: naming the field and what is allowed.
        """
        where = f"{self.name} round {ctx.round} state"
        if not isinstance(raw, Mapping):
            raise ValidationError(f"{where}: must be a JSON object, got {type(raw).__name__}")
        try:
            state = self.state_model.model_validate(dict(raw))
        except pydantic.ValidationError as exc:
            raise ValidationError(format_validation_error(where, exc)) from None
        self.check_state(state, params, ctx)
        return state.model_dump(exclude_none=True)

    # ----------------------------------------------------------------- site half
    @abstractmethod
    def local(self, data: pd.DataFrame, params: P, ctx: AnalysisContext) -> Arrays:
        """Exact aggregates over this site's (filtered, consented) rows.

        ``data`` holds dictionary columns only, with missing values as NaN. Raise
        ``DisclosureError`` for analysis-specific disclosure rules (more model parameters than
        the site's records allow, say); generic small-cell rules are the site engine's job.
        """

    def pushdown(self, params: P, ctx: AnalysisContext, column: ColumnOf) -> Pushdown | None:
        """The same arrays as :meth:`local`, as SQL aggregates a site's source computes
        (``analyses.pushdown``); None: this analysis, or these parameters, cannot be pushed
        down, and the site computes :meth:`local` on its rows instead. Sites push down dp
        releases only (sdc's differencing guard and dominance rule need the records)."""
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

    def partial_result(self, params: P, ctx: AnalysisContext, reason: str) -> AnalysisResult:
        """Analyses that set ``finishes_when_sites_leave``: the result when round ``ctx.round``
        lost a site (``reason`` says which and why); ``ctx`` holds that round's state and memo."""
        raise NotImplementedError(f"{self.name} does not finish when sites leave")


def rows_used(data: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The complete cases of ``columns`` (listwise deletion, as statsmodels' default)."""
    return data.loc[data[columns].notna().all(axis=1), columns]

"""Pydantic models of the YAML files people write, and one loader with one error shape.

An invalid file fails with the file, the field path, the bad value and what is allowed::

    configs/site.yaml: policy.studies[0].mode: 'exact' is not allowed;
    use one of: dp, sdc, off
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from protocol.budget import ZCDP, PureDP
from protocol.errors import BudgetError, ConfigError

PrivacyMode = Literal["dp", "sdc", "off"]
#: How a variable may be used (see docs/threat-model.md): ``identifier`` never analysed or
#: released; ``quasi-identifier`` in sdc only through public bins or levels; ``sensitive`` only
#: where the site's approval of a study names it; ``ordinary`` as the policy allows.
Sensitivity = Literal["identifier", "quasi-identifier", "sensitive", "ordinary"]
SENSITIVITIES: tuple[str, ...] = ("identifier", "quasi-identifier", "sensitive", "ordinary")
PRIVACY_MODES: tuple[str, ...] = ("off", "sdc", "dp")  # ordered from least to most strict

_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
#: a site's name (its certificate's subject), a study's or a token owner's id
SITE_NAME = _NAME
_VARIABLE = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


def _epsilon(value: Any, positive: bool) -> PureDP:
    if isinstance(value, PureDP):
        budget = value
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            budget = PureDP(float(value))
        except BudgetError as exc:
            raise ValueError(str(exc)) from None
    if positive and budget.epsilon <= 0:
        raise ValueError("must be above 0")
    return budget


#: An epsilon held in a config: a typed ``PureDP`` in Python, a number in YAML and JSON.
Epsilon = Annotated[
    PureDP,
    BeforeValidator(lambda v: _epsilon(v, positive=False)),
    PlainSerializer(lambda b: b.epsilon, return_type=float),
    WithJsonSchema({"type": "number", "minimum": 0}),
]
#: The same, above 0 (what a request may spend).
PositiveEpsilon = Annotated[
    PureDP,
    BeforeValidator(lambda v: _epsilon(v, positive=True)),
    PlainSerializer(lambda b: b.epsilon, return_type=float),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0}),
]


def stricter_mode(first: str, second: str) -> str:
    """The stricter of two privacy modes (off < sdc < dp)."""
    return max(first, second, key=PRIVACY_MODES.index)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data dictionary


class NumericVariable(_Model):
    """A numeric variable with public bounds (differential privacy depends on them)."""

    type: Literal["numeric"]
    min: float
    max: float
    unit: str | None = None
    description: str | None = None
    sensitivity: Sensitivity = "ordinary"
    plausible: tuple[float, float] | None = Field(
        default=None,
        description="the range a clinician expects, inside [min, max]: a value outside it is "
        "still analysed but counts as implausible in the quality profile",
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> NumericVariable:
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if self.plausible is not None:
            low, high = self.plausible
            if not self.min <= low < high <= self.max:
                raise ValueError(
                    f"plausible [{low:g}, {high:g}] must be an increasing range inside "
                    f"[min, max] = [{self.min:g}, {self.max:g}]"
                )
        return self


class CategoricalVariable(_Model):
    """A categorical variable; its levels come from here, never from a site's data."""

    type: Literal["categorical"]
    levels: list[int]
    labels: list[str] | None = None
    description: str | None = None
    sensitivity: Sensitivity = "ordinary"

    @model_validator(mode="after")
    def _levels_valid(self) -> CategoricalVariable:
        if len(self.levels) < 2:
            raise ValueError(f"a categorical variable needs at least 2 levels, got {self.levels}")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels must be distinct, got {self.levels}")
        if self.labels is not None and len(self.labels) != len(self.levels):
            raise ValueError(
                f"labels ({len(self.labels)}) must match levels ({len(self.levels)}) one to one"
            )
        return self


class BinaryVariable(_Model):
    """A 0/1 variable (an outcome or an indicator)."""

    type: Literal["binary"]
    labels: list[str] | None = None
    description: str | None = None
    sensitivity: Sensitivity = "ordinary"

    @property
    def levels(self) -> list[int]:
        """Always ``[0, 1]``."""
        return [0, 1]


Variable = Annotated[
    NumericVariable | CategoricalVariable | BinaryVariable, Field(discriminator="type")
]


class OrderCheck(_Model):
    """Two numeric variables (dates as days, say) whose values must not run backwards."""

    earlier: str = Field(pattern=_VARIABLE)
    later: str = Field(pattern=_VARIABLE)
    description: str | None = None


class DataDictionary(_Model):
    """The alliance's common variables, their types, public bounds and levels."""

    variables: dict[str, Variable]
    patient_id: str | None = Field(
        default=None,
        pattern=_VARIABLE,
        description="the column holding patient ids (after a site's rename): used for consent "
        "and one-row-per-patient, never analysed or released",
    )
    order_checks: list[OrderCheck] = Field(
        default_factory=list,
        description="pairs whose values must not run backwards (earlier <= later, both "
        "present); a record that breaks one counts as out of order in the quality profile",
    )

    @model_validator(mode="after")
    def _order_checks_numeric(self) -> DataDictionary:
        for check in self.order_checks:
            for name in (check.earlier, check.later):
                if not isinstance(self.variables.get(name), NumericVariable):
                    raise ValueError(
                        f"order check {check.earlier} <= {check.later}: {name!r} is not a "
                        "numeric variable of this dictionary"
                    )
            if check.earlier == check.later:
                raise ValueError(f"order check {check.earlier} <= {check.later}: one variable")
        return self

    @model_validator(mode="after")
    def _patient_id_not_a_variable(self) -> DataDictionary:
        if self.patient_id is not None and self.patient_id in self.variables:
            raise ValueError(
                f"patient_id {self.patient_id!r} is also a variable; patient ids are never "
                "analysable, so remove it from variables"
            )
        return self

    @field_validator("variables")
    @classmethod
    def _names_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(_VARIABLE, name):
                raise ValueError(
                    f"variable name {name!r} must start with a letter and use letters, digits, _"
                )
        if not value:
            raise ValueError("a dictionary needs at least one variable")
        return value

    def variable(self, name: str) -> NumericVariable | CategoricalVariable | BinaryVariable:
        """The variable called ``name``, or a ValidationError listing the known ones."""
        from protocol.errors import ValidationError

        if name not in self.variables:
            raise ValidationError(
                f"variable {name!r} is not in the data dictionary; known: "
                f"{', '.join(sorted(self.variables))}"
            )
        return self.variables[name]

    def bounds(self, name: str) -> tuple[float, float]:
        """Public (min, max) of a variable; levels give them for categorical and binary ones."""
        var = self.variable(name)
        if isinstance(var, NumericVariable):
            return (var.min, var.max)
        return (float(min(var.levels)), float(max(var.levels)))

    def levels(self, name: str) -> list[int]:
        """Public levels of a categorical or binary variable."""
        from protocol.errors import ValidationError

        var = self.variable(name)
        if isinstance(var, NumericVariable):
            raise ValidationError(f"variable {name!r} is numeric; it has no levels")
        return list(var.levels)

    def classed(self, sensitivity: str) -> set[str]:
        """The variables of one sensitivity class."""
        return {name for name, var in self.variables.items() if var.sensitivity == sensitivity}

    def digest(self) -> str:
        """A stable SHA-256 of the dictionary, so both sides can check they use the same one."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- requests


class AnalysisRequest(_Model):
    """What a researcher asks for: an analysis, an optional row filter and its parameters."""

    analysis: str
    filter: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    epsilon: PositiveEpsilon | None = Field(
        default=None, description="per site, at most the study's epsilon_per_request"
    )
    rho: PositiveRho | None = Field(
        default=None,
        description="zCDP rho per site, for releases with Gaussian noise (a script with an L2 "
        "bound); default: the study's rho_per_request",
    )


def _rho(value: Any) -> ZCDP:
    if isinstance(value, ZCDP):
        budget = value
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            budget = ZCDP(float(value))
        except BudgetError as exc:
            raise ValueError(str(exc)) from None
    if budget.rho <= 0:
        raise ValueError("must be above 0")
    return budget


#: A zCDP rho held in a config (above 0): a typed ``ZCDP`` in Python, a number in YAML.
PositiveRho = Annotated[
    ZCDP,
    BeforeValidator(_rho),
    PlainSerializer(lambda b: b.rho, return_type=float),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0}),
]


# --------------------------------------------------------------------------- studies


class StudyPrivacy(_Model):
    """A study's privacy request; each site's policy may be stricter."""

    mode: PrivacyMode = "dp"
    epsilon_per_request: PositiveEpsilon = Field(default=PureDP(0.5))
    budget: PositiveEpsilon = Field(
        default=PureDP(3.0), description="epsilon per site for the study"
    )
    rho_per_request: PositiveRho | None = Field(
        default=None,
        description="zCDP rho per site for a request released with Gaussian noise (a script "
        "with an L2 bound); None: such requests must give their own rho",
    )


class SDCTerms(_Model):
    """The populations (row filters) and models a study's exact releases may use; each site
    approves them in its own policy and enforces its own copy."""

    populations: list[str] = Field(default_factory=list)
    models: list[str] = Field(
        default_factory=list, description="'y ~ x1 + x2' (glm), 'Surv(time, event) ~ x1' (cox)"
    )


#: min_quality shares lie on this public grid: a site's refusal then says only which 5% band
#: its share lies below, however many requests probe it
QUALITY_STEP = 0.05


def quality_share_problem(share: Any) -> str | None:
    """What is wrong with a min_quality share, or None: a number in (0, 1] on the 0.05 grid."""
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        return f"{share!r} is not a number"
    steps = float(share) / QUALITY_STEP
    if not (math.isfinite(steps) and 0 < share <= 1.0 and abs(steps - round(steps)) < 1e-9):
        return (
            f"{share!r} is not a share in (0, 1] on the grid of {QUALITY_STEP:g} (0.05, 0.1, ...)"
        )
    return None


def _check_min_quality(value: dict[str, float]) -> dict[str, float]:
    for name, share in value.items():
        if not re.match(_VARIABLE, name):
            raise ValueError(f"min_quality: {name!r} is not a variable name")
        problem = quality_share_problem(share)
        if problem is not None:
            raise ValueError(
                f"min_quality.{name}: {problem}; it is the least share of records with an "
                "allowed, plausible value"
            )
    return value


#: variable -> the least usable share of a site's records (allowed, plausible values)
MinQuality = Annotated[dict[str, float], AfterValidator(_check_min_quality)]


class StudyConfig(_Model):
    """A study drafted by the alliance lead and approved by each site."""

    id: str = Field(pattern=_NAME)
    title: str
    purpose: str = Field(default="research", pattern=r"^[a-z][a-z0-9_-]*$")
    lead: str = Field(
        default="",
        max_length=200,
        description="the lead institution, as the public registry shows it",
    )
    sites: list[str] = Field(default_factory=list, description="empty: every connected site")
    analyses: list[str] = Field(default_factory=list, description="empty: any registered one")
    variables: list[str] = Field(default_factory=list, description="empty: the whole dictionary")
    researchers: list[str] = Field(
        default_factory=list,
        description="user ids (as in the coordinator's tokens) who may run requests and read "
        "results; empty: nobody but the alliance lead",
    )
    privacy: StudyPrivacy = Field(default_factory=StudyPrivacy)
    sdc: SDCTerms | None = Field(
        default=None,
        description="sdc: the approved populations and models (None: each site's own terms "
        "only; the coordinator does not pre-check)",
    )
    min_quality: MinQuality = Field(
        default_factory=dict,
        description="the least usable share of a site's records per variable (0..1]: a site "
        "below it leaves that variable out of this study's analyses, saying so",
    )
    max_model_columns: int = Field(
        default=200,
        ge=1,
        le=2000,
        description="most design columns a model (glm formula, cox covariates) may have",
    )
    version: int = Field(
        default=1,
        ge=1,
        description="the study's version: 1 at creation, one more at each amendment (set by the "
        "coordinator; each version needs its own approval at each site)",
    )
    quorum: int = Field(
        default=1,
        ge=0,
        description="how many invited sites must approve its version before the study becomes "
        "active (0: active at once; each site still answers only what it approved)",
    )
    starts: dt.date | None = Field(default=None, description="no request runs before this day")
    expires: dt.date | None = Field(
        default=None, description="the study's end date: after it, it closes and sites refuse it"
    )
    agreement: str = Field(
        default="",
        max_length=200,
        description="the data-sharing agreement's reference, as the sites and the report show it",
    )

    @model_validator(mode="after")
    def _dates_and_quorum(self) -> StudyConfig:
        if self.starts is not None and self.expires is not None and self.expires < self.starts:
            raise ValueError(
                f"expires ({self.expires}) is before starts ({self.starts}); the study would "
                "never run"
            )
        if self.sites and self.quorum > len(self.sites):
            raise ValueError(
                f"quorum {self.quorum} is more than the {len(self.sites)} invited sites "
                f"({', '.join(self.sites)}); the study could never become active"
            )
        return self


# --------------------------------------------------------------------------- site


class SDCThresholds(_Model):
    """Disclosure-control thresholds; never weaker than DataSHIELD's defaults."""

    min_cell: int = Field(default=3, ge=3)
    min_subset: int = Field(default=3, ge=3)
    max_parameter_ratio: float = Field(default=0.33, gt=0, le=0.33)
    dominance_p: float = Field(
        default=10.0,
        ge=5.0,
        le=100.0,
        description="p% rule: a sum is refused when the others' total is under p% of the "
        "largest contribution (the second largest contributor could estimate it that well)",
    )


class StudyApproval(_Model):
    """A site's approval of one study: its privacy mode and its budget there."""

    id: str = Field(pattern=_NAME)
    version: int = Field(
        default=1,
        ge=1,
        description="the study version approved; a newer version runs here only once approved "
        "(`alliance site approve`)",
    )
    mode: PrivacyMode = "dp"
    budget: Epsilon = Field(default=PureDP(3.0), description="epsilon this site allows the study")
    epsilon_per_request: PositiveEpsilon = Field(
        default=PureDP(0.5),
        description="the most epsilon one request may spend here, summed over its rounds",
    )
    analyses: list[str] | None = Field(default=None, description="None: the site allow-list")
    starts: dt.date | None = Field(default=None, description="no task runs here before this day")
    expires: dt.date | None = None
    researcher_budget: Epsilon | None = Field(
        default=None, description="the most one researcher may spend on this study here"
    )
    rho_budget: PositiveRho | None = Field(
        default=None,
        description="zCDP rho this site allows the study for releases with Gaussian noise (a "
        "script with an L2 bound); None: no such release runs here",
    )
    rho_per_request: PositiveRho | None = Field(
        default=None, description="the most rho one request may spend here (None: no cap)"
    )
    sdc_filters: Literal["approved", "free"] = Field(
        default="approved",
        description="sdc: 'approved' runs only the populations and models below; 'free' any",
    )
    populations: list[str] = Field(
        default_factory=list, description="sdc: approved row filters (the study's subgroups)"
    )
    models: list[str] = Field(
        default_factory=list,
        description="sdc: approved models: 'y ~ x1 + x2' (glm), 'Surv(time, event) ~ x1' (cox)",
    )
    sensitive_variables: list[str] = Field(
        default_factory=list, description="sensitive variables this study may read here"
    )
    min_quality: MinQuality = Field(
        default_factory=dict,
        description="the least usable share of this site's records per variable (0..1] for "
        "this study; below it the site leaves the variable out (with the study's own minimum, "
        "the higher applies)",
    )
    purpose: str = Field(
        default="research",
        pattern=r"^[a-z][a-z0-9_-]*$",
        description="the study's purpose code, for this site's consent rules",
    )


class PeriodBudget(_Model):
    """A site-wide epsilon per calendar period (UTC), over all studies."""

    period: Literal["day", "week", "month", "year"] = "month"
    epsilon: Epsilon


class ScriptSandbox(_Model):
    """What a researcher's script may use per call at this site (``analyses.sandbox``)."""

    cpu_seconds: int = Field(default=30, ge=1, le=3600)
    memory_mb: int = Field(default=1024, ge=64, le=65536)
    wall_seconds: float = Field(default=60.0, gt=0, le=7200)


class SitePolicy(_Model):
    """What a site allows. Empty means nothing: a site runs nothing it has not approved."""

    allowed_analyses: list[str] = Field(default_factory=list)
    studies: list[StudyApproval] = Field(default_factory=list)
    denied_variables: list[str] = Field(default_factory=list)
    sdc: SDCThresholds = Field(default_factory=SDCThresholds)
    period_budget: PeriodBudget | None = Field(
        default=None, description="site-wide epsilon per calendar period, over all studies"
    )
    consent: dict[str, Literal["opt-in", "opt-out"]] = Field(
        default_factory=dict,
        description="purpose code -> opt-in (a grant is needed) or opt-out (a withdrawal excludes)",
    )
    scripts: ScriptSandbox = Field(
        default_factory=ScriptSandbox,
        description="limits of researchers' scripts (the 'script' analysis; each script runs "
        "only once its hash is approved with `alliance site approve-script`)",
    )

    def approval(self, study_id: str) -> StudyApproval | None:
        """This site's approval of ``study_id``, if any."""
        for approval in self.studies:
            if approval.id == study_id:
                return approval
        return None


class UnitConversion(_Model):
    """A local unit to the dictionary's: ``value * factor + offset``, declared once per pair."""

    from_unit: str = Field(alias="from", min_length=1)
    to: str = Field(min_length=1)
    factor: float
    offset: float = 0.0
    variables: list[str] | None = Field(
        default=None,
        description="the variables it applies to (None: every variable with this unit pair); "
        "the same pair may need another factor for another analyte (glucose, cholesterol)",
    )

    @model_validator(mode="after")
    def _finite(self) -> UnitConversion:
        if not (math.isfinite(self.factor) and self.factor != 0 and math.isfinite(self.offset)):
            raise ValueError(
                f"{self.from_unit} -> {self.to}: factor {self.factor!r} and offset "
                f"{self.offset!r} must be finite numbers, the factor not 0"
            )
        return self


def _codes_as_text(value: Any) -> Any:
    # YAML reads {1: 0} with integer keys; local codes are compared as text.
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return value


#: local code (as text) -> dictionary level
LocalCodes = Annotated[dict[str, float], BeforeValidator(_codes_as_text)]


class VariableMapping(_Model):
    """How one dictionary variable is read from a site's local data."""

    column: str | None = Field(default=None, description="the local column (default: same name)")
    derive: str | None = Field(
        default=None,
        description="an arithmetic expression over local columns instead of a column: + - * / "
        "**, numbers, years_between(start, end), days_between(start, end) for dates",
    )
    unit: str | None = Field(default=None, description="the local unit, if not the dictionary's")
    codes: LocalCodes | None = Field(
        default=None, description="local code -> dictionary level, e.g. {M: 1, F: 0}"
    )
    missing: list[str | float] = Field(
        default_factory=list, description="local values that mean missing, e.g. [0, -9, NA]"
    )

    @model_validator(mode="after")
    def _one_source(self) -> VariableMapping:
        if self.column is not None and self.derive is not None:
            raise ValueError("give column or derive, not both")
        return self


class SiteMapping(_Model):
    """A site's mapping file: local columns, units and codes to the alliance dictionary."""

    variables: dict[str, VariableMapping] = Field(default_factory=dict)
    conversions: list[UnitConversion] = Field(default_factory=list)


class OmopVariable(_Model):
    """One dictionary variable from an OMOP CDM database, per person.

    kinds: ``age`` (years from birth to the index date, the start of the person's first
    observation period); ``gender`` (``gender_concept_id`` recoded by ``codes``, e.g.
    ``{8507: 1, 8532: 0}``); ``measurement`` (``value_as_number`` of the ``concepts``, the
    ``first`` or ``last`` by date, or their ``mean``); ``condition`` and ``drug`` (1 when the
    person has an occurrence or exposure of the ``concepts``, else 0); ``death`` (1 when the
    person has a death record, else 0); ``follow_up`` (days from the index date to death, or
    else to the end of the last observation period).
    """

    kind: Literal["age", "gender", "measurement", "condition", "drug", "death", "follow_up"]
    concepts: list[int] = Field(default_factory=list, max_length=10000)
    codes: LocalCodes | None = None
    value: Literal["first", "last", "mean"] = "last"

    @model_validator(mode="after")
    def _needs(self) -> OmopVariable:
        if self.kind in ("measurement", "condition", "drug") and not self.concepts:
            raise ValueError(f"kind {self.kind} needs concepts (OMOP concept ids)")
        if self.kind == "gender" and not self.codes:
            raise ValueError("kind gender needs codes: gender_concept_id -> level")
        return self


class OmopSource(_Model):
    """How a site's OMOP CDM tables become one row per person."""

    variables: dict[str, OmopVariable]


class DataSource(_Model):
    """Where a site's records are and how to read them."""

    connector: Literal["csv", "parquet", "sql", "omop"] = Field(
        default="csv",
        description="csv (a file, pandas), parquet (a file, scanned by DuckDB), sql (a "
        "table through SQLAlchemy, in a read-only session) or omop (an OMOP CDM database: "
        "one row per person, by the concept ids in omop)",
    )
    path: Path | None = Field(default=None, description="csv and parquet: the file")
    url: str | None = Field(
        default=None, description="sql: a SQLAlchemy URL; use a database user that can only read"
    )
    table: str | None = Field(default=None, pattern=_VARIABLE, description="sql: the table")
    db_schema: str | None = Field(
        default=None, pattern=_VARIABLE, description="sql: the table's schema, if not the default"
    )
    omop: OmopSource | None = Field(default=None, description="omop: the variables per person")
    order_by: list[str] | None = Field(
        default=None,
        description="sql: columns that fix the rows' order (default: the primary key); sdc's "
        "differencing guard knows records by their position",
    )
    where: str | None = Field(
        default=None,
        description="the rows this site exposes at all, in the filter language over the "
        "source's columns (e.g. 'age >= 18'): run in the source's query (parquet, sql) or "
        "right after reading (csv, omop)",
    )
    header: bool = True
    column_names: list[str] | None = Field(
        default=None, description="column names when the file has no header row"
    )
    rename: dict[str, str] = Field(default_factory=dict, description="local name -> dictionary")
    na_values: list[str] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list, description="local columns to ignore")
    derive: dict[str, str] = Field(
        default_factory=dict,
        description="dictionary variable -> a filter expression giving it as 0/1 (e.g. num > 0)",
    )
    duplicate_patients: Literal["refuse", "first", "last"] = Field(
        default="refuse",
        description="several rows for one patient id: refuse dp, or keep the first or last row",
    )
    mapping: Path | None = Field(
        default=None,
        description="the site mapping file (local columns, units, codes, derived variables and "
        "missing-value codes to the dictionary), applied before rename and derive",
    )
    pushdown: bool = Field(
        default=False,
        description="csv, parquet and sql: compute dp aggregates (count, mean, histogram, table, "
        "glm rounds, kaplan_meier and logrank counts, cox rounds) in the source instead of "
        "reading the records at start; what cannot be pushed down reads the dictionary's "
        "columns once, on first need",
    )

    @model_validator(mode="after")
    def _where(self) -> DataSource:
        if self.pushdown and self.connector not in ("csv", "parquet", "sql"):
            raise ValueError(
                f"pushdown: true needs connector csv, parquet or sql, not {self.connector!r} "
                "(an omop source is reduced to one row per person in memory)"
            )
        if self.connector in ("csv", "parquet") and self.path is None:
            raise ValueError(f"a {self.connector} source needs path (the file)")
        if self.connector == "sql" and (self.url is None or self.table is None):
            raise ValueError("a sql source needs url (a SQLAlchemy URL) and table")
        if self.connector == "omop" and (self.url is None or self.omop is None):
            raise ValueError("an omop source needs url (a SQLAlchemy URL) and omop.variables")
        if self.where is not None:
            from protocol.errors import FilterError
            from protocol.filters import parse_filter

            try:  # the syntax now; the names against the source's columns when it is read
                parse_filter(self.where)
            except FilterError as exc:
                raise ValueError(str(exc)) from None
        return self


class ConsentColumns(_Model):
    """Column names of a consent table (CSV or SQL)."""

    patient: str = "patient_id"
    purpose: str = "purpose"
    status: str = Field(default="status", description="granted or withdrawn")
    date: str = "date"


class ConsentSource(_Model):
    """Where a site's consent statements are: a CSV, a SQL table, or FHIR Consent NDJSON."""

    kind: Literal["csv", "sql", "fhir"]
    path: Path | None = Field(default=None, description="csv and fhir: the file")
    url: str | None = Field(default=None, description="sql: a SQLAlchemy URL, read only")
    table: str = Field(default="consent", pattern=_VARIABLE, description="sql: the table")
    columns: ConsentColumns = Field(default_factory=ConsentColumns)

    @model_validator(mode="after")
    def _where(self) -> ConsentSource:
        if self.kind in ("csv", "fhir") and self.path is None:
            raise ValueError(f"a {self.kind} consent source needs path")
        if self.kind == "sql" and self.url is None:
            raise ValueError("a sql consent source needs url (a SQLAlchemy URL)")
        return self


class TLSFiles(_Model):
    """Paths of a certificate, its key and the alliance CA certificate."""

    ca: Path
    cert: Path
    key: Path


class SiteConfig(_Model):
    """A site node's configuration (``site.yaml``)."""

    name: str = Field(pattern=_NAME)
    coordinator: str = Field(description="host:port of the coordinator's site link")
    dictionary: Path
    data: DataSource
    consent: ConsentSource | None = None
    policy: SitePolicy = Field(default_factory=SitePolicy)
    state_dir: Path = Field(default=Path("state"))
    tls: TLSFiles | None = None
    insecure: bool = False
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    reconnect_max_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _tls_or_insecure(self) -> SiteConfig:
        if self.tls is None and not self.insecure:
            raise ValueError("give tls (ca, cert, key) or set insecure: true for loopback tests")
        if self.consent is None and self.policy.consent:
            purposes = ", ".join(sorted(self.policy.consent))
            raise ValueError(
                f"policy.consent has rules ({purposes}) but no consent source is configured; "
                "add consent: {kind: csv, path: ...} (or sql, fhir)"
            )
        return self


# --------------------------------------------------------------------------- coordinator


class APIToken(_Model):
    """A person's API token bound to a role (and, for a site admin, to their site)."""

    token: str = Field(min_length=16)
    user: str
    role: Literal["lead", "researcher", "site_admin"]
    site: str | None = Field(
        default=None, pattern=_NAME, description="role site_admin only: the site they run"
    )

    @model_validator(mode="after")
    def _site_only_for_site_admins(self) -> APIToken:
        if self.role == "site_admin" and self.site is None:
            raise ValueError(
                f"user {self.user!r} has role site_admin but no site; name the site they run "
                "(e.g. site: cleveland)"
            )
        if self.role != "site_admin" and self.site is not None:
            raise ValueError(
                f"user {self.user!r} has role {self.role} and site {self.site!r}; only a "
                "site_admin token names a site (remove site, or use role site_admin)"
            )
        return self


class CoordinatorConfig(_Model):
    """The coordinator's configuration (``coordinator.yaml``)."""

    name: str = Field(default="coordinator", pattern=_NAME)
    site_link: str = Field(default="127.0.0.1:50051", description="host:port for sites")
    http: str = Field(default="127.0.0.1:8080", description="host:port of the HTTP API")
    dictionary: Path
    store: str = Field(default="sqlite:///coordinator.db", description="SQLAlchemy URL")
    state_dir: Path = Field(default=Path("."))
    tls: TLSFiles | None = None
    crl: Path | None = Field(
        default=None,
        description="the alliance's revocation list (`alliance pki revoke` writes pki/crl.pem); "
        "checked at every site handshake, re-read when it changes",
    )
    insecure: bool = False
    tokens: list[APIToken] = Field(default_factory=list)
    task_timeout_seconds: float = Field(default=30.0, gt=0)
    max_request_bytes: int = Field(
        default=1 << 20, ge=1024, description="largest HTTP request body accepted (413 above)"
    )

    @model_validator(mode="after")
    def _tls_or_insecure(self) -> CoordinatorConfig:
        if self.tls is None and not self.insecure:
            raise ValueError("give tls (ca, cert, key) or set insecure: true for loopback tests")
        return self


# --------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("numeric", "categorical", "binary") and out.startswith("variables."):
            continue  # the discriminator tag pydantic inserts is noise to a reader
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(error: Any) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        allowed = ctx.get("expected", "").replace("'", "")
        return f"{value!r} is not allowed; use one of: {allowed.replace(' or ', ', ')}"
    if kind == "missing":
        return "is required but missing"
    if kind == "extra_forbidden":
        return "is not a known field (check the spelling)"
    if kind == "union_tag_invalid":
        return f"type {ctx.get('tag')!r} is not allowed; use one of: numeric, categorical, binary"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{value!r}: {message}" if not isinstance(value, dict) else message


def format_validation_error(source: str, exc: pydantic.ValidationError) -> str:
    """One line per problem: ``source: field.path: value, what is allowed``."""
    lines = [f"{source}: {_field_path(tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()]
    return "\n".join(lines)


def parse_model(model: type[M], data: Any, source: str) -> M:
    """Validate ``data`` as ``model``; raise ConfigError naming ``source`` and the field."""
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Load and validate a YAML file; relative paths inside stay relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of fields at the top, got {type(data).__name__}"
        )
    model_obj = parse_model(model, data, str(path))
    return _resolve_paths(model_obj, path.parent)


def _resolve_paths(obj: M, base: Path) -> M:
    """Make Path fields absolute relative to the YAML file's folder."""
    updates: dict[str, Any] = {}
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = (base / value).resolve()
        elif isinstance(value, BaseModel) and not isinstance(value, DataDictionary):
            updates[name] = _resolve_paths(value, base)
    return obj.model_copy(update=updates) if updates else obj


def dump_yaml(obj: BaseModel) -> str:
    """A model as YAML (paths as strings), for writing generated configs."""
    return yaml.safe_dump(obj.model_dump(mode="json", exclude_none=True), sort_keys=False)

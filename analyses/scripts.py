"""Researchers' own analyses: a script's per-record contributions, released by the framework.

A script is a Python module with two functions and a manifest:

* ``per_record(frame) -> array (n, k)``: each record's contribution, computed at a site, in the
  sandbox, on the complete cases of the manifest's variables for the filtered, consented rows;
* ``combine(total, n) -> dict``: computed from the pooled totals, in the sandbox, at the
  coordinator (or locally by ``alliance script try``).

The framework, not the script, does the releasing: it validates the contributions' shape and
values, clips each record's contribution to the manifest's bound (L1 norm, or per coordinate),
sums them, and hands the sums to the site's privacy engine: OpenDP Laplace in dp (the L1 bound
is the sensitivity), the disclosure rules in sdc (the differencing guard on the record set,
counts under ``min_cell`` refused, the p% rule on every sum's contributions). A script is known
by the SHA-256 of its bytes (module and manifest), and a site runs only the hashes its admin
approved.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from analyses.base import (
    Analysis,
    AnalysisContext,
    Arrays,
    DistinctNames,
    NextRound,
    Params,
    RoundState,
)
from analyses.registry import analysis
from analyses.results import AnalysisResult
from analyses.sandbox import SandboxLimits, run_function
from protocol.config import DataDictionary, format_validation_error
from protocol.errors import RecordError, ValidationError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec

#: Largest module and manifest a script may have (bytes).
MAX_MODULE_BYTES = 256 << 10
MAX_MANIFEST_BYTES = 16 << 10
#: Most values a record may contribute.
MAX_K = 1000
#: Most rounds an iterative script may declare, and most numbers its public state may hold.
MAX_ROUNDS = 50
MAX_STATE_NUMBERS = 1000
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def check_public_state(state: Mapping[str, Any], where: str) -> dict[str, float | list[float]]:
    """An iterative script's public state: at most 20 names, each a finite number or a flat
    list of finite numbers, at most ``MAX_STATE_NUMBERS`` in all. Returns it as floats.

    Raises:
        ValueError: naming what is wrong (never a value).
    """
    if not isinstance(state, Mapping) or len(state) > 20:
        raise ValueError(f"{where}: a public state is a mapping of at most 20 names")
    out: dict[str, float | list[float]] = {}
    numbers = 0
    for name, value in state.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", name):
            raise ValueError(f"{where}: state names are identifiers, got {str(name)[:64]!r}")
        items = value if isinstance(value, list) else [value]
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in items
        ):
            raise ValueError(f"{where}: {name!r} must be a finite number or a list of them")
        numbers += len(items)
        out[name] = [float(v) for v in items] if isinstance(value, list) else float(value)
    if numbers > MAX_STATE_NUMBERS:
        raise ValueError(f"{where}: a public state holds at most {MAX_STATE_NUMBERS} numbers")
    return out


class ScriptState(RoundState):
    """The public round state of an iterative script: what its combine returned as ``state``."""

    state: dict[str, float | list[float]] = Field(default_factory=dict)


class ContributionBound(BaseModel):
    """How far one record's contribution may reach: the framework clips to it.

    ``l1``: the vector's L1 norm at most ``value`` (scaled down when above), which is the L1
    sensitivity of the sum; dp adds Laplace noise under epsilon. ``per_coordinate``:
    coordinate j in [-value[j], value[j]]; the L1 sensitivity is their sum (Laplace). ``l2``:
    the vector's L2 norm at most ``value``, the L2 sensitivity of the sum; dp adds Gaussian
    noise under zCDP rho, charged to the site's zCDP budget for the study.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    norm: Literal["l1", "l2", "per_coordinate"]
    value: float | list[float]


class ScriptManifest(BaseModel):
    """A script's manifest: what it reads, what it returns per record, and its bound."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    version: str = Field(min_length=1, max_length=32)
    description: str = Field(default="", max_length=2000)
    variables: DistinctNames = Field(min_length=1, max_length=50)
    k: int = Field(ge=1, le=MAX_K, description="values each record contributes")
    bound: ContributionBound
    counts: list[int] = Field(
        default_factory=list,
        description="coordinates that count records: each record gives 0 or 1 there",
    )
    mode: Literal["dp", "sdc"] = Field(description="the privacy mode the script is meant for")
    rounds: int = Field(
        default=1,
        ge=1,
        le=MAX_ROUNDS,
        description="iterative scripts: the most rounds (dp splits the request's budget over "
        "all of them); per_record and combine then take the round's public state last",
    )
    initial_state: dict[str, float | list[float]] = Field(
        default_factory=dict, description="iterative scripts: round 0's public state"
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @model_validator(mode="after")
    def _consistent(self) -> ScriptManifest:
        if self.bound.norm == "per_coordinate":
            values = self.bound.value
            if not isinstance(values, list) or len(values) != self.k:
                raise ValueError(
                    f"a per_coordinate bound lists k = {self.k} values, got {values!r}"
                )
        elif not isinstance(self.bound.value, (int, float)):
            raise ValueError(f"an {self.bound.norm} bound is one number, got {self.bound.value!r}")
        for value in self.bounds_list():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"bounds must be finite numbers above 0, got {value!r}")
        if self.initial_state:
            check_public_state(self.initial_state, "initial_state")
        bad = [j for j in self.counts if not 0 <= j < self.k]
        if bad or len(set(self.counts)) != len(self.counts):
            raise ValueError(
                f"counts are distinct coordinates in 0..{self.k - 1}, got {self.counts}"
            )
        return self

    def bounds_list(self) -> list[float]:
        """The bound's value(s) as a list."""
        value = self.bound.value
        return [float(v) for v in value] if isinstance(value, list) else [float(value)]

    @property
    def gaussian(self) -> bool:
        """Whether dp releases this script's sums with Gaussian noise under zCDP (an L2 bound)."""
        return self.bound.norm == "l2"

    @property
    def sensitivity(self) -> float:
        """The sensitivity of the total (L2 for an l2 bound, else L1): what one record added
        or removed moves it by."""
        values = self.bounds_list()
        return float(sum(values)) if self.bound.norm == "per_coordinate" else values[0]

    def describe(self) -> str:
        """The manifest in words, for reviews and errors."""
        if self.bound.norm in ("l1", "l2"):
            bound = f"{self.bound.norm.upper()} norm at most {self.bounds_list()[0]:g}"
        else:
            bound = "each coordinate within +/- " + ", ".join(f"{b:g}" for b in self.bounds_list())
        return (
            f"reads {', '.join(self.variables)}; returns {self.k} value(s) per record, clipped "
            f"to {bound}; meant for {self.mode}"
        )


def content_hash(domain: bytes, module: str, manifest: str) -> str:
    """SHA-256 over a module and its manifest, length-prefixed so no byte can move between
    them, in its own ``domain`` (a script's hash is never a training app's)."""
    module_bytes, manifest_bytes = module.encode(), manifest.encode()
    digest = hashlib.sha256(domain)
    digest.update(len(module_bytes).to_bytes(8, "big") + module_bytes)
    digest.update(len(manifest_bytes).to_bytes(8, "big") + manifest_bytes)
    return digest.hexdigest()


def manifest_mapping(text: str, where: str) -> dict[str, Any]:
    """A manifest's YAML as a mapping.

    Raises:
        ValidationError: not YAML, or not a mapping.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationError(f"{where}: not YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ValidationError(f"{where}: must be a mapping of fields")
    return raw


@dataclass(frozen=True)
class ScriptBundle:
    """A script's module and manifest, exactly as submitted: its hash covers every byte."""

    module: str
    manifest_text: str

    def __post_init__(self) -> None:
        if len(self.module.encode()) > MAX_MODULE_BYTES:
            raise ValidationError(f"a script module may have at most {MAX_MODULE_BYTES} bytes")
        if len(self.manifest_text.encode()) > MAX_MANIFEST_BYTES:
            raise ValidationError(f"a script manifest may have at most {MAX_MANIFEST_BYTES} bytes")

    @functools.cached_property
    def hash(self) -> str:
        """SHA-256 over both texts, length-prefixed so no byte can move between them."""
        return content_hash(b"alliance-script/1\n", self.module, self.manifest_text)

    @functools.cached_property
    def manifest(self) -> ScriptManifest:
        """The manifest, validated.

        Raises:
            ValidationError: what is wrong with it.
        """
        raw = manifest_mapping(self.manifest_text, "script manifest")
        try:
            return ScriptManifest.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise ValidationError(format_validation_error("script manifest", exc)) from None

    @functools.cached_property
    def label(self) -> str:
        """How people see it: name, version and the hash's start."""
        try:
            manifest = self.manifest
            return f"{manifest.name!r} {manifest.version} (sha256 {self.hash[:12]})"
        except ValidationError:
            return f"(sha256 {self.hash[:12]})"

    def check_source(self) -> None:
        """The module compiles and defines ``per_record`` and ``combine`` at top level."""
        import ast

        try:
            tree = ast.parse(self.module)
        except SyntaxError as exc:
            raise ValidationError(f"script module: line {exc.lineno}: {exc.msg}") from None
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        missing = {"per_record", "combine"} - defined
        if missing:
            raise ValidationError(
                f"script module: defines no {' or '.join(sorted(missing))} function at top level"
            )


class ScriptParams(Params):
    """A script request as a task carries it: the hash and both texts (checked against it)."""

    hash: str
    module: str
    manifest: str

    @model_validator(mode="after")
    def _matches(self) -> ScriptParams:
        if not HASH_PATTERN.match(self.hash):
            raise ValueError(f"hash must be 64 lowercase hex digits, got {self.hash[:80]!r}")
        if ScriptBundle(self.module, self.manifest).hash != self.hash:
            raise ValueError("the script's module and manifest do not match its hash")
        return self

    @functools.cached_property
    def bundle(self) -> ScriptBundle:
        """The script itself."""
        return ScriptBundle(self.module, self.manifest)


@dataclass
class ScriptResult(AnalysisResult):
    """A script's result: what its ``combine`` returned, and the pooled totals it saw.

    Attributes:
        script: the script's name, version and hash.
        estimates: ``combine``'s output (names to numbers or lists of numbers).
        total: the pooled per-coordinate totals (noisy in dp); ``n`` is the pooled record
            count (noisy in dp).
        total_sd: the noise standard deviation of each pooled total (0 when exact).
    """

    script: str = ""
    estimates: dict[str, Any] | None = None
    total: list[float] | None = None
    total_sd: list[float] | None = None

    @property
    def summary(self) -> pd.DataFrame:
        """One row per scalar estimate."""
        rows = [
            {"estimate": name, "value": value}
            for name, value in (self.estimates or {}).items()
            if isinstance(value, (int, float))
        ]
        return pd.DataFrame(rows, columns=["estimate", "value"])


def _check_result(value: Any) -> dict[str, Any]:
    """``combine``'s output: a JSON object of names to numbers or (nested) lists of numbers."""
    if not isinstance(value, dict) or not value:
        raise ValidationError("the script's combine must return a non-empty dict of numbers")
    if len(value) > 100:
        raise ValidationError("the script's combine may return at most 100 named estimates")

    def numeric(item: Any, depth: int) -> bool:
        if isinstance(item, bool):
            return False
        if isinstance(item, (int, float)):
            return True
        return isinstance(item, list) and depth < 3 and all(numeric(x, depth + 1) for x in item)

    for name, item in value.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", str(name)) or not numeric(item, 0):
            raise ValidationError(
                f"the script's combine returned {str(name)[:64]!r}: names are identifiers and "
                "values numbers or lists of numbers"
            )
    return dict(value)


def clip_contributions(
    values: npt.NDArray[np.float64], manifest: ScriptManifest, rows: int
) -> tuple[npt.NDArray[np.float64], int]:
    """Validate ``per_record``'s output and clip each record's contribution to the bound.

    Returns:
        The clipped (rows, k) contributions, and how many records were clipped.

    Raises:
        RecordError: the wrong shape (one row per record, k columns), non-finite values, or a
            count coordinate holding something other than 0 or 1. The words never hold a value.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1 and manifest.k == 1 and array.shape[0] == rows:
        array = array.reshape(rows, 1)
    if array.shape != (rows, manifest.k):
        raise RecordError(
            f"per_record must return one row per record and k = {manifest.k} columns; it "
            f"returned an array of {array.ndim} dimension(s) that is not that shape"
        )
    if not np.isfinite(array).all():
        raise RecordError("per_record returned a non-finite value (NaN or infinity)")
    if manifest.counts:
        counted = array[:, manifest.counts]
        if not np.all((counted == 0) | (counted == 1)):
            raise RecordError(
                "per_record returned a value other than 0 or 1 in a coordinate the manifest "
                "declares a count"
            )
    clipped = array.copy()
    if manifest.bound.norm == "per_coordinate":
        limits = np.asarray(manifest.bounds_list())
        clipped = np.clip(clipped, -limits, limits)
        touched = np.any(clipped != array, axis=1)
    else:
        limit = manifest.bounds_list()[0]
        if manifest.bound.norm == "l2":
            norms = np.sqrt(np.square(clipped).sum(axis=1))
        else:
            norms = np.abs(clipped).sum(axis=1)
        over = norms > limit
        clipped[over] *= (limit / norms[over])[:, None]
        touched = over
    return clipped, int(np.count_nonzero(touched))


def contributions_bytes(rows: int, k: int) -> int:
    """The most output ``per_record`` may write: its (rows, k) float64 array and the header."""
    return rows * k * 8 + 4096


@dataclass(frozen=True)
class Contributions:
    """``per_record``'s output, validated and clipped: (records, k), and how many were clipped."""

    clipped: npt.NDArray[np.float64]
    touched: int
    layers: dict[str, str]


def run_per_record(
    bundle: ScriptBundle,
    data: pd.DataFrame,
    limits: SandboxLimits,
    state: dict[str, Any] | None = None,
) -> Contributions:
    """Run ``per_record`` in the sandbox on the complete cases of the manifest's variables,
    then validate and clip what it returned (as a site does, and ``alliance script try``)."""
    manifest = bundle.manifest
    frame = script_frame(data, manifest)
    run = run_function(
        bundle.label,
        bundle.module,
        "per_record",
        limits,
        frame=frame,
        output_cap=contributions_bytes(len(frame), manifest.k),
        state=state,
    )
    clipped, touched = clip_contributions(run.value, manifest, len(frame))
    return Contributions(clipped, touched, run.layers)


def site_arrays(
    contributions: npt.NDArray[np.float64], manifest: ScriptManifest, mode: str
) -> Arrays:
    """The exact arrays a site releases from clipped contributions: the totals, n, and in sdc
    the count coordinates' totals (for the min_cell rule)."""
    arrays: Arrays = {
        "total": contributions.sum(axis=0),
        "n": np.asarray(float(contributions.shape[0])),
    }
    if mode == "sdc" and manifest.counts:
        arrays["count_cells"] = contributions[:, manifest.counts].sum(axis=0)
    return arrays


def script_frame(data: pd.DataFrame, manifest: ScriptManifest) -> pd.DataFrame:
    """What ``per_record`` sees: the complete cases of the manifest's variables, in a fresh,
    writable frame with a 0..n-1 index (no site row positions)."""
    columns = list(manifest.variables)
    kept = data.loc[data[columns].notna().all(axis=1), columns]
    return pd.DataFrame({c: np.array(kept[c].to_numpy(), copy=True) for c in columns})


@analysis("script")
class ScriptAnalysis(Analysis[ScriptParams]):
    """A reviewed script, released by the framework (see the module docstring)."""

    params_model = ScriptParams
    state_model = ScriptState
    result_type = ScriptResult
    may_finish_early = True  # an iterative script may converge before its last round

    def check_params(self, params: ScriptParams, dictionary: DataDictionary) -> None:
        bundle = params.bundle
        bundle.check_source()
        manifest = bundle.manifest
        for variable in manifest.variables:
            dictionary.variable(variable)

    def variables(self, params: ScriptParams) -> set[str]:
        try:
            return set(params.bundle.manifest.variables)
        except ValidationError:
            return set()

    def reviewed_code(self, params: ScriptParams) -> ScriptBundle | None:
        return params.bundle

    def dp_rounds(self, params: ScriptParams, ctx: AnalysisContext) -> int:
        return params.bundle.manifest.rounds

    def initial_state(self, params: ScriptParams, ctx: AnalysisContext) -> NextRound:
        manifest = params.bundle.manifest
        if manifest.rounds == 1:
            return NextRound()
        return NextRound(state={"state": dict(manifest.initial_state)})

    def check_state(self, state: Any, params: ScriptParams, ctx: AnalysisContext) -> None:
        manifest = params.bundle.manifest
        if manifest.rounds == 1 and state.state:
            raise ValidationError("script round state: a single-round script takes no state")
        if ctx.round >= manifest.rounds:
            raise ValidationError(
                f"script round state: round {ctx.round} is past the script's {manifest.rounds}"
            )
        try:
            check_public_state(state.state, "script round state")
        except ValueError as exc:
            raise ValidationError(str(exc)) from None

    def _round_state(self, params: ScriptParams, ctx: AnalysisContext) -> dict[str, Any] | None:
        if params.bundle.manifest.rounds == 1:
            return None
        return dict(ctx.state.get("state", {}))

    def dp_measure(self, params: ScriptParams) -> str:
        return "zcdp" if params.bundle.manifest.gaussian else "pure"

    def declare(self, params: ScriptParams, ctx: AnalysisContext) -> RecordSpec:
        manifest = params.bundle.manifest
        if manifest.gaussian:  # L2: Gaussian noise under zCDP, for the sums and the count
            main = {
                "total": ArraySpec(
                    (manifest.k,), kind="sum", sensitivity=manifest.sensitivity, norm="l2"
                ),
                "n": ArraySpec((), kind="count", sensitivity=1.0, norm="l2"),
            }
        else:
            main = {
                "total": ArraySpec((manifest.k,), kind="sum", sensitivity=manifest.sensitivity),
                "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True),
            }
        return RecordSpec(
            {
                **main,
                # sdc: the count coordinates' totals, so the min_cell rule applies to them.
                **(
                    {"count_cells": ArraySpec((len(manifest.counts),), kind="count")}
                    if ctx.mode == "sdc" and manifest.counts
                    else {}
                ),
            }
        )

    def _contributions(
        self, data: pd.DataFrame, params: ScriptParams, ctx: AnalysisContext
    ) -> npt.NDArray[np.float64]:
        def build() -> npt.NDArray[np.float64]:
            limits = ctx.sandbox if isinstance(ctx.sandbox, SandboxLimits) else SandboxLimits()
            return run_per_record(params.bundle, data, limits, state).clipped

        state = self._round_state(params, ctx)
        if ctx.cache is None:
            return build()
        key = ("script", params.hash, json.dumps(state, sort_keys=True))
        return ctx.cache.get(key, build, lambda a: a.nbytes)

    def local(self, data: pd.DataFrame, params: ScriptParams, ctx: AnalysisContext) -> Arrays:
        contributions = self._contributions(data, params, ctx)
        return site_arrays(contributions, params.bundle.manifest, ctx.mode)

    def magnitude_cells(
        self, data: pd.DataFrame, params: ScriptParams, ctx: AnalysisContext
    ) -> list[npt.NDArray[np.float64]]:
        manifest = params.bundle.manifest
        contributions = self._contributions(data, params, ctx)
        summed = [j for j in range(manifest.k) if j not in set(manifest.counts)]
        return [contributions[:, j] for j in summed]

    def combine(
        self, records: Mapping[str, AggregateRecord], params: ScriptParams, ctx: AnalysisContext
    ) -> ScriptResult | NextRound:
        bundle = params.bundle
        manifest = bundle.manifest
        total = np.sum([r["total"] for r in records.values()], axis=0)
        n = float(sum(float(r["n"]) for r in records.values()))
        sd = np.sqrt(
            np.sum(
                [np.full(total.shape, r.releases["total"].variance()) for r in records.values()],
                axis=0,
            )
        )
        limits = ctx.sandbox if isinstance(ctx.sandbox, SandboxLimits) else SandboxLimits()
        state = self._round_state(params, ctx)
        run = run_function(
            bundle.label, bundle.module, "combine", limits, total=total, n=n, state=state
        )
        if manifest.rounds > 1 and isinstance(run.value, dict) and "state" in run.value:
            if ctx.round + 1 >= manifest.rounds:
                raise ValidationError(
                    f"script {bundle.label} asked for round {ctx.round + 2}, but its manifest "
                    f"declares rounds: {manifest.rounds}"
                )
            try:
                public = check_public_state(run.value["state"], "the script's next state")
            except ValueError as exc:
                raise ValidationError(str(exc)) from None
            return NextRound(state={"state": public})
        return ScriptResult(
            analysis=self.name,
            script=bundle.label,
            estimates=_check_result(run.value),
            total=[float(v) for v in total],
            n=n,
            total_sd=[float(v) for v in sd],
        )

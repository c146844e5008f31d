"""Studies at the coordinator: their lifecycle, and the scope every request must keep.

A study is created open by the alliance lead and closed by the lead (a closed study takes no
more requests). Every request is checked against its study before any task leaves: the analysis
is one the study allows, its epsilon is within the study's epsilon per request (the sites refuse
more in the same words), its model is no wider than the study's ``max_model_columns`` (counted
from the formula, before any design is built), and every variable it reads, its filter's
included, is in the study's scope. Who may read or run a study is ``coordinator.auth``'s.
"""

from __future__ import annotations

import threading
from typing import Any

from analyses import get_analysis
from analyses.model_size import COLUMN_COUNT_CAP, model_columns
from analyses.scripts import ScriptBundle
from coordinator.store import Store
from protocol.budget import over_request_cap
from protocol.config import AnalysisRequest, DataDictionary, SDCTerms, StudyConfig
from protocol.errors import ValidationError
from protocol.filters import RowFilter, parse_filter

#: A study's states: it takes requests only while open.
OPEN, CLOSED = "open", "closed"


def check_request(study: StudyConfig, request: AnalysisRequest, dictionary: DataDictionary) -> Any:
    """Check a request against its study before any task leaves; return its parsed parameters.

    The cheap refusals come first (an analysis outside the study, an epsilon above its cap, a
    model too wide); parsing the parameters may build a model spec, so the HTTP API runs this
    in a worker thread.

    Raises:
        ValidationError: what is wrong, the bad value and what the study allows.
    """
    if study.analyses and request.analysis not in study.analyses:
        raise ValidationError(
            f"analysis {request.analysis!r} is not part of study {study.id!r}; the study "
            f"allows: {', '.join(study.analyses)}"
        )
    cap = study.privacy.epsilon_per_request
    if request.epsilon is not None and request.epsilon > cap:
        # Sites refuse it too, in the same words; refusing here sends no task at all.
        raise ValidationError(over_request_cap(study.id, request.epsilon, cap))
    rho_cap = study.privacy.rho_per_request
    if request.rho is not None and rho_cap is not None and rho_cap < request.rho:
        raise ValidationError(
            f"study {study.id} allows rho {rho_cap.rho:g} per request at each site; this "
            f"request asks for {request.rho.rho:g}. Lower `rho` in the request"
        )
    analysis = get_analysis(request.analysis)
    size = model_columns(request.analysis, request.params, dictionary)
    if size is not None and size[0] > study.max_model_columns:
        count, what = size
        shown = f"more than {COLUMN_COUNT_CAP:,}" if count > COLUMN_COUNT_CAP else f"{count:,}"
        raise ValidationError(
            f"{what} {shown} model columns; study {study.id} allows at most "
            f"{study.max_model_columns} (max_model_columns). Use fewer interactions or "
            "categorical levels, or ask the alliance lead to raise the study's limit"
        )
    params = analysis.parse_params(request.params, dictionary)
    variables = set(analysis.variables(params))
    row_filter = parse_filter(request.filter, set(dictionary.variables)) if request.filter else None
    if row_filter is not None:
        variables |= row_filter.variables
    if study.privacy.mode == "sdc" and study.sdc is not None:
        _check_sdc_terms(study, study.sdc, row_filter, analysis.model_key(params), dictionary)
    if study.variables:
        outside = sorted(variables - set(study.variables))
        if outside:
            raise ValidationError(
                f"variables {', '.join(outside)} are outside study {study.id!r}'s scope; "
                f"in scope: {', '.join(study.variables)}"
            )
    return params


def check_study_terms(study: StudyConfig, dictionary: DataDictionary) -> None:
    """A study's sdc populations and models parse against the dictionary, and its minimum
    quality names dictionary variables.

    Raises:
        ValidationError: naming the study, the entry and what is wrong with it.
    """
    from analyses.models import canonical_model

    unknown = sorted(set(study.min_quality) - set(dictionary.variables))
    if unknown:
        raise ValidationError(
            f"study {study.id}: min_quality names {unknown}, not in the data dictionary"
        )
    if study.sdc is None:
        return
    for text in study.sdc.populations:
        try:
            parse_filter(text, set(dictionary.variables))
        except ValidationError as exc:
            raise ValidationError(f"study {study.id}: sdc population {text!r}: {exc}") from None
    for text in study.sdc.models:
        try:
            canonical_model(text)
        except ValidationError as exc:
            raise ValidationError(f"study {study.id}: sdc model {text!r}: {exc}") from None


def _check_sdc_terms(
    study: StudyConfig,
    terms: SDCTerms,
    row_filter: RowFilter | None,
    model: str | None,
    dictionary: DataDictionary,
) -> None:
    """sdc: a request's filter and model must be among the study's approved terms (each site
    checks again against its own approval, in the same words)."""
    from analyses.models import canonical_model

    names = set(dictionary.variables)
    if row_filter is not None:
        approved = {parse_filter(text, names).canonical for text in terms.populations}
        if row_filter.canonical not in approved:
            listed = "; ".join(terms.populations) or "none (the whole population only)"
            raise ValidationError(
                f"filter {row_filter.text!r} is not an approved population of study "
                f"{study.id!r} for exact (sdc) releases; approved: {listed}. Free-form filters "
                "are available in dp"
            )
    if model is not None and model not in {canonical_model(m) for m in terms.models}:
        listed = "; ".join(terms.models) or "none"
        raise ValidationError(
            f"model {model!r} is not an approved model of study {study.id!r} for exact (sdc) "
            f"releases; approved: {listed}. Other models run in dp"
        )


class StudyBook:
    """The coordinator's studies over its store, with the open ones kept parsed in memory
    (studies change only through this book, so the copy cannot go stale)."""

    def __init__(self, store: Store, dictionary: DataDictionary) -> None:
        self.store = store
        self.dictionary = dictionary
        self._open: dict[str, StudyConfig] = {}
        self._lock = threading.Lock()

    def get(self, study_id: str) -> tuple[StudyConfig, str] | None:
        """A study and its state, or None when there is no such study."""
        with self._lock:
            if study_id in self._open:
                return self._open[study_id], OPEN
        found = self.store.study(study_id)
        if found is None:
            return None
        study = StudyConfig.model_validate(found["config"])
        if found["status"] == OPEN:
            with self._lock:
                self._open[study_id] = study
        return study, str(found["status"])

    def create(self, study: StudyConfig, actor: str) -> None:
        """Store a new, open study (its id must be new).

        Raises:
            ValidationError: an sdc population or model that does not parse, naming it.
        """
        check_study_terms(study, self.dictionary)
        self.store.create_study(study.model_dump(mode="json"), actor)

    def close(self, study_id: str, actor: str) -> None:
        """Close a study: it takes no more requests."""
        self.store.close_study(study_id, actor)
        with self._lock:
            self._open.pop(study_id, None)

    def all(self) -> list[tuple[dict[str, Any], StudyConfig]]:
        """Every study's listing row with its parsed config, oldest first."""
        out = []
        for row in self.store.studies():
            found = self.store.study(row["id"])
            if found is not None:
                out.append((row, StudyConfig.model_validate(found["config"])))
        return out

    def check_request(self, study: StudyConfig, request: AnalysisRequest) -> Any:
        """:func:`check_request` against this coordinator's dictionary."""
        return check_request(study, request, self.dictionary)

    def submit_script(
        self, study: StudyConfig, module: str, manifest: str, actor: str
    ) -> dict[str, Any]:
        """Keep a researcher's script for ``study`` by its content hash, after checking it
        parses, names its two functions and reads only dictionary variables in the study.

        Raises:
            ValidationError: what is wrong with the script.
        """
        bundle = ScriptBundle(module, manifest)
        bundle.check_source()
        parsed = bundle.manifest
        for variable in parsed.variables:
            self.dictionary.variable(variable)
        outside = sorted(set(parsed.variables) - set(study.variables)) if study.variables else []
        if outside:
            raise ValidationError(
                f"script {bundle.label} reads {', '.join(outside)}, outside study {study.id!r}'s "
                "variables"
            )
        new = self.store.submit_script(
            study.id, bundle.hash, parsed.name, parsed.version, module, manifest, actor
        )
        return {"hash": bundle.hash, "name": parsed.name, "version": parsed.version, "new": new}

    def expand_script(self, study: StudyConfig, request: AnalysisRequest) -> AnalysisRequest:
        """A ``script`` request names its script by hash; its tasks carry the script itself
        (each site checks the text against the hash and its approvals). Other requests are
        returned as they are.

        Raises:
            ValidationError: no such script was submitted to the study.
        """
        if request.analysis != "script":
            return request
        digest = request.params.get("hash")
        if set(request.params) != {"hash"} or not isinstance(digest, str):
            raise ValidationError(
                "a script request's params are {hash: <the hash `alliance script submit` "
                f"printed>}}, got keys {sorted(request.params)}"
            )
        found = self.store.script(study.id, digest.lower())
        if found is None:
            raise ValidationError(
                f"no script with hash {digest[:64]!r} was submitted to study {study.id!r}; "
                "submit it with `alliance script submit MODULE MANIFEST --study "
                f"{study.id}`"
            )
        params = {"hash": found["hash"], "module": found["module"], "manifest": found["manifest"]}
        return request.model_copy(update={"params": params})

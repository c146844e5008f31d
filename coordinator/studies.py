"""Studies at the coordinator: their lifecycle, and the scope every request must keep.

The lifecycle (draft, proposed, active at quorum, suspended, closed; versioned amendments) is
:class:`StudyBook`'s. Every request is checked against its study before any task leaves: the
analysis is one the study allows, its epsilon is within the study's epsilon per request (the
sites refuse more in the same words), its model is no wider than the study's
``max_model_columns`` (counted from the formula, before any design is built), and every
variable it reads, its filter's included, is in the study's scope. Who may read or run a
study is ``coordinator.auth``'s.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from analyses import get_analysis
from analyses.model_size import COLUMN_COUNT_CAP, model_columns
from analyses.training.app import TrainingApp, reviewed_bundle
from coordinator.store import Store
from protocol.audit import canonical_json
from protocol.budget import over_request_cap
from protocol.config import AnalysisRequest, DataDictionary, SDCTerms, StudyConfig
from protocol.errors import ValidationError
from protocol.filters import RowFilter, parse_filter
from protocol.signing import fingerprint, message_signature_valid, study_digest
from protocol.wire import alliance_pb2 as pb

#: A study's states (only an active study takes requests).
DRAFT, PROPOSED, ACTIVE, SUSPENDED, CLOSED = "draft", "proposed", "active", "suspended", "closed"


class StudyStateError(ValidationError):
    """A lifecycle step that the study's state does not allow (HTTP 409)."""


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
    """The coordinator's studies over its store, and their lifecycle.

    States: ``draft`` (the lead's, sent nowhere) -> ``proposed`` (sent to the invited sites for
    review) -> ``active`` once ``quorum`` invited sites approved its current version ->
    ``suspended`` (by the lead; ``resume`` returns it) -> ``closed`` (by the lead, or at its
    end date). Only an active study takes requests; the sites enforce suspension, closing and
    expiry themselves too (``site_node.studies``). An amendment is a new version: each site
    answers under the version it last approved, or refuses.

    Methods that change a study return what the invited sites must be told (the study and its
    state); the caller, on the event loop, hands it to ``SiteRegistry.announce``.
    """

    def __init__(self, store: Store, dictionary: DataDictionary) -> None:
        self.store = store
        self.dictionary = dictionary
        self._lock = threading.RLock()
        # Studies change only through this book, so these copies cannot go stale: each
        # change drops the study's entries (every request reads both).
        self._studies: dict[str, tuple[StudyConfig, str]] = {}
        self._versions: dict[str, dict[str, int]] = {}

    def _forget(self, study_id: str) -> None:
        with self._lock:
            self._studies.pop(study_id, None)
            self._versions.pop(study_id, None)

    def _set_status(
        self, study_id: str, status: str, actor: str, detail: dict[str, Any] | None = None
    ) -> None:
        self.store.set_study_status(study_id, status, actor, detail)
        self._forget(study_id)

    # ------------------------------------------------------------------ reading
    def get(self, study_id: str, today: dt.date | None = None) -> tuple[StudyConfig, str] | None:
        """A study and its state, or None when there is no such study (a study past its end
        date is closed here, audited)."""
        with self._lock:  # a read and its caching never interleave with a change
            cached = self._studies.get(study_id)
            if cached is None:
                found = self.store.study(study_id)
                if found is None:
                    return None
                study = StudyConfig.model_validate(found["config"])
                status = str(found["status"])
                self._studies[study_id] = (study, status)
            else:
                study, status = cached
        today = today or dt.date.today()
        if status != CLOSED and study.expires is not None and today > study.expires:
            with self._lock:
                self._set_status(study.id, CLOSED, "expiry", {"expired": str(study.expires)})
            status = CLOSED
        return study, status

    def _require(
        self, study_id: str, allowed: tuple[str, ...], verb: str
    ) -> tuple[StudyConfig, str]:
        found = self.get(study_id)
        if found is None:
            raise ValidationError(f"study {study_id!r} does not exist")
        study, status = found
        if status not in allowed:
            raise StudyStateError(
                f"cannot {verb} study {study_id!r}: it is {status}; {verb} applies to a study "
                f"that is {' or '.join(allowed)}"
            )
        return study, status

    def all(self) -> list[tuple[dict[str, Any], StudyConfig]]:
        """Every study's listing row with its parsed config, oldest first."""
        out = []
        for row in self.store.studies():
            found = self.get(row["id"])
            if found is not None:
                out.append(({**row, "status": found[1], "version": found[0].version}, found[0]))
        return out

    def approvals(self, study: StudyConfig) -> dict[str, dict[str, Any]]:
        """Each invited site's decision in force (its latest), by site."""
        latest: dict[str, dict[str, Any]] = {}
        for row in self.store.study_decisions(study.id):
            if not study.sites or row["site"] in study.sites:
                latest[row["site"]] = row
        return latest

    def approved_sites(self, study: StudyConfig, version: int | None = None) -> list[str]:
        """Invited sites whose decision in force approves ``version`` (default: the current)."""
        want = study.version if version is None else version
        return sorted(
            site
            for site, row in self.approvals(study).items()
            if row["decision"] == "approved" and int(row["version"]) == want
        )

    def site_versions(self, study: StudyConfig) -> dict[str, int]:
        """The version each site that approved one runs the study under (its latest approved;
        other sites are sent the current version, and refuse it)."""
        with self._lock:
            cached = self._versions.get(study.id)
            if cached is None:
                cached = {
                    site: int(row["version"])
                    for site, row in self.approvals(study).items()
                    if row["decision"] == "approved" and int(row["version"]) <= study.version
                }
                self._versions[study.id] = cached
            return dict(cached)

    # ------------------------------------------------------------------ changing
    def create(
        self, study: StudyConfig, actor: str, draft: bool = False
    ) -> tuple[StudyConfig, str]:
        """Store a new study at version 1, proposed to its sites (or a draft, sent nowhere);
        active at once when enough sites approved it already (an approval in site.yaml).

        Raises:
            ValidationError: an sdc population or model that does not parse, naming it.
        """
        check_study_terms(study, self.dictionary)
        study = study.model_copy(update={"version": 1})
        with self._lock:
            self.store.create_study(
                study.model_dump(mode="json"), actor, DRAFT if draft else PROPOSED
            )
            self._forget(study.id)
            status = DRAFT if draft else self._activate_at_quorum(study, PROPOSED)
        return study, status

    def propose(self, study_id: str, actor: str) -> tuple[StudyConfig, str]:
        """Send a draft to its sites for review."""
        with self._lock:
            study, _ = self._require(study_id, (DRAFT,), "propose")
            self._set_status(study_id, PROPOSED, actor)
            return study, self._activate_at_quorum(study, PROPOSED)

    def amend(self, study: StudyConfig, actor: str) -> tuple[StudyConfig, str]:
        """Keep a new version of a study (its id must exist; its version is set here).

        Raises:
            ValidationError: the terms do not parse, or the study is closed.
        """
        check_study_terms(study, self.dictionary)
        with self._lock:
            current, status = self._require(study.id, (DRAFT, PROPOSED, ACTIVE, SUSPENDED), "amend")
            amended = study.model_copy(update={"version": current.version + 1})
            self.store.amend_study(amended.model_dump(mode="json"), actor)
            self._forget(study.id)
            if status == PROPOSED:
                status = self._activate_at_quorum(amended, status)
            return amended, status

    def suspend(self, study_id: str, actor: str, reason: str) -> tuple[StudyConfig, str]:
        """Stop a study's requests until it is resumed (the sites refuse its tasks too)."""
        with self._lock:
            study, _ = self._require(study_id, (PROPOSED, ACTIVE), "suspend")
            self._set_status(study_id, SUSPENDED, actor, {"reason": reason})
            return study, SUSPENDED

    def resume(self, study_id: str, actor: str) -> tuple[StudyConfig, str]:
        """Lift a suspension: active again at quorum, else proposed."""
        with self._lock:
            study, _ = self._require(study_id, (SUSPENDED,), "resume")
            # active again when enough sites approved some version (each answers under it)
            quorum = len(self.site_versions(study)) >= study.quorum
            status = ACTIVE if quorum else PROPOSED
            self._set_status(study_id, status, actor, {"resumed": True})
            return study, status

    def close(self, study_id: str, actor: str) -> tuple[StudyConfig, str]:
        """Close a study: it takes no more requests, here or at the sites."""
        with self._lock:
            study, _ = self._require(study_id, (DRAFT, PROPOSED, ACTIVE, SUSPENDED), "close")
            self._set_status(study_id, CLOSED, actor)
            return study, CLOSED

    def _activate_at_quorum(self, study: StudyConfig, status: str) -> str:
        approved = self.approved_sites(study)
        if status == PROPOSED and len(approved) >= study.quorum:
            self._set_status(
                study.id, ACTIVE, "quorum", {"version": study.version, "approved_by": approved}
            )
            return ACTIVE
        return status

    def receive_decision(
        self, site: str, decision: pb.StudyDecision, public_key: str
    ) -> tuple[str | None, tuple[StudyConfig, str] | None]:
        """Keep a site's signed decision; a study it brings to quorum becomes active.

        Returns:
            What is wrong with the decision (it is then not kept), or None; and the study with
            its new state when the decision changed it.
        """
        if decision.site != site:
            return f"it names site {decision.site[:64]!r}, not the site that sent it", None
        if not message_signature_valid(decision, public_key):
            return (
                f"its signature does not verify under the site's key {fingerprint(public_key)}",
                None,
            )
        if decision.decision not in ("approved", "refused"):
            return f"unknown decision {decision.decision[:20]!r}", None
        with self._lock:
            found = self.get(decision.study_id)
            if found is None:  # a site.yaml approval of a study not created yet: kept
                versions = []
            else:
                versions = self.store.study_versions(decision.study_id)
                if found[0].sites and site not in found[0].sites:
                    return f"site {site} is not invited to study {decision.study_id!r}", None
            if decision.study_digest:
                matches = [
                    v
                    for v in versions
                    if v["version"] == decision.version
                    and study_digest(canonical_json(v["config"])) == decision.study_digest
                ]
                if not matches:
                    return (
                        f"it approves a text of study {decision.study_id!r} version "
                        f"{decision.version} that this coordinator never sent",
                        None,
                    )
            new = self.store.record_study_decision(
                {
                    "signature": decision.signature,
                    "site": site,
                    "study_id": decision.study_id,
                    "version": decision.version,
                    "study_digest": decision.study_digest,
                    "decision": decision.decision,
                    "reason": decision.reason[:500],
                    "decided_by": decision.decided_by[:128],
                    "decided_at": decision.decided_at[:40],
                    "public_key": public_key,
                    "message": decision.SerializeToString(deterministic=True).hex(),
                }
            )
            self._forget(decision.study_id)
            if not new or found is None or found[1] != PROPOSED:
                return None, None
            status = self._activate_at_quorum(found[0], PROPOSED)
            return None, ((found[0], status) if status != PROPOSED else None)

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
        bundle = reviewed_bundle(module, manifest)
        bundle.check_source()
        parsed = bundle.manifest
        # A training app reads what each request names (checked then); a script, its manifest's.
        read = [] if isinstance(bundle, TrainingApp) else list(bundle.manifest.variables)
        for variable in read:
            self.dictionary.variable(variable)
        outside = sorted(set(read) - set(study.variables)) if study.variables else []
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
        if request.analysis == "train":
            return self._expand_training_app(study, request)
        if request.analysis != "script":
            return request
        digest = request.params.get("hash")
        if set(request.params) != {"hash"} or not isinstance(digest, str):
            raise ValidationError(
                "a script request's params are {hash: <the hash `alliance script submit` "
                f"printed>}}, got keys {sorted(request.params)}"
            )
        found = self._submitted(study, digest, "script")
        params = {"hash": found["hash"], "module": found["module"], "manifest": found["manifest"]}
        return request.model_copy(update={"params": params})

    def _submitted(self, study: StudyConfig, digest: str, what: str) -> dict[str, Any]:
        found = self.store.script(study.id, digest.lower())
        if found is None:
            raise ValidationError(
                f"no {what} with hash {digest[:64]!r} was submitted to study {study.id!r}; "
                "submit it with `alliance script submit MODULE MANIFEST --study "
                f"{study.id}`"
            )
        return found

    def _expand_training_app(self, study: StudyConfig, request: AnalysisRequest) -> AnalysisRequest:
        """A training request names its app by hash (``params.app``); the app must have been
        submitted to the study, as a training app, and its tasks carry its texts."""
        digest = request.params.get("app")
        extra = {"module", "manifest"} & set(request.params)
        if not isinstance(digest, str) or extra:
            raise ValidationError(
                "a train request names its training app by hash: params.app = <the hash "
                "`alliance script submit` printed>; module and manifest are filled in by the "
                f"coordinator (got keys {sorted(request.params)})"
            )
        found = self._submitted(study, digest, "training app")
        bundle = reviewed_bundle(found["module"], found["manifest"])
        if not isinstance(bundle, TrainingApp):
            raise ValidationError(
                f"{bundle.label} is a script, not a training app (its manifest has no "
                "kind: flower_client_app)"
            )
        params = {
            **request.params,
            "app": found["hash"],
            "module": found["module"],
            "manifest": found["manifest"],
        }
        return request.model_copy(update={"params": params})

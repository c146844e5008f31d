"""Studies at a site: the coordinator's notices and the admin's signed decisions.

The coordinator sends a signed :class:`StudyNotice` whenever a study the site is invited to is
proposed, amended, suspended, resumed or closed, and at every connect; the site keeps each one
(``study_notices``, audited). Its admin reads the study with ``alliance site review``, then
approves or refuses one version with ``alliance site approve | refuse``: the decision is signed
with the site's Ed25519 key, kept in the site's store (``study_decisions``, audited), sent to
the coordinator over the link, and in force from the next task, without a restart.

An approval in ``site.yaml`` (``policy.studies``) is a decision too: the site records it, signed
by ``site.yaml``, when it starts with terms it has not recorded before. The latest decision on a
study is the one in force, wherever it came from.

Every task is checked here before the policy sees it (:meth:`StudyGate.approval`): the study
must be approved at the task's version, not refused, not suspended or closed by the lead's
latest notice (a closed study stays closed here, whatever a later notice says), and within its
dates: the approval's ``starts``, and the study's own ``starts`` and ``expires`` as the latest
notice gave them (the approval's ``expires`` is the policy's check).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from typing import Any

from protocol.audit import canonical_json
from protocol.config import DataDictionary, StudyApproval, StudyConfig
from protocol.errors import RefusedError, ValidationError
from protocol.signing import SigningKey, sign_message
from protocol.wire import alliance_pb2 as pb
from site_node.ledger import SiteStore, now

APPROVED, REFUSED = "approved", "refused"
#: the study states a coordinator's notice may carry
NOTICE_STATES = ("proposed", "active", "suspended", "closed")
#: the source of a decision recorded from site.yaml (its signer is named ``site.yaml``)
SITE_YAML = "site.yaml"


def approval_terms(
    study: StudyConfig, dictionary: DataDictionary, base: StudyApproval | None = None
) -> StudyApproval:
    """This site's terms for approving ``study`` at its version.

    With ``base`` (the site's own approval in site.yaml) the site's terms stay and only the
    version changes; otherwise they are the study's: its mode, budget and epsilon per request,
    analyses, sdc populations and models, purpose and dates, and the sensitive variables the
    study names in its scope (none when it names no scope).
    """
    if base is not None:
        return base.model_copy(update={"version": study.version})
    sensitive = dictionary.classed("sensitive")
    return StudyApproval(
        id=study.id,
        version=study.version,
        mode=study.privacy.mode,
        budget=study.privacy.budget,
        epsilon_per_request=study.privacy.epsilon_per_request,
        analyses=list(study.analyses) or None,
        starts=study.starts,
        expires=study.expires,
        rho_per_request=study.privacy.rho_per_request,
        populations=list(study.sdc.populations) if study.sdc else [],
        models=list(study.sdc.models) if study.sdc else [],
        sensitive_variables=sorted(set(study.variables) & sensitive),
        purpose=study.purpose,
    )


def signed_decision(
    site: str,
    key: SigningKey,
    study_id: str,
    version: int,
    digest: str,
    approve: bool,
    by: str,
    reason: str = "",
    terms: StudyApproval | None = None,
) -> pb.StudyDecision:
    """A decision on one study version, signed with the site's key."""
    decision = pb.StudyDecision(
        site=site,
        study_id=study_id,
        version=version,
        study_digest=digest,
        decision=APPROVED if approve else REFUSED,
        reason=reason,
        decided_by=by,
        decided_at=now(),
        terms_json=terms.model_dump_json() if terms is not None else "",
    )
    sign_message(decision, key)
    return decision


def study_json(study: StudyConfig) -> str:
    """A study version's canonical JSON (what a notice carries and a site approves)."""
    return canonical_json(study.model_dump(mode="json"))


class StudyGate:
    """A site's decisions on studies, consulted at every task."""

    def __init__(
        self,
        store: SiteStore,
        site: str,
        key: SigningKey,
        site_yaml: list[StudyApproval] | None = None,
    ) -> None:
        self.store = store
        self.site = site
        self.key = key
        # site.yaml's approvals: recorded as decisions at start; until then (or in a runtime
        # that records nothing) they hold for a study with no decision in the store.
        self.site_yaml = list(site_yaml or [])

    def adopt_site_yaml(self, approvals: list[StudyApproval] | None = None) -> list[str]:
        """Record each site.yaml approval whose terms were never recorded from site.yaml
        (a first start, or an edited entry), and a refusal for each study whose decision in
        force is a site.yaml approval no longer listed; return the studies recorded."""
        approvals = self.site_yaml if approvals is None else approvals
        history = self.store.decisions()
        seen = {(d.study_id, d.terms_json) for _, source, d in history if source == SITE_YAML}
        in_force = {d.study_id: (source, d) for _, source, d in history}
        recorded = []
        listed = {approval.id for approval in approvals}
        for study_id, (source, decision) in sorted(in_force.items()):
            # An approval taken out of site.yaml ends: the admin's edit is a refusal.
            if source == SITE_YAML and decision.decision == APPROVED and study_id not in listed:
                refusal = signed_decision(
                    self.site,
                    self.key,
                    study_id,
                    decision.version,
                    "",
                    False,
                    SITE_YAML,
                    "removed from site.yaml",
                )
                self.store.record_decision(refusal, SITE_YAML)
                recorded.append(study_id)
        for approval in approvals:
            terms = approval.model_dump_json()
            if (approval.id, terms) in seen:
                continue
            decision = signed_decision(
                self.site,
                self.key,
                approval.id,
                approval.version,
                "",
                True,
                SITE_YAML,
                "",
                approval,
            )
            self.store.record_decision(decision, SITE_YAML)
            recorded.append(approval.id)
        return recorded

    def latest(self) -> list[pb.StudyDecision]:
        """Each study's decision in force, signed (what the Hello reports)."""
        return list(self.store.latest_decisions().values())

    def approval(self, study_id: str, version: int, today: dt.date | None = None) -> StudyApproval:
        """The approval a task of ``study_id`` at ``version`` runs under here.

        Raises:
            RefusedError: code ``policy``, saying which decision or notice stops it.
        """
        decision = self.store.latest_decision(study_id)
        from_yaml = next((a for a in self.site_yaml if a.id == study_id), None)
        if decision is None and from_yaml is not None:
            decision = pb.StudyDecision(
                study_id=study_id, decision=APPROVED, terms_json=from_yaml.model_dump_json()
            )
        if decision is None:
            decisions = self.store.latest_decisions()
            approved = sorted(
                {d.study_id for d in decisions.values() if d.decision == APPROVED}
                | {a.id for a in self.site_yaml if a.id not in decisions}
            )
            if not approved:
                raise RefusedError(
                    f"no study is approved at this site ({self.site}); its admin reviews study "
                    f"{study_id!r} with `alliance site review {study_id}` and approves it with "
                    f"`alliance site approve {study_id}`",
                    code="policy",
                )
            raise RefusedError(
                f"study {study_id!r} is not approved at this site ({self.site}); approved: "
                f"{', '.join(approved)}",
                code="policy",
            )
        if decision.decision == REFUSED:
            raise RefusedError(
                f"study {study_id!r} was refused at this site ({self.site}) by its admin on "
                f"{decision.decided_at[:10]}: {decision.reason or 'no reason given'}",
                code="policy",
            )
        notices = self.store.notice_states(study_id)
        if any(state == "closed" for state, *_ in notices):
            raise RefusedError(
                f"study {study_id!r} was closed by the alliance lead; this site answers none of "
                "its tasks",
                code="policy",
            )
        if notices and notices[-1][0] == "suspended":
            raise RefusedError(
                f"study {study_id!r} is suspended by the alliance lead (notice of "
                f"{notices[-1][1][:19]}); this site answers none of its tasks until "
                "it is resumed",
                code="policy",
            )
        approval = StudyApproval.model_validate_json(decision.terms_json)
        if version != approval.version:
            raise RefusedError(
                f"the task runs study {study_id!r} at version {version}, and this site "
                f"approved version {approval.version}; its admin reviews the change with "
                f"`alliance site review {study_id}`",
                code="policy",
            )
        _check_dates(study_id, approval, notices[-1] if notices else None, today)
        return approval

    def receive_notice(self, notice: pb.StudyNotice) -> str | None:
        """Keep a notice (signature already checked); return what is wrong with it, or None."""
        if notice.state not in NOTICE_STATES:
            return f"unknown state {notice.state[:20]!r}"
        try:
            study = StudyConfig.model_validate_json(notice.study_json)
        except ValueError:
            return "its study is not a valid study"
        if (study.id, study.version) != (notice.study_id, notice.version):
            return "its study's id or version differs from the notice's"
        self.store.receive_notice(
            notice,
            str(study.starts) if study.starts else "",
            str(study.expires) if study.expires else "",
        )
        return None


def _check_dates(
    study_id: str,
    approval: StudyApproval,
    notice: tuple[str, str, str, str] | None,
    today: dt.date | None,
) -> None:
    """The approval's start date, and the study's own dates as the lead's latest notice gave
    them (so an approval from site.yaml, which names no dates, still ends with the study)."""
    today = today or dt.date.today()
    starts, expires = approval.starts, None
    if notice is not None:
        _, _, noticed_starts, noticed_expires = notice
        if noticed_starts:
            noticed = dt.date.fromisoformat(noticed_starts)
            starts = noticed if starts is None else max(starts, noticed)
        if noticed_expires:
            expires = dt.date.fromisoformat(noticed_expires)
    if starts is not None and today < starts:
        raise RefusedError(
            f"study {study_id!r} starts on {starts}; no task of it runs here before",
            code="policy",
        )
    if expires is not None and today > expires:
        raise RefusedError(
            f"study {study_id!r} ended on {expires}; this site answers none of its tasks",
            code="policy",
        )


def study_at(store: SiteStore, study_id: str, version: int | None = None) -> StudyConfig:
    """A study as the coordinator's notices brought it (the newest version, or ``version``).

    Raises:
        ValidationError: no notice of that study (or version) has reached this site.
    """
    found = [n for n in store.notices(study_id) if version is None or n["version"] == version]
    if not found:
        which = f"study {study_id!r}" + (f" version {version}" if version else "")
        raise ValidationError(
            f"{which} has not reached this site: the coordinator sends a study to its invited "
            "sites when the lead proposes it (the site must be connected)"
        )
    return StudyConfig.model_validate_json(found[-1]["study_json"])


def _describe_terms(approval: StudyApproval) -> list[str]:
    def eps(value: Any) -> str:
        return f"{value.epsilon:g}" if value is not None else "-"

    analyses = (
        "any on the site allow-list"
        if approval.analyses is None
        else ", ".join(approval.analyses) or "none"
    )
    lines = [
        f"  mode:         {approval.mode}",
        f"  budget:       epsilon {eps(approval.budget)} at this site; at most "
        f"{eps(approval.epsilon_per_request)} per request",
        f"  analyses:     {analyses}",
        f"  purpose:      {approval.purpose}",
        f"  dates:        {approval.starts or 'from approval'} to "
        f"{approval.expires or 'no end date'}",
        f"  sensitive:    {', '.join(approval.sensitive_variables) or 'none'}",
    ]
    if approval.mode == "sdc":
        lines.append(f"  populations:  {'; '.join(approval.populations) or 'the whole population'}")
        lines.append(f"  models:       {'; '.join(approval.models) or 'none'}")
    return lines


def _changes(old: StudyConfig, new: StudyConfig) -> list[str]:
    """What changed between two versions, field by field."""
    before = old.model_dump(mode="json", exclude={"version"})
    after = new.model_dump(mode="json", exclude={"version"})
    lines = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            lines.append(
                f"  {name}: {json.dumps(before.get(name))} -> {json.dumps(after.get(name))}"
            )
    return lines or ["  nothing but the version number"]


def review_lines(
    store: SiteStore,
    site: str,
    study_id: str,
    dictionary: DataDictionary,
    yaml_approval: StudyApproval | None,
) -> list[str]:
    """A readable summary of what the study may do with this site's data, and what changed
    since the version this site last approved.

    Raises:
        ValidationError: the study has not reached this site.
    """
    study = study_at(store, study_id)
    notices = store.notices(study_id)
    state = notices[-1]["state"]
    decision = store.latest_decisions().get(study_id)
    if decision is None:
        standing = "no decision yet"
    else:
        standing = f"{decision.decision} version {decision.version} on {decision.decided_at[:10]}"
        if decision.decision == REFUSED:
            standing += f" ({decision.reason})"
    lines = [
        f"study {study.id} version {study.version}: {study.title}",
        f"  state:        {state} (the alliance lead's latest notice)",
        f"  here:         {standing}",
        f"  lead:         {study.lead or '-'}; agreement: {study.agreement or '-'}",
        f"  researchers:  {', '.join(study.researchers) or 'the alliance lead only'}",
        f"  variables:    {', '.join(study.variables) or 'the whole data dictionary'}",
        f"  quorum:       {study.quorum} site(s) of {', '.join(study.sites) or 'every site'}",
        "what this study may do with this site's data if approved:",
        *_describe_terms(approval_terms(study, dictionary, yaml_approval)),
    ]
    if yaml_approval is not None:
        lines.append("  (the terms are this site's own, from site.yaml policy.studies)")
    if decision is not None and decision.decision == APPROVED and decision.version != study.version:
        try:
            earlier = study_at(store, study_id, decision.version)
        except ValidationError:
            lines.append(f"changed since version {decision.version}: (that version was not kept)")
        else:
            lines.append(f"changed since version {decision.version}, the one approved here:")
            lines.extend(_changes(earlier, study))
    return lines


def decision_lines(store: SiteStore) -> list[str]:
    """The decision in force on each study here, and the lead's latest notice of it."""
    try:
        decisions = store.latest_decisions()
        notices = {n["study_id"]: n for n in store.notices()}
    except sqlite3.OperationalError:  # a store from before study decisions: none yet
        decisions, notices = {}, {}
    if not decisions and not notices:
        return ["study decisions: none yet (`alliance site approve STUDY` once a study arrives)"]
    lines = ["study decisions in force here (the latest of each study):"]
    for study_id in sorted(set(decisions) | set(notices)):
        decision = decisions.get(study_id)
        notice = notices.get(study_id)
        state = f"; the lead says: {notice['state']}, version {notice['version']}" if notice else ""
        if decision is None:
            lines.append(f"  study {study_id}: no decision yet{state}")
            continue
        by = decision.decided_by or "?"
        what = (
            f"{decision.decision} version {decision.version} on {decision.decided_at[:10]} by {by}"
        )
        if decision.decision == REFUSED:
            what += f" ({decision.reason})"
        lines.append(f"  study {study_id}: {what}{state}")
    return lines

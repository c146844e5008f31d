"""Default deny: a site runs nothing it has not approved.

A task passes only when its study is approved here and not expired, its analysis is on the
site's allow-list (and on the study approval's own list, if it has one), it reads no variable on
the site's negative list, every variable it reads is allowed by its sensitivity class, and its
privacy mode is one the site accepts for that study. In sdc, the filter and the model must be
ones the approval lists (``sdc_filters: approved``, the default), or with ``sdc_filters: free``
the filter may read neither a quasi-identifier nor a variable whose exact values the release
carries (a filter pinning them, ``chol == 234``, would unmask a record among known values).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from protocol.config import DataDictionary, SitePolicy, StudyApproval, stricter_mode
from protocol.errors import ConfigError, RefusedError, ValidationError
from protocol.filters import RowFilter, parse_filter


@dataclass(frozen=True)
class TaskScope:
    """What a task reads, as the site's policy needs to see it.

    Attributes:
        analysis: the registered analysis's name.
        variables: every variable the analysis reads (not the filter's).
        coarsened: those it reads only through public bins or levels.
        row_filter: the parsed filter, or None.
        model: the canonical model of a glm or cox task, else None.
    """

    analysis: str
    variables: frozenset[str]
    coarsened: frozenset[str] = frozenset()
    row_filter: RowFilter | None = None
    model: str | None = None
    filter_variables: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = self.row_filter.variables if self.row_filter is not None else frozenset()
        object.__setattr__(self, "filter_variables", frozenset(names))


def canonical_filter(row_filter: RowFilter | None) -> str:
    """A filter's canonical text (whitespace and redundant parentheses removed); "" for none."""
    return "" if row_filter is None else row_filter.canonical


def check_approval_terms(
    approval: StudyApproval, dictionary: DataDictionary, source: str = "policy"
) -> None:
    """Check an approval's populations and models once, when the site loads its policy.

    Raises:
        ConfigError: naming the study, the entry and what is wrong with it.
    """
    from analyses.models import canonical_model

    where = f"{source}: study {approval.id}"
    for text in approval.populations:
        try:
            parse_filter(text, set(dictionary.variables))
        except ValidationError as exc:
            raise ConfigError(f"{where}: population {text!r}: {exc}") from None
    for text in approval.models:
        try:
            canonical_model(text)
        except ValidationError as exc:
            raise ConfigError(f"{where}: model {text!r}: {exc}") from None
    unknown = sorted(set(approval.sensitive_variables) - set(dictionary.variables))
    if unknown:
        raise ConfigError(f"{where}: sensitive_variables {unknown} are not in the dictionary")
    unknown = sorted(set(approval.min_quality) - set(dictionary.variables))
    if unknown:
        raise ConfigError(f"{where}: min_quality names {unknown}, not in the dictionary")


def _check_classes(
    scope: TaskScope, approval: StudyApproval, dictionary: DataDictionary, mode: str
) -> None:
    """Identifiers never; sensitive variables only where named; quasi-identifiers in sdc only
    coarsened (and in a free-form filter never)."""
    read = scope.variables | scope.filter_variables
    identifiers = sorted(read & dictionary.classed("identifier"))
    if identifiers:
        raise RefusedError(
            f"{', '.join(identifiers)}: an identifier in the data dictionary, never analysed, "
            "filtered on or released",
            code="policy",
        )
    sensitive = sorted((read & dictionary.classed("sensitive")) - set(approval.sensitive_variables))
    if sensitive:
        raise RefusedError(
            f"{', '.join(sensitive)}: sensitive in the data dictionary, and this site's "
            f"approval of study {approval.id!r} does not name it (sensitive_variables); ask "
            "the site admin",
            code="policy",
        )
    if mode != "sdc":
        return
    quasi = dictionary.classed("quasi-identifier")
    exact = sorted((scope.variables - scope.coarsened) & quasi)
    if exact:
        raise RefusedError(
            f"{', '.join(exact)}: a quasi-identifier, which sdc releases only on public bins or "
            f"levels (histogram, table), never as exact values in {scope.analysis}; use dp",
            code="policy",
        )


def _check_sdc_terms(scope: TaskScope, approval: StudyApproval, dictionary: DataDictionary) -> None:
    """sdc: only approved populations and models, or free filters that pin nothing."""
    if approval.sdc_filters == "approved":
        asked = canonical_filter(scope.row_filter)
        approved = {
            canonical_filter(parse_filter(p, set(dictionary.variables)))
            for p in approval.populations
        }
        if asked and asked not in approved:
            listed = "; ".join(approval.populations) or "none (the whole population only)"
            raise RefusedError(
                f"filter {scope.row_filter.text if scope.row_filter else ''!r} is not an "
                f"approved population of study {approval.id!r} for exact (sdc) releases here; "
                f"approved: {listed}. Free-form filters are available in dp",
                code="policy",
            )
        if scope.model is not None:
            from analyses.models import canonical_model

            models = {canonical_model(m) for m in approval.models}
            if scope.model not in models:
                listed = "; ".join(approval.models) or "none"
                raise RefusedError(
                    f"model {scope.model!r} is not an approved model of study {approval.id!r} "
                    f"for exact (sdc) releases here; approved: {listed}. Other models run in dp",
                    code="policy",
                )
        return
    pinned = sorted(scope.filter_variables & (scope.variables - scope.coarsened))
    quasi = sorted(scope.filter_variables & dictionary.classed("quasi-identifier"))
    if pinned or quasi:
        names = ", ".join(sorted(set(pinned) | set(quasi)))
        raise RefusedError(
            f"a free-form sdc filter may not read {names}: a filter on a variable whose exact "
            "values the release carries (or on a quasi-identifier) can single out a record "
            "among known values. Use an approved population, or dp",
            code="policy",
        )


def check_task(
    policy: SitePolicy,
    site: str,
    study_id: str,
    scope: TaskScope,
    requested_mode: str,
    dictionary: DataDictionary,
    today: dt.date | None = None,
) -> tuple[StudyApproval, str]:
    """The study's approval and the effective privacy mode, or a policy refusal.

    Raises:
        RefusedError: with code ``policy`` and the reason in plain words.
    """
    if not policy.studies:
        raise RefusedError(
            f"no study is approved at this site ({site}); the site admin must approve "
            f"study {study_id!r} first",
            code="policy",
        )
    approval = policy.approval(study_id)
    if approval is None:
        approved = ", ".join(a.id for a in policy.studies)
        raise RefusedError(
            f"study {study_id!r} is not approved at this site ({site}); approved: {approved}",
            code="policy",
        )
    today = today or dt.date.today()
    if approval.expires is not None and today > approval.expires:
        raise RefusedError(
            f"this site's approval of study {study_id!r} expired on {approval.expires}",
            code="policy",
        )
    analysis = scope.analysis
    if analysis not in policy.allowed_analyses:
        allowed = ", ".join(policy.allowed_analyses) or "nothing"
        raise RefusedError(
            f"analysis {analysis!r} is not on this site's allow-list; allowed: {allowed}",
            code="policy",
        )
    if approval.analyses is not None and analysis not in approval.analyses:
        raise RefusedError(
            f"analysis {analysis!r} is not approved for study {study_id!r} here; approved: "
            f"{', '.join(approval.analyses) or 'nothing'}",
            code="policy",
        )
    denied = sorted((scope.variables | scope.filter_variables) & set(policy.denied_variables))
    if denied:
        raise RefusedError(
            f"variables {', '.join(denied)} are on this site's negative list and are never "
            "analysed here",
            code="policy",
        )
    mode = stricter_mode(requested_mode, approval.mode)
    _check_classes(scope, approval, dictionary, mode)
    if mode == "sdc":
        _check_sdc_terms(scope, approval, dictionary)
    return approval, mode

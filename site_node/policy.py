"""Default deny: a site runs nothing it has not approved.

A task passes only when its study is approved here and not expired, its analysis is on the
site's allow-list (and on the study approval's own list, if it has one), it reads no variable on
the site's negative list, and its privacy mode is one the site accepts for that study.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from protocol.config import SitePolicy, StudyApproval, stricter_mode
from protocol.errors import RefusedError


def check_task(
    policy: SitePolicy,
    site: str,
    study_id: str,
    analysis: str,
    variables: Iterable[str],
    requested_mode: str,
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
    denied = sorted(set(variables) & set(policy.denied_variables))
    if denied:
        raise RefusedError(
            f"variables {', '.join(denied)} are on this site's negative list and are never "
            "analysed here",
            code="policy",
        )
    mode = stricter_mode(requested_mode, approval.mode)
    return approval, mode

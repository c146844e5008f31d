"""The study report: what ran in a study, what it cost each site and researcher, who refused
what and why, and each site's contribution, written as Markdown, HTML and JSON.

Built from the coordinator's store only (online through the API, or offline on a kept folder
with ``alliance study report ID --coordinator PATH``): the figures are what each site reported
with its replies, which its ledger charged in the same transaction. It holds results-level
facts only (statuses, budgets, noisy counts already released to the study), never a site's
released arrays.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.store import Store
from protocol.budget import PureDP, format_epsilon
from protocol.errors import ConfigError, ValidationError
from protocol.signing import fingerprint


@dataclass
class Contribution:
    """One site's part in a study."""

    site: str
    analyses: int = 0  # requests it contributed to
    refused: int = 0
    failed: int = 0  # timeouts, drops and errors
    epsilon: PureDP = field(default_factory=lambda: PureDP(0.0))
    rho: float = 0.0
    records: float | None = None  # its largest contribution (noisy where private)
    noisy: bool = False
    receipts: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain fields; epsilon as a number."""
        return {
            "site": self.site,
            "analyses": self.analyses,
            "refused": self.refused,
            "failed": self.failed,
            "epsilon": self.epsilon.epsilon,
            "rho": self.rho,
            "records": self.records,
            "records_noisy": self.noisy,
            "receipts": self.receipts,
        }


@dataclass
class StudyReport:
    """Everything the report shows, as data (``to_json``) and as documents."""

    study: dict[str, Any]
    status: str
    created: str
    requests: list[dict[str, Any]]
    contributions: list[Contribution]
    by_researcher: dict[str, dict[str, float]]
    refusals: list[dict[str, Any]]
    sites_joined: list[dict[str, Any]]
    approvals: list[dict[str, Any]] = field(default_factory=list)
    #: per training request with credit asked for: each site's Shapley value and leave-one-out
    #: difference of the model's held-out AUC
    model_credit: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON document."""
        return {
            "study": {
                "id": self.study["id"],
                "title": self.study.get("title", ""),
                "purpose": self.study.get("purpose", ""),
                "status": self.status,
                "created": self.created,
                "invited_sites": list(self.study.get("sites") or []),
                "privacy": self.study.get("privacy", {}),
                "version": int(self.study.get("version", 1)),
                "quorum": int(self.study.get("quorum", 1)),
                "lead": self.study.get("lead", ""),
                "agreement": self.study.get("agreement", ""),
            },
            "approvals": self.approvals,
            "requests": self.requests,
            "privacy_spent": {
                "by_site": {c.site: c.epsilon.epsilon for c in self.contributions},
                "rho_by_site": {c.site: c.rho for c in self.contributions if c.rho},
                "by_researcher": self.by_researcher,
            },
            "refusals": self.refusals,
            "contributions": [c.to_json() for c in self.contributions],
            "model_credit": self.model_credit,
            "sites_joined": self.sites_joined,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> StudyReport:
        """A report from :meth:`to_json` (what the API returns)."""
        study = body["study"]
        contributions = [
            Contribution(
                site=c["site"],
                analyses=int(c["analyses"]),
                refused=int(c["refused"]),
                failed=int(c["failed"]),
                epsilon=PureDP(float(c["epsilon"])),
                rho=float(c["rho"]),
                records=c["records"],
                noisy=bool(c["records_noisy"]),
                receipts=int(c["receipts"]),
            )
            for c in body["contributions"]
        ]
        return cls(
            study={
                "id": study["id"],
                "title": study["title"],
                "purpose": study["purpose"],
                "sites": study["invited_sites"],
                "privacy": study["privacy"],
                "version": study.get("version", 1),
                "quorum": study.get("quorum", 1),
                "lead": study.get("lead", ""),
                "agreement": study.get("agreement", ""),
            },
            approvals=list(body.get("approvals", [])),
            status=study["status"],
            created=study["created"],
            requests=list(body["requests"]),
            contributions=contributions,
            by_researcher=dict(body["privacy_spent"]["by_researcher"]),
            refusals=list(body["refusals"]),
            sites_joined=list(body["sites_joined"]),
            model_credit=list(body.get("model_credit", [])),
        )

    # ------------------------------------------------------------------ documents
    def _sections(self) -> list[tuple[str, list[str], list[list[str]], str]]:
        """(title, header, rows, note) per table, shared by Markdown and HTML."""
        contributions = [
            [
                c.site,
                _records(c),
                str(c.analyses),
                str(c.refused),
                str(c.failed),
                format_epsilon(c.epsilon.epsilon),
                f"{c.rho:.4g}" if c.rho else "0",
                str(c.receipts),
            ]
            for c in self.contributions
        ]
        researchers = [
            [who, site, format_epsilon(spent)]
            for who, sites in sorted(self.by_researcher.items())
            for site, spent in sorted(sites.items())
        ]
        requests = [
            [
                r["request_id"],
                r["created"],
                r["researcher"],
                r["analysis"],
                r["status"],
                r["error"] or "",
            ]
            for r in self.requests
        ]
        refusals = [
            [r["request_id"], r["site"], r["status"], r["code"] or "", r["reason"] or ""]
            for r in self.refusals
        ]
        joined = [[s["site"], s["first_seen"], s["key"]] for s in self.sites_joined]
        approvals = [
            [a["site"], str(a["version"]), a["decision"], a["decided_at"], a["reason"] or ""]
            for a in self.approvals
        ]
        credit = [
            [
                c["request_id"],
                c["site"],
                "" if c["shapley"] is None else f"{c['shapley']:+.4f}",
                f"{c['leave_one_out']:+.4f}",
                c["method"],
            ]
            for c in self.model_credit
        ]
        return [
            (
                "Approvals",
                ["site", "version", "decision", "decided", "reason"],
                approvals,
                "Each decision is signed with the site's own key (verified on arrival); the "
                "latest decision of a site is the one in force. A site answers a task only under "
                "the version it last approved (default deny).",
            ),
            (
                "Contributions",
                [
                    "site",
                    "records",
                    "analyses",
                    "refused",
                    "failed",
                    "epsilon spent",
                    "rho",
                    "signed receipts",
                ],
                contributions,
                "records: the site's largest contribution to one analysis; `~` marks a noisy "
                "count (differential privacy). epsilon spent: what the site's ledger charged "
                "for this study's requests, as it reported with each reply.",
            ),
            (
                "Credit for trained models",
                ["request", "site", "Shapley value", "leave-one-out", "method"],
                credit,
                "Each site's share of a trained model's held-out AUC: its Shapley value over "
                "coalition models trained alongside on subsets of the sites (exact up to 6 sites, "
                "sampled orders beyond; the values add up to the AUC gained over the initial "
                "model), and how much the AUC drops without it. Noisy under dp.",
            ),
            (
                "Privacy spent per researcher",
                ["researcher", "site", "epsilon"],
                researchers,
                "",
            ),
            (
                "Requests",
                ["request", "submitted", "researcher", "analysis", "status", "error"],
                requests,
                "",
            ),
            (
                "Refusals and failures",
                ["request", "site", "status", "code", "reason"],
                refusals,
                "",
            ),
            (
                "Sites that took part",
                ["site", "first answered", "signing key (fingerprint)"],
                joined,
                "",
            ),
        ]

    def _facts(self) -> list[tuple[str, str]]:
        privacy = self.study.get("privacy") or {}
        return [
            ("Study", f"{self.study['id']}: {self.study.get('title', '')}"),
            ("Purpose", str(self.study.get("purpose", ""))),
            ("Status", f"{self.status}, version {self.study.get('version', 1)}"),
            ("Lead", str(self.study.get("lead") or "-")),
            ("Data-sharing agreement", str(self.study.get("agreement") or "-")),
            ("Created", self.created),
            ("Invited sites", ", ".join(self.study.get("sites") or []) or "every connected site"),
            (
                "Privacy",
                f"{privacy.get('mode', 'dp')}, epsilon {privacy.get('epsilon_per_request', '')} "
                f"per request, budget {privacy.get('budget', '')} per site",
            ),
        ]

    def to_markdown(self) -> str:
        """The report as Markdown."""
        lines = [f"# Study report: {self.study['id']}", ""]
        lines += [f"- **{name}:** {_md(value)}" for name, value in self._facts()]
        for title, header, rows, note in self._sections():
            lines += ["", f"## {title}", ""]
            if not rows:
                lines.append("None.")
                continue
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
            if note:
                lines += ["", note]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """The report as one self-contained HTML page."""
        e = html.escape
        parts = [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            f"<title>Study report: {e(self.study['id'])}</title>",
            "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #999;padding:.2em .5em}"
            "</style></head><body>",
            f"<h1>Study report: {e(self.study['id'])}</h1><ul>",
        ]
        parts += [f"<li><b>{e(name)}:</b> {e(value)}</li>" for name, value in self._facts()]
        parts.append("</ul>")
        for title, header, rows, note in self._sections():
            parts.append(f"<h2>{e(title)}</h2>")
            if not rows:
                parts.append("<p>None.</p>")
                continue
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>")
            parts.append("</table>")
            if note:
                parts.append(f"<p>{e(note)}</p>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def write(self, folder: Path) -> list[Path]:
        """Write ``report.md``, ``report.html`` and ``report.json`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "report.md": self.to_markdown(),
            "report.html": self.to_html(),
            "report.json": json.dumps(self.to_json(), indent=2) + "\n",
        }
        written = []
        for name, text in files.items():
            path = folder / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
        return written


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _records(c: Contribution) -> str:
    if c.records is None:
        return "-"
    return f"~{round(c.records)}" if c.noisy else str(round(c.records))


def build_report(store: Store, study_id: str) -> StudyReport:
    """The report of ``study_id`` from the coordinator's store.

    Raises:
        ValidationError: no such study.
    """
    found = store.study(study_id)
    if found is None:
        raise ValidationError(f"no study {study_id!r} in this coordinator's store")
    requests = store.study_requests(study_id)
    contributions: dict[str, Contribution] = {}
    by_researcher: dict[str, dict[str, PureDP]] = {}
    refusals: list[dict[str, Any]] = []
    for request in requests:
        result = request.get("result") or {}
        dp = (result.get("privacy") or {}).get("mode", "dp") == "dp"
        for site in result.get("sites", []):
            entry = contributions.setdefault(site["name"], Contribution(site["name"]))
            spent = PureDP(float(site.get("epsilon") or 0.0))
            entry.epsilon = entry.epsilon + spent
            entry.rho += float(site.get("rho") or 0.0)
            mine = by_researcher.setdefault(request["researcher"], {})
            mine[site["name"]] = mine.get(site["name"], PureDP(0.0)) + spent
            status = site.get("status")
            if status == "ok":
                entry.analyses += 1
                records = site.get("records")
                if records is not None and (entry.records is None or records > entry.records):
                    entry.records, entry.noisy = float(records), dp
                continue
            if status == "refused":
                entry.refused += 1
            else:
                entry.failed += 1
            refusals.append(
                {
                    "request_id": request["request_id"],
                    "site": site["name"],
                    "status": status,
                    "code": site.get("code"),
                    "reason": site.get("reason"),
                }
            )
    model_credit = [
        {
            "request_id": request["request_id"],
            "site": site,
            "shapley": (credit.get("shapley") or {}).get(site),
            "leave_one_out": drop,
            "method": credit.get("method", ""),
        }
        for request in requests
        if request["analysis"] == "train"
        for credit in [(request.get("result") or {}).get("contributions") or {}]
        for site, drop in (credit.get("leave_one_out") or {}).items()
    ]
    first_seen: dict[str, dict[str, Any]] = {}
    for row in store.study_receipts(study_id):  # oldest first
        site = row["site"]
        contributions.setdefault(site, Contribution(site)).receipts += 1
        if site not in first_seen:
            key = fingerprint(row["public_key"])
            first_seen[site] = {"site": site, "first_seen": row["received"], "key": key}
    return StudyReport(
        study=found["config"],
        status=found["status"],
        created=found.get("created", ""),
        requests=[
            {
                "request_id": r["request_id"],
                "created": r["created"],
                "finished": r["finished"],
                "researcher": r["researcher"],
                "analysis": r["analysis"],
                "status": r["status"],
                "error": r["error"],
            }
            for r in requests
        ],
        contributions=sorted(contributions.values(), key=lambda c: c.site),
        by_researcher={
            who: {site: spent.epsilon for site, spent in sites.items()}
            for who, sites in by_researcher.items()
        },
        refusals=refusals,
        approvals=[
            {k: a[k] for k in ("site", "version", "decision", "reason", "decided_at", "decided_by")}
            for a in store.study_decisions(study_id)
        ],
        sites_joined=sorted(first_seen.values(), key=lambda s: s["site"]),
        model_credit=model_credit,
    )


def offline_report(path: Path, study_id: str) -> StudyReport:
    """The report of ``study_id`` read from a coordinator's folder (as ``--keep`` leaves it) or
    its SQLite file, read-only.

    Raises:
        ConfigError: no coordinator store there.
        ValidationError: no such study in it.
    """
    file = path / "coordinator.db" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no coordinator.db (give the coordinator's folder or file)")
    store = Store.open_read_only(file)
    try:
        return build_report(store, study_id)
    finally:
        store.close()

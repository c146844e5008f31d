"""The public study registry: who uses the hospitals' data, and for what.

Read-only and open to anyone (no token), as JSON (``GET /api/registry``) and as a plain HTML
page (``GET /registry``). For each study: its title, purpose, lead, the hospitals taking part,
its status, and a plain-language summary of the results released to the study.

It publishes no released value and no researcher's name: what kinds of analysis were run, how
many, and when. Results themselves stay with the study (a released value may be exact in sdc
or off mode, and publishing it is the study's decision, not the registry's).
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

from coordinator.store import Store

# What each analysis is, for patients reading the registry.
PLAIN_WORDS = {
    "correlation": ("a correlation between measurements", "correlations between measurements"),
    "count": ("a count of patients", "counts of patients"),
    "cox": ("a survival model (Cox regression)", "survival models (Cox regression)"),
    "glm": ("a regression model", "regression models"),
    "histogram": ("a distribution of a measurement", "distributions of measurements"),
    "kaplan_meier": ("a survival curve", "survival curves"),
    "logrank": ("a comparison of survival curves", "comparisons of survival curves"),
    "mantel_haenszel": ("a stratified comparison of groups", "stratified comparisons of groups"),
    "mean": ("an average of a measurement", "averages of measurements"),
    "proportion": ("a proportion of patients", "proportions of patients"),
    "quality": ("a data-quality check", "data-quality checks"),
    "quantiles": ("a median or other percentile", "medians or other percentiles"),
    "script": ("an analysis written by a researcher and reviewed by each hospital",
               "analyses written by researchers and reviewed by each hospital"),
    "table": ("a table of counts", "tables of counts"),
    "ttest": ("a comparison of two groups' averages", "comparisons of two groups' averages"),
}  # fmt: skip


def _phrase(analysis: str, count: int) -> str:
    one, many = PLAIN_WORDS.get(analysis, (f"a {analysis} analysis", f"{analysis} analyses"))
    return one if count == 1 else f"{count} {many}"


def summarise(analyses: Counter[str], last: str | None) -> str:
    """A plain-language sentence on the results released to a study."""
    if not analyses:
        return "No results have been released to this study yet."
    parts = [_phrase(name, n) for name, n in sorted(analyses.items())]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    total = sum(analyses.values())
    when = f"; the latest on {last[:10]}" if last else ""
    return (
        f"{total} result{'s' if total != 1 else ''} released to the study: {listed}{when}. "
        "Only summaries left the hospitals; no patient record did."
    )


def registry_entries(store: Store) -> list[dict[str, Any]]:
    """One public entry per study, in the order studies were created."""
    entries = []
    for row in store.studies():
        if row["status"] == "draft":  # the lead's, not yet proposed to any hospital
            continue
        study_id = row["id"]
        found = store.study(study_id)
        config = found["config"] if found is not None else {}
        done = [r for r in store.study_requests(study_id) if r["status"] == "done"]
        analyses = Counter(r["analysis"] for r in done)
        last = max((r["finished"] or "" for r in done), default=None)
        took_part = sorted({r["site"] for r in store.study_receipts(study_id)})
        entries.append(
            {
                "id": study_id,
                "title": config.get("title", ""),
                "purpose": config.get("purpose", ""),
                "lead": config.get("lead") or "",
                "status": row["status"],
                "hospitals": took_part,
                "invited": list(config.get("sites") or []),
                "results": dict(sorted(analyses.items())),
                "summary": summarise(analyses, last),
            }
        )
    return entries


def registry_html(entries: list[dict[str, Any]]) -> str:
    """The registry as one plain HTML page."""
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>Study registry</title>",
        "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto;line-height:1.4}"
        "section{border-top:1px solid #999;padding:.5em 0}</style></head><body>",
        "<h1>Who uses our hospitals' data, and for what</h1>",
        "<p>Every study of this alliance. Each hospital keeps its patients' records; only "
        "summaries it approved leave it.</p>",
    ]
    if not entries:
        parts.append("<p>No study yet.</p>")
    for entry in entries:
        hospitals = ", ".join(entry["hospitals"]) or (
            "invited: " + ", ".join(entry["invited"]) if entry["invited"] else "none yet"
        )
        parts += [
            f"<section><h2>{e(entry['title'] or entry['id'])}</h2><ul>",
            f"<li><b>Purpose:</b> {e(entry['purpose'])}</li>",
            f"<li><b>Led by:</b> {e(entry['lead'] or 'not stated')}</li>",
            f"<li><b>Hospitals taking part:</b> {e(hospitals)}</li>",
            f"<li><b>Status:</b> {e(entry['status'])}</li>",
            f"</ul><p>{e(entry['summary'])}</p></section>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

"""``alliance demo``: four UCI heart hospitals, a small dp study, a readable report.

Data: UCI Heart Disease (CC BY 4.0, DOI 10.24432/C52P4X); principal investigators Andras Janosi
(Budapest), William Steinbrunn (Zurich), Matthias Pfisterer (Basel), Robert Detrano (Long Beach
and Cleveland).
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from analyses import AnalysisResult
from analyses.results import show_count
from coordinator.client import result_from_json
from coordinator.store import Store
from protocol.config import AnalysisRequest, StudyConfig
from protocol.crosscheck import announced_keys, cross_check
from protocol.signing import Receipt
from simulations.federation import LocalFederation, SiteSpec
from simulations.heart import SITES, heart_dictionary, heart_source
from site_node.ledger import SiteStore

LABELS = {
    "cleveland": "Cleveland Clinic",
    "hungarian": "Hungarian Institute of Cardiology",
    "switzerland": "University Hospitals Zurich and Basel",
    "va": "VA Long Beach",
}
EPSILON = 0.3
#: VA Long Beach's admin set a smaller budget, so the demo shows a budget refusal.
BUDGETS = {"cleveland": 2.0, "hungarian": 2.0, "switzerland": 2.0, "va": 1.0}
REQUESTS = [
    ("How many patients?", {"analysis": "count"}),
    ("Mean age", {"analysis": "mean", "params": {"variable": "age"}}),
    ("Mean cholesterol", {"analysis": "mean", "params": {"variable": "chol"}}),
    (
        "Age histogram by disease",
        {
            "analysis": "histogram",
            "params": {
                "variable": "age",
                "edges": [20, 30, 40, 50, 60, 70, 80],
                "group": "disease",
            },
        },
    ),
]


def _out(text: str = "") -> None:
    print(text, flush=True)


def _site_spec(name: str) -> SiteSpec:
    return SiteSpec(
        name, heart_source(name), mode="dp", budget=BUDGETS[name], epsilon_per_request=EPSILON
    )


def _render(title: str, result: AnalysisResult) -> None:
    """A result as its own class prints it (refusals included), then what each hospital that
    contributed gave and spent."""
    _out(f"\n== {title} ==")
    _out(textwrap.indent(str(result), "  "))
    for site in result.sites:
        if site.status == "ok":
            records = show_count(max(0.0, site.records or 0.0), noisy=site.mode == "dp")
            spent = site.epsilon.epsilon
            _out(f"  - {site.name:<12} used {records} records, spent epsilon {spent:.2f}")


def _site_trail(db_path: Path, name: str, receipts: list[Receipt]) -> tuple[float, int, str]:
    """Epsilon spent, refusals, and the site's audit trail checked as an auditor would
    (`alliance audit verify` and `cross-check`), read through the site's own store class,
    read-only."""
    store = SiteStore(db_path, "demo", read_only=True)
    try:
        spent = sum(row.epsilon for row in store.ledger())
        entries = store.audit_entries()
        refused = sum(1 for entry in entries if entry.action == "refused")
        problems = store.integrity_problems()
    finally:
        store.close()
    problems += cross_check(name, entries, receipts, announced_keys(entries))
    if problems:
        return spent, refused, f"BROKEN ({len(problems)} findings)"
    return spent, refused, f"intact; matches {len(receipts)} receipts"


def run_demo(keep: Path | None = None) -> None:
    """Run the demo end to end and print its report."""
    dictionary = heart_dictionary()
    sites = [_site_spec(name) for name in SITES]
    study = StudyConfig.model_validate(
        {
            "id": "heart-demo",
            "title": "Heart disease across four hospitals (demo)",
            "purpose": "research",
            "privacy": {"mode": "dp", "epsilon_per_request": EPSILON, "budget": 2.0},
        }
    )
    started = time.monotonic()
    _out("Alliance demo: four hospitals keep their records; only noisy aggregates travel.")
    _out("Data: UCI Heart Disease (CC BY 4.0): Janosi, Steinbrunn, Pfisterer, Detrano.\n")
    federation = LocalFederation(sites, dictionary, keep)
    try:
        _out(f"Setting up in {federation.root}: an alliance CA, one certificate per hospital.")
        federation.start_coordinator()
        _out(
            f"Coordinator listening: sites dial {federation.site_link} (mutual TLS); "
            f"researchers use {federation.url}"
        )
        for site in sites:
            federation.start_site(site, study.id)
        federation.wait_for_sites([s.name for s in sites])
        for site in sites:
            _out(
                f"  site {site.name:<12} connected ({LABELS[site.name]}; budget epsilon "
                f"{site.budget:g} for this study)"
            )
        with federation.researcher() as client:
            federation.create_study(study)
            _out(
                f"Study '{study.id}' created: differential privacy, epsilon {EPSILON} per "
                "request at each site."
            )
            for title, raw in REQUESTS:
                request = AnalysisRequest.model_validate(raw)
                body = client.submit(study.id, request.model_dump(mode="json", exclude_none=True))
                if body["status"] == "done":
                    _render(title, result_from_json(body["result"]))
                else:
                    _out(f"\n== {title} ==\n  FAILED: {body['error']}")
        federation.stop()
        _out("\n== Contribution and privacy report (read from each hospital's own ledger) ==")
        _out(f"  {'site':<12} {'epsilon spent':>14} {'budget':>8} {'refusals':>9}  audit trail")
        receipts, coordinator_problems = _coordinator_trail(
            federation.coordinator_dir / "coordinator.db"
        )
        for site in sites:
            spent, refused, trail = _site_trail(
                federation.site_dir(site.name) / "state" / "site.db",
                site.name,
                [r for r in receipts if r.site == site.name],
            )
            _out(f"  {site.name:<12} {spent:>14.2f} {site.budget:>8.2f} {refused:>9}  {trail}")
        verdict = f"BROKEN ({coordinator_problems} findings)" if coordinator_problems else "intact"
        _out(f"  coordinator audit trail: {verdict}; {len(receipts)} signed receipts verified")
        _out(
            "\nWhat happened: each hospital answered only what its own policy allows, added "
            "noise\nbefore anything left, and charged its own ledger first. VA Long Beach's "
            f"admin set a\nbudget of {BUDGETS['va']:g}, so VA refused the request that would "
            "have passed it; the study\nwent on with the other three, and the refusal is in "
            "VA's audit log and in the result."
        )
        _out(f"\nDone in {time.monotonic() - started:.1f} s; every process has shut down.")
        if keep:
            _out(
                f"Inspect {keep}/coordinator and {keep}/sites/<name>: configs, SQLite stores, "
                "logs. Try: alliance site ledger --config "
                f"{keep}/sites/va/site.yaml, or alliance audit cross-check "
                f"{keep}/coordinator {keep}/sites/va"
            )
    except Exception:
        federation.stop()
        _out(
            f"The demo failed. Logs: {federation.root}",
        )
        raise
    finally:
        federation.cleanup()


def _coordinator_trail(path: Path) -> tuple[list[Receipt], int]:
    """The coordinator's receipts and how many findings `alliance audit verify` makes."""
    store = Store.open_read_only(path)
    try:
        return store.receipts(), len(store.integrity_problems())
    finally:
        store.close()


if __name__ == "__main__":
    run_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else None)

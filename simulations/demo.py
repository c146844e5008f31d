"""``alliance demo``: four UCI heart hospitals, a small dp study, a readable report.

Data: UCI Heart Disease (CC BY 4.0, DOI 10.24432/C52P4X); principal investigators Andras Janosi
(Budapest), William Steinbrunn (Zurich), Matthias Pfisterer (Basel), Robert Detrano (Long Beach
and Cleveland).
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from protocol.audit import AuditEntry, verify_chain
from protocol.config import AnalysisRequest, StudyConfig
from simulations.federation import LocalFederation, SiteSpec
from simulations.heart import SITES, heart_dictionary, heart_source

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


def _render(title: str, result: dict[str, Any]) -> None:
    _out(f"\n== {title} ==")
    analysis = result["analysis"]
    if analysis == "count":
        _out(f"  patients (noisy): {result['count']:.0f}")
    elif analysis == "mean":
        _out(
            f"  mean {result['variable']}: {result['mean']:.1f} "
            f"(standard error {result['std_error']:.1f}, of which DP noise "
            f"{result['noise_sd']:.1f}; n ~ {result['n']:.0f})"
        )
    elif analysis == "histogram":
        edges = result["edges"]
        counts = result["counts"]
        groups = counts if isinstance(counts, dict) else {"all": counts}
        names = {"0": "no disease", "1": "disease"}
        _out("  " + f"{'age':<10}" + "".join(f"{names.get(g, g):>12}" for g in groups))
        for i in range(len(edges) - 1):
            row = "".join(f"{max(0.0, groups[g][i]):>12.0f}" for g in groups)
            _out(f"  {f'{edges[i]:g}-{edges[i + 1]:g}':<10}{row}")
    for note in result.get("notes", []):
        _out(f"  note: {note}")
    for site in result["sites"]:
        if site["status"] == "ok":
            _out(
                f"  - {site['name']:<12} used ~{max(0.0, site['records']):.0f} records, "
                f"spent epsilon {site['epsilon']:.2f}"
            )
        else:
            reason = str(site["reason"]).removeprefix(f"refused by {site['name']}: ")
            _out(f"  - {site['name']:<12} {site['status'].upper()}: {reason}")


def _ledger(db_path: Path) -> tuple[float, int, bool]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        (spent,) = db.execute("SELECT COALESCE(SUM(epsilon), 0) FROM ledger").fetchone()
        (refused,) = db.execute("SELECT COUNT(*) FROM audit WHERE action = 'refused'").fetchone()
        rows = db.execute(
            "SELECT seq, time, actor, action, detail, prev_hash, hash FROM audit ORDER BY seq"
        ).fetchall()
    finally:
        db.close()
    return float(spent), int(refused), verify_chain(AuditEntry(*r) for r in rows).ok


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
                    _render(title, body["result"])
                else:
                    _out(f"\n== {title} ==\n  FAILED: {body['error']}")
        federation.stop()
        _out("\n== Contribution and privacy report (read from each hospital's own ledger) ==")
        _out(f"  {'site':<12} {'epsilon spent':>14} {'budget':>8} {'refusals':>9}  audit log")
        for site in sites:
            spent, refused, intact = _ledger(federation.site_dir(site.name) / "state" / "site.db")
            _out(
                f"  {site.name:<12} {spent:>14.2f} {site.budget:>8.2f} {refused:>9}  "
                f"{'intact' if intact else 'BROKEN'}"
            )
        coordinator_ok = _coordinator_audit(federation.coordinator_dir / "coordinator.db")
        _out(f"  coordinator audit log: {'intact' if coordinator_ok else 'BROKEN'}")
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
                f"{keep}/sites/va/site.yaml"
            )
    except Exception:
        federation.stop()
        _out(
            f"The demo failed. Logs: {federation.root}",
        )
        raise
    finally:
        federation.cleanup()


def _coordinator_audit(path: Path) -> bool:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT seq, time, actor, action, detail, prev_hash, hash FROM "
            "alliance_audit ORDER BY seq"
        ).fetchall()
    finally:
        db.close()
    return verify_chain(AuditEntry(*r) for r in rows).ok


if __name__ == "__main__":
    run_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else None)

"""``alliance simulate``: start the federation, run requests in order, print, tear down."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from coordinator.client import result_from_json
from coordinator.report import offline_report
from protocol.config import AnalysisRequest, DataDictionary, DataSource, SDCTerms, StudyConfig
from simulations.federation import LocalFederation, SiteSpec


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def approved_terms(requests: list[AnalysisRequest], dictionary: DataDictionary) -> dict[str, Any]:
    """The sdc populations and models a simulation's sites approve: the requests' own (dummy
    data, run by the person who wrote the requests). A malformed one is left out: its request
    fails at the coordinator with its own error."""
    from analyses.models import canonical_model
    from protocol.errors import AllianceError
    from protocol.filters import parse_filter

    populations: list[str] = []
    for text in sorted({r.filter for r in requests if r.filter}):
        try:
            parse_filter(text, set(dictionary.variables))
        except AllianceError:
            continue
        populations.append(text)
    models: list[str] = []
    for request in requests:
        if request.analysis == "glm" and "formula" in request.params:
            models.append(str(request.params["formula"]))
        elif request.analysis == "cox" and {"time", "event", "covariates"} <= set(request.params):
            params = request.params
            covariates = " + ".join(params["covariates"])
            models.append(f"Surv({params['time']}, {params['event']}) ~ {covariates}")
    valid = []
    for model in models:
        try:
            canonical_model(model)
        except AllianceError:
            continue
        valid.append(model)
    return {"populations": populations, "models": valid}


def simulate_requests(
    sites: list[tuple[str, DataSource]],
    dictionary: DataDictionary,
    study: StudyConfig,
    requests: list[AnalysisRequest],
    keep: Path | None,
    as_json: bool,
    tls: bool = True,
    budget: float = 3.0,
    report: Path | None = None,
) -> int:
    """Run every request in order in one study; return how many failed (and with ``report``,
    write the study's report there once every process has stopped)."""
    cap = study.privacy.epsilon_per_request.epsilon
    terms = approved_terms(requests, dictionary)
    if study.privacy.mode == "sdc":
        study = study.model_copy(update={"sdc": SDCTerms(**terms)})
    specs = [
        SiteSpec(
            name,
            data,
            mode=study.privacy.mode,
            budget=budget,
            epsilon_per_request=cap,
            approval=terms,
        )
        for name, data in sites
    ]
    federation = LocalFederation(specs, dictionary, keep, tls=tls)
    failed = 0
    try:
        _say(
            f"starting a coordinator and {len(specs)} site processes in {federation.root} "
            f"({'mutual TLS' if tls else 'INSECURE, no TLS'}, privacy {study.privacy.mode})"
        )
        federation.start(study)
        with federation.researcher() as client:
            for req in requests:
                body = client.submit(study.id, req.model_dump(mode="json", exclude_none=True))
                result: dict[str, Any] = body.get("result") or {}
                if body.get("status") != "done":
                    failed += 1
                    if as_json:
                        print(
                            json.dumps(
                                {
                                    "ok": False,
                                    "analysis": req.analysis,
                                    "error": body.get("error"),
                                    "sites": result.get("sites", []),
                                }
                            ),
                            flush=True,
                        )
                    else:
                        print(f"{req.analysis}: FAILED: {body.get('error')}", flush=True)
                    continue
                print(json.dumps(result) if as_json else str(result_from_json(result)), flush=True)
    finally:
        federation.stop()
        if report is not None and (federation.coordinator_dir / "coordinator.db").is_file():
            for path in offline_report(federation.coordinator_dir, study.id).write(report):
                _say(f"wrote {path}")
        if keep:
            _say(f"kept {keep}/coordinator and {keep}/sites/<name> (configs, stores, logs)")
        federation.cleanup()
    return failed

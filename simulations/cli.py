"""The ``alliance`` command: one entry point, a group per role.

This module sits above both roles (it composes them for ``simulate`` and ``demo``), which is why
the entry point lives in ``simulations/`` and not in either role's package.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from analyses import get_analysis
from coordinator.cli import (
    coordinator_app,
    pki_app,
    run_command,
    script_app,
    study_app,
    token_app,
)
from protocol.config import (
    AnalysisRequest,
    DataDictionary,
    DataSource,
    StudyConfig,
    StudyPrivacy,
    load_yaml,
    parse_model,
)
from protocol.errors import AllianceError, ConfigError
from protocol.logs import LOG_LEVEL, QUIET, configure, resolve_level
from simulations.script_try import script_try
from site_node.cli import site_app
from site_node.ledger import SiteStore

app = typer.Typer(
    help="Alliance: federated analysis for hospital alliances.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(pki_app, name="pki")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(site_app, name="site")
app.add_typer(study_app, name="study")
app.add_typer(token_app, name="token")
audit_app = typer.Typer(help="Verify audit logs.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.command("run")(run_command)
app.add_typer(script_app, name="script")
script_app.command("try")(script_try)


@app.callback()
def _setup(
    log_level: LOG_LEVEL = None,
    quiet: QUIET = False,
) -> None:
    """Alliance: federated analysis for hospital alliances."""
    # Servers log each change of state by default; they re-apply these options with INFO as
    # their default (and accept them after the subcommand too). Everything else stays quiet.
    configure(resolve_level(log_level, quiet, {}, logging.WARNING))


@audit_app.command("verify")
def audit_verify(path: Path) -> None:
    """Verify the audit chain of a site folder or a coordinator folder (read-only)."""
    # Here, not at the top: a site node starts through this module and needs no SQLAlchemy.
    from sqlalchemy.exc import SQLAlchemyError

    from coordinator.store import Store

    candidates = [path / "state" / "site.db", path / "site.db", path / "coordinator.db", path]
    for candidate in candidates:
        if candidate.is_file():
            break
    else:
        raise AllianceError(f"{path}: no site.db, state/site.db or coordinator.db found")
    try:
        if candidate.name == "site.db":
            site = SiteStore(candidate, "verify", read_only=True)
            try:
                report = site.verify_audit()
            finally:
                site.close()
        else:
            store = Store.open_read_only(candidate)
            try:
                report = store.verify_audit()
            finally:
                store.close()
    except (sqlite3.Error, SQLAlchemyError) as exc:
        first = str(exc).splitlines()[0]
        raise AllianceError(f"{candidate}: not an Alliance store ({first})") from None
    typer.echo(f"{candidate}: {report}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("simulate")
def simulate(
    site: Annotated[list[str], typer.Option("--site", help="NAME=PATH of a CSV with a header")],
    dictionary: Annotated[Path, typer.Option("--dictionary", help="the data dictionary YAML")],
    request: Annotated[list[Path], typer.Option("--request", help="request YAML (repeatable)")],
    privacy: Annotated[str, typer.Option(help="dp, sdc or off")] = "dp",
    epsilon: Annotated[float, typer.Option(help="each request's epsilon at each site")] = 0.5,
    budget: Annotated[float, typer.Option(help="each site's epsilon budget for the study")] = 3.0,
    keep: Annotated[Path | None, typer.Option(help="keep configs, stores and logs here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document per line")] = False,
    insecure: Annotated[bool, typer.Option(help="no TLS (loopback experiments only)")] = False,
) -> None:
    """Run requests on dummy data across real site processes on loopback."""
    from simulations.runner import simulate_requests

    if privacy not in ("dp", "sdc", "off"):
        raise AllianceError(
            f"--privacy: {privacy!r} is not a privacy mode; use one of: dp, sdc, off"
        )
    sites: list[tuple[str, DataSource]] = []
    for item in site:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise AllianceError(f"--site: {item!r} is not NAME=PATH (e.g. cleveland=cleveland.csv)")
        if not Path(file).is_file():
            raise AllianceError(f"--site {name}: {file!r}: file not found")
        sites.append((name, DataSource(path=Path(file).resolve())))
    dict_model = load_yaml(dictionary, DataDictionary)
    requests = [load_yaml(path, AnalysisRequest) for path in request]
    for path, req in zip(request, requests, strict=True):
        try:
            get_analysis(req.analysis).parse_params(req.params, dict_model)
        except AllianceError as exc:
            raise AllianceError(f"{path}: {exc}") from None
    privacy_terms = {"mode": privacy, "epsilon_per_request": epsilon, "budget": budget}
    try:
        terms = parse_model(StudyPrivacy, privacy_terms, "alliance simulate")
    except ConfigError as exc:  # name the flags, not the study file the user never wrote
        flags = {"epsilon_per_request": "--epsilon", "budget": "--budget", "mode": "--privacy"}
        text = str(exc)
        for field, flag in flags.items():
            text = text.replace(f"alliance simulate: {field}:", f"{flag}:")
        raise AllianceError(text) from None
    study = StudyConfig(id="simulation", title="alliance simulate", privacy=terms)
    failed = simulate_requests(
        sites, dict_model, study, requests, keep, as_json, tls=not insecure, budget=budget
    )
    if failed:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    keep: Annotated[Path | None, typer.Option(help="keep the demo's folders here")] = None,
) -> None:
    """Four UCI heart hospitals as real processes, a small dp study, and a report."""
    from simulations.demo import run_demo

    run_demo(keep)


def main() -> None:
    """Entry point: clear one-line errors instead of tracebacks for anything we expect."""
    try:
        app()
    except AllianceError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

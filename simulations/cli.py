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
    TOKEN,
    URL,
    coordinator_app,
    pki_app,
    run_command,
    script_app,
    sites_command,
    study_app,
    token_app,
)
from protocol.audit import AuditEntry
from protocol.config import (
    AnalysisRequest,
    DataDictionary,
    DataSource,
    StudyConfig,
    StudyPrivacy,
    load_yaml,
    parse_model,
)
from protocol.crosscheck import announced_keys, cross_check
from protocol.errors import AllianceError, ConfigError
from protocol.logs import LOG_LEVEL, QUIET, configure, resolve_level
from protocol.signing import SigningKey
from simulations.script_try import script_try
from site_node.cli import site_app
from site_node.ledger import SiteStore
from site_node.runtime import SIGNING_KEY_FILE

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
audit_app = typer.Typer(
    help="Verify audit trails and cross-check a site against the coordinator.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")
app.command("run")(run_command)
app.command("sites")(sites_command)
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


def _node_file(path: Path) -> Path:
    """The store in a node's folder as ``--keep`` leaves it (or the file itself)."""
    candidates = [path / "state" / "site.db", path / "site.db", path / "coordinator.db", path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise AllianceError(
        f"{path}: no site.db, state/site.db or coordinator.db found (give a site's or the "
        "coordinator's folder, or the file)"
    )


def _not_a_store(candidate: Path, exc: Exception) -> AllianceError:
    first = str(exc).splitlines()[0]
    return AllianceError(f"{candidate}: not an Alliance store ({first})")


def _report(problems: list[str], ok: str) -> None:
    """Print findings (or ``ok``); exit 1 when there is any."""
    for problem in problems:
        typer.echo(f"  FOUND: {problem}")
    if problems:
        typer.echo(f"{len(problems)} finding(s)")
        raise typer.Exit(1)
    typer.echo(ok)


@audit_app.command("verify")
def audit_verify(
    path: Annotated[Path, typer.Argument(help="a site's or the coordinator's folder")],
) -> None:
    """Verify a node's audit trail, read-only; exit 1 on any finding.

    Checks the hash chain (naming the first entry edited, deleted, inserted or reordered),
    the ledger against the charges the chain records (a site), every stored reply and the
    signatures on it (a site), and every stored receipt against the chain and its signature
    (the coordinator).
    """
    # Here, not at the top: a site node starts through this module and needs no SQLAlchemy.
    from sqlalchemy.exc import SQLAlchemyError

    from coordinator.store import Store

    candidate = _node_file(path)
    try:
        if candidate.name == "site.db":
            site = SiteStore(candidate, "verify", read_only=True)
            try:
                entries, problems = len(site.audit_entries()), site.integrity_problems()
            finally:
                site.close()
            what = "entries; ledger, stored replies and signatures agree"
        else:
            store = Store.open_read_only(candidate)
            try:
                entries, problems = len(store.audit_entries()), store.integrity_problems()
                receipts = len(store.receipts())
            finally:
                store.close()
            what = f"entries; {receipts} receipts verified"
    except (sqlite3.Error, SQLAlchemyError) as exc:
        raise _not_a_store(candidate, exc) from None
    typer.echo(f"{candidate}:")
    _report(problems, f"audit trail intact: {entries} {what}")


def _site_name(folder: Path, entries: list[AuditEntry]) -> str:
    """A site folder's name: its ``site.yaml``'s ``name``, else the actor of its log."""
    config = folder / "site.yaml"
    if config.is_file():
        import yaml

        try:
            name = (yaml.safe_load(config.read_text()) or {}).get("name")
        except yaml.YAMLError:
            name = None
        if isinstance(name, str) and name:
            return name
    for entry in entries:
        return entry.actor
    raise AllianceError(
        f"{folder}: cannot tell which site this is (no site.yaml and an empty log); "
        "give --site NAME"
    )


@audit_app.command("cross-check")
def audit_cross_check(
    coordinator: Annotated[
        Path | None, typer.Argument(help="the coordinator's folder (offline)")
    ] = None,
    site: Annotated[Path | None, typer.Argument(help="a site's folder (offline)")] = None,
    name: Annotated[str | None, typer.Option("--site", help="the site's name")] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="online: every site of this study")
    ] = None,
    url: URL = "http://127.0.0.1:8080",
    token: TOKEN = "",
) -> None:
    """Compare a site's audit log with the coordinator's receipts from it; exit 1 on any
    finding. Offline on two folders, or online with --study (the lead's token).

    Lists every task one side has and the other lacks, and catches a site log whose tail
    was cut off, or that was emptied or re-chained below a receipted head.
    """
    if study is not None:
        if coordinator is not None or site is not None:
            raise AllianceError("give either two folders (offline) or --study ID (online)")
        _cross_check_online(study, url, token)
        return
    if coordinator is None or site is None:
        raise AllianceError(
            "cross-check needs the coordinator's folder and a site's folder (offline), or "
            "--study ID with --url and --token (online)"
        )
    from sqlalchemy.exc import SQLAlchemyError

    from coordinator.store import Store

    site_file, coordinator_file = _node_file(site), _node_file(coordinator)
    if site_file.name != "site.db" or coordinator_file.name != "coordinator.db":
        raise AllianceError(
            "cross-check takes the coordinator's folder first, then a site's folder "
            f"(got {coordinator_file} and {site_file})"
        )
    try:
        store = SiteStore(site_file, "cross-check", read_only=True)
        try:
            entries = store.audit_entries()
        finally:
            store.close()
        name = name or _site_name(site, entries)
        coordinator_store = Store.open_read_only(coordinator_file)
        try:
            receipts = coordinator_store.receipts(name)
        finally:
            coordinator_store.close()
    except (sqlite3.Error, SQLAlchemyError) as exc:
        raise _not_a_store(site_file, exc) from None
    keys = announced_keys(entries)
    key_file = site_file.parent / SIGNING_KEY_FILE
    if key_file.is_file():
        keys.add(SigningKey.load(key_file).public_hex)
    problems = cross_check(name, entries, receipts, keys)
    typer.echo(
        f"{name}: {len(entries)} audit entries; the coordinator holds {len(receipts)} "
        "receipts from it"
    )
    _report(problems, f"{name}'s audit log agrees with every receipt the coordinator holds")


def _cross_check_online(study: str, url: str, token: str) -> None:
    """The coordinator asks each of the study's sites for its audit entries over the link."""
    from coordinator.client import NO_TOKEN, AllianceClient

    if not token.strip():
        raise AllianceError(NO_TOKEN)
    with AllianceClient(url, token) as client:
        sites = client.cross_check(study)
    found = 0
    for entry in sites:
        typer.echo(f"{entry['site']}: {entry['receipts']} receipts")
        for problem in entry["problems"]:
            typer.echo(f"  FOUND: {problem}")
        found += len(entry["problems"])
    if found:
        typer.echo(f"{found} finding(s)")
        raise typer.Exit(1)
    typer.echo(f"every site's audit log agrees with the receipts of study {study}")


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
    report: Annotated[
        Path | None, typer.Option(help="write the study's report (md, html, json) here")
    ] = None,
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
        sites,
        dict_model,
        study,
        requests,
        keep,
        as_json,
        tls=not insecure,
        budget=budget,
        report=report,
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

"""``alliance site ...``: serve, check and ledger, for hospital IT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from protocol.config import DataDictionary, SiteConfig, load_yaml
from protocol.logs import LOG_LEVEL, QUIET, configure, resolve_level
from protocol.tlsfiles import INSECURE, check_tls_files
from site_node.connectors import load
from site_node.harmonize import conform
from site_node.ledger import SiteStore
from site_node.link import SiteLink
from site_node.runtime import SiteRuntime

log = logging.getLogger("alliance.site")


def load_site(
    config_path: Path, insecure: bool = False, record_start: bool = True
) -> tuple[SiteConfig, SiteRuntime]:
    """Load a site's config and data, log the data check, and return the runtime."""
    config = load_yaml(config_path, SiteConfig)
    if insecure:
        config = config.model_copy(update={"tls": None, "insecure": True})
    runtime = SiteRuntime.from_config(config, record_start)
    for line in runtime.report.lines():
        log.info("data check: %s", line)
    if not config.policy.allowed_analyses or not config.policy.studies:
        log.warning(
            "this site's policy allows %s and approves %s: it will refuse every task "
            "(default deny)",
            ", ".join(config.policy.allowed_analyses) or "no analysis",
            ", ".join(s.id for s in config.policy.studies) or "no study",
        )
    return config, runtime


async def serve(config_path: Path, insecure: bool = False) -> None:
    """Run a site node until SIGINT or SIGTERM (``insecure``: drop TLS, loopback only)."""
    config, runtime = load_site(config_path, insecure)
    if config.tls is None:
        log.warning(
            "INSECURE: this site link has no TLS and proves no identity; use it only on "
            "loopback for experiments"
        )
    else:
        # The coordinator has the last word on the handshake; these lines say why it will
        # refuse, in the site admin's terms, before the first attempt.
        for problem in check_tls_files(config.tls, "site", config.name).problems:
            log.error("%s (run `alliance site check`)", problem)
    link = SiteLink(config, runtime)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, link.stop)
    try:
        await link.run()
    finally:
        runtime.store.audit("site_stopped", {"tasks_answered": link.tasks_answered})
        runtime.close()


site_app = typer.Typer(help="Run and inspect a site node (hospital IT).", no_args_is_help=True)
CONFIG = Annotated[Path, typer.Option("--config", help="site.yaml")]


@site_app.command("serve")
def site_serve(
    ctx: typer.Context,
    config: CONFIG,
    insecure: INSECURE = False,
    log_level: LOG_LEVEL = None,
    quiet: QUIET = False,
) -> None:
    """Dial the coordinator and answer approved tasks; stop with Ctrl-C.

    Logs one line per change of state (connecting, connected, lost, each task answered or
    refused) unless --quiet.
    """
    configure(resolve_level(log_level, quiet, ctx.find_root().params, logging.INFO))
    if insecure:
        typer.echo(
            "WARNING: --insecure: this site dials WITHOUT TLS and proves no identity; its "
            "aggregates travel in clear. Use it only on loopback for experiments.",
            err=True,
        )
    asyncio.run(serve(config, insecure))


@site_app.command("check")
def site_check(config: CONFIG) -> None:
    """Check the config, TLS files, data and audit log; exit 1 on a problem; write nothing."""
    settings = load_yaml(config, SiteConfig)
    problems: list[str] = []
    if settings.tls is None:
        typer.echo(
            "tls: none (insecure: true): this site proves no identity and its aggregates "
            "travel in clear; loopback experiments only"
        )
    else:
        tls = check_tls_files(settings.tls, "site", settings.name)
        problems += tls.problems
        for line in tls.problems:
            typer.echo(line)
        for line in tls.warnings:
            typer.echo(f"{line} (warning)")
        if tls.ok:
            typer.echo(f"tls: ok: {tls.summary}")
    dictionary = load_yaml(settings.dictionary, DataDictionary)
    _, report = conform(load(settings.data), dictionary, settings.data.rename, settings.data.derive)
    for line in report.lines():
        typer.echo(f"data: {line}")
    policy = settings.policy
    typer.echo(f"allowed analyses: {', '.join(policy.allowed_analyses) or 'none (deny all)'}")
    if not policy.allowed_analyses or not policy.studies:
        typer.echo(
            "policy: this site will refuse every task until it allows an analysis and "
            "approves a study (default deny)"
        )
    db = settings.state_dir / "site.db"
    store = SiteStore(db, settings.name, read_only=True) if db.exists() else None
    try:
        for approval in policy.studies:
            spent = store.spent(approval.id).epsilon if store else 0.0
            typer.echo(
                f"study {approval.id}: mode {approval.mode}, budget {approval.budget.epsilon:g}, "
                f"spent {spent:.4g}"
            )
        if store is None:
            typer.echo(f"audit log: none yet ({db} is created by `alliance site serve`)")
        else:
            audit = store.verify_audit()
            typer.echo(str(audit))
            if not audit.ok:
                problems.append(str(audit))
    finally:
        if store is not None:
            store.close()
    if problems:
        typer.echo(f"site check failed: {len(problems)} problem(s) above", err=True)
        raise typer.Exit(1)


@site_app.command("ledger")
def site_ledger(
    config: CONFIG, study: Annotated[str | None, typer.Option(help="one study only")] = None
) -> None:
    """Print the privacy-budget ledger: every charge, and the total per study."""
    settings = load_yaml(config, SiteConfig)
    db = settings.state_dir / "site.db"
    if not db.exists():
        typer.echo("the ledger is empty")
        return
    store = SiteStore(db, settings.name, read_only=True)
    try:
        rows = store.ledger(study)
        totals: dict[str, float] = {}
        for row in rows:
            typer.echo(
                f"{row.time}  {row.study_id:<20} {row.analysis:<12} {row.researcher:<12} "
                f"epsilon {row.epsilon:.4g}  task {row.task_id}"
            )
            totals[row.study_id] = totals.get(row.study_id, 0.0) + row.epsilon
        for study_id, total in totals.items():
            approval = settings.policy.approval(study_id)
            budget = f" of {approval.budget.epsilon:g}" if approval else ""
            typer.echo(f"total {study_id}: epsilon {total:.4g}{budget}")
        if not rows:
            typer.echo("the ledger is empty")
    finally:
        store.close()

"""``alliance site ...``: serve, check and ledger, for hospital IT."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from analyses.sandbox import ScriptStopped, isolation_layers
from protocol.budget import PureDP, format_epsilon
from protocol.config import DataDictionary, SiteConfig, SiteMapping, StudyApproval, load_yaml
from protocol.errors import ConfigError
from protocol.logs import LOG_LEVEL, QUIET, configure, resolve_level
from protocol.tlsfiles import INSECURE, check_tls_files
from site_node.connectors import load, source_columns
from site_node.harmonize import conform, patient_ids, usable_share
from site_node.ledger import SiteStore, period_name
from site_node.link import SiteLink
from site_node.mapping import apply_mapping, closest, columns_needed
from site_node.pushdown import pushdown_lines
from site_node.review import (
    approve_script,
    approve_study,
    refuse_study,
    review_script,
    review_study,
)
from site_node.runtime import SiteRuntime
from site_node.studies import decision_lines

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


def policy_lines(settings: SiteConfig, dictionary: DataDictionary) -> list[str]:
    """The sensitivity classes and the negative list this site enforces."""
    enforced = {
        "identifier": "never analysed, filtered on or released",
        "quasi-identifier": "sdc: only on public bins or levels; never in a free-form filter",
        "sensitive": "only in studies whose approval names them (sensitive_variables)",
    }
    lines = []
    for sensitivity, rule in enforced.items():
        names = ", ".join(sorted(dictionary.classed(sensitivity))) or "none"
        lines.append(f"variables {sensitivity}: {names} ({rule})")
    if settings.policy.denied_variables:
        denied = ", ".join(settings.policy.denied_variables)
        lines.append(f"negative list: {denied} (never analysed here)")
    return lines


def consent_lines(settings: SiteConfig, dictionary: DataDictionary, raw: pd.DataFrame) -> list[str]:
    """Patient ids and consent, as the site admin needs to see them (local counts are fine:
    a check runs at the site and writes nothing)."""
    lines = []
    try:
        ids = patient_ids(raw, dictionary, settings.data.rename)
    except ConfigError as exc:
        return [f"patient ids: {exc}"]
    if ids is None:
        lines.append("patient ids: none declared (dp assumes one row per patient)")
    else:
        repeated = int(pd.Series(ids).duplicated().sum())
        rule = settings.data.duplicate_patients
        lines.append(
            f"patient ids: column {dictionary.patient_id!r}, {repeated} repeated rows "
            f"(duplicate_patients: {rule})"
        )
    source = settings.consent
    if source is None:
        lines.append("consent: no source; every record is used (consent handled upstream)")
    else:
        where = source.path if source.kind != "sql" else f"{source.url} table {source.table}"
        rules = ", ".join(f"{p} {r}" for p, r in sorted(settings.policy.consent.items()))
        lines.append(
            f"consent: {source.kind} {where}; rules: {rules or 'none (every purpose refused)'}"
        )
    return lines


def sdc_terms(approval: StudyApproval) -> str:
    """What an approval lets sdc run, in one line."""
    if approval.sdc_filters == "free":
        return "any filter and model (sdc_filters: free: weaker against differencing)"
    populations = "; ".join(approval.populations) or "the whole population only"
    models = "; ".join(approval.models) or "none"
    return f"approved populations: {populations}; approved models: {models}"


def _check_tls(settings: SiteConfig) -> list[str]:
    """Print the TLS files' state; return the problems."""
    if settings.tls is None:
        typer.echo(
            "tls: none (insecure: true): this site proves no identity and its aggregates "
            "travel in clear; loopback experiments only"
        )
        return []
    tls = check_tls_files(settings.tls, "site", settings.name)
    for line in tls.problems:
        typer.echo(line)
    for line in tls.warnings:
        typer.echo(f"{line} (warning)")
    if tls.ok:
        typer.echo(f"tls: ok: {tls.summary}")
    return list(tls.problems)


def _check_data(
    settings: SiteConfig, dictionary: DataDictionary
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Print the mapping, the data check and the coverage; return the local (mapped) table
    and the conformed data."""
    mapping = load_yaml(settings.data.mapping, SiteMapping) if settings.data.mapping else None
    needed = columns_needed(settings.data, dictionary, mapping)
    raw = load(settings.data, needed)
    unread = [c for c in source_columns(settings.data) or [] if c not in needed]
    if unread:
        known = set(dictionary.variables)
        hints = {c: closest(c, known) for c in unread}
        shown = [f"{c} (did you mean {hints[c]}?)" if hints[c] else c for c in unread]
        typer.echo(f"data: source columns not read (nothing needs them): {', '.join(shown)}")
    if settings.data.where is not None:
        place = "in the source" if settings.data.connector in ("sql", "parquet") else "on reading"
        typer.echo(f"data: only rows where {settings.data.where} ({place})")
    for line in pushdown_lines(settings, dictionary):
        typer.echo(f"data: {line}")
    if mapping is not None:
        raw, mapped = apply_mapping(raw, mapping, dictionary)
        for line in mapped.lines():
            typer.echo(f"mapping: {line}")
    data, report = conform(raw, dictionary, settings.data.rename, settings.data.derive)
    for line in report.lines():
        typer.echo(f"data: {line}")
    served = len(dictionary.variables) - len(report.missing_columns)
    typer.echo(
        f"coverage: {served} of {len(dictionary.variables)} dictionary variables held here"
        + (" (tasks reading the others are refused)" if report.missing_columns else "")
    )
    for name in dictionary.variables:
        if name in report.missing_columns:
            typer.echo(f"coverage {name}: not held here (no column, no mapping)")
            continue
        present = int(data[name].notna().sum())
        typer.echo(f"coverage {name}: {present} of {len(data)} records hold an allowed value")
    return raw, data


def _check_sandbox(settings: SiteConfig) -> list[str]:
    """Which isolation layers researchers' scripts get on this machine (a probe run)."""
    limits = settings.policy.scripts
    typer.echo(
        f"scripts: each call at most {limits.cpu_seconds} CPU s, {limits.memory_mb} MB, "
        f"{limits.wall_seconds:g} s; approved by hash only (alliance site approve-script)"
    )
    try:
        layers = isolation_layers()
    except ScriptStopped as exc:
        return [f"scripts: the sandbox does not run on this machine ({exc}; {exc.detail.strip()})"]
    for name, state in layers.items():
        typer.echo(f"  sandbox {name}: {state}")
    missing = [n for n, state in layers.items() if not state.startswith("applied")]
    if missing:
        typer.echo(
            f"  note: {', '.join(missing)} unavailable here; the other layers still apply "
            "(docs/threat-model.md)"
        )
    return []


def _rho_line(approval: StudyApproval, store: SiteStore | None) -> str:
    """A study's zCDP budget and spending at this site, when it has one."""
    if approval.rho_budget is None:
        return ""
    used = store.spent_rho(approval.id).rho if store else 0.0
    return f"; zCDP rho budget {approval.rho_budget.rho:g}, spent {used:.4g}"


def _audit_lines(store: SiteStore) -> list[str]:
    """Print the audit chain's and the ledger's state; return the problems."""
    audit = store.verify_audit()
    typer.echo(str(audit))
    problems = [] if audit.ok else [str(audit)]
    ledger = store.ledger_problems()
    for problem in ledger:  # a deleted charge gives back budget: serve refuses too
        typer.echo(problem)
    if not ledger:
        typer.echo("ledger: every charge matches the audit log")
    return problems + ledger


@site_app.command("check")
def site_check(config: CONFIG) -> None:
    """Check the config, TLS files, data and audit log; exit 1 on a problem; write nothing."""
    settings = load_yaml(config, SiteConfig)
    problems = _check_tls(settings)
    dictionary = load_yaml(settings.dictionary, DataDictionary)
    raw, data = _check_data(settings, dictionary)
    for line in consent_lines(settings, dictionary, raw):
        typer.echo(line)
    policy = settings.policy
    typer.echo(f"allowed analyses: {', '.join(policy.allowed_analyses) or 'none (deny all)'}")
    for line in policy_lines(settings, dictionary):
        typer.echo(line)
    if not policy.allowed_analyses or not policy.studies:
        typer.echo(
            "policy: this site will refuse every task until it allows an analysis and "
            "approves a study (default deny; site.yaml policy.studies, or `alliance site "
            "approve STUDY`)"
        )
    if "script" in policy.allowed_analyses:
        problems += _check_sandbox(settings)
    db = settings.state_dir / "site.db"
    store = SiteStore(db, settings.name, read_only=True) if db.exists() else None
    try:
        for approval in policy.studies:
            spent = store.spent(approval.id).epsilon if store else 0.0
            rho = _rho_line(approval, store)
            typer.echo(
                f"study {approval.id}: mode {approval.mode}, budget {approval.budget.epsilon:g}, "
                f"spent {spent:.4g}{rho}"
            )
            if approval.mode == "sdc" or approval.populations or approval.models:
                typer.echo(f"  sdc terms: {sdc_terms(approval)}")
            for name, minimum in approval.min_quality.items():
                share = usable_share(data, dictionary, name)
                verdict = "left out of this study" if share < minimum else "served"
                typer.echo(
                    f"  min_quality {name}: at least {minimum:.0%} usable; this site "
                    f"{share:.0%}: {verdict}"
                )
        if store is None:
            typer.echo(f"audit log: none yet ({db} is created by `alliance site serve`)")
        else:
            for line in decision_lines(store):
                typer.echo(line)
            problems += _audit_lines(store)
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
            spent = f"rho {row.rho:.4g}" if row.rho else f"epsilon {row.epsilon:.4g}"
            typer.echo(
                f"{row.time}  {row.study_id:<20} {row.analysis:<12} {row.researcher:<12} "
                f"{spent}  task {row.task_id}"
            )
            totals[row.study_id] = totals.get(row.study_id, 0.0) + row.epsilon
        for study_id, total in totals.items():
            approval = settings.policy.approval(study_id)
            budget = f" of {approval.budget.epsilon:g}" if approval else ""
            typer.echo(f"total {study_id}: epsilon {total:.4g}{budget}")
            rho = store.spent_rho(study_id).rho
            if rho or (approval is not None and approval.rho_budget is not None):
                limit = approval.rho_budget if approval is not None else None
                of = f" of {limit.rho:g}" if limit is not None else ""
                typer.echo(f"total {study_id}: rho {rho:.4g}{of} (zCDP, Gaussian releases)")
        if not rows:
            typer.echo("the ledger is empty")
        for line in budget_lines(settings, store, study):
            typer.echo(line)
    finally:
        store.close()


@site_app.command("init")
def site_init(
    name: Annotated[str, typer.Argument(help="the site's name (its certificate's subject)")],
    folder: Annotated[Path, typer.Option("--dir", help="the new site folder")] = Path("."),
    coordinator: Annotated[
        str, typer.Option(help="host:port of the coordinator's site link")
    ] = "coordinator.example.org:50051",
) -> None:
    """Create a site folder: its own TLS key and certificate request, its signing key, and a
    default-deny site.yaml."""
    from site_node.identity import init_site

    made = init_site(folder, name, coordinator)
    typer.echo(
        f"created site {name} in {folder}:\n"
        f"  {made.config} (default deny: it allows no analysis and no study yet)\n"
        f"  {made.tls_key} and {made.signing_key} (private: they never leave this folder)\n"
        f"  {made.csr}: send it to the alliance lead, who runs `alliance pki sign site.csr` "
        "and returns ca.pem and site.pem; put them in tls/\n"
        "then set dictionary and data in site.yaml and run `alliance site check`"
    )


@site_app.command("replies")
def site_replies(
    config: CONFIG,
    study: Annotated[str | None, typer.Option(help="one study only")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document per reply")] = False,
) -> None:
    """Show exactly what left this site: each reply's released values, decoded, with its
    mode and what it cost."""
    settings = load_yaml(config, SiteConfig)
    db = settings.state_dir / "site.db"
    if not db.exists():
        typer.echo("nothing has left this site")
        return
    store = SiteStore(db, settings.name, read_only=True)
    try:
        replies = store.released(study)
    finally:
        store.close()
    if not replies:
        typer.echo("nothing has left this site" + (f" for study {study}" if study else ""))
    for reply in replies:
        if as_json:
            typer.echo(json.dumps(reply))
            continue
        cost = f"rho {reply['rho']:.4g}" if reply["rho"] else f"epsilon {reply['epsilon']:.4g}"
        typer.echo(
            f"{reply['time']}  study {reply['study']}  task {reply['task']}  "
            f"{reply['analysis']} for {reply['researcher'] or '?'}  {reply['mode']}, {cost}"
        )
        for array in reply["arrays"]:
            noise = (
                f"{array['mechanism']}, scale {array['scale']:.4g}"
                if array["mechanism"] not in ("", "none")
                else "exact"
            )
            values = ", ".join(f"{v:.6g}" for v in array["values"])
            shape = "x".join(str(n) for n in array["shape"])
            typer.echo(f"  {array['name']}{f' [{shape}]' if shape else ''} ({noise}): {values}")


def _level(name: str, spent: PureDP, limit: PureDP | None) -> str:
    if limit is None:
        return f"{name}: spent {format_epsilon(spent.epsilon)} (no separate limit)"
    left = limit - spent
    return (
        f"{name}: spent {format_epsilon(spent.epsilon)} of {format_epsilon(limit.epsilon)}, "
        f"{format_epsilon(left.epsilon)} left"
    )


def budget_lines(settings: SiteConfig, store: SiteStore, study: str | None) -> list[str]:
    """The three budget levels, spent and remaining: site-wide this period, per study, and per
    researcher within each study."""
    policy = settings.policy
    lines = ["budgets (epsilon):"]
    if policy.period_budget is not None:
        now = dt.datetime.now(dt.UTC)
        spent = store.spent_in_period(policy.period_budget.period, now)
        name = f"  site-wide, {period_name(policy.period_budget.period, now)}, all studies"
        lines.append(_level(name, spent, policy.period_budget.epsilon))
    else:
        lines.append("  site-wide: no period budget (policy.period_budget)")
    for approval in policy.studies:
        if study is not None and approval.id != study:
            continue
        lines.append(_level(f"  study {approval.id}", store.spent(approval.id), approval.budget))
        for researcher, spent in store.spent_by_researcher(approval.id).items():
            lines.append(_level(f"    researcher {researcher}", spent, approval.researcher_budget))
    return lines


site_app.command("review")(review_study)
site_app.command("approve")(approve_study)
site_app.command("refuse")(refuse_study)
site_app.command("review-script")(review_script)
site_app.command("approve-script")(approve_script)

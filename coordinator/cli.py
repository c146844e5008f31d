"""``alliance coordinator|pki|study|run``: the alliance lead's and researchers' commands."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from coordinator import pki, tokens
from coordinator.client import NO_TOKEN, AllianceClient
from protocol.config import AnalysisRequest, CoordinatorConfig, StudyConfig, load_yaml
from protocol.errors import ConfigError
from protocol.logs import LOG_LEVEL, QUIET, configure, resolve_level
from protocol.tlsfiles import INSECURE

coordinator_app = typer.Typer(help="Run the coordinator.", no_args_is_help=True)
pki_app = typer.Typer(help="The alliance CA and its certificates.", no_args_is_help=True)
study_app = typer.Typer(
    help="Create, propose, amend, suspend, resume, close, list and show studies.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="API tokens for people (the alliance lead).", no_args_is_help=True)
script_app = typer.Typer(
    help="Researchers' own analyses: submit a script, or try it locally.", no_args_is_help=True
)

INSECURE_WARNING = (
    "WARNING: --insecure: the site link runs WITHOUT TLS. Anyone on the network can read the "
    "aggregates and impersonate a site. Use it only on loopback for experiments."
)
URL = Annotated[
    str, typer.Option("--url", envvar="ALLIANCE_URL", help="the coordinator's HTTP API")
]
TOKEN = Annotated[str, typer.Option("--token", envvar="ALLIANCE_TOKEN", help="your API token")]


@coordinator_app.command("serve")
def coordinator_serve(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", help="coordinator.yaml")],
    ready_file: Annotated[Path | None, typer.Option(help="write the bound ports here")] = None,
    insecure: INSECURE = False,
    log_level: LOG_LEVEL = None,
    quiet: QUIET = False,
) -> None:
    """Start the site link (gRPC) and the HTTP API; stop with Ctrl-C.

    Logs one line per change of state (listening, each site connected or gone, each task
    answered or refused) unless --quiet.
    """
    from coordinator.server import serve

    configure(resolve_level(log_level, quiet, ctx.find_root().params, logging.INFO))
    settings = load_yaml(config, CoordinatorConfig)
    if insecure:
        typer.echo(INSECURE_WARNING, err=True)
        settings = settings.model_copy(update={"tls": None, "insecure": True})
    try:
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"state_dir: cannot create {settings.state_dir} ({exc.strerror})"
        ) from None
    os.chdir(settings.state_dir)  # a relative sqlite:/// store lives in the state folder
    asyncio.run(serve(settings, ready_file, source=str(config)))


PKI_DIR = Annotated[Path, typer.Option("--dir", help="the PKI folder")]


@pki_app.command("init")
def pki_init(
    name: Annotated[str, typer.Option(help="the alliance's name")] = "alliance",
    folder: PKI_DIR = Path("pki"),
) -> None:
    """Create the alliance CA (ca.pem, ca.key)."""
    files = pki.init_ca(folder, name)
    typer.echo(f"created the alliance CA: {files.cert} (keep {files.key} offline)")


OVERWRITE = Annotated[
    bool, typer.Option("--overwrite", help="replace an existing certificate and key")
]


@pki_app.command("issue-site")
def pki_issue_site(name: str, folder: PKI_DIR = Path("pki"), overwrite: OVERWRITE = False) -> None:
    """Issue a site certificate whose subject is the site's name."""
    existed = (folder / "sites" / f"{name}.pem").exists()
    files = pki.issue_site(folder, name, overwrite=overwrite)
    typer.echo(
        f"{'re-issued' if existed else 'issued'} site {name}: give the site "
        f"{folder / 'ca.pem'}, {files.cert} and {files.key}"
    )


@pki_app.command("sign")
def pki_sign(
    request: Annotated[Path, typer.Argument(help="the site's tls/site.csr")],
    folder: PKI_DIR = Path("pki"),
    overwrite: OVERWRITE = False,
) -> None:
    """Sign a site's certificate request (from `alliance site init`): the site keeps its key."""
    cert = pki.sign_site_request(folder, request, overwrite=overwrite)
    typer.echo(
        f"signed {cert}: give the site {folder / 'ca.pem'} and {cert} (as tls/ca.pem and "
        "tls/site.pem); its key never left it"
    )


@pki_app.command("renew")
def pki_renew(name: str, folder: PKI_DIR = Path("pki")) -> None:
    """Re-issue a site's certificate for the key it already has (new dates, new serial)."""
    cert = pki.renew_site(folder, name)
    typer.echo(
        f"renewed {cert}: give the site its new certificate (as tls/site.pem); the old one "
        "stays valid until it expires unless you revoke it"
    )


@pki_app.command("revoke")
def pki_revoke(name: str, folder: PKI_DIR = Path("pki")) -> None:
    """Revoke a site's current certificate: the coordinator refuses it at the next handshake."""
    revoked = pki.revoke_site(folder, name)
    typer.echo(
        f"revoked site {name}'s certificate (serial {revoked.serial:x}) in {folder / 'crl.pem'}; "
        "a coordinator whose coordinator.yaml names it (crl:) refuses it from the site's next "
        "connection"
    )


@pki_app.command("issue-coordinator")
def pki_issue_coordinator(
    host: Annotated[list[str] | None, typer.Option("--host", help="name or IP sites dial")] = None,
    folder: PKI_DIR = Path("pki"),
    overwrite: OVERWRITE = False,
) -> None:
    """Issue the coordinator's certificate (SANs = the hosts sites dial)."""
    existed = (folder / "coordinator.pem").exists()
    files = pki.issue_coordinator(folder, host or None, overwrite=overwrite)
    typer.echo(f"{'re-issued' if existed else 'issued'} the coordinator certificate: {files.cert}")


@pki_app.command("show")
def pki_show(cert: Path) -> None:
    """Print a certificate's subject, issuer, validity and fingerprint."""
    typer.echo(str(pki.describe(cert)))


COORDINATOR_CONFIG = Annotated[
    Path, typer.Option("--config", help="the coordinator's coordinator.yaml")
]


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help=f"one of: {', '.join(tokens.ROLES)}")],
    person: Annotated[str, typer.Option("--person", help="who holds it, e.g. r.chen")],
    config: COORDINATOR_CONFIG,
) -> None:
    """Create a token; print it alone on stdout (give it to the person privately)."""
    tokens.check_role(role)
    tokens.check_person(person)
    settings = load_yaml(config, CoordinatorConfig)
    _, token = tokens.create_token(settings, role, person)
    typer.echo(
        f"created a {role} token for {person} in {tokens.tokens_file(settings)}; a running "
        "coordinator accepts it from the next request. Give it to them privately:",
        err=True,
    )
    typer.echo(token)


@token_app.command("list")
def token_list(config: COORDINATOR_CONFIG) -> None:
    """List who holds a token, in which role, and where it is kept (the file keeps only each
    token's digest: shown abbreviated)."""
    settings = load_yaml(config, CoordinatorConfig)
    path = tokens.tokens_file(settings)
    typer.echo(f"{'person':<20} {'role':<12} {'token':<8} {'created':<26} kept in")
    for entry in settings.tokens:
        typer.echo(
            f"{entry.user:<20} {entry.role:<12} {entry.token[:4] + '…':<8} {'-':<26} {config}"
        )
    for stored in tokens.read_tokens(path):
        typer.echo(
            f"{stored.user:<20} {stored.role:<12} {stored.fingerprint:<8} "
            f"{stored.created or '-':<26} {path}"
        )


@token_app.command("revoke")
def token_revoke(
    person: Annotated[str, typer.Argument(help="whose tokens to revoke")],
    config: COORDINATOR_CONFIG,
) -> None:
    """Revoke every token a person holds in the tokens file."""
    settings = load_yaml(config, CoordinatorConfig)
    count = tokens.revoke_tokens(settings, person)
    typer.echo(
        f"revoked {count} token{'s' if count != 1 else ''} of {person}; a running coordinator "
        f"refuses {'them' if count != 1 else 'it'} from the next request"
    )


def _client(url: str, token: str) -> AllianceClient:
    if not token.strip():
        raise ConfigError(NO_TOKEN)
    return AllianceClient(url, token)


def sites_command(url: URL = "http://127.0.0.1:8080", token: TOKEN = "") -> None:
    """List the sites the coordinator knows: connected or not, last seen, software version and
    dictionary digest (what your role may see)."""
    with _client(url, token) as client:
        listed = client.sites()
    if not listed:
        typer.echo("no site has connected yet")
    for site in listed:
        parts = [f"{site['name']:<16}", f"{site.get('status') or '-':<13}"]
        if "last_seen" in site:
            digest = (site.get("dictionary_digest") or "-")[:12]
            parts += [
                f"last seen {site.get('last_seen') or '-'}",
                f"version {site.get('version') or '-'}",
                f"dictionary {digest}",
            ]
        typer.echo("  ".join(parts))


def _say_step(body: dict[str, Any], verb: str) -> None:
    study = body["study"]
    told = ", ".join(body.get("told", [])) or "no connected site"
    typer.echo(
        f"{verb} study {study['id']} version {body['version']}: now {body['status']} "
        f"(sites told: {told})"
    )


@study_app.command("create")
def study_create(
    path: Path,
    draft: Annotated[bool, typer.Option(help="keep it a draft (sent nowhere)")] = False,
    url: URL = "http://127.0.0.1:8080",
    token: TOKEN = "",
) -> None:
    """Create the study described in a YAML file, proposed to its sites for approval (or a
    draft with --draft); it becomes active once `quorum` sites approved it."""
    study = load_yaml(path, StudyConfig)
    with _client(url, token) as client:
        created = client.create_study(study.model_dump(mode="json"), draft)
        status = client.study(created["id"])["status"]
    typer.echo(f"created study {created['id']}: {created['title']} ({status})")


@study_app.command("propose")
def study_propose(study_id: str, url: URL = "http://127.0.0.1:8080", token: TOKEN = "") -> None:
    """Send a draft study to its sites for review and approval."""
    with _client(url, token) as client:
        _say_step(client.study_step(study_id, "propose"), "proposed")


@study_app.command("amend")
def study_amend(path: Path, url: URL = "http://127.0.0.1:8080", token: TOKEN = "") -> None:
    """Amend a study from a YAML file: a new version, which each site must approve (until it
    does, a site answers under the version it last approved, or refuses)."""
    study = load_yaml(path, StudyConfig)
    with _client(url, token) as client:
        _say_step(client.amend_study(study.model_dump(mode="json")), "amended")


@study_app.command("suspend")
def study_suspend(
    study_id: str,
    reason: Annotated[str, typer.Option(help="why (the sites and the audit log keep it)")] = "",
    url: URL = "http://127.0.0.1:8080",
    token: TOKEN = "",
) -> None:
    """Suspend a study: no requests, and its sites refuse its tasks, until it is resumed."""
    with _client(url, token) as client:
        _say_step(client.study_step(study_id, "suspend", reason), "suspended")


@study_app.command("resume")
def study_resume(study_id: str, url: URL = "http://127.0.0.1:8080", token: TOKEN = "") -> None:
    """Resume a suspended study."""
    with _client(url, token) as client:
        _say_step(client.study_step(study_id, "resume"), "resumed")


@study_app.command("list")
def study_list(url: URL = "http://127.0.0.1:8080", token: TOKEN = "") -> None:
    """List studies."""
    with _client(url, token) as client:
        for study in client.studies():
            typer.echo(
                f"{study['id']:<24} {study['status']:<10} v{study.get('version', 1):<3} "
                f"{study['title']}"
            )


@study_app.command("show")
def study_show(study_id: str, url: URL = "http://127.0.0.1:8080", token: TOKEN = "") -> None:
    """Show a study and its requests."""
    with _client(url, token) as client:
        body = client.study(study_id)
    typer.echo(
        yaml.safe_dump(
            {
                "study": body["study"],
                "status": body["status"],
                "approvals": [
                    {
                        k: a[k]
                        for k in ("site", "version", "decision", "reason", "decided_at")
                        if a.get(k) not in (None, "")
                    }
                    for a in body.get("approvals", [])
                ],
                "requests": [
                    {k: r[k] for k in ("request_id", "analysis", "status", "error")}
                    for r in body["requests"]
                ],
            },
            sort_keys=False,
        )
    )


@study_app.command("report")
def study_report(
    study_id: str,
    out: Annotated[Path, typer.Option("--out", help="folder for report.md, .html, .json")] = Path(
        "report"
    ),
    coordinator: Annotated[
        Path | None,
        typer.Option("--coordinator", help="a coordinator's folder or file, read offline"),
    ] = None,
    url: URL = "http://127.0.0.1:8080",
    token: TOKEN = "",
) -> None:
    """Write a study's report (Markdown, HTML, JSON): requests, privacy spent per site and
    researcher, refusals, and each site's contribution."""
    # Here, not at the top: a site node starts through this package and needs no SQLAlchemy.
    from coordinator.report import StudyReport, offline_report

    if coordinator is not None:
        report = offline_report(coordinator, study_id)
    else:
        with _client(url, token) as client:
            report = StudyReport.from_json(client.study_report(study_id))
    for path in report.write(out):
        typer.echo(f"wrote {path}")


@study_app.command("close")
def study_close(study_id: str, url: URL = "http://127.0.0.1:8080", token: TOKEN = "") -> None:
    """Close a study: no more requests."""
    with _client(url, token) as client:
        _say_step(client.study_step(study_id, "close"), "closed")


def run_command(
    request: Path,
    study: Annotated[str, typer.Option("--study", help="the study id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON result")] = False,
    url: URL = "http://127.0.0.1:8080",
    token: TOKEN = "",
) -> None:
    """Submit an analysis request to a study and print its result."""
    body = load_yaml(request, AnalysisRequest).model_dump(mode="json", exclude_none=True)
    with _client(url, token) as client:
        result = client.run(study, body)
    typer.echo(json.dumps(result.to_dict()) if as_json else str(result))


@script_app.command("submit")
def script_submit(
    module: Annotated[Path, typer.Argument(help="the script's Python module")],
    manifest: Annotated[Path, typer.Argument(help="its manifest (YAML)")],
    study: Annotated[str, typer.Option("--study", help="the study id")],
    url: URL = "http://127.0.0.1:8080",
    token: TOKEN = "",
) -> None:
    """Store a script at the coordinator by its content hash; print the hash that requests
    name ({analysis: script, params: {hash: ...}}) and each site's admin approves."""
    texts = []
    for path in (module, manifest):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read it ({exc})") from None
    with _client(url, token) as client:
        stored = client.submit_script(study, texts[0], texts[1])
    state = "submitted" if stored["new"] else "already submitted"
    typer.echo(f"{state}: script {stored['name']!r} {stored['version']} to study {study}")
    typer.echo(f"hash: {stored['hash']}")
    offered = stored.get("offered_to") or []
    typer.echo(
        f"sent for review to {len(offered)} connected site(s)"
        + (f": {', '.join(offered)}" if offered else "")
        + "; a site that connects later gets it then"
    )
    typer.echo(
        "each site runs it once its admin approves this hash (alliance site review-script / "
        "approve-script); request it with analysis: script, params: {hash: " + stored["hash"] + "}"
    )

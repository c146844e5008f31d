"""``alliance site review-script`` and ``approve-script``: a site admin's review of
researchers' scripts, by hash; and ``alliance site review | approve | refuse`` for studies
(``site_node.studies``).

A site keeps every script a task brought (its module and manifest, exactly); it runs one only
after its admin approved that exact hash, so a changed byte is a new script and a new review.
Decisions are audited in the site's hash-chained log and are in force at once.
"""

from __future__ import annotations

import difflib
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from analyses.training.app import TrainingApp, reviewed_bundle
from protocol.config import DataDictionary, SiteConfig, load_yaml
from protocol.errors import ConfigError, ValidationError
from site_node.ledger import SiteStore
from site_node.policy import check_approval_terms
from site_node.studies import approval_terms, signed_decision, study_at, study_json
from site_node.studies import review_lines as review_study_lines


def _open_store(config: Path, read_only: bool) -> tuple[SiteConfig, SiteStore]:
    settings = load_yaml(config, SiteConfig)
    db = settings.state_dir / "site.db"
    if not db.exists():
        typer.echo(
            f"no script has reached site {settings.name} yet (its store {db} does not exist)",
            err=True,
        )
        raise typer.Exit(1)
    return settings, SiteStore(db, settings.name, read_only=read_only)


def _find(store: SiteStore, prefix: str) -> dict[str, Any]:
    try:
        return store.find_script(prefix)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def review_lines(
    script: dict[str, Any], earlier: dict[str, Any] | None, settings: SiteConfig
) -> list[str]:
    """The review in words: what the script may read and do here, and what changed."""
    bundle = reviewed_bundle(script["module"], script["manifest"])
    training = isinstance(bundle, TrainingApp)
    lines = [
        f"{'training app' if training else 'script'} {script['name']!r} version "
        f"{script['version']}",
        f"  hash:     {script['hash']}",
        f"  status:   {script['status']} at {settings.name} (received {script['received']})",
    ]
    if isinstance(bundle, TrainingApp):
        return [*lines, *_training_lines(bundle, settings), *_changes(script, earlier)]
    try:
        manifest = bundle.manifest
        dictionary = load_yaml(settings.dictionary, DataDictionary)
        lines.append(f"  may:      {manifest.describe()}")
        for name in manifest.variables:
            variable = dictionary.variables.get(name)
            kind = "not in the dictionary" if variable is None else variable.type
            lines.append(f"    reads {name} ({kind})")
        denied = sorted(set(manifest.variables) & set(settings.policy.denied_variables))
        if denied:
            lines.append(f"  NOTE: this site denies {', '.join(denied)}: tasks will be refused")
    except ValidationError as exc:
        lines.append(f"  manifest: INVALID: {exc}")
    limits = settings.policy.scripts
    lines.append(
        f"  runs in:  the sandbox, at most {limits.cpu_seconds} CPU s, {limits.memory_mb} MB, "
        f"{limits.wall_seconds:g} s per task; no network, no files, no processes"
    )
    if "script" not in settings.policy.allowed_analyses:
        lines.append(
            "  NOTE: this site's policy does not allow the analysis 'script' "
            "(policy.allowed_analyses): approved scripts still do not run"
        )
    return [*lines, *_changes(script, earlier)]


def _training_lines(bundle: TrainingApp, settings: SiteConfig) -> list[str]:
    """What a training app may do here."""
    lines = []
    try:
        lines.append(f"  may:      {bundle.manifest.describe()}")
    except ValidationError as exc:
        lines.append(f"  manifest: INVALID: {exc}")
    lines.append(
        "  runs in:  the site node's own process (a Flower ClientApp), with the site node's "
        "rights: read its module (above) before approving"
    )
    if "train" not in settings.policy.allowed_analyses:
        lines.append(
            "  NOTE: this site's policy does not allow the analysis 'train' "
            "(policy.allowed_analyses): an approved training app still does not run"
        )
    return lines


def _changes(script: dict[str, Any], earlier: dict[str, Any] | None) -> list[str]:
    """The differences from the earlier version this site decided on, or why there are none."""
    lines: list[str] = []
    if earlier is not None:
        lines.append(
            f"  changes since {earlier['version']} ({earlier['hash'][:12]}, {earlier['status']}):"
        )
        for old, new, label in (
            (earlier["manifest"], script["manifest"], "manifest"),
            (earlier["module"], script["module"], "module"),
        ):
            diff = list(
                difflib.unified_diff(
                    old.splitlines(),
                    new.splitlines(),
                    f"{label} (earlier)",
                    f"{label}",
                    lineterm="",
                )
            )
            lines.extend("    " + line for line in diff) if diff else lines.append(
                f"    {label}: unchanged"
            )
    else:
        lines.append("  changes:  no earlier version of this script has reached this site")
    return lines


def _earlier(store: SiteStore, script: dict[str, Any]) -> dict[str, Any] | None:
    """The latest other script of the same name this site decided on (else: received)."""
    others = [
        s for s in store.scripts() if s["name"] == script["name"] and s["hash"] != script["hash"]
    ]
    decided = [s for s in others if s["status"] == "approved"]
    found = decided or others
    return found[0] if found else None


def review_script(
    digest: Annotated[str, typer.Argument(help="the script's hash (8 or more hex digits)")],
    config: Annotated[Path, typer.Option("--config", help="site.yaml")],
    plain: Annotated[
        bool, typer.Option(help="no colours (the default when not a terminal)")
    ] = False,
) -> None:
    """Show a script a task brought here: its manifest, what it may read, its code, and what
    changed since an earlier version. Changes nothing."""
    settings, store = _open_store(config, read_only=True)
    try:
        script = _find(store, digest)
        earlier = _earlier(store, script)
    finally:
        store.close()
    for line in review_lines(script, earlier, settings):
        typer.echo(line)
    typer.echo("\n--- manifest ---")
    typer.echo(script["manifest"].rstrip())
    typer.echo("--- module ---")
    if plain or not sys.stdout.isatty():
        for number, line in enumerate(script["module"].splitlines(), start=1):
            typer.echo(f"{number:4d}  {line}")
    else:
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(script["module"], "python", line_numbers=True))
    if script["status"] != "approved":
        typer.echo(
            f"\napprove it with: alliance site approve-script {script['hash']} --config {config}"
        )


def approve_script(
    digest: Annotated[str, typer.Argument(help="the script's hash (8 or more hex digits)")],
    config: Annotated[Path, typer.Option("--config", help="site.yaml")],
    by: Annotated[str, typer.Option(help="who approves (for the audit log)")] = "site admin",
    refuse: Annotated[str | None, typer.Option(help="refuse it instead, with this reason")] = None,
) -> None:
    """Approve a script by its exact hash (or refuse it with --refuse REASON): in force at
    once, without a restart, and audited."""
    settings, store = _open_store(config, read_only=False)
    try:
        script = _find(store, digest)
        try:
            bundle = reviewed_bundle(script["module"], script["manifest"])
            bundle.check_source()
            _ = bundle.manifest
        except ValidationError as exc:
            typer.echo(f"error: cannot approve: {exc}", err=True)
            raise typer.Exit(1) from None
        store.decide_script(script["hash"], refuse is None, by, refuse or "")
    finally:
        store.close()
    verb = "approved" if refuse is None else "refused"
    typer.echo(
        f"{verb} script {script['name']!r} {script['version']} ({script['hash']}) at "
        f"{settings.name}; in force from the next task"
    )


# ---------------------------------------------------------------------- studies
def _study_store(config: Path) -> tuple[SiteConfig, SiteStore]:
    settings = load_yaml(config, SiteConfig)
    db = settings.state_dir / "site.db"
    if not db.exists():
        typer.echo(
            f"no study has reached site {settings.name} yet (its store {db} does not exist; "
            "`alliance site serve` creates it)",
            err=True,
        )
        raise typer.Exit(1)
    return settings, SiteStore(db, settings.name)


def review_study(
    study: Annotated[str, typer.Argument(help="the study id")],
    config: Annotated[Path, typer.Option("--config", help="site.yaml")],
) -> None:
    """Show what a study may do with this site's data if approved, and what changed since the
    version this site last approved. Changes nothing."""
    settings = load_yaml(config, SiteConfig)
    db = settings.state_dir / "site.db"
    if not db.exists():
        typer.echo(f"no study has reached site {settings.name} yet ({db} does not exist)", err=True)
        raise typer.Exit(1)
    store = SiteStore(db, settings.name, read_only=True)
    try:
        dictionary = load_yaml(settings.dictionary, DataDictionary)
        lines = review_study_lines(
            store, settings.name, study, dictionary, settings.policy.approval(study)
        )
    except ValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except sqlite3.OperationalError:  # a store the site node has not yet opened with studies
        typer.echo(f"error: study {study!r} has not reached this site yet", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    for line in lines:
        typer.echo(line)
    typer.echo(
        f"\napprove it with: alliance site approve {study} --config {config}\n"
        f"refuse it with:  alliance site refuse {study} --reason '...' --config {config}"
    )


def _decide_study(
    study_id: str, config: Path, by: str, approve: bool, reason: str, budget: float | None
) -> None:
    from protocol.budget import PureDP
    from protocol.signing import SigningKey, study_digest
    from site_node.runtime import SIGNING_KEY_FILE

    settings, store = _study_store(config)
    try:
        try:
            study = study_at(store, study_id)
        except ValidationError as exc:
            typer.echo(f"error: cannot decide: {exc}", err=True)
            raise typer.Exit(1) from None
        dictionary = load_yaml(settings.dictionary, DataDictionary)
        terms = None
        if approve:
            terms = approval_terms(study, dictionary, settings.policy.approval(study_id))
            try:
                check_approval_terms(terms, dictionary, settings.name)
            except ConfigError as exc:
                typer.echo(f"error: cannot approve: {exc}", err=True)
                raise typer.Exit(1) from None
            if budget is not None:
                if not budget > 0 or budget > terms.budget.epsilon:
                    typer.echo(
                        f"error: --budget {budget:g}: must be above 0 and at most the study's "
                        f"{terms.budget.epsilon:g} (a site may only lower it)",
                        err=True,
                    )
                    raise typer.Exit(1)
                terms = terms.model_copy(update={"budget": PureDP(budget)})
        key = SigningKey.load(settings.state_dir / SIGNING_KEY_FILE)
        decision = signed_decision(
            settings.name,
            key,
            study.id,
            study.version,
            study_digest(study_json(study)),
            approve,
            by,
            reason,
            terms,
        )
        store.record_decision(decision, "command line")
    finally:
        store.close()
    verb = "approved" if approve else "refused"
    typer.echo(
        f"{verb} study {study.id} version {study.version} at {settings.name}; in force from the "
        "next task (a running site node reports it to the coordinator within a second)"
    )


def approve_study(
    study: Annotated[str, typer.Argument(help="the study id")],
    config: Annotated[Path, typer.Option("--config", help="site.yaml")],
    by: Annotated[str, typer.Option(help="who approves (for the audit log)")] = "site admin",
    budget: Annotated[
        float | None, typer.Option(help="a lower epsilon budget for the study at this site")
    ] = None,
) -> None:
    """Approve the newest version of a study, signed with this site's key: in force at once,
    without a restart, audited, and reported to the coordinator."""
    _decide_study(study, config, by, True, "", budget)


def refuse_study(
    study: Annotated[str, typer.Argument(help="the study id")],
    config: Annotated[Path, typer.Option("--config", help="site.yaml")],
    reason: Annotated[str, typer.Option(help="why (the coordinator and the lead see it)")],
    by: Annotated[str, typer.Option(help="who refuses (for the audit log)")] = "site admin",
) -> None:
    """Refuse a study (or withdraw an approval): in force at once, signed and reported."""
    if not reason.strip():
        typer.echo("error: --reason must say why the study is refused", err=True)
        raise typer.Exit(1)
    _decide_study(study, config, by, False, reason.strip()[:500], None)

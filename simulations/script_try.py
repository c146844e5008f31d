"""``alliance script try``: run a script on local dummy data exactly as sites and the
coordinator would (sandbox, clipping, the sites' own privacy engine), before submitting it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from analyses.base import AnalysisContext
from analyses.sandbox import SandboxLimits, run_function
from analyses.scripts import (
    ScriptAnalysis,  # noqa: F401 - registers the analysis
    ScriptBundle,
    run_per_record,
    site_arrays,
)
from protocol.config import DataDictionary, SDCThresholds
from protocol.errors import AllianceError, ConfigError
from site_node.privacy import privatize


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None


def try_script(
    bundle: ScriptBundle,
    data: pd.DataFrame,
    mode: str,
    epsilon: float,
    limits: SandboxLimits,
    dictionary: DataDictionary | None = None,
) -> dict[str, Any]:
    """One site's release and the combined result, with what clipping changed."""
    from analyses import get_analysis

    bundle.check_source()
    manifest = bundle.manifest
    missing = [v for v in manifest.variables if v not in data.columns]
    if missing:
        raise AllianceError(
            f"the data has no column {', '.join(map(repr, missing))} (the manifest reads "
            f"{', '.join(manifest.variables)})"
        )
    contributions = run_per_record(bundle, data, limits)
    analysis = get_analysis("script")
    params = {"hash": bundle.hash, "module": bundle.module, "manifest": bundle.manifest_text}
    parsed = analysis.params_model.model_validate(params)
    # declare reads only the manifest: no dictionary is needed to try a script.
    ctx = AnalysisContext(dictionary or DataDictionary.model_construct(), mode, SDCThresholds())
    spec = analysis.declare(parsed, ctx)
    arrays = site_arrays(contributions.clipped, manifest, mode)
    record = privatize(spec, arrays, mode, epsilon, SDCThresholds())
    total = record["total"]
    combined = run_function(
        bundle.label, bundle.module, "combine", limits, total=total, n=float(record["n"])
    )
    sd = float(np.sqrt(record.releases["total"].variance()))
    return {
        "script": bundle.label,
        "hash": bundle.hash,
        "records": len(contributions.clipped),
        "clipped": contributions.touched,
        "mode": mode,
        "epsilon": epsilon if mode == "dp" else 0.0,
        "total": [float(v) for v in total],
        "exact_total": [float(v) for v in arrays["total"]],
        "total_sd": sd,
        "n": float(record["n"]),
        "estimates": combined.value,
        "sandbox": contributions.layers,
    }


def script_try(
    module: Annotated[Path, typer.Argument(help="the script's Python module")],
    data: Annotated[Path, typer.Option("--data", help="a CSV of dummy records")],
    manifest: Annotated[
        Path | None, typer.Option(help="its manifest (default: MODULE with .yaml)")
    ] = None,
    epsilon: Annotated[float, typer.Option(help="dp: this site's epsilon")] = 1.0,
    privacy: Annotated[str, typer.Option(help="dp, sdc or off")] = "dp",
) -> None:
    """Run a script on a CSV with the sites' clipping and noise, and print what a site would
    release and what combine makes of it (nothing is sent anywhere)."""
    if privacy not in ("dp", "sdc", "off"):
        raise AllianceError(f"--privacy: {privacy!r} is not a privacy mode; use dp, sdc or off")
    bundle = ScriptBundle(_read(module), _read(manifest or module.with_suffix(".yaml")))
    try:
        frame = pd.read_csv(data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--data {data}: cannot read it as CSV ({exc})") from None
    out = try_script(bundle, frame, privacy, epsilon, SandboxLimits())
    typer.echo(f"script {out['script']}")
    typer.echo(f"  hash: {out['hash']}")
    typer.echo(
        f"  records: {out['records']} (complete cases); clipped to the bound: {out['clipped']}"
    )
    if privacy == "dp":
        sd = out["total_sd"]
        typer.echo(f"  dp, epsilon {epsilon:g}: each total carries Laplace noise of sd {sd:.4g}")
    typer.echo("  totals released: " + ", ".join(f"{v:.6g}" for v in out["total"]))
    typer.echo("  exact totals:    " + ", ".join(f"{v:.6g}" for v in out["exact_total"]))
    for name, value in out["estimates"].items():
        typer.echo(f"  {name} = {value}")
    layers = ", ".join(f"{k}: {v}" for k, v in out["sandbox"].items())
    typer.echo(f"  sandbox: {layers}")

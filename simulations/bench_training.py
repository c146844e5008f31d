"""Benchmark: federated training against pooled scikit-learn, and its round latency.

    python -m simulations.bench_training [--rounds 60] [--link-rounds 20]

Two parts:

* **Quality** (in process, through the same round driver and Flower strategy as the real
  path; mode ``off``, no noise): FedAvg logistic regression on the UCI heart data (four
  hospitals) and on 10 synthetic sites (``simulations.synthetic``, its known logistic model),
  against ``sklearn.linear_model.LogisticRegression(C=inf)`` on the pooled training rows of
  the same per-site splits. Reported: held-out AUC and accuracy (threshold 0.5) of both on the
  pooled held-out rows, their gaps, the first round after which the federated model's
  held-out AUC stays within 0.005 of its final value, and wall times.
* **Round latency over the real link**: a coordinator and four heart-hospital site processes
  on loopback (mutual TLS, dp, each round charged to the sites' SQLite ledgers), one training
  request of ``--link-rounds`` rounds; the coordinator's time per round (the scheduler's
  ``timings.total_seconds`` over its rounds). ``simulations.bench_flower_runtime`` measures
  Flower's own deployment runtime on a comparable task.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.testing import federate
from analyses.training import pooled_split
from analyses.training.app import TrainingApp, builtin_app_paths
from protocol.config import DataDictionary, StudyConfig
from simulations.heart import SITES, heart_dictionary, heart_sites, heart_source
from simulations.synthetic import generate_sites, synthetic_dictionary

HEART_FEATURES = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]
SYNTHETIC_FEATURES = ["age", "sex", "bmi", "sbp", "smoker", "stage"]


def builtin_app() -> TrainingApp:
    """The built-in gradient-descent ClientApp."""
    module, manifest = builtin_app_paths()
    return TrainingApp(Path(module).read_text(), Path(manifest).read_text())


def quality(
    label: str,
    frames: Mapping[str, pd.DataFrame],
    dictionary: DataDictionary,
    features: list[str],
    outcome: str,
    rounds: int,
) -> dict[str, Any]:
    """Federated FedAvg against pooled scikit-learn on one federation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score

    app = builtin_app()
    raw = {
        "app": app.hash,
        "module": app.module,
        "manifest": app.manifest_text,
        "features": features,
        "outcome": outcome,
        "rounds": rounds,
        "learning_rate": 2.0,
        "clip": 100.0,
    }
    started = time.perf_counter()
    result = federate("train", frames, raw, dictionary)
    federated_seconds = time.perf_counter() - started
    x_train, y_train, x_test, y_test = pooled_split(frames, raw, dictionary)
    started = time.perf_counter()
    pooled = LogisticRegression(C=np.inf, max_iter=10_000).fit(x_train, y_train)
    pooled_seconds = time.perf_counter() - started
    p_fed = result.predict_proba(x_test)
    p_pool = pooled.predict_proba(x_test)[:, 1]
    final = result.history[-1]["auc"]
    converged = next(
        (
            row["round"]
            for row in result.history
            if all(abs(later["auc"] - final) <= 0.005 for later in result.history[row["round"] :])
        ),
        rounds,
    )
    return {
        "federation": label,
        "sites": len(frames),
        "train rows": len(y_train),
        "held-out rows": len(y_test),
        "AUC federated": roc_auc_score(y_test, p_fed),
        "AUC pooled": roc_auc_score(y_test, p_pool),
        "accuracy federated": accuracy_score(y_test, p_fed >= 0.5),
        "accuracy pooled": accuracy_score(y_test, p_pool >= 0.5),
        "rounds": rounds,
        "converged by round": converged,
        "federated s": federated_seconds,
        "pooled s": pooled_seconds,
    }


def link_latency(rounds: int, folder: Path) -> dict[str, Any]:
    """One training request over real processes; the coordinator's seconds per round."""
    from simulations.federation import LocalFederation, SiteSpec

    app = builtin_app()
    specs = [
        SiteSpec(name, heart_source(name), mode="dp", approval={"rho_budget": 100.0})
        for name in SITES
    ]
    federation = LocalFederation(specs, heart_dictionary(), folder, log_level="WARNING")
    study = StudyConfig.model_validate(
        {"id": "bench", "title": "training latency", "privacy": {"mode": "dp", "budget": 10}}
    )
    try:
        federation.start(study)
        with federation.researcher() as client:
            digest = client.submit_script("bench", app.module, app.manifest_text)["hash"]
            for name in SITES:
                store_approve(federation.site_dir(name) / "site.yaml", digest)
            body = {
                "analysis": "train",
                "params": {
                    "app": digest,
                    "features": HEART_FEATURES,
                    "outcome": "disease",
                    "rounds": rounds,
                },
                "rho": 1.0,
            }
            client.submit("bench", {**body, "params": {**body["params"], "rounds": 1}})  # warm
            started = time.perf_counter()
            reply = client.submit("bench", body)
            wall = time.perf_counter() - started
    finally:
        federation.stop()
    assert reply["status"] == "done", reply.get("error")
    timings = reply["result"]["timings"]
    return {
        "rounds (dp, incl. final evaluation)": timings["rounds"],
        "coordinator s per round": timings["total_seconds"] / timings["rounds"],
        "researcher wall s": wall,
    }


def store_approve(config: Path, digest: str) -> None:
    """``alliance site approve-script`` for one site, as its admin runs it."""
    from typer.testing import CliRunner

    from simulations.cli import app

    done = CliRunner().invoke(app, ["site", "approve-script", digest, "--config", str(config)])
    if done.exit_code != 0:
        raise RuntimeError(done.output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--link-rounds", type=int, default=20)
    args = parser.parse_args()
    rows = [
        quality(
            "UCI heart", heart_sites(), heart_dictionary(), HEART_FEATURES, "disease", args.rounds
        ),
        quality(
            "synthetic",
            generate_sites(10, 2000, seed=7),
            synthetic_dictionary(),
            SYNTHETIC_FEATURES,
            "outcome",
            args.rounds,
        ),
    ]
    table = pd.DataFrame(rows).set_index("federation").T
    with pd.option_context("display.float_format", "{:.4f}".format):
        print(table.to_string())
    with tempfile.TemporaryDirectory(prefix="alliance-bench-") as tmp:
        latency = link_latency(args.link_rounds, Path(tmp))
    print()
    for key, value in latency.items():
        print(f"{key:>40}: {value:.4f}" if isinstance(value, float) else f"{key:>40}: {value}")


if __name__ == "__main__":
    main()

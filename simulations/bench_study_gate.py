"""Benchmark: what a site's study gate adds to every task (``StudyGate.approval``).

    python -m simulations.bench_study_gate [--studies 1 100 1000] [--repeat 5000]

A real SQLite store holding one decision and one notice per study (``--studies`` of them),
the way `alliance site approve` and the coordinator's notices leave it. Each figure is the
median over ``--repeat`` calls of the gate for one approved study: its latest decision, the
lead's notices of it, and the approval parsed; then the policy copy the runtime hands to
``check_task``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from protocol.config import SitePolicy, StudyConfig
from protocol.signing import SigningKey, sign_message
from protocol.wire import alliance_pb2 as pb
from simulations.heart import heart_dictionary
from site_node.ledger import SiteStore
from site_node.studies import StudyGate, approval_terms, signed_decision, study_json


def fill(gate: StudyGate, studies: int, coordinator: SigningKey) -> None:
    dictionary = heart_dictionary()
    for number in range(studies):
        study = StudyConfig.model_validate({"id": f"s{number}", "title": "bench"})
        terms = approval_terms(study, dictionary)
        gate.store.record_decision(
            signed_decision("a", gate.key, study.id, 1, "", True, "it", "", terms), "bench"
        )
        notice = pb.StudyNotice(
            study_id=study.id, version=1, state="active", study_json=study_json(study)
        )
        sign_message(notice, coordinator)
        gate.receive_notice(notice)


def time_gate(studies: int, repeat: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        store = SiteStore(Path(folder) / "site.db", "a")
        gate = StudyGate(store, "a", SigningKey.generate())
        fill(gate, studies, SigningKey.generate())
        policy = SitePolicy(allowed_analyses=["mean"])
        gate_times, total_times = [], []
        for _ in range(repeat):
            started = time.perf_counter()
            approval = gate.approval("s0", 1)
            gated = time.perf_counter()
            policy.model_copy(update={"studies": [approval]})
            done = time.perf_counter()
            gate_times.append(gated - started)
            total_times.append(done - started)
        store.close()
    return statistics.median(gate_times), statistics.median(total_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--repeat", type=int, default=5000)
    args = parser.parse_args()
    print(f"{'studies':>8} {'gate median':>12} {'with policy copy':>17}")
    for studies in args.studies:
        gate, total = time_gate(studies, args.repeat)
        print(f"{studies:>8} {gate * 1e6:>10.1f}us {total * 1e6:>15.1f}us")


if __name__ == "__main__":
    main()

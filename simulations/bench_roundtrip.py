"""Benchmark: one `mean` request, coordinator to every site and back, on loopback.

    python -m simulations.bench_roundtrip [--sites 4 50] [--requests 60] [--rows 2000]

Real processes, mutual TLS, dp mode (the ledger is charged in each site's SQLite file before
every reply leaves). Two figures per federation size:
  * end to end: the researcher's HTTP call (POST with wait), from submit to the stored result;
  * coordinator: the scheduler's own round trip (tasks out, replies in, combined), as reported
    in the result's `timings.total_seconds`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from protocol.config import DataSource, StudyConfig
from simulations.federation import LocalFederation, SiteSpec
from simulations.synthetic import synthetic_dictionary, write_sites


def run(n_sites: int, requests: int, rows: int, folder: Path) -> tuple[list[float], list[float]]:
    files = write_sites(folder / "data", n_sites, rows, seed=1)
    specs = [
        SiteSpec(name, DataSource(path=path), mode="dp", budget=1e6)
        for name, path in files.sites.items()
    ]
    federation = LocalFederation(specs, synthetic_dictionary(), folder / "run", log_level="WARNING")
    study = StudyConfig.model_validate(
        {"id": "bench", "title": "round trip", "privacy": {"mode": "dp", "budget": 1e6}}
    )
    end_to_end: list[float] = []
    coordinator: list[float] = []
    try:
        started = time.monotonic()
        federation.start(study)
        print(f"  {n_sites} sites connected in {time.monotonic() - started:.1f} s")
        body = {"analysis": "mean", "params": {"variable": "sbp"}, "epsilon": 0.01}
        with federation.researcher() as client:
            for i in range(requests + 5):
                t0 = time.perf_counter()
                reply = client.submit("bench", body)
                elapsed = time.perf_counter() - t0
                assert reply["status"] == "done", reply.get("error")
                if i >= 5:  # warm-up: first connections, first imports on the sites
                    end_to_end.append(elapsed)
                    coordinator.append(reply["result"]["timings"]["total_seconds"])
    finally:
        federation.stop()
    return end_to_end, coordinator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 50])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    results = []
    for n_sites in args.sites:
        with tempfile.TemporaryDirectory(prefix="alliance-bench-") as tmp:
            e2e, coord = run(n_sites, args.requests, args.rows, Path(tmp))
        results.append((n_sites, e2e, coord))
    print(
        f"\n{'sites':>5} {'requests':>9} {'end-to-end median':>18} {'p90':>8} "
        f"{'coordinator median':>19} {'p90':>8}"
    )
    for n_sites, e2e, coord in results:
        p90 = statistics.quantiles(e2e, n=10)[-1]
        c90 = statistics.quantiles(coord, n=10)[-1]
        print(
            f"{n_sites:>5} {len(e2e):>9} {statistics.median(e2e) * 1e3:>16.1f}ms "
            f"{p90 * 1e3:>6.1f}ms {statistics.median(coord) * 1e3:>17.1f}ms {c90 * 1e3:>6.1f}ms"
        )


if __name__ == "__main__":
    main()

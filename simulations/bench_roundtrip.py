"""Benchmark: one `mean` request, coordinator to every site and back, on loopback.

    python -m simulations.bench_roundtrip [--sites 4 50] [--requests 60] [--rows 2000]

Real processes, mutual TLS, dp mode (the ledger is charged in each site's SQLite file before
every reply leaves). Three figures per federation size:
  * from outside: `alliance simulate --json` with the request given ``--requests`` times, run as
    a user runs it; the median gap between consecutive result lines on its stdout (everything a
    researcher waits for: the CLI's HTTP client, the API, the store, the sites, printing);
  * end to end: the researcher's HTTP call (POST with wait), from submit to the stored result;
  * coordinator: the scheduler's own round trip (tasks out, replies in, combined), as reported
    in the result's `timings.total_seconds`.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol.config import DataSource, StudyConfig
from simulations.federation import LocalFederation, SiteSpec, child_env
from simulations.synthetic import generate_sites, synthetic_dictionary, write_sites

#: Result lines skipped before gaps count: first connections, first imports on the sites.
WARM_UP = 5


def run_outside(n_sites: int, requests: int, rows: int, folder: Path) -> list[float]:
    """Gaps between consecutive result lines of ``alliance simulate --json``, in seconds."""
    files = write_sites(folder / "data", generate_sites(n_sites, rows, seed=1))
    request = folder / "mean.yaml"
    request.write_text("analysis: mean\nparams: {variable: sbp}\n")
    command = [sys.executable, "-m", "simulations.cli", "simulate"]
    for name, path in files.sites.items():
        command += ["--site", f"{name}={path}"]
    command += ["--dictionary", str(files.dictionary), "--privacy", "dp", "--epsilon", "0.01"]
    command += ["--budget", "1000000", "--json"]
    command += ["--request", str(request)] * (requests + WARM_UP)
    arrivals: list[float] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(), text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                arrivals.append(time.perf_counter())
    if proc.returncode != 0 or len(arrivals) != requests + WARM_UP:
        raise RuntimeError(f"alliance simulate failed ({len(arrivals)} result lines)")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return gaps[WARM_UP - 1 :]


def run(n_sites: int, requests: int, rows: int, folder: Path) -> tuple[list[float], list[float]]:
    files = write_sites(folder / "data", generate_sites(n_sites, rows, seed=1))
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
            for i in range(requests + WARM_UP):
                t0 = time.perf_counter()
                reply = client.submit("bench", body)
                elapsed = time.perf_counter() - t0
                assert reply["status"] == "done", reply.get("error")
                if i >= WARM_UP:
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
            outside = run_outside(n_sites, args.requests, args.rows, Path(tmp) / "outside")
            e2e, coord = run(n_sites, args.requests, args.rows, Path(tmp))
        results.append((n_sites, outside, e2e, coord))
    print(
        f"\n{'sites':>5} {'requests':>9} {'outside median':>15} {'p90':>8} "
        f"{'end-to-end median':>18} {'p90':>8} {'coordinator median':>19} {'p90':>8}"
    )
    for n_sites, outside, e2e, coord in results:
        cells = []
        for sample, width in ((outside, 13), (e2e, 16), (coord, 17)):
            p90 = statistics.quantiles(sample, n=10)[-1]
            cells.append(f"{statistics.median(sample) * 1e3:>{width}.1f}ms {p90 * 1e3:>6.1f}ms")
        print(f"{n_sites:>5} {len(e2e):>9} " + " ".join(cells))


if __name__ == "__main__":
    main()

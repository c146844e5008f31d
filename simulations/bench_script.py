"""Benchmark: what one call of a researcher's script costs in the sandbox.

    python -m simulations.bench_script [--rows 1000000] [--repeat 11]

Times, as medians of ``--repeat`` calls (milliseconds):

* a fresh interpreter per call (the sandbox's cold path: start Python, import numpy and pandas,
  lock down, run): what every call cost before the fork server;
* a child forked from the warm fork server (the default path once it is up);
* a weighted-mean script's ``per_record`` on ``--rows`` rows through the fork server (the data
  is pickled through a pipe to the child and the contributions come back as ``.npy``);
* the framework's clipping of those contributions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.sandbox import SandboxLimits, run_function
from analyses.scripts import ScriptBundle, clip_contributions, contributions_bytes

SCRIPTS = Path(__file__).resolve().parent.parent / "configs" / "scripts"
TINY = "import numpy as np\n\n\ndef per_record(frame):\n    return np.ones((len(frame), 1))\n"


def median_ms(work: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()
    limits = SandboxLimits(cpu_seconds=60, memory_mb=4096, wall_seconds=120)
    small = pd.DataFrame({"a": [1.0, 2.0, 3.0]})
    run_function("warm-up", TINY, "per_record", limits, frame=small)  # starts the fork server
    cold = median_ms(
        lambda: run_function("cold", TINY, "per_record", limits, frame=small, warm=False),
        max(3, args.repeat // 3),
    )
    warm = median_ms(
        lambda: run_function("warm", TINY, "per_record", limits, frame=small), args.repeat
    )
    bundle = ScriptBundle(
        (SCRIPTS / "weighted_mean.py").read_text(), (SCRIPTS / "weighted_mean.yaml").read_text()
    )
    rng = np.random.default_rng(7)
    big = pd.DataFrame(
        {"age": rng.uniform(20, 90, args.rows), "chol": rng.uniform(100, 400, args.rows)}
    )
    out: list[np.ndarray] = []

    def big_call() -> None:
        cap = contributions_bytes(args.rows, 2)
        run = run_function("wmean", bundle.module, "per_record", limits, frame=big, output_cap=cap)
        out[:] = [run.value]

    per_record = median_ms(big_call, max(3, args.repeat // 2))
    clip = median_ms(lambda: clip_contributions(out[0], bundle.manifest, args.rows), args.repeat)
    print(f"sandbox call, fresh interpreter (cold path): {cold:8.1f} ms")
    print(f"sandbox call, forked from the fork server:   {warm:8.1f} ms")
    print(f"weighted mean per_record on {args.rows:,} rows:   {per_record:8.1f} ms")
    print(f"clipping {args.rows:,} contributions:            {clip:8.1f} ms")


if __name__ == "__main__":
    main()

"""Benchmark: aggregate pushdown against reading the columns into pandas, at a site.

    python -m simulations.bench_pushdown [--rows 10000000] [--sources parquet,postgresql]

A table of ``--rows`` rows is generated in place (DuckDB writes the Parquet file, PostgreSQL
fills its table with ``generate_series``): 5 numeric covariates, sex and smoker (0/1), a 0/1
outcome drawn from a logistic model, and 3 columns nothing reads. Then, each in a fresh process
so that its peak memory is its own, a site node is started on it (``SiteRuntime.from_config``)
and computes four dp releases' exact aggregates:

* ``mean`` of chol (count, sum, sum of squares);
* ``histogram`` of age on 8 public bins;
* a 2-way ``table`` of sex by smoker;
* one round of a 5-covariate logistic ``glm`` (X'WX, the score, the deviance, n) at fixed
  coefficients.

``pushdown``: ``data.pushdown: true``; each aggregate is one SQL query in the source.
``pandas``: the site as without pushdown: the connector reads the dictionary's columns into
pandas at start, then ``Analysis.local`` computes on them.

Times are wall seconds after the libraries are imported (start: opening the source, or reading
the columns; then each analysis); memory is the process's peak resident set (ru_maxrss), which
includes the interpreter and libraries (about 200 MiB before any data).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

PG_URL = os.environ.get("ALLIANCE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLE = "alliance_bench_pushdown"
DICTIONARY = {
    "variables": {
        "age": {"type": "numeric", "min": 18, "max": 100},
        "sbp": {"type": "numeric", "min": 60, "max": 250},
        "chol": {"type": "numeric", "min": 50, "max": 700},
        "bmi": {"type": "numeric", "min": 10, "max": 70},
        "glucose": {"type": "numeric", "min": 40, "max": 400},
        "sex": {"type": "binary"},
        "smoker": {"type": "binary"},
        "event": {"type": "binary"},
    }
}
# Each generator reads random() through a fresh subquery, so columns are independent.
COLUMNS = [
    "18 + (random() * 80)::int AS age",
    "90 + random() * 100 AS sbp",
    "120 + random() * 250 AS chol",
    "16 + random() * 30 AS bmi",
    "60 + random() * 200 AS glucose",
    "(random() < 0.5)::int AS sex",
    "(random() < 0.3)::int AS smoker",
    "random() AS note_a",
    "random() AS note_b",
    "random() AS note_c",
]
OUTCOME = (
    "*, (random() < 1 / (1 + exp(-(-6 + 0.04 * age + 0.01 * sbp + 0.004 * chol "
    "+ 0.02 * bmi + 0.002 * glucose))))::int AS event"
)
REQUESTS: list[tuple[str, dict[str, Any], int, list[float] | None]] = [
    ("mean", {"variable": "chol"}, 0, None),
    ("histogram", {"variable": "age", "edges": [18, 30, 40, 50, 60, 70, 80, 90, 100]}, 0, None),
    ("table", {"rows": "sex", "cols": "smoker"}, 0, None),
    (
        "glm",
        {"formula": "event ~ age + sbp + chol + bmi + glucose", "family": "binomial"},
        1,
        [0.3, 1.2, 0.4, 0.5, 0.3, 0.3],
    ),
]


def generate(source: str, rows: int, folder: Path) -> dict[str, Any]:
    """Create the source's table; return the site's ``data`` section for it."""
    select = f"SELECT {OUTCOME} FROM (SELECT {', '.join(COLUMNS)} FROM {{rows}}) AS t"
    if source == "parquet":
        import duckdb

        path = folder / "bench.parquet"
        con = duckdb.connect(":memory:")
        query = select.format(rows=f"range({int(rows)})")
        con.execute(f"COPY ({query}) TO '{path}' (FORMAT PARQUET)")
        con.close()
        return {"connector": "parquet", "path": str(path)}
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP TABLE IF EXISTS {TABLE}"))
        query = select.format(rows=f"generate_series(1, {int(rows)})")
        connection.execute(sa.text(f"CREATE TABLE {TABLE} AS {query}"))
        connection.execute(sa.text(f"ANALYZE {TABLE}"))
    engine.dispose()
    return {"connector": "sql", "url": PG_URL, "table": TABLE, "order_by": ["note_a"]}


def measure(method: str, data: dict[str, Any], folder: str) -> dict[str, Any]:
    """One site process: start it, compute the four requests' aggregates; seconds and MiB."""
    # Import every library either path may load, so the timings hold no import time.
    import duckdb  # noqa: F401
    import sqlalchemy  # noqa: F401

    from analyses import AnalysisContext, get_analysis
    from protocol.config import SiteConfig
    from site_node.runtime import SiteRuntime

    if data["connector"] == "sql":
        import psycopg  # noqa: F401

    config = SiteConfig.model_validate(
        {
            "name": "bench",
            "coordinator": "127.0.0.1:1",
            "dictionary": str(Path(folder) / "dictionary.yaml"),
            "data": {**data, "pushdown": method == "pushdown"},
            "state_dir": str(Path(folder) / f"state-{method}"),
            "insecure": True,
        }
    )
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    site = SiteRuntime.from_config(config, record_start=False)
    if method == "pandas":
        site.data  # noqa: B018 - read at start, as a site without pushdown does
    figures["start"] = time.perf_counter() - started
    results: dict[str, Any] = {}
    for name, raw, round_, beta in REQUESTS:
        analysis = get_analysis(name)
        params = analysis.parse_params(raw, site.dictionary)
        state = {"beta": beta} if beta else {}
        ctx = AnalysisContext(site.dictionary, "dp", round=round_, state=state)
        began = time.perf_counter()
        if method == "pushdown":
            assert site.pushdown is not None
            plan = analysis.pushdown(params, ctx, site.pushdown.column)
            assert plan is not None
            arrays = site.pushdown.run(plan, None)
        else:
            arrays = analysis.local(site.data, params, ctx)
        figures[name] = time.perf_counter() - began
        results[name] = {k: float(sum(v.ravel())) for k, v in arrays.items()}
    assert method == "pandas" or site._records is None, "pushdown read the records"
    site.close()
    figures["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["checksums"] = results
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--sources", default="parquet,postgresql")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: method=json
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        method, data = args.measure.split("=", 1)
        print(json.dumps(measure(method, json.loads(data), args.folder)))
        return
    print(f"pushdown against pandas at a site: {args.rows:,} rows")
    header = f"    {'method':<10}{'start':>8}{'mean':>8}{'hist':>8}{'table':>8}{'glm':>8}"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "dictionary.yaml").write_text(yaml.safe_dump(DICTIONARY))
        for source in args.sources.split(","):
            started = time.perf_counter()
            data = generate(source, args.rows, Path(folder))
            print(f"  {source} (generated in {time.perf_counter() - started:.1f} s)")
            print(header + f"{'total':>8}{'peak MiB':>10}")
            try:
                checksums = [run_one(method, data, folder) for method in ("pushdown", "pandas")]
            finally:
                if source == "postgresql":
                    drop_table()
            same = all(
                abs(a - b) <= 1e-6 * max(1.0, abs(b))
                for name in checksums[0]
                for key in checksums[0][name]
                for a, b in [(checksums[0][name][key], checksums[1][name][key])]
            )
            print(f"    same aggregates both ways (relative 1e-6): {same}")


def run_one(method: str, data: dict[str, Any], folder: str) -> dict[str, Any]:
    """One measurement in a fresh process; print its line, return its checksums."""
    out = subprocess.run(
        [sys.executable, "-m", "simulations.bench_pushdown", "--measure",
         f"{method}={json.dumps(data)}", "--folder", folder],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    parts = [figures[k] for k in ("start", "mean", "histogram", "table", "glm")]
    cells = "".join(f"{v:8.2f}" for v in parts)
    print(f"    {method:<10}{cells}{sum(parts):8.2f}{figures['peak_mib']:10.0f}")
    return dict(figures["checksums"])


def drop_table() -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP TABLE IF EXISTS {TABLE}"))
    engine.dispose()


if __name__ == "__main__":
    main()

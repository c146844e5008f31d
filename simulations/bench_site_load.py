"""Benchmark: a site's data sources at scale. What loading the records costs, and what one
aggregate computed in the source costs instead (``bench_pushdown`` measures the analyses'
own pushdown).

    python -m simulations.bench_site_load [--rows 10000000] [--sources parquet,postgresql,csv]

For each source a table of ``--rows`` rows and 8 numeric columns (5 that a dictionary needs,
3 it does not) is generated in place (DuckDB writes the Parquet file and the CSV, PostgreSQL
fills its table with ``generate_series``; nothing passes through Python). Then, each in a fresh
process so that its peak memory is its own:

* ``load``: the site's connector reads the 5 needed columns into pandas, as at start (csv
  reads all 8);
* ``in source``: the count, sum and sum of squares of one column (what a ``mean`` releases)
  computed by the source itself: DuckDB over the Parquet file, SQL in PostgreSQL.

Times are wall seconds after the libraries are imported; memory is the process's peak resident
set (ru_maxrss), which includes
the interpreter and libraries (about 150-250 MiB before any data).
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

PG_URL = os.environ.get("ALLIANCE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
NEEDED = ["age", "sbp", "chol", "bmi", "glucose"]
UNUSED = ["note_a", "note_b", "note_c"]
SELECT = ", ".join(
    [
        "18 + (random() * 80)::int AS age",
        "90 + random() * 100 AS sbp",
        "120 + random() * 250 AS chol",
        "16 + random() * 30 AS bmi",
        "60 + random() * 200 AS glucose",
        *(f"random() AS {name}" for name in UNUSED),
    ]
)


def generate(source: str, rows: int, folder: Path) -> dict[str, Any]:
    """Create the source's table; return the site's ``data`` section for it."""
    import duckdb

    if source in ("parquet", "csv"):
        path = folder / f"bench.{source}"
        con = duckdb.connect(":memory:")
        options = "(FORMAT PARQUET)" if source == "parquet" else "(FORMAT CSV, HEADER)"
        con.execute(f"COPY (SELECT {SELECT} FROM range({int(rows)})) TO '{path}' {options}")
        con.close()
        return {"connector": source, "path": str(path)}
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS alliance_bench"))
        connection.execute(
            sa.text(
                f"CREATE TABLE alliance_bench AS SELECT {SELECT} "
                f"FROM generate_series(1, {int(rows)})"
            )
        )
    engine.dispose()
    return {"connector": "sql", "url": PG_URL, "table": "alliance_bench"}


def measure(kind: str, data: dict[str, Any]) -> dict[str, float]:
    """One measurement in this process: seconds (libraries imported first) and peak MiB."""
    import duckdb
    import sqlalchemy as sa

    from protocol.config import DataSource
    from site_node.connectors import load

    started = time.perf_counter()
    if kind == "load":
        frame = load(DataSource.model_validate(data), set(NEEDED))
        # csv reads every column (pandas; its unknown columns are reported at start).
        assert set(NEEDED) <= set(frame.columns) and len(frame) > 0
    elif data["connector"] == "parquet":
        con = duckdb.connect(":memory:")
        relation = con.read_parquet(data["path"])
        relation.create_view("t")
        con.execute("SELECT count(chol), sum(chol), sum(chol * chol) FROM t").fetchall()
        con.close()
    else:
        engine = sa.create_engine(data["url"])
        with engine.connect() as connection:
            connection.execute(
                sa.text("SELECT count(chol), sum(chol), sum(chol * chol) FROM alliance_bench")
            ).fetchall()
        engine.dispose()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--sources", default="parquet,postgresql,csv")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: kind=json
    args = parser.parse_args()
    if args.measure:
        kind, data = args.measure.split("=", 1)
        print(json.dumps(measure(kind, json.loads(data))))
        return
    print(f"site data sources: {args.rows:,} rows, {len(NEEDED)} needed of {len(NEEDED) + 3}")
    with tempfile.TemporaryDirectory() as folder:
        for source in args.sources.split(","):
            started = time.perf_counter()
            data = generate(source, args.rows, Path(folder))
            made = time.perf_counter() - started
            print(f"  {source} (generated in {made:.1f} s)")
            kinds = ["load"] if source == "csv" else ["load", "in source"]
            try:
                run_measurements(source, kinds, data)
            finally:
                if source == "postgresql":
                    drop_table()


def drop_table() -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS alliance_bench"))
    engine.dispose()


def run_measurements(source: str, kinds: list[str], data: dict[str, Any]) -> None:
    """Each measurement in a fresh process, so its peak memory is its own; print its line."""
    for kind in kinds:
        out = subprocess.run(
            [sys.executable, "-m", "simulations.bench_site_load", "--measure",
             f"{kind}={json.dumps(data)}"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        label = "count/sum/sumsq in source"
        if kind == "load":
            label = "load all 8 columns" if source == "csv" else "load 5 columns"
        print(f"    {label:<28} {figures['seconds']:8.2f} s   peak {figures['peak_mib']:8.0f} MiB")


if __name__ == "__main__":
    main()

"""Benchmark: per-round latency of Flower's own deployment runtime, on loopback.

    cd /work/main && .venv/bin/python -m simulations.bench_flower_runtime \
        [--rounds 10] [--nodes 4] [--json PATH] [--keep-tmp]

What is measured: the wall time of each FedAvg round as seen by the ServerApp, when the app
runs on Flower's deployment runtime: one real ``flower-superlink`` process and ``--nodes`` real
``flower-supernode`` processes, all ``--insecure`` on 127.0.0.1, with free ports picked at run
time. The task is tiny on purpose (logistic regression, 300 synthetic rows x 9 features per
node, 5 steps of full-batch numpy gradient descent per round), so the figure is the runtime's
own overhead: message routing through the SuperLink, SuperNode polling, and ClientApp launch.

How the ServerApp is run: everything is generated from the strings below into a temporary
directory: a Flower App directory (``pyproject.toml`` with ``[tool.flwr.app.components]``
naming ``serverapp``/``clientapp``, plus the two modules), a ``FLWR_HOME`` per process, and a
Flower CLI ``config.toml`` whose ``[superlink.bench]`` connection points at the SuperLink.
The benchmark then calls ``flwr run <app-dir> bench --stream --run-config <file.toml>``, the
documented way in Flower 1.42 to submit a run to a running SuperLink (its Control API now
shares the SuperLink's single HTTP ``--host``/``--port``). ``flwr run`` only packs the directory
into a FAB and calls ``StartRun``; it installs nothing. The SuperLink runs with its default
``--isolation subprocess``: it launches ``flower-superexec``, which starts ``flwr-serverapp``
for the run, and each SuperNode likewise starts the ClientApp through its own SuperExec.
The SuperLink is started with ``--disable-runtime-dependency-installation``: Flower 1.42 enables
runtime dependency installation (``uv sync`` of the app's dependencies into a per-run env) by
default on the SuperLink, which would need the network; with it off, the FAB is only unpacked
into ``FLWR_HOME/apps`` and imported with the benchmark's virtualenv (numpy and flwr are there).
SuperNodes have it off by default.

Per round the ServerApp runs what ``Strategy.start`` runs (``configure_train``,
``grid.send_and_receive``, ``aggregate_train``, then the evaluate step, which is empty with
``fraction_evaluate=0.0``) in its own loop, timing each round with ``time.perf_counter``, and
writes the figures to the JSON file named in its run config. Before round 1 it waits until all
SuperNodes are registered, so node start-up is not charged to round 1 (it is reported apart).

Note: both sides poll. The SuperNode sleeps 3 s when a pull finds no message, and
``send_and_receive`` sleeps 3 s between pulls of replies, so a round costs a few seconds
whatever the model; that is what this benchmark makes visible.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

#: Name of the generated Flower App's Python package.
APP_PACKAGE = "flwrbench"
#: Name of the SuperLink connection written into the CLI's ``config.toml``.
CONNECTION = "bench"
#: Seconds to wait for a process to open its port / to exit after SIGTERM.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

PYPROJECT_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "flwrbench"
version = "1.0.0"
description = "Per-round latency benchmark: FedAvg logistic regression"
license = "Apache-2.0"
dependencies = ["flwr>=1.42.0", "numpy>=1.26.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "alliance"

[tool.flwr.app.components]
serverapp = "flwrbench.server_app:app"
clientapp = "flwrbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 10
num-nodes = 4
num-rows = 300
num-features = 9
local-steps = 5
learning-rate = 0.1
round-timeout = 300.0
node-wait-timeout = 120.0
output-path = ""
"""

SERVER_APP_PY = '''\
"""ServerApp: FedAvg rounds, each timed as the ServerApp sees it."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Wait for all nodes, then run and time the FedAvg rounds."""
    cfg = context.run_config
    num_nodes = int(cfg["num-nodes"])
    timeout = float(cfg["round-timeout"])

    # Node start-up is not charged to round 1.
    t_wait = time.perf_counter()
    deadline = t_wait + float(cfg["node-wait-timeout"])
    while len(list(grid.get_node_ids())) < num_nodes:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"fewer than {num_nodes} SuperNodes registered")
        time.sleep(0.2)
    node_wait = time.perf_counter() - t_wait

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    arrays = ArrayRecord([np.zeros(int(cfg["num-features"]) + 1)])  # weights, then bias
    train_config = ConfigRecord(
        {"local-steps": int(cfg["local-steps"]), "learning-rate": float(cfg["learning-rate"])}
    )
    rounds, exchanges, replies_per_round, losses = [], [], [], []
    for server_round in range(1, int(cfg["num-server-rounds"]) + 1):
        # The same steps as Strategy.start, timed per round.
        t0 = time.perf_counter()
        messages = strategy.configure_train(server_round, arrays, train_config, grid)
        t1 = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        t2 = time.perf_counter()
        agg_arrays, agg_metrics = strategy.aggregate_train(server_round, replies)
        if agg_arrays is not None:
            arrays = agg_arrays
        evaluate = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        strategy.aggregate_evaluate(
            server_round, grid.send_and_receive(evaluate, timeout=timeout)
        )
        rounds.append(time.perf_counter() - t0)
        exchanges.append(t2 - t1)
        replies_per_round.append(sum(not m.has_error() for m in replies))
        losses.append(float(agg_metrics["train-loss"]) if agg_metrics else float("nan"))

    Path(str(cfg["output-path"])).write_text(
        json.dumps(
            {
                "round_seconds": rounds,
                "send_and_receive_seconds": exchanges,
                "replies": replies_per_round,
                "train_loss": losses,
                "node_wait_seconds": node_wait,
            }
        )
    )
'''

CLIENT_APP_PY = '''\
"""ClientApp: a few steps of full-batch gradient descent for logistic regression."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def load_partition(partition_id: int, rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic rows for one node; the true coefficients are shared by all nodes."""
    coef = np.random.default_rng(0).normal(size=features)
    rng = np.random.default_rng(1000 + partition_id)
    x = rng.normal(size=(rows, features))
    p = 1.0 / (1.0 + np.exp(-(x @ coef + 0.5)))
    y = (rng.random(rows) < p).astype(np.float64)
    return x, y


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run local gradient steps from the global model and return the new one."""
    rows = int(context.run_config["num-rows"])
    x, y = load_partition(
        int(context.node_config["partition-id"]), rows, int(context.run_config["num-features"])
    )
    params = msg.content["arrays"].to_numpy_ndarrays()[0].astype(np.float64)
    config = msg.content["config"]
    lr = float(config["learning-rate"])
    for _ in range(int(config["local-steps"])):
        p = 1.0 / (1.0 + np.exp(-(x @ params[:-1] + params[-1])))
        params[:-1] -= lr * (x.T @ (p - y)) / rows
        params[-1] -= lr * float(np.mean(p - y))
    p = np.clip(1.0 / (1.0 + np.exp(-(x @ params[:-1] + params[-1]))), 1e-12, 1 - 1e-12)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    content = RecordDict(
        {
            "arrays": ArrayRecord([params]),
            "metrics": MetricRecord({"train-loss": loss, "num-examples": rows}),
        }
    )
    return Message(content=content, reply_to=msg)
'''


@dataclass
class Started:
    """A process the benchmark started, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: TextIO
    log_path: Path


@dataclass
class Processes:
    """Every process the benchmark started, stopped together in ``stop_all``."""

    items: list[Started] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str], logs: Path) -> Started:
        """Start ``cmd`` in its own session with stdout/stderr to ``logs/<name>.log``."""
        log_path = logs / f"{name}.log"
        log = log_path.open("w")
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        started = Started(name, proc, log, log_path)
        self.items.append(started)
        return started

    def stop_all(self) -> None:
        """Stop SuperNodes first, then the SuperLink, then any process they left behind."""
        # Children (SuperExec, flwr-serverapp, flwr-clientapp) by pid, taken before stopping.
        leftovers = {pid for s in self.items for pid in descendants(s.proc.pid)}
        for started in reversed(self.items):
            _terminate(started.proc)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for started in self.items:
            started.log.close()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``, to the process group ``proc`` leads."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Field 4 (ppid) comes after the parenthesised command name.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 (held open together while picked)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for_port(port: int, started: Started, timeout: float = START_TIMEOUT) -> None:
    """Block until ``127.0.0.1:port`` accepts a connection, failing if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise RuntimeError(f"{started.name} exited early:\n{tail(started.log_path)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{started.name} did not open port {port} within {timeout:.0f} s")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def write_app(app_dir: Path) -> None:
    """Write the Flower App (pyproject and the two app modules) into ``app_dir``."""
    package = app_dir / APP_PACKAGE
    package.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(PYPROJECT_TOML)
    (package / "__init__.py").write_text('"""Flower App for bench_flower_runtime."""\n')
    (package / "server_app.py").write_text(SERVER_APP_PY)
    (package / "client_app.py").write_text(CLIENT_APP_PY)


def flower_env(home: Path) -> dict[str, str]:
    """Environment for a Flower process: own ``FLWR_HOME``, no telemetry or update check."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # SuperLink/SuperNode find flower-superexec, flwr-serverapp, flwr-clientapp on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    home.mkdir(parents=True, exist_ok=True)
    return env


def flower_bin(name: str) -> str:
    """Path of a Flower console script in this interpreter's virtualenv."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}")
    return str(path)


def run_benchmark(rounds: int, nodes: int, tmp: Path) -> dict[str, Any]:
    """Start SuperLink and SuperNodes, submit the run, and return the ServerApp's figures.

    Args:
        rounds: Number of FedAvg rounds.
        nodes: Number of SuperNodes (every one trains in every round).
        tmp: Empty directory for the app, the Flower homes, the logs and the results.

    Returns:
        The ServerApp's per-round figures plus the wall times measured here.
    """
    logs, app_dir, out = tmp / "logs", tmp / "app", tmp / "rounds.json"
    logs.mkdir()
    write_app(app_dir)
    link_port, *node_ports = free_ports(1 + nodes)

    # The Flower CLI reads its SuperLink connections from FLWR_HOME/config.toml.
    cli_env = flower_env(tmp / "home-cli")
    (tmp / "home-cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    run_config = tmp / "run_config.toml"
    run_config.write_text(
        f"num-server-rounds = {rounds}\nnum-nodes = {nodes}\noutput-path = {json.dumps(str(out))}\n"
    )

    procs = Processes()
    t_start = time.perf_counter()
    try:
        link = procs.start(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--host=127.0.0.1",
                f"--port={link_port}",
                "--isolation=subprocess",
                "--disable-runtime-dependency-installation",
            ],
            flower_env(tmp / "home-superlink"),
            logs,
        )
        wait_for_port(link_port, link)
        supernodes = [
            procs.start(
                f"supernode-{i}",
                [
                    flower_bin("flower-supernode"),
                    "--insecure",
                    f"--superlink=127.0.0.1:{link_port}",
                    "--host=127.0.0.1",
                    f"--port={port}",
                    f"--node-config=partition-id={i} num-partitions={nodes}",
                ],
                flower_env(tmp / f"home-supernode-{i}"),
                logs,
            )
            for i, port in enumerate(node_ports)
        ]
        for port, node in zip(node_ports, supernodes, strict=True):
            wait_for_port(port, node)
        startup = time.perf_counter() - t_start

        # `--stream` follows the run's logs and returns when the run has finished.
        t_run = time.perf_counter()
        cmd = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        cmd += ["--run-config", str(run_config)]
        with (logs / "flwr-run.log").open("w") as run_log:
            subprocess.run(
                cmd,
                env=cli_env,
                stdout=run_log,
                stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT + 60.0 * rounds,
                check=True,
            )
        run_wall = time.perf_counter() - t_run
        if not out.exists():
            raise RuntimeError(
                "the ServerApp wrote no results; `flwr run` output:\n"
                + tail(logs / "flwr-run.log")
                + "\nSuperLink log:\n"
                + tail(link.log_path)
            )
        result: dict[str, Any] = json.loads(out.read_text())
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"flwr run failed:\n{tail(logs / 'flwr-run.log')}") from err
    finally:
        t_stop = time.perf_counter()
        procs.stop_all()
    result["startup_seconds"] = startup
    result["run_wall_seconds"] = run_wall
    result["shutdown_seconds"] = time.perf_counter() - t_stop
    result["total_wall_seconds"] = time.perf_counter() - t_start
    return result


def report(result: dict[str, Any], rounds: int, nodes: int) -> dict[str, Any]:
    """Summarise the figures, print them, and return them for ``--json``."""
    per_round: list[float] = result["round_seconds"]
    summary = {
        "flwr_version": version("flwr"),
        "nodes": nodes,
        "rounds": len(per_round),
        "rounds_requested": rounds,
        "median_round_seconds": statistics.median(per_round),
        "min_round_seconds": min(per_round),
        "max_round_seconds": max(per_round),
        "rounds_total_seconds": sum(per_round),
        "startup_seconds": result["startup_seconds"],
        "run_wall_seconds": result["run_wall_seconds"],
        "shutdown_seconds": result["shutdown_seconds"],
        "total_wall_seconds": result["total_wall_seconds"],
        "node_wait_seconds": result["node_wait_seconds"],
        "round_seconds": per_round,
        "send_and_receive_seconds": result["send_and_receive_seconds"],
        "replies_per_round": result["replies"],
        "train_loss": result["train_loss"],
    }
    print(f"Flower {summary['flwr_version']} deployment runtime: 1 SuperLink, {nodes} SuperNodes")
    print(
        f"  per round: median {summary['median_round_seconds']:.3f} s, "
        f"min {summary['min_round_seconds']:.3f} s, max {summary['max_round_seconds']:.3f} s "
        f"over {summary['rounds']} rounds"
    )
    print(f"  rounds:    {' '.join(f'{s:.2f}' for s in per_round)}")
    print(
        f"  total:     {summary['total_wall_seconds']:.1f} s wall = start-up "
        f"{summary['startup_seconds']:.1f} s + `flwr run` {summary['run_wall_seconds']:.1f} s "
        f"+ shutdown {summary['shutdown_seconds']:.1f} s"
    )
    print(
        f"  in `flwr run`: rounds {summary['rounds_total_seconds']:.1f} s, "
        f"ServerApp waiting for {nodes} nodes {summary['node_wait_seconds']:.1f} s"
    )
    print(
        f"  replies per round: {result['replies']}, final train loss {result['train_loss'][-1]:.4f}"
    )
    return summary


def _raise_interrupt(signum: int, _frame: object) -> None:
    """Signal handler: turn ``signum`` into ``KeyboardInterrupt``."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark in a temporary directory, print the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="FedAvg rounds (default 10)")
    parser.add_argument("--nodes", type=int, default=4, help="SuperNodes (default 4)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory (logs, app)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.nodes < 1:
        parser.error("--rounds and --nodes must be at least 1")

    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop every process started.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="bench-flower-runtime-"))
    try:
        result = run_benchmark(args.rounds, args.nodes, tmp)
    finally:
        if args.keep_tmp:
            print(f"temporary directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = report(result, args.rounds, args.nodes)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

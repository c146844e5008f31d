"""A real federation on loopback: one coordinator process and one process per site.

Each part gets its own folder, certificate, store and log; everything talks real gRPC with
mutual TLS and real HTTP, exactly as a deployment does. ``alliance simulate``, ``alliance
demo``, the system tests and the benchmarks all drive this class.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from analyses import registered_analyses
from coordinator import pki
from coordinator.client import AllianceClient
from protocol.config import DataDictionary, DataSource, StudyConfig
from protocol.errors import LinkError

STARTUP_SECONDS = 60.0
#: The user id of the simulation's researcher token; every study it creates names this user.
RESEARCHER = "researcher"


@dataclass
class SiteSpec:
    """One simulated site: its name, data and policy choices."""

    name: str
    data: DataSource
    mode: str = "dp"
    budget: float = 3.0
    epsilon_per_request: float = 0.5  # the most one request may spend at this site
    allowed_analyses: list[str] | None = None  # None: every registered analysis
    denied_variables: list[str] = field(default_factory=list)
    #: more fields of the study's approval: sdc populations and models, budgets, ...
    approval: dict[str, Any] = field(default_factory=dict)
    #: False: site.yaml approves no study (its admin approves with `alliance site approve`)
    approves: bool = True


def child_env() -> dict[str, str]:
    """Environment for child processes: unbuffered, quiet Flower, this interpreter's path."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


class LocalFederation:
    """Start, use and stop a coordinator and N site processes on loopback."""

    def __init__(
        self,
        sites: list[SiteSpec],
        dictionary: DataDictionary,
        folder: Path | None = None,
        tls: bool = True,
        task_timeout: float = 30.0,
        log_level: str = "INFO",
        extra_tokens: list[dict[str, str]] | None = None,
    ) -> None:
        self.sites = sites
        self.dictionary = dictionary
        self.keep = folder is not None
        self.root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="alliance-sim-"))
        self.tls = tls
        self.task_timeout = task_timeout
        self.log_level = log_level
        self.lead_token = secrets.token_urlsafe(24)
        self.researcher_token = secrets.token_urlsafe(24)
        self.extra_tokens = list(extra_tokens or [])  # more people: {token, user, role, site?}
        self.coordinator_proc: subprocess.Popen[bytes] | None = None
        self.site_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""
        self.site_link = ""
        self._logs: list[Any] = []

    # ----------------------------------------------------------------- layout
    @property
    def coordinator_dir(self) -> Path:
        """``<root>/coordinator``."""
        return self.root / "coordinator"

    def site_dir(self, name: str) -> Path:
        """``<root>/sites/<name>``."""
        return self.root / "sites" / name

    def _write_pki(self) -> None:
        folder = self.root / "pki"
        if (folder / "ca.pem").exists():
            return
        pki.init_ca(folder, "alliance-simulation")
        pki.issue_coordinator(folder, ["localhost", "127.0.0.1"])
        for site in self.sites:
            pki.issue_site(folder, site.name)

    def _write_coordinator(self) -> Path:
        folder = self.coordinator_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dictionary.yaml").write_text(
            yaml.safe_dump(self.dictionary.model_dump(mode="json"), sort_keys=False)
        )
        config: dict[str, Any] = {
            "name": "coordinator",
            "site_link": "127.0.0.1:0",
            "http": "127.0.0.1:0",
            "dictionary": "dictionary.yaml",
            "store": f"sqlite:///{folder / 'coordinator.db'}",
            "state_dir": ".",
            "task_timeout_seconds": self.task_timeout,
            "tokens": [
                {"token": self.lead_token, "user": "lead", "role": "lead"},
                {"token": self.researcher_token, "user": RESEARCHER, "role": "researcher"},
                *self.extra_tokens,
            ],
        }
        if self.tls:
            pki_dir = self.root / "pki"
            config["tls"] = {
                "ca": str(pki_dir / "ca.pem"),
                "cert": str(pki_dir / "coordinator.pem"),
                "key": str(pki_dir / "coordinator.key"),
            }
        else:
            config["insecure"] = True
        path = folder / "coordinator.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _write_site(self, site: SiteSpec, study_id: str) -> Path:
        folder = self.site_dir(site.name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dictionary.yaml").write_text(
            yaml.safe_dump(self.dictionary.model_dump(mode="json"), sort_keys=False)
        )
        allowed = (
            site.allowed_analyses if site.allowed_analyses is not None else registered_analyses()
        )
        config: dict[str, Any] = {
            "name": site.name,
            "coordinator": self.site_link,
            "dictionary": "dictionary.yaml",
            "data": site.data.model_dump(mode="json", exclude_defaults=True)
            | {"path": str(Path(site.data.path).resolve())},
            "state_dir": "state",
            "heartbeat_seconds": 5,
            "reconnect_max_seconds": 5,
            "policy": {
                "allowed_analyses": allowed,
                "denied_variables": site.denied_variables,
                "studies": [
                    {
                        "id": study_id,
                        "mode": site.mode,
                        "budget": site.budget,
                        "epsilon_per_request": site.epsilon_per_request,
                        **site.approval,
                    }
                ]
                if site.approves
                else [],
            },
        }
        if self.tls:
            pki_dir = self.root / "pki"
            config["tls"] = {
                "ca": str(pki_dir / "ca.pem"),
                "cert": str(pki_dir / "sites" / f"{site.name}.pem"),
                "key": str(pki_dir / "sites" / f"{site.name}.key"),
            }
        else:
            config["insecure"] = True
        path = folder / "site.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # ----------------------------------------------------------------- processes
    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "simulations.cli", "--log-level", self.log_level, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=log_path.parent,
        )

    def start_coordinator(self) -> None:
        """Start the coordinator and wait until it listens."""
        if self.tls:
            self._write_pki()
        config = self._write_coordinator()
        ready = self.coordinator_dir / "ready.json"
        ready.unlink(missing_ok=True)
        self.coordinator_proc = self._spawn(
            ["coordinator", "serve", "--config", str(config), "--ready-file", str(ready)],
            self.coordinator_dir / "coordinator.log",
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while not ready.exists():
            if self.coordinator_proc.poll() is not None:
                raise LinkError(
                    f"the coordinator exited at start; see "
                    f"{self.coordinator_dir / 'coordinator.log'}:\n"
                    + self.tail(self.coordinator_dir / "coordinator.log")
                )
            if time.monotonic() > deadline:
                raise LinkError(f"the coordinator did not start within {STARTUP_SECONDS:g} s")
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        self.url, self.site_link = ports["http"], ports["site_link"]

    def start_site(self, site: SiteSpec, study_id: str) -> None:
        """Write a site's config and start its process."""
        config = self._write_site(site, study_id)
        self.site_procs[site.name] = self._spawn(
            ["site", "serve", "--config", str(config)], self.site_dir(site.name) / "site.log"
        )

    def stop_site(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop (or, with SIGKILL, crash) one site process."""
        proc = self.site_procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def wait_for_sites(self, names: list[str], timeout: float = STARTUP_SECONDS) -> None:
        """Wait until the coordinator reports every named site connected."""
        deadline = time.monotonic() + timeout
        with AllianceClient(self.url, self.lead_token) as client:
            while True:
                connected = set(client.health()["sites"])
                missing = [n for n in names if n not in connected]
                if not missing:
                    return
                for name in missing:
                    proc = self.site_procs.get(name)
                    if proc is not None and proc.poll() is not None:
                        log = self.site_dir(name) / "site.log"
                        raise LinkError(
                            f"site {name} exited at start; see {log}:\n" + self.tail(log)
                        )
                if time.monotonic() > deadline:
                    raise LinkError(
                        f"sites {', '.join(missing)} did not connect within {timeout:g} s"
                    )
                time.sleep(0.05)

    def start(self, study: StudyConfig) -> None:
        """Start everything, create ``study`` and wait for every site to connect."""
        self.start_coordinator()
        for site in self.sites:
            self.start_site(site, study.id)
        # Each site process imports and loads its data on start; on a small machine they queue.
        self.wait_for_sites([s.name for s in self.sites], STARTUP_SECONDS + 2.0 * len(self.sites))
        self.create_study(study)

    def create_study(self, study: StudyConfig) -> None:
        """Create ``study`` as the lead, inviting every simulated site unless it names some.

        The study names the simulation's researcher (:data:`RESEARCHER`) unless it names its
        researchers itself: a study is closed to every researcher it does not name.
        """
        body = study.model_dump(mode="json")
        body["sites"] = body["sites"] or [s.name for s in self.sites]
        body["researchers"] = body.get("researchers") or [RESEARCHER]
        with AllianceClient(self.url, self.lead_token) as client:
            client.create_study(body)

    def researcher(self) -> AllianceClient:
        """A client holding the researcher's token."""
        return AllianceClient(self.url, self.researcher_token)

    def stop(self) -> None:
        """Stop every process gracefully (SIGTERM, then SIGKILL after 15 s)."""
        procs = list(self.site_procs.values())
        if self.coordinator_proc is not None:
            procs.append(self.coordinator_proc)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.site_procs.clear()
        self.coordinator_proc = None
        for log in self._logs:
            log.close()
        self._logs.clear()

    def cleanup(self) -> None:
        """Remove the folder unless it was asked to be kept."""
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
        self.cleanup()

    @staticmethod
    def tail(path: Path, lines: int = 20) -> str:
        """The last lines of a log file."""
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

"""The servers say what they are doing: one line per change of state, unless told otherwise.

Real coordinator and site processes on loopback (mutual TLS), started through the `alliance`
command exactly as an admin starts them, with the logging flags before or after the
subcommand. The coordinator never logs a count of a site's records.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocol.config import StudyConfig
from protocol.errors import ConfigError
from simulations.cli import app
from simulations.federation import LocalFederation, SiteSpec, child_env
from simulations.heart import heart_dictionary, heart_source

pytestmark = pytest.mark.system
runner = CliRunner()


Flags = dict[str, list[str]]


class FlaggedFederation(LocalFederation):
    """A federation whose processes get flags before and after the subcommand, per role."""

    def __init__(self, *args: object, before: Flags, after: Flags, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.before, self.after = before, after

    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        role = args[0]
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "simulations.cli"),
                *self.before.get(role, []),
                *args,
                *self.after.get(role, []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=log_path.parent,
        )


def run_scenario(tmp_path: Path, before: Flags, after: Flags) -> tuple[str, str]:
    """Start, answer a task, refuse one (budget), stop the site, then the coordinator."""
    federation = FlaggedFederation(
        [SiteSpec("va", heart_source("va"), mode="dp", budget=0.6)],
        heart_dictionary(),
        tmp_path,
        before=before,
        after=after,
    )
    study = StudyConfig.model_validate(
        {"id": "s1", "title": "logs", "privacy": {"mode": "dp", "epsilon_per_request": 0.5}}
    )
    try:
        federation.start(study)
        with federation.researcher() as client:
            first = client.run("s1", {"analysis": "count"})
            assert first["sites"][0]["status"] == "ok"
            # va's budget of 0.6 is spent: it refuses, and the request fails without it.
            second = client.submit("s1", {"analysis": "count"}, wait=True)
            assert second["status"] == "failed", second
        federation.stop_site("va")
        coordinator_log = federation.coordinator_dir / "coordinator.log"
        deadline = time.monotonic() + 20
        while "site va disconnected" not in coordinator_log.read_text():
            assert time.monotonic() < deadline, coordinator_log.read_text()
            time.sleep(0.1)
    finally:
        federation.stop()
    return (
        (federation.coordinator_dir / "coordinator.log").read_text(),
        (federation.site_dir("va") / "site.log").read_text(),
    )


def levels(log: str) -> set[str]:
    return set(re.findall(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR) ", log, flags=re.MULTILINE))


def test_by_default_each_server_logs_each_change_of_state(tmp_path: Path) -> None:
    coordinator, site = run_scenario(tmp_path, {}, {})
    for line in [
        r"INFO alliance.coordinator: coordinator listening: sites dial "
        r"127\.0\.0\.1:\d+ \(mutual TLS\); people use http://127\.0\.0\.1:\d+",
        r"INFO alliance.coordinator: site va connected \(version \S+, analyses: ",
        r"INFO alliance.coordinator: task \S+ of request \S+ \(count, study s1\) answered by va$",
        r"INFO alliance.coordinator: task \S+ of request \S+ \(count, study s1\) refused by va "
        r"\(budget\)$",
        r"WARNING alliance.coordinator: site va disconnected \(version \S+\)$",
    ]:
        assert re.search(line, coordinator, flags=re.MULTILINE), (line, coordinator)
    assert "record" not in coordinator  # never a count of a site's records
    assert "epsilon" not in coordinator  # nor what a refusal protects
    for line in [
        r"INFO alliance.site: connecting to the coordinator at 127\.0\.0\.1:\d+$",
        r"INFO alliance.site: connected to coordinator at 127\.0\.0\.1:\d+; waiting for tasks$",
        r"INFO alliance.site: answered task \S+ \(request \S+, count, study s1\)$",
        r"INFO alliance.site: refused task \S+ \(request \S+, count, study s1, budget\): ",
        r"INFO alliance.site: site link closed$",
    ]:
        assert re.search(line, site, flags=re.MULTILINE), (line, site)
    assert "DEBUG" not in levels(coordinator) | levels(site)


def test_quiet_before_or_after_the_subcommand_keeps_only_warnings_and_errors(
    tmp_path: Path,
) -> None:
    coordinator, site = run_scenario(
        tmp_path, before={"site": ["--quiet"]}, after={"coordinator": ["--quiet"]}
    )
    assert levels(coordinator) == {"WARNING"}  # "site va disconnected" is a warning
    assert levels(site) <= {"WARNING", "ERROR"}
    assert "listening" not in coordinator and "answered" not in site


def test_log_level_before_or_after_the_subcommand_and_after_wins(tmp_path: Path) -> None:
    # The site gets it before the subcommand (as simulations/federation.py passes it); the
    # coordinator gets ERROR before and debug after it: the one after the subcommand wins.
    coordinator, site = run_scenario(
        tmp_path,
        before={"site": ["--log-level", "DEBUG"], "coordinator": ["--log-level", "ERROR"]},
        after={"coordinator": ["--log-level", "debug"]},
    )
    assert re.search(r"DEBUG alliance.coordinator: sent task \S+ of request", coordinator)
    assert re.search(r"INFO alliance.coordinator: site va connected", coordinator)
    assert re.search(r"DEBUG alliance.site: received task \S+ \(count, study s1", site)


@pytest.mark.parametrize(
    "args",
    [
        ["--log-level", "LOUD", "coordinator", "serve", "--config", "c.yaml"],
        ["coordinator", "serve", "--config", "c.yaml", "--log-level", "LOUD"],
        ["site", "serve", "--config", "s.yaml", "--log-level", "LOUD"],
    ],
    ids=["before", "coordinator-after", "site-after"],
)
def test_an_unknown_log_level_is_refused_in_one_line(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == (
        "--log-level: 'LOUD' is not a log level; use one of: DEBUG, INFO, WARNING, ERROR"
    )


def test_an_unknown_log_level_is_one_line_on_stderr() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "simulations.cli", "site", "serve"),
            *("--config", "s.yaml", "--log-level", "verbose"),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --log-level: 'verbose' is not a log level; use one of: DEBUG, INFO, WARNING, ERROR"
    ]


def test_quiet_and_a_lower_level_together_are_refused() -> None:
    result = runner.invoke(
        app, ["site", "serve", "--config", "s.yaml", "--quiet", "--log-level", "DEBUG"]
    )
    assert isinstance(result.exception, ConfigError)
    assert "--quiet and --log-level DEBUG contradict each other" in str(result.exception)


def test_other_commands_stay_quiet_by_default(tmp_path: Path) -> None:
    from tests.unit.test_site_cli import write_site

    result = runner.invoke(app, ["site", "check", "--config", str(write_site(tmp_path))])
    assert result.exit_code == 0, result.output
    assert not re.search(r"^\S+ \S+ (INFO|DEBUG) ", result.output, flags=re.MULTILINE)

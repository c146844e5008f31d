"""API tokens: the shipped examples never open a coordinator, and real ones come from somewhere.

A newcomer who starts the coordinator with the example config must not get a coordinator that
anyone who read the README can use. A coordinator without tokens makes one for the lead on its
first start, in a file only its owner can read; `alliance token create | list | revoke` manage
the rest while it runs.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from coordinator.auth import token_digest
from protocol.config import CoordinatorConfig, load_yaml
from protocol.errors import ConfigError
from simulations.cli import app
from simulations.federation import child_env
from simulations.heart import DICTIONARY_PATH

pytestmark = pytest.mark.system
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
runner = CliRunner()
#: The tokens configs/coordinator.yaml shipped with before this test existed.
SHIPPED = ["change-me-lead-token-0123456789", "change-me-researcher-token-0123"]


def write_config(folder: Path, tokens: list[dict[str, str]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "name": "coordinator",
        "site_link": "127.0.0.1:0",
        "http": "127.0.0.1:0",
        "dictionary": str(DICTIONARY_PATH),
        "store": f"sqlite:///{folder / 'coordinator.db'}",
        "state_dir": str(folder / "state"),
        "insecure": True,
    }
    if tokens is not None:
        config["tokens"] = tokens
    path = folder / "coordinator.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        return self.log.read_text(errors="replace")


def start(config: Path, timeout: float = 60.0) -> Running | str:
    """Start a coordinator; its address when it listens, or its output when it exits."""
    ready = config.parent / "ready.json"
    log = config.parent / "coordinator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "simulations.cli", "coordinator", "serve"),
                *("--config", str(config), "--ready-file", str(ready)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            return log.read_text(errors="replace")
        assert time.monotonic() < deadline, "the coordinator neither started nor exited"
        time.sleep(0.05)
    time.sleep(0.1)  # the ready file is written in one go, but give the writer a moment
    return Running(proc, yaml.safe_load(ready.read_text())["http"], log)


def status(url: str, token: str) -> int:
    response = httpx.get(f"{url}/api/analyses", headers={"Authorization": f"Bearer {token}"})
    return response.status_code


def test_the_coordinator_refuses_to_start_with_an_example_token(tmp_path: Path) -> None:
    token = SHIPPED[0]
    config = write_config(tmp_path, [{"token": token, "user": "lead", "role": "lead"}])
    outcome = start(config)
    if isinstance(outcome, Running):
        accepted = status(outcome.url, token)
        outcome.stop()
        pytest.fail(f"the coordinator started with the example token; the API answered {accepted}")
    assert outcome.strip().splitlines() == [
        f"error: {config}: tokens[0] (user lead): this token is an example shipped with "
        "Alliance (anyone who read the README knows it); delete it from the config and create "
        "real tokens with `alliance token create --role ROLE --person ID --config "
        f"{config}`"
    ]
    assert not (tmp_path / "coordinator.db").exists()  # refused before anything was created


@pytest.mark.parametrize("token", [*SHIPPED, "change-me-to-something-long", "Change-Me-0123456789"])
def test_every_example_token_stops_the_start(tmp_path: Path, token: str) -> None:
    from coordinator.server import startup_problems

    path = write_config(tmp_path, [{"token": token, "user": "r.chen", "role": "researcher"}])
    [problem] = startup_problems(load_yaml(path, CoordinatorConfig), str(path))
    assert problem.startswith(f"{path}: tokens[0] (user r.chen): this token is an example")


def test_the_shipped_example_config_opens_no_coordinator() -> None:
    from coordinator.server import startup_problems

    path = CONFIGS / "coordinator.yaml"
    config = load_yaml(path, CoordinatorConfig).model_copy(update={"tls": None})
    # Any token it ships must be one the coordinator refuses (today it ships none).
    assert len(startup_problems(config, str(path))) == len(config.tokens)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Running]]:
    """A coordinator started for the first time with no token anywhere."""
    config = write_config(tmp_path_factory.mktemp("fresh"))
    outcome = start(config)
    assert isinstance(outcome, Running), outcome
    try:
        yield config, outcome
    finally:
        outcome.stop()


def test_a_first_start_without_tokens_makes_a_lead_token_only_its_owner_can_read(
    fresh: tuple[Path, Running],
) -> None:
    config, running = fresh
    path = config.parent / "state" / "tokens.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    handover = config.parent / "state" / "lead-token.txt"
    assert stat.S_IMODE(handover.stat().st_mode) == 0o600
    log = running.log.read_text()
    assert (
        f"no API tokens yet: created a lead token for person 'lead' in {handover} (readable by "
        "this user only; tokens.yaml keeps only its digest): read it, then delete that file; "
        "create more with `alliance token create`"
    ) in log
    token = handover.read_text().strip()
    [entry] = yaml.safe_load(path.read_text())["tokens"]
    assert (entry["user"], entry["role"]) == ("lead", "lead")
    assert entry["token_sha256"] == token_digest(token) and "token" not in entry
    assert token not in path.read_text()  # the tokens file holds digests only
    assert token not in log  # the log says where the token is, never the token
    assert status(running.url, token) == 200
    assert status(running.url, token[:-1] + "x") == 401


def test_token_create_list_and_revoke_take_effect_without_a_restart(
    fresh: tuple[Path, Running],
) -> None:
    config, running = fresh
    created = runner.invoke(
        app,
        ["token", "create", "--role", "researcher", "--person", "r.chen", "--config", str(config)],
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert len(token) >= 32 and "\n" not in token  # stdout is the token alone: TOKEN=$(...)
    assert status(running.url, token) == 200

    listed = runner.invoke(app, ["token", "list", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["lead", "lead"], ["r.chen", "researcher"]]
    assert token not in listed.stdout and token_digest(token)[:8] in listed.stdout
    assert token not in (config.parent / "state" / "tokens.yaml").read_text()

    revoked = runner.invoke(app, ["token", "revoke", "r.chen", "--config", str(config)])
    assert revoked.exit_code == 0, revoked.output
    assert status(running.url, token) == 401
    again = runner.invoke(app, ["token", "revoke", "r.chen", "--config", str(config)])
    assert isinstance(again.exception, ConfigError)
    assert str(again.exception).startswith("r.chen has no token in ")


def test_an_unknown_role_is_refused_naming_the_roles(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = runner.invoke(
        app, ["token", "create", "--role", "admin", "--person", "a", "--config", str(config)]
    )
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == (
        "--role: 'admin' is not a role; use one of: lead, researcher, site_admin"
    )
    assert not (tmp_path / "state").exists()


def test_an_example_token_in_the_tokens_file_is_refused_at_start_and_ignored_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from coordinator.server import startup_problems
    from coordinator.tokens import LiveTokenBook, create_token, read_tokens, write_tokens

    config_path = write_config(tmp_path)
    config = load_yaml(config_path, CoordinatorConfig)
    tokens_path = tmp_path / "state" / "tokens.yaml"
    # Pasted by hand, in plain text, as the docs' examples are written.
    pasted = "change-me-pasted-from-the-docs"
    tokens_path.parent.mkdir(exist_ok=True)
    by_hand = {"tokens": [{"token": pasted, "user": "lead", "role": "lead"}]}
    tokens_path.write_text(yaml.safe_dump(by_hand))
    assert startup_problems(config, str(config_path)) == [
        f"{tokens_path}: tokens[0] (user lead): this token is an example shipped with Alliance "
        "(anyone who read the README knows it); revoke it with `alliance token revoke lead "
        f"--config {config_path}` and create real tokens with `alliance token create --role "
        f"ROLE --person ID --config {config_path}`"
    ]
    # A running coordinator that finds one in the file later ignores it and says so.
    write_tokens(tokens_path, [])
    book = LiveTokenBook([], tokens_path)
    _, token = create_token(config, "researcher", "r.chen")
    stored = read_tokens(tokens_path)
    tokens_path.write_text(
        yaml.safe_dump({"tokens": [*(t.model_dump() for t in stored), *by_hand["tokens"]]})
    )
    assert book.identify(pasted) is None
    assert book.identify(token) is not None
    assert read_tokens(tokens_path)[-1].example  # known as an example only while in text
    assert any("ignoring an example token for lead" in r.getMessage() for r in caplog.records)

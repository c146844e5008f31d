"""`alliance pki ...` through the CLI runner: re-issuing needs, and has, `--overwrite`."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from protocol.errors import ConfigError
from simulations.cli import app

runner = CliRunner()


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.mark.parametrize(
    ("command", "cert"),
    [
        (["pki", "issue-site", "basel"], "sites/basel.pem"),
        (["pki", "issue-coordinator", "--host", "localhost"], "coordinator.pem"),
    ],
    ids=["issue-site", "issue-coordinator"],
)
def test_reissuing_names_the_real_overwrite_flag_and_the_flag_works(
    tmp_path: Path, command: list[str], cert: str
) -> None:
    folder = ["--dir", str(tmp_path)]
    assert runner.invoke(app, ["pki", "init", *folder]).exit_code == 0
    first = runner.invoke(app, [*command, *folder])
    assert first.exit_code == 0, first.output
    before = serial(tmp_path / cert)

    again = runner.invoke(app, [*command, *folder])
    assert isinstance(again.exception, ConfigError)
    message = str(again.exception)
    assert "already has a certificate" in message
    assert f"alliance {' '.join(command[:2])}" in message and "--overwrite" in message
    assert "pass overwrite" not in message
    assert serial(tmp_path / cert) == before  # nothing was replaced

    forced = runner.invoke(app, [*command, "--overwrite", *folder])
    assert forced.exit_code == 0, forced.output
    assert "re-issued" in forced.stdout
    assert serial(tmp_path / cert) != before

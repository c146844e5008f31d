"""`alliance site check` catches broken TLS files and changes nothing on disk.

Each broken case is a file a hospital could really be sent: a missing certificate, one from
another CA, one issued to another site, one out of its dates, a key that belongs to another
certificate. Each must fail the check with one line that says what to do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from coordinator import pki
from protocol.config import SiteConfig, load_yaml
from simulations.cli import app
from simulations.heart import DICTIONARY_PATH, heart_source
from site_node.runtime import SiteRuntime

runner = CliRunner()


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The alliance's PKI (sites va and cleveland) and another CA's, with a site va."""
    ours, other = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("other")
    pki.init_ca(ours, "Cardio Alliance")
    pki.issue_site(ours, "va")
    pki.issue_site(ours, "cleveland")
    pki.init_ca(other, "Cardio Alliance")
    pki.issue_site(other, "va")
    return ours, other


def dated_cert(ca_folder: Path, out: Path, start: dt.datetime, end: dt.datetime) -> Path:
    """A site certificate for va signed by the alliance CA, valid from ``start`` to ``end``."""
    ca = x509.load_pem_x509_certificate((ca_folder / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_folder / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "va")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "va.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "va.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (out / "va.key").chmod(0o600)
    return out / "va.pem"


def write_site(folder: Path, ca: Path, cert: Path, key: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "va",
        "coordinator": "127.0.0.1:1",
        "dictionary": str(DICTIONARY_PATH),
        "data": heart_source("va").model_dump(mode="json"),
        "state_dir": "state",
        "tls": {"ca": str(ca), "cert": str(cert), "key": str(key)},
        "policy": {"allowed_analyses": ["count"], "studies": [{"id": "s1", "budget": 2.0}]},
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check(config: Path) -> tuple[int, list[str]]:
    result = runner.invoke(app, ["site", "check", "--config", str(config)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output.splitlines()


def tls_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("tls")]


def test_good_tls_files_pass(pkis: tuple[Path, Path], tmp_path: Path) -> None:
    ours, _ = pkis
    config = write_site(
        tmp_path, ours / "ca.pem", ours / "sites" / "va.pem", ours / "sites" / "va.key"
    )
    code, lines = check(config)
    assert code == 0, lines
    assert any(line.startswith("tls: ok: certificate for va, issued by") for line in lines), lines


def failing_tls_lines(config: Path) -> list[str]:
    """The ``tls`` lines of a check that must fail."""
    code, lines = check(config)
    assert code != 0
    return tls_lines(lines)


#: Wrong files a hospital could be sent (``{ours}``: the alliance's PKI folder, ``{tmp}``: the
#: test's own), and the one line that must say what to do.
WRONG_FILES = [
    pytest.param(
        "{tmp}/nowhere/va.pem",
        "{ours}/sites/va.key",
        "tls.cert: {cert}: file not found; ask the alliance lead for this site's "
        "certificate (`alliance pki issue-site va`) and set tls.cert to its path",
        id="a missing certificate",
    ),
    pytest.param(
        "{ours}/sites/cleveland.pem",
        "{ours}/sites/cleveland.key",
        "tls.cert: {cert}: issued to site 'cleveland', but this site's name is 'va'; use the "
        "certificate issued for va, or correct `name` in the site config",
        id="a certificate issued to another site",
    ),
    pytest.param(
        "{ours}/sites/va.pem",
        "{ours}/sites/cleveland.key",
        "tls.key: {key}: does not belong to the certificate in tls.cert ({cert}); use the key "
        "that was issued with that certificate",
        id="a key that belongs to another certificate",
    ),
]


@pytest.mark.parametrize(("cert", "key", "line"), WRONG_FILES)
def test_a_wrong_file_fails_the_check_with_one_line_saying_what_to_do(
    pkis: tuple[Path, Path], tmp_path: Path, cert: str, key: str, line: str
) -> None:
    ours, _ = pkis
    cert_path = Path(cert.format(ours=ours, tmp=tmp_path))
    key_path = Path(key.format(ours=ours, tmp=tmp_path))
    config = write_site(tmp_path, ours / "ca.pem", cert_path, key_path)
    assert failing_tls_lines(config) == [line.format(cert=cert_path, key=key_path)]


def test_a_certificate_from_another_ca_fails_the_check(
    pkis: tuple[Path, Path], tmp_path: Path
) -> None:
    ours, other = pkis
    cert = other / "sites" / "va.pem"
    config = write_site(tmp_path, ours / "ca.pem", cert, other / "sites" / "va.key")
    [line] = failing_tls_lines(config)
    assert line.startswith(f"tls.cert: {cert}: not issued by the CA in tls.ca ({ours / 'ca.pem'})")
    assert "ask the alliance lead" in line


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_a_certificate_outside_its_dates_fails_the_check(
    pkis: tuple[Path, Path], tmp_path: Path, when: str
) -> None:
    ours, _ = pkis
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=30), now - dt.timedelta(days=1))
        if when == "expired"
        else (now + dt.timedelta(days=1), now + dt.timedelta(days=30))
    )
    cert = dated_cert(ours, tmp_path / "certs", start, end)
    config = write_site(tmp_path, ours / "ca.pem", cert, cert.with_suffix(".key"))
    [line] = failing_tls_lines(config)
    if when == "expired":
        assert line.startswith(f"tls.cert: {cert}: expired on {end:%Y-%m-%d}")
        assert "alliance pki issue-site va --overwrite" in line
    else:
        assert line.startswith(f"tls.cert: {cert}: not valid before {start:%Y-%m-%d %H:%M}")
        assert "clock" in line


def test_a_key_readable_by_others_is_a_warning_not_a_failure(
    pkis: tuple[Path, Path], tmp_path: Path
) -> None:
    ours, _ = pkis
    key = tmp_path / "va.key"
    shutil.copy(ours / "sites" / "va.key", key)
    key.chmod(0o644)
    config = write_site(tmp_path, ours / "ca.pem", ours / "sites" / "va.pem", key)
    code, lines = check(config)
    assert code == 0, lines
    assert (
        f"tls.key: {key}: readable by other users of this machine (mode 0644); restrict it "
        f"with `chmod 600 {key}` (warning)"
    ) in lines


def test_files_that_are_not_pem_fail_the_check(pkis: tuple[Path, Path], tmp_path: Path) -> None:
    ours, _ = pkis
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    config = write_site(tmp_path, junk, ours / "sites" / "va.pem", junk)
    problems = failing_tls_lines(config)
    assert problems[0].startswith(f"tls.ca: {junk}: not a PEM certificate")
    assert problems[1].startswith(f"tls.key: {junk}: not a PEM private key")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder``: bytes, mode and modification time."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            info = path.stat()
            found[str(path.relative_to(folder))] = (
                hashlib.sha256(path.read_bytes()).digest(),
                info.st_mode,
                info.st_mtime_ns,
            )
    return found


@pytest.mark.parametrize("state", ["fresh", "after-serving"])
def test_site_check_leaves_the_site_folder_byte_for_byte_unchanged(
    pkis: tuple[Path, Path], tmp_path: Path, state: str
) -> None:
    ours, _ = pkis
    shutil.copytree(ours / "sites", tmp_path / "site" / "tls")
    shutil.copy(ours / "ca.pem", tmp_path / "site" / "tls")
    tls = tmp_path / "site" / "tls"
    config = write_site(tmp_path / "site", tls / "ca.pem", tls / "va.pem", tls / "va.key")
    if state == "after-serving":  # a site that ran: its SQLite file holds an audit log
        runtime = SiteRuntime.from_config(load_yaml(config, SiteConfig))
        runtime.store.audit("site_stopped", {"tasks_answered": 0})
        runtime.close()
        assert (tmp_path / "site" / "state" / "site.db").exists()
    before = snapshot(tmp_path / "site")
    code, lines = check(config)
    assert code == 0, lines
    assert snapshot(tmp_path / "site") == before
    if state == "fresh":
        assert not (tmp_path / "site" / "state").exists()
        db = tmp_path / "site" / "state" / "site.db"
        assert f"audit log: none yet ({db} is created by `alliance site serve`)" in lines
    else:
        # site_started, site.yaml's approval recorded as a decision, site_stopped
        assert any(line.startswith("audit log intact: 3 entries") for line in lines), lines

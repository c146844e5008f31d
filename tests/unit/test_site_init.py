"""`alliance site init` and `alliance pki sign`: the site's key never leaves the site.

The site makes its own TLS key and a certificate request; the lead signs the request with the
alliance CA; the signed certificate then carries a real mutual-TLS handshake to a real
coordinator link on loopback.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from coordinator import pki
from coordinator.link import SiteLinkService, SiteRegistry
from coordinator.pki import RevocationList, check_crl
from protocol.config import SiteConfig, load_yaml
from protocol.errors import ConfigError, ValidationError
from protocol.tlsfiles import check_tls_files
from simulations.cli import app
from simulations.heart import heart_dictionary
from site_node.identity import init_site
from site_node.runtime import SiteRuntime
from tests.unit.test_site_link_retries import RecordingLink, runtime, start_server

runner = CliRunner()


@pytest.fixture
def alliance_pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    pki.init_ca(folder, "Cardio Alliance")
    pki.issue_coordinator(folder, ["127.0.0.1"])
    return folder


def test_init_writes_private_keys_a_request_and_a_default_deny_policy(tmp_path: Path) -> None:
    made = runner.invoke(app, ["site", "init", "mercy", "--dir", str(tmp_path / "mercy")])
    assert made.exit_code == 0, made.output
    assert "send it to the alliance lead" in made.stdout
    site = tmp_path / "mercy"
    for private in (site / "tls" / "site.key", site / "state" / "signing_key.pem"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    csr = x509.load_pem_x509_csr((site / "tls" / "site.csr").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mercy"
    config = load_yaml(site / "site.yaml", SiteConfig)
    assert config.name == "mercy"
    assert config.policy.allowed_analyses == [] and config.policy.studies == []  # default deny
    again = runner.invoke(app, ["site", "init", "mercy", "--dir", str(site)])
    # main() prints it as one `error:` line and exits 2; nothing was overwritten.
    assert isinstance(again.exception, ConfigError) and "already exists" in str(again.exception)


@pytest.mark.parametrize("name", ["coordinator", "1st", "a b", ""])
def test_init_refuses_a_name_no_certificate_could_carry(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationError, match="site name"):
        init_site(tmp_path / "site", name)


def test_the_lead_signs_the_request_and_the_site_handshakes_with_it(
    tmp_path: Path, alliance_pki: Path
) -> None:
    made = init_site(tmp_path / "va", "va")
    signed = runner.invoke(app, ["pki", "sign", str(made.csr), "--dir", str(alliance_pki)])
    assert signed.exit_code == 0, signed.output
    cert_path = alliance_pki / "sites" / "va.pem"
    assert not (alliance_pki / "sites" / "va.key").exists()  # the lead never held the key
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    site_key = serialization.load_pem_private_key(made.tls_key.read_bytes(), None)
    assert cert.public_key() == site_key.public_key()
    shutil.copy(alliance_pki / "ca.pem", made.tls_key.parent / "ca.pem")
    shutil.copy(cert_path, made.tls_key.parent / "site.pem")
    tls = {
        "ca": str(made.tls_key.parent / "ca.pem"),
        "cert": str(made.tls_key.parent / "site.pem"),
        "key": str(made.tls_key),
    }
    config = load_yaml(made.config, SiteConfig)
    assert config.tls is not None
    assert check_tls_files(config.tls, "site", "va").problems == []
    # A real mutual-TLS handshake with the coordinator's link.
    rt = runtime(tmp_path, "va", tls)
    registry = SiteRegistry(None, heart_dictionary().digest())
    try:
        service = SiteLinkService(registry, "coordinator", True)
        assert asyncio.run(connect(rt, service, alliance_pki)) == ["va"]
    finally:
        rt.close()


def coordinator_credentials(alliance_pki: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [
            (
                (alliance_pki / "coordinator.key").read_bytes(),
                (alliance_pki / "coordinator.pem").read_bytes(),
            )
        ],
        root_certificates=(alliance_pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )


async def connect(
    rt: SiteRuntime, service: SiteLinkService, alliance_pki: Path
) -> list[str] | None:
    """The sites connected once ``service`` welcomed this site's link; None when it did not
    (a refusal is audited at the site)."""
    server, port = await start_server(service, coordinator_credentials(alliance_pki))
    rt.config = rt.config.model_copy(update={"coordinator": f"127.0.0.1:{port}"})
    link = RecordingLink(rt.config, rt, pauses=1)
    running = asyncio.create_task(link.run())
    welcomed = asyncio.create_task(link.connected.wait())
    try:
        await asyncio.wait({running, welcomed}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if not welcomed.done():
            return None
        await asyncio.sleep(0.05)  # the coordinator attaches the session as it welcomes
        return service.registry.connected()
    finally:
        link.stop()
        welcomed.cancel()
        await asyncio.wait_for(running, 10)
        await server.stop(None)


def test_a_revoked_certificate_is_refused_at_the_next_handshake_and_a_renewed_one_works(
    tmp_path: Path, alliance_pki: Path
) -> None:
    made = init_site(tmp_path / "va", "va")
    pki.sign_site_request(alliance_pki, made.csr)
    tls_dir = made.tls_key.parent
    shutil.copy(alliance_pki / "ca.pem", tls_dir / "ca.pem")
    shutil.copy(alliance_pki / "sites" / "va.pem", tls_dir / "site.pem")
    tls = {
        "ca": str(tls_dir / "ca.pem"),
        "cert": str(tls_dir / "site.pem"),
        "key": str(made.tls_key),
    }
    rt = runtime(tmp_path, "va", tls)
    crl = alliance_pki / "crl.pem"
    pki.revoke_site(alliance_pki, "va")  # an empty list to start from is not needed: any list
    revoked_serial = x509.load_pem_x509_certificate(
        (tls_dir / "site.pem").read_bytes()
    ).serial_number
    registry = SiteRegistry(None, heart_dictionary().digest())
    service = SiteLinkService(
        registry, "coordinator", True, RevocationList(crl, alliance_pki / "ca.pem")
    )
    try:
        assert asyncio.run(connect(rt, service, alliance_pki)) is None
        [refused] = [e for e in rt.store.audit_entries() if e.action == "link_refused"]
        assert f"serial {revoked_serial:x}) was revoked by the alliance lead" in refused.detail
        # The lead renews it (same key, new serial): the new certificate is not on the list.
        renewed = runner.invoke(app, ["pki", "renew", "va", "--dir", str(alliance_pki)])
        assert renewed.exit_code == 0, renewed.output
        shutil.copy(alliance_pki / "sites" / "va.pem", tls_dir / "site.pem")
        assert asyncio.run(connect(rt, service, alliance_pki)) == ["va"]
        # Revoked again while the coordinator runs: the list is re-read at the next handshake.
        revoked = runner.invoke(app, ["pki", "revoke", "va", "--dir", str(alliance_pki)])
        assert revoked.exit_code == 0, revoked.output
        assert asyncio.run(connect(rt, service, alliance_pki)) is None
    finally:
        rt.close()
    listed = pki.read_crl(
        crl, x509.load_pem_x509_certificate((alliance_pki / "ca.pem").read_bytes())
    )
    assert {r.site for r in listed.values()} == {"va"} and len(listed) == 2


def test_a_crl_not_signed_by_the_alliance_ca_stops_the_coordinator(
    tmp_path: Path, alliance_pki: Path
) -> None:
    other = tmp_path / "other-pki"
    pki.init_ca(other, "Someone Else")
    pki.issue_site(other, "va")
    pki.revoke_site(other, "va")
    problems = check_crl(other / "crl.pem", alliance_pki / "ca.pem")
    assert problems == [
        f"crl: {other / 'crl.pem'}: not signed by the alliance CA; ignore it and ask the lead"
    ]
    assert check_crl(tmp_path / "missing.pem", alliance_pki / "ca.pem")[0].startswith("crl: ")


def test_sign_refuses_a_forged_request_a_reserved_name_and_a_second_certificate(
    tmp_path: Path, alliance_pki: Path
) -> None:
    made = init_site(tmp_path / "va", "va")
    # A request whose name was edited after signing no longer verifies.
    good = made.csr.read_bytes()
    forged_path = tmp_path / "forged.csr"
    key = ec.generate_private_key(ec.SECP256R1())
    other = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator")]))
        .sign(key, hashes.SHA256())
    )
    forged_path.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValidationError, match="reserved for the coordinator"):
        pki.sign_site_request(alliance_pki, forged_path)
    broken = tmp_path / "broken.csr"
    broken.write_bytes(good.replace(b"M", b"N", 1))
    with pytest.raises(ConfigError):
        pki.sign_site_request(alliance_pki, broken)
    pki.sign_site_request(alliance_pki, made.csr)
    with pytest.raises(ConfigError, match="already has a certificate"):
        pki.sign_site_request(alliance_pki, made.csr)
    pki.sign_site_request(alliance_pki, made.csr, overwrite=True)

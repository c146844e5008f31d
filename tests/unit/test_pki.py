"""The alliance CA: issued certificates chain to it, carry the right identity and usages, and
the lead cannot overwrite a CA or issue a certificate under a bad name."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator import pki
from protocol.errors import ConfigError, ValidationError


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Check the signature with the CA's public key (ECDSA over SHA-256)."""
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    try:
        public.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm),
        )
    except InvalidSignature:
        return False
    return cert.issuer == ca.subject


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    pki.init_ca(folder, "Cardio Alliance")
    pki.issue_site(folder, "cleveland")
    pki.issue_coordinator(folder, hosts=["localhost", "127.0.0.1", "coord.alliance.example"])
    return folder


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second CA, with a site of the same name: the impostor case."""
    folder = tmp_path_factory.mktemp("rogue")
    pki.init_ca(folder, "Cardio Alliance")
    pki.issue_site(folder, "cleveland")
    return folder


def test_layout_and_key_permissions(alliance: Path) -> None:
    for name in ("ca.pem", "ca.key", "coordinator.pem", "coordinator.key"):
        assert (alliance / name).is_file(), name
    assert (alliance / "sites" / "cleveland.pem").is_file()
    for key in ("ca.key", "coordinator.key", "sites/cleveland.key"):
        assert stat.S_IMODE((alliance / key).stat().st_mode) == 0o600, key
        # Unencrypted PKCS8 PEM: gRPC reads it unattended.
        loaded = serialization.load_pem_private_key((alliance / key).read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        assert loaded.curve.name == "secp256r1"


def test_ca_is_self_signed_ca_for_leaves_only(alliance: Path) -> None:
    ca = load(alliance / "ca.pem")
    assert signed_by(ca, ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "Cardio Alliance"
    )


def test_site_chain_verifies_with_cn_and_client_auth(alliance: Path) -> None:
    ca, site = load(alliance / "ca.pem"), load(alliance / "sites" / "cleveland.pem")
    assert signed_by(site, ca)
    site.verify_directly_issued_by(ca)  # cryptography's own check: raises if not
    assert pki.read_subject_cn((alliance / "sites" / "cleveland.pem").read_bytes()) == "cleveland"
    eku = site.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = site.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = site.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    # The leaf's key pair matches: the public key in the cert is the one of the written key.
    key = serialization.load_pem_private_key((alliance / "sites/cleveland.key").read_bytes(), None)
    assert key.public_key() == site.public_key()


def test_coordinator_has_server_and_client_auth_and_sans(alliance: Path) -> None:
    ca, coord = load(alliance / "ca.pem"), load(alliance / "coordinator.pem")
    assert signed_by(coord, ca)
    eku = set(coord.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = coord.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.alliance.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert not coord.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki.read_subject_cn((alliance / "coordinator.pem").read_bytes()) == pki.COORDINATOR_CN


def test_certificate_from_second_ca_does_not_verify(alliance: Path, rogue: Path) -> None:
    ca, impostor = load(alliance / "ca.pem"), load(rogue / "sites" / "cleveland.pem")
    # Same subject names, so only the signature tells them apart.
    assert impostor.issuer == ca.subject
    assert not signed_by(impostor, ca)
    with pytest.raises(InvalidSignature):
        impostor.verify_directly_issued_by(ca)
    with pytest.raises(ConfigError, match="not issued by the alliance CA"):
        pki.verify_issued_by(rogue / "sites" / "cleveland.pem", alliance / "ca.pem")
    pki.verify_issued_by(alliance / "sites" / "cleveland.pem", alliance / "ca.pem")


def test_overwriting_a_ca_is_refused(alliance: Path) -> None:
    before = (alliance / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match=r"already exists.*refusing to overwrite"):
        pki.init_ca(alliance, "Another Alliance")
    assert (alliance / "ca.key").read_bytes() == before


def test_half_a_ca_is_not_overwritten_either(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_text("left over")
    with pytest.raises(ConfigError, match=r"ca\.key: an alliance CA already exists"):
        pki.init_ca(tmp_path, "A")
    assert (tmp_path / "ca.key").read_text() == "left over"
    assert not (tmp_path / "ca.pem").exists()


def test_reissuing_needs_overwrite(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "A")
    first = pki.issue_site(tmp_path, "basel")
    serial = load(first.cert).serial_number
    with pytest.raises(ConfigError, match="site 'basel' already has a certificate"):
        pki.issue_site(tmp_path, "basel")
    again = pki.issue_site(tmp_path, "basel", overwrite=True)
    assert load(again.cert).serial_number != serial
    assert stat.S_IMODE(again.key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "name", ["", "9lives", "-site", "st gallen", "zürich", "a/b", "../etc", "a" * 65, "x;rm"]
)
def test_bad_site_names_are_refused(tmp_path: Path, name: str) -> None:
    pki.init_ca(tmp_path, "A")
    with pytest.raises(ValidationError) as info:
        pki.issue_site(tmp_path, name)
    message = str(info.value)
    assert repr(name) in message and pki.SITE_NAME in message and "\n" not in message
    assert not (tmp_path / "sites").exists() or not any((tmp_path / "sites").iterdir())


@pytest.mark.parametrize("name", ["a", "St.Gallen-2", "va_long.beach", "h" + "x" * 63])
def test_good_site_names_are_accepted(tmp_path: Path, name: str) -> None:
    pki.init_ca(tmp_path, "A")
    files = pki.issue_site(tmp_path, name, days=30)
    assert pki.read_subject_cn(files.cert.read_bytes()) == name


def test_coordinator_name_is_reserved(tmp_path: Path) -> None:
    # A site certificate with CN "coordinator" would look like the coordinator's own identity.
    pki.init_ca(tmp_path, "A")
    with pytest.raises(ValidationError, match="reserved for the coordinator"):
        pki.issue_site(tmp_path, "Coordinator")


def test_issuing_without_a_ca_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\.pem: not found; create the alliance CA first"):
        pki.issue_site(tmp_path, "basel")
    with pytest.raises(ConfigError, match="create the alliance CA first"):
        pki.issue_coordinator(tmp_path)


@pytest.mark.parametrize("host", ["bad host", "-x.example", "a..b", "", "x" * 64 + ".org"])
def test_bad_coordinator_hosts_are_refused(tmp_path: Path, host: str) -> None:
    pki.init_ca(tmp_path, "A")
    with pytest.raises(ValidationError, match="neither an IP address nor a DNS name"):
        pki.issue_coordinator(tmp_path, hosts=[host])


def test_ipv6_host_becomes_an_ip_san(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "A")
    files = pki.issue_coordinator(tmp_path, hosts=["::1"])
    san = load(files.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]


def test_validity_days_and_ca_expiry(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "A", days=100)
    files = pki.issue_site(tmp_path, "basel", days=10)
    cert = load(files.cert)
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert span - pki.CLOCK_SKEW == dt.timedelta(days=10)
    with pytest.raises(ValidationError, match="would outlive the alliance CA"):
        pki.issue_site(tmp_path, "bern", days=200)
    with pytest.raises(ValidationError, match="days must be a whole number >= 1, got 0"):
        pki.issue_site(tmp_path, "bern", days=0)


def test_read_subject_cn_rejects_non_certificates() -> None:
    with pytest.raises(ValidationError, match="not a PEM certificate"):
        pki.read_subject_cn(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_describe(alliance: Path) -> None:
    info = pki.describe(alliance / "sites" / "cleveland.pem")
    cert = load(alliance / "sites" / "cleveland.pem")
    assert info.subject == "CN=cleveland,O=Cardio Alliance"
    assert info.issuer == "CN=Cardio Alliance CA,O=Cardio Alliance"
    assert info.not_before == cert.not_valid_before_utc
    assert info.not_after == cert.not_valid_after_utc
    assert (
        info.sha256_fingerprint.replace(":", "").lower() == cert.fingerprint(hashes.SHA256()).hex()
    )
    assert not info.is_ca and info.extended_key_usage == ("clientAuth",)
    assert not info.expired()
    text = str(info)
    assert "CN=cleveland" in text and info.sha256_fingerprint in text and "EXPIRED" not in text
    ca_info = pki.describe(alliance / "ca.pem")
    assert ca_info.is_ca and ca_info.subject == ca_info.issuer
    assert "DNS:localhost" in pki.describe(alliance / "coordinator.pem").subject_alt_names


def test_describe_missing_or_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.pem: file not found"):
        pki.describe(tmp_path / "nope.pem")
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ConfigError, match=r"junk\.pem: not a PEM certificate"):
        pki.describe(tmp_path / "junk.pem")


def test_read_subject_cn_needs_exactly_one_cn() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "No CN Hospital")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ValidationError, match="has 0 subject common names"):
        pki.read_subject_cn(cert.public_bytes(serialization.Encoding.PEM))

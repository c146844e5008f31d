"""The alliance's own certificate authority, for the lead's ``alliance pki`` commands.

Sites and the coordinator authenticate each other with mutual TLS on the site link. The alliance
lead creates one CA for the alliance, issues every hospital a site certificate whose subject
common name is the site's name (the coordinator reads the site's identity from it), and issues
the coordinator a server certificate naming the hosts sites dial. Keys are EC P-256 (small,
fast handshakes, supported by every gRPC build); signatures are ECDSA with SHA-256.

Layout of a PKI folder (keys are unencrypted PEM, mode 0600, because site nodes and the
coordinator read them unattended at start-up; protect the folder, not the file)::

    <folder>/
      ca.pem                  the alliance CA certificate: give a copy to every site
      ca.key                  the CA private key: keep it offline; whoever holds it can mint sites
      coordinator.pem         the coordinator's certificate (serverAuth + clientAuth, SANs = hosts)
      coordinator.key
      sites/<name>.pem        one certificate per site (clientAuth, CN = <name>)
      sites/<name>.key        (issue-site only; a site that ran `alliance site init` keeps its key)
      crl.pem                 the certificates revoked (`alliance pki revoke`), signed by the CA:
                              give it to the coordinator (tls.crl in coordinator.yaml)

A site gets ``ca.pem``, ``sites/<name>.pem`` and ``sites/<name>.key``; the coordinator gets
``ca.pem``, ``coordinator.pem`` and ``coordinator.key``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.config import SITE_NAME
from protocol.errors import ConfigError, ValidationError
from protocol.storage import write_new_file

log = logging.getLogger("alliance.coordinator")

#: The coordinator certificate's common name; no site may take it (see ``issue_site``).
COORDINATOR_CN = "coordinator"
CA_DAYS = 3650
LEAF_DAYS = 730
#: Certificates start this long before "now" so a site whose clock is a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


@dataclass(frozen=True)
class CAFiles:
    """Paths of the alliance CA certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class IssuedFiles:
    """Paths of an issued certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateInfo:
    """What ``alliance pki show`` prints about one certificate."""

    path: Path
    subject: str
    issuer: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    sha256_fingerprint: str
    is_ca: bool
    extended_key_usage: tuple[str, ...]
    subject_alt_names: tuple[str, ...]

    def expired(self, now: dt.datetime | None = None) -> bool:
        """Whether the certificate is outside its validity period at ``now`` (UTC)."""
        now = now or dt.datetime.now(dt.UTC)
        return not self.not_before <= now <= self.not_after

    def __str__(self) -> str:
        lines = [
            f"certificate  {self.path}",
            f"subject      {self.subject}",
            f"issuer       {self.issuer}",
            f"role         {'certificate authority' if self.is_ca else 'leaf'}",
            f"valid        {self.not_before:%Y-%m-%d %H:%M} to {self.not_after:%Y-%m-%d %H:%M} UTC"
            + (" (EXPIRED or not yet valid)" if self.expired() else ""),
            f"serial       {self.serial:x}",
            f"sha256       {self.sha256_fingerprint}",
        ]
        if self.extended_key_usage:
            lines.append(f"usage        {', '.join(self.extended_key_usage)}")
        if self.subject_alt_names:
            lines.append(f"names        {', '.join(self.subject_alt_names)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- public functions


def init_ca(folder: str | Path, alliance_name: str, days: int = CA_DAYS) -> CAFiles:
    """Create the alliance CA in ``folder`` (created if needed).

    Raises:
        ConfigError: when ``folder`` already holds a CA (or half of one); a new CA would orphan
            every certificate the old one issued, so it is never overwritten.
        ValidationError: for an empty or overlong alliance name, or ``days`` < 1.
    """
    folder = Path(folder)
    _check_alliance_name(alliance_name)
    _check_days(days)
    files = CAFiles(folder / "ca.pem", folder / "ca.key")
    existing = [p for p in (files.cert, files.key) if p.exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]}: an alliance CA already exists in {folder}; refusing to overwrite it "
            "(every certificate it issued would stop working). Use another folder for a new CA."
        )
    _make_private_dir(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, alliance_name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{alliance_name} CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key.public_key(), now, now + dt.timedelta(days=days), ca=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    write_new_file(files.key, _key_pem(key), private=True)
    write_new_file(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def issue_site(
    folder: str | Path, site_name: str, days: int = LEAF_DAYS, overwrite: bool = False
) -> IssuedFiles:
    """Issue ``sites/<site_name>.pem`` and ``.key``: a client certificate with CN = site name.

    Raises:
        ValidationError: for a name outside ``SITE_NAME``, the reserved name ``coordinator``,
            ``days`` < 1 or a validity past the CA's own expiry.
        ConfigError: when the folder has no CA, or the site already has a certificate and
            ``overwrite`` is false.
    """
    check_issuable_site_name(site_name)
    folder = Path(folder)
    return _issue_site_certificate(
        folder,
        site_name,
        _site_files(folder, site_name),
        days,
        overwrite,
        reissue=f"alliance pki issue-site {site_name} --overwrite",
    )


def issue_coordinator(
    folder: str | Path,
    hosts: list[str] | None = None,
    days: int = LEAF_DAYS,
    overwrite: bool = False,
) -> IssuedFiles:
    """Issue ``coordinator.pem`` and ``.key``: serverAuth + clientAuth, one SAN per host.

    Args:
        folder: the PKI folder holding the CA.
        hosts: DNS names and IP addresses sites use to dial the coordinator (a site checks the
            name it dials against these); default ``["localhost", "127.0.0.1"]``.
        days: validity in days.
        overwrite: replace an existing coordinator certificate.

    Raises:
        ValidationError: for an empty host list, a host that is neither a DNS name nor an IP
            address, ``days`` < 1 or a validity past the CA's expiry.
        ConfigError: when the folder has no CA, or a coordinator certificate exists and
            ``overwrite`` is false.
    """
    hosts = ["localhost", "127.0.0.1"] if hosts is None else list(hosts)
    if not hosts:
        raise ValidationError("the coordinator certificate needs at least one host name or IP")
    alt_names = [_alt_name(host) for host in dict.fromkeys(hosts)]
    folder = Path(folder)
    files = IssuedFiles(folder / "coordinator.pem", folder / "coordinator.key")
    return _issue(
        folder,
        files,
        common_name=COORDINATOR_CN,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        alt_names=alt_names,
        days=days,
        overwrite=overwrite,
        what="the coordinator",
        reissue="alliance pki issue-coordinator --overwrite",
    )


def check_site_name(site_name: str) -> None:
    """Raise ValidationError unless ``site_name`` matches ``SITE_NAME``."""
    if not isinstance(site_name, str) or not re.match(SITE_NAME, site_name):
        raise ValidationError(
            f"site name {site_name!r} is not allowed; use a letter followed by up to 63 letters, "
            f"digits, '_', '.' or '-' (pattern {SITE_NAME})"
        )


def read_subject_cn(pem_bytes: bytes) -> str:
    """The subject common name of a PEM certificate (a site's identity).

    Raises:
        ValidationError: when the bytes are not a PEM certificate, or it has no single CN.
    """
    cert = _parse_cert(pem_bytes, "the given bytes")
    return _single_cn(cert, "the certificate")


def describe(cert_path: str | Path) -> CertificateInfo:
    """Subject, issuer, validity, fingerprint and usages of the certificate at ``cert_path``.

    Raises:
        ConfigError: when the file cannot be read or is not a PEM certificate.
    """
    path = Path(cert_path)
    cert = _load_cert(path)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku)
    except x509.ExtensionNotFound:
        usages = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(
            [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
            + [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        is_ca=is_ca,
        extended_key_usage=usages,
        subject_alt_names=names,
    )


def verify_issued_by(cert_path: str | Path, ca_path: str | Path) -> None:
    """Check that the certificate at ``cert_path`` was signed by the CA at ``ca_path``.

    Raises:
        ConfigError: naming both files when the certificate is from another CA, or unreadable.
    """
    cert, ca = _load_cert(Path(cert_path)), _load_cert(Path(ca_path))
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{cert_path}: not issued by the alliance CA in {ca_path} "
            f"(issuer {cert.issuer.rfc4514_string()!r}, CA {ca.subject.rfc4514_string()!r})"
        ) from None


# --------------------------------------------------------------------------- internals


def sign_site_request(
    folder: str | Path, csr_path: str | Path, days: int = LEAF_DAYS, overwrite: bool = False
) -> Path:
    """Sign a site's certificate request (``alliance site init`` wrote it at the site, whose
    key never leaves it): write ``sites/<name>.pem``, CN = the request's name, client auth.

    Raises:
        ConfigError: the request is unreadable or not self-signed by its key, the folder has
            no CA, or the site has a certificate already and ``overwrite`` is false.
        ValidationError: the request's name is not a site name, or is reserved.
    """
    path = Path(csr_path)
    try:
        csr = x509.load_pem_x509_csr(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError:
        raise ConfigError(
            f"{path}: not a PEM certificate request (alliance site init writes tls/site.csr)"
        ) from None
    if not csr.is_signature_valid:
        raise ConfigError(f"{path}: the request is not signed by its own key; ask for a new one")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise ConfigError(
            f"{path}: the request's key is {type(public).__name__}; the alliance issues "
            "ECDSA P-256 certificates (alliance site init makes one)"
        )
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ConfigError(f"{path}: the request must name exactly one site (common name)")
    site_name = str(names[0].value)
    check_issuable_site_name(site_name)
    folder = Path(folder)
    files = _site_files(folder, site_name)
    _issue_site_certificate(
        folder,
        site_name,
        files,
        days,
        overwrite,
        reissue=f"alliance pki sign {path} --overwrite",
        public_key=public,
    )
    return files.cert


def renew_site(folder: str | Path, site_name: str, days: int = LEAF_DAYS) -> Path:
    """Re-issue ``sites/<site_name>.pem`` for the same key (the site keeps its key), with new
    dates and a new serial. The old certificate stays valid until it expires; revoke it to end
    it sooner.

    Raises:
        ConfigError: no CA, or no certificate for that site in the folder.
        ValidationError: the site name is not one.
    """
    check_site_name(site_name)
    folder = Path(folder)
    cert_path = folder / "sites" / f"{site_name}.pem"
    if not cert_path.exists():
        raise ConfigError(
            f"{cert_path}: site {site_name!r} has no certificate here to renew; "
            "`alliance pki sign` its request"
        )
    public = _ec_public(_load_cert(cert_path), cert_path)
    _issue_site_certificate(
        folder,
        site_name,
        # Only the certificate is replaced: a key file beside it (issue-site) stays untouched.
        IssuedFiles(cert_path, folder / "sites" / f".{site_name}.no-key"),
        days,
        overwrite=True,
        reissue="",
        public_key=public,
    )
    return cert_path


def check_issuable_site_name(site_name: str) -> None:
    """A site name the CA may issue: it matches ``SITE_NAME`` and is not ``coordinator``.

    Raises:
        ValidationError: naming the bad name and the rule.
    """
    check_site_name(site_name)
    if site_name.casefold() == COORDINATOR_CN:
        raise ValidationError(
            f"site name {site_name!r} is reserved for the coordinator's certificate; "
            "choose another site name"
        )


def _site_files(folder: Path, site_name: str) -> IssuedFiles:
    return IssuedFiles(folder / "sites" / f"{site_name}.pem", folder / "sites" / f"{site_name}.key")


def _issue_site_certificate(
    folder: Path,
    site_name: str,
    files: IssuedFiles,
    days: int,
    overwrite: bool,
    reissue: str,
    public_key: ec.EllipticCurvePublicKey | None = None,
) -> IssuedFiles:
    """A site's client certificate (CN = its name, client auth only): the one shape that
    issue-site, sign and renew all write."""
    return _issue(
        folder,
        files,
        common_name=site_name,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        alt_names=[],
        days=days,
        overwrite=overwrite,
        what=f"site {site_name!r}",
        reissue=reissue,
        public_key=public_key,
    )


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate."""

    site: str
    serial: int
    revoked: dt.datetime


def revoke_site(folder: str | Path, site_name: str) -> Revoked:
    """Revoke the site's current certificate: add its serial to ``crl.pem`` (signed by the CA).
    A coordinator configured with ``tls.crl`` refuses it at the site's next handshake.

    Raises:
        ConfigError: no CA, or no certificate for that site in the folder.
    """
    check_site_name(site_name)
    folder = Path(folder)
    cert_path = folder / "sites" / f"{site_name}.pem"
    if not cert_path.exists():
        raise ConfigError(f"{cert_path}: site {site_name!r} has no certificate here to revoke")
    cert = _load_cert(cert_path)
    ca_cert, ca_key = _load_ca(folder)
    crl_path = folder / "crl.pem"
    revoked = list(read_crl(crl_path, ca_cert).values()) if crl_path.exists() else []
    now = dt.datetime.now(dt.UTC)
    entry = Revoked(site_name, cert.serial_number, now)
    if all(r.serial != entry.serial for r in revoked):
        revoked.append(entry)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=LEAF_DAYS))
    )
    for item in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(item.serial)
            .revocation_date(item.revoked)
            .add_extension(
                x509.CertificateIssuer([x509.DirectoryName(_site_name(item.site))]),
                critical=True,
            )
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    temp = crl_path.with_name(".crl.pem.new")
    temp.unlink(missing_ok=True)
    write_new_file(temp, crl.public_bytes(serialization.Encoding.PEM), private=False)
    os.replace(temp, crl_path)
    return entry


def _site_name(site: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)])


def read_crl(path: Path, ca_cert: x509.Certificate) -> dict[int, Revoked]:
    """The revoked certificates in ``path`` by serial, after checking the CA signed it.

    Raises:
        ConfigError: unreadable, not a CRL, or not signed by the alliance CA.
    """
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate revocation list") from None
    if not crl.is_signature_valid(_ec_public(ca_cert, path)):
        raise ConfigError(f"{path}: not signed by the alliance CA; ignore it and ask the lead")
    found: dict[int, Revoked] = {}
    for item in crl:
        site = "?"
        try:
            issuer = item.extensions.get_extension_for_class(x509.CertificateIssuer).value
            names = issuer.get_values_for_type(x509.DirectoryName)
            if names:
                site = str(names[0].get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        except (x509.ExtensionNotFound, IndexError):
            pass
        revoked_at = item.revocation_date_utc
        found[item.serial_number] = Revoked(site, item.serial_number, revoked_at)
    return found


def _issue(
    folder: Path,
    files: IssuedFiles,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    alt_names: list[x509.GeneralName],
    days: int,
    overwrite: bool,
    what: str,
    reissue: str,
    public_key: ec.EllipticCurvePublicKey | None = None,
) -> IssuedFiles:
    """Issue a leaf certificate; with ``public_key`` (a signed request) for that key and no
    key file, otherwise for a new key written beside it."""
    _check_days(days)
    ca_cert, ca_key = _load_ca(folder)
    existing = [p for p in (files.cert, files.key) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]}: {what} already has a certificate; refusing to overwrite it. "
            f"To re-issue it, run `{reissue}` (the old certificate stays valid until it "
            "expires)"
        )
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        left = (ca_cert.not_valid_after_utc - now).days
        raise ValidationError(
            f"a {days}-day certificate would outlive the alliance CA, which expires on "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%d}; use days <= {left}"
        )
    organisation = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(a.value)) for a in organisation]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    key = ec.generate_private_key(ec.SECP256R1()) if public_key is None else None
    public = public_key if key is None else key.public_key()
    assert public is not None
    builder = (
        _builder(x509.Name(attributes), ca_cert.subject, public, now, not_after, ca=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _make_private_dir(files.cert.parent)
    for path in existing:
        path.unlink()
    if key is not None:
        write_new_file(files.key, _key_pem(key), private=True)
    write_new_file(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    not_after: dt.datetime,
    ca: bool,
) -> x509.CertificateBuilder:
    """What the CA's and a leaf's certificates share: names, key, serial, dates, and the basic
    constraints and key usage of the one or the other.

    The CA signs certificates only, and leaves only (path_length=0: never another CA). A
    leaf's ECDSA key signs the handshake (digitalSignature); ECDHE needs no keyAgreement bit.
    """
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            _key_usage("key_cert_sign", "crl_sign") if ca else _key_usage("digital_signature"),
            critical=True,
        )
    )


#: Every bit of the key usage extension, in x509.KeyUsage's own names.
KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*granted: str) -> x509.KeyUsage:
    """A key usage extension with the ``granted`` bits set and every other bit clear."""
    return x509.KeyUsage(**{bit: bit in granted for bit in KEY_USAGE_BITS})


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    for path in (cert_path, key_path):
        if not path.exists():
            raise ConfigError(
                f"{path}: not found; create the alliance CA first (`alliance pki init`)"
            )
    cert = _load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
    if key.public_key().public_numbers() != _ec_public(cert, cert_path).public_numbers():
        raise ConfigError(f"{key_path}: this key does not belong to the CA certificate {cert_path}")
    return cert, key


def _ec_public(cert: x509.Certificate, path: Path) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path}: expected an EC certificate, got {type(public).__name__}")
    return public


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return _parse_cert(data, str(path))
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None


def _parse_cert(data: bytes, source: str) -> x509.Certificate:
    if not isinstance(data, bytes):
        raise ValidationError(f"{source}: expected PEM bytes, got {type(data).__name__}")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValidationError(
            f"{source}: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----')"
        ) from None


def _single_cn(cert: x509.Certificate, source: str) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValidationError(
            f"{source} has {len(names)} subject common names ({cert.subject.rfc4514_string()!r});"
            " an alliance certificate has exactly one"
        )
    return str(names[0].value)


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".") if isinstance(host, str) else []
    if not labels or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValidationError(
            f"host {host!r} is neither an IP address nor a DNS name (letters, digits and '-' "
            "in dot-separated labels, e.g. coordinator.alliance.example or 10.0.0.5)"
        )
    return x509.DNSName(host.rstrip(".").lower())


def _check_alliance_name(name: str) -> None:
    # The CA's CN is "<name> CA" and X.509 caps a CN at 64 characters.
    if not isinstance(name, str) or not name.strip() or len(name) > 60 or not name.isprintable():
        raise ValidationError(
            f"alliance name {name!r} is not allowed; use 1 to 60 printable characters"
        )


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValidationError(f"days must be a whole number >= 1, got {days!r}")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the folder ({exc.strerror})") from None


class RevocationList:
    """The CRL a coordinator checks at every site handshake, re-read when the file changes.

    A file that turns unreadable or unsigned later keeps the list read before (and logs why);
    at start it must be good (:func:`check_crl`).
    """

    def __init__(self, path: Path, ca_path: Path) -> None:
        self.path = path
        self.ca = _load_cert(ca_path)
        self._stamp: tuple[int, int] | None = None
        self._revoked: dict[int, Revoked] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        try:
            self._revoked = read_crl(self.path, self.ca)
        except ConfigError as exc:
            log.error("%s; keeping the revocation list read before", exc)
            return
        self._stamp = stamp

    def revoked(self, cert_pem: bytes) -> Revoked | None:
        """The revocation of this certificate, if it was revoked."""
        self.refresh()
        try:
            serial = x509.load_pem_x509_certificate(cert_pem).serial_number
        except ValueError:
            return None
        return self._revoked.get(serial)


def check_crl(path: Path, ca_path: Path) -> list[str]:
    """What is wrong with a configured revocation list (one line each; none when fine)."""
    if not path.exists():
        return [f"crl: {path} does not exist (alliance pki revoke writes pki/crl.pem)"]
    try:
        read_crl(path, _load_cert(ca_path))
    except ConfigError as exc:
        return [f"crl: {exc}"]
    return []

"""Check a node's TLS files before it uses them: one line per problem, saying what to do.

Both roles run these checks: ``alliance site check`` (and ``site serve`` at start) for a site's
files, ``alliance coordinator serve`` at start for the coordinator's. A broken file otherwise
shows up only as a failed TLS handshake, in gRPC's words and often on the other side.

Checked, for each of ``tls.ca``, ``tls.cert`` and ``tls.key``: the file is readable and PEM;
the CA is a CA and within its dates; the certificate was signed by that CA (signature verified),
names the node (a site's CN is its ``name``), carries the usage the node needs (clientAuth for a
site, serverAuth for the coordinator) and is within its dates; the key belongs to the
certificate. Nothing is written.
"""

from __future__ import annotations

import datetime as dt
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import typer
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.config import TLSFiles

Role = Literal["site", "coordinator"]
#: Both servers' ``--insecure``: drop TLS (typer type, shared by both roles' CLIs).
INSECURE = Annotated[bool, typer.Option("--insecure", help="no TLS: loopback experiments ONLY")]
#: A certificate closer than this to its end date gets a warning (not a failure).
EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass
class TLSCheck:
    """What :func:`check_tls_files` found: problems fail the check, warnings do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


@dataclass(frozen=True)
class _Advice:
    """What a person in this role does about each kind of problem."""

    get_cert: str
    reissue: str
    get_ca: str


def _advice(role: Role, name: str) -> _Advice:
    if role == "site":
        return _Advice(
            get_cert=f"ask the alliance lead for this site's certificate "
            f"(`alliance pki issue-site {name}`)",
            reissue=f"ask the alliance lead to re-issue it "
            f"(`alliance pki issue-site {name} --overwrite`)",
            get_ca="ask the alliance lead for the alliance CA certificate (ca.pem)",
        )
    return _Advice(
        get_cert="issue it with `alliance pki issue-coordinator --host HOST`",
        reissue="re-issue it with `alliance pki issue-coordinator --host HOST --overwrite`",
        get_ca="use the alliance CA certificate (ca.pem, made by `alliance pki init`)",
    )


def check_tls_files(
    files: TLSFiles, role: Role, name: str, now: dt.datetime | None = None
) -> TLSCheck:
    """Check a node's CA, certificate and key; never raises for a bad file.

    Args:
        files: the paths from the node's config (``tls:``).
        role: ``site`` (the certificate's CN must equal ``name``; clientAuth) or
            ``coordinator`` (serverAuth; the CN is not the coordinator's config name).
        name: the site's name, or the coordinator's (used in the advice only).
        now: the time to check validity at (UTC); default now.
    """
    now = now or dt.datetime.now(dt.UTC)
    advice = _advice(role, name)
    result = TLSCheck()
    problems = result.problems

    ca_bytes = _read("tls.ca", files.ca, advice.get_ca, problems)
    cert_bytes = _read(
        "tls.cert", files.cert, f"{advice.get_cert} and set tls.cert to its path", problems
    )
    key_bytes = _read(
        "tls.key",
        files.key,
        f"the key comes with the certificate; {advice.get_cert} and set tls.key to its path",
        problems,
    )

    ca = _parse_cert("tls.ca", files.ca, ca_bytes, advice.get_ca, problems)
    cert = _parse_cert("tls.cert", files.cert, cert_bytes, advice.get_cert, problems)
    key = _parse_key(files.key, key_bytes, advice.get_cert, problems)

    if ca is not None:
        _check_ca(ca, files, advice, now, problems)
    if cert is not None:
        _check_cert(cert, ca, key, files, role, name, advice, now, result)
    if key_bytes is not None:
        mode = stat.S_IMODE(files.key.stat().st_mode)
        if mode & 0o077:
            result.warnings.append(
                f"tls.key: {files.key}: readable by other users of this machine (mode "
                f"{mode:04o}); restrict it with `chmod 600 {files.key}`"
            )
    if cert is not None and ca is not None and not problems:
        result.summary = (
            f"certificate for {_common_name(cert) or '?'}, issued by "
            f"{_common_name(ca) or ca.subject.rfc4514_string()} ({files.ca}), valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d}"
        )
    return result


# --------------------------------------------------------------------------- internals
def _check_ca(
    ca: x509.Certificate, files: TLSFiles, advice: _Advice, now: dt.datetime, problems: list[str]
) -> None:
    if not _is_ca(ca):
        problems.append(
            f"tls.ca: {files.ca}: not a CA certificate (its subject is "
            f"{ca.subject.rfc4514_string()!r}); {advice.get_ca} and set tls.ca to its path"
        )
    elif ca.not_valid_after_utc < now:
        problems.append(
            f"tls.ca: {files.ca}: the CA certificate expired on "
            f"{ca.not_valid_after_utc:%Y-%m-%d}; every certificate it issued stops working "
            "with it, so the alliance needs a new CA (`alliance pki init` in a new folder)"
        )


def _check_cert(
    cert: x509.Certificate,
    ca: x509.Certificate | None,
    key: PrivateKeyTypes | None,
    files: TLSFiles,
    role: Role,
    name: str,
    advice: _Advice,
    now: dt.datetime,
    result: TLSCheck,
) -> None:
    problems = result.problems
    if ca is not None and _is_ca(ca) and not _signed_by(cert, ca):
        problems.append(
            f"tls.cert: {files.cert}: not issued by the CA in tls.ca ({files.ca}) (issuer "
            f"{cert.issuer.rfc4514_string()!r}, CA {ca.subject.rfc4514_string()!r}); "
            f"{advice.get_cert}, or set tls.ca to the alliance CA that issued it"
        )
    _check_identity(cert, files.cert, role, name, problems)
    _check_dates(cert, files, advice, now, result)
    if key is not None and not _same_public_key(cert, key):
        problems.append(
            f"tls.key: {files.key}: does not belong to the certificate in tls.cert "
            f"({files.cert}); use the key that was issued with that certificate"
        )


def _check_dates(
    cert: x509.Certificate, files: TLSFiles, advice: _Advice, now: dt.datetime, result: TLSCheck
) -> None:
    if cert.not_valid_after_utc < now:
        result.problems.append(
            f"tls.cert: {files.cert}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} "
            f"UTC; {advice.reissue}"
        )
    elif cert.not_valid_before_utc > now:
        result.problems.append(
            f"tls.cert: {files.cert}: not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (it is now "
            f"{now:%Y-%m-%d %H:%M} UTC here); check this machine's clock, or wait"
        )
    elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
        days = (cert.not_valid_after_utc - now).days
        result.warnings.append(
            f"tls.cert: {files.cert}: expires in {days} days, on "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; {advice.reissue}"
        )


def _read(label: str, path: Path, remedy: str, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{label}: {path}: file not found; {remedy}")
    except IsADirectoryError:
        problems.append(f"{label}: {path}: is a folder, not a file; {remedy}")
    except PermissionError:
        problems.append(
            f"{label}: {path}: permission denied; run the node as a user who can read it"
        )
    except OSError as exc:
        problems.append(f"{label}: {path}: cannot read ({exc.strerror}); {remedy}")
    return None


def _parse_cert(
    label: str, path: Path, data: bytes | None, remedy: str, problems: list[str]
) -> x509.Certificate | None:
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append(
            f"{label}: {path}: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----'); "
            f"{remedy}"
        )
        return None


def _parse_key(
    path: Path, data: bytes | None, remedy: str, problems: list[str]
) -> PrivateKeyTypes | None:
    if data is None:
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: the node reads its key unattended at start
        problems.append(
            f"tls.key: {path}: the key is encrypted with a password; the node reads it "
            "unattended, so it must be unencrypted PEM (protect its folder instead)"
        )
    except (ValueError, UnsupportedAlgorithm):
        problems.append(
            f"tls.key: {path}: not a PEM private key (expected '-----BEGIN PRIVATE KEY-----'); "
            f"{remedy}"
        )
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def _check_identity(
    cert: x509.Certificate, path: Path, role: Role, name: str, problems: list[str]
) -> None:
    usages: list[x509.ObjectIdentifier] | None
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = None  # no restriction
    if role == "site":
        cn = _common_name(cert)
        if cn != name:
            issued_to = f"site {cn!r}" if cn else f"{cert.subject.rfc4514_string()!r}"
            problems.append(
                f"tls.cert: {path}: issued to {issued_to}, but this site's name is {name!r}; use "
                f"the certificate issued for {name}, or correct `name` in the site config"
            )
        elif usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            problems.append(
                f"tls.cert: {path}: not a site certificate (no clientAuth usage); use the "
                f"certificate made by `alliance pki issue-site {name}`"
            )
    elif usages is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        problems.append(
            f"tls.cert: {path}: not a coordinator certificate (no serverAuth usage); use the "
            "certificate made by `alliance pki issue-coordinator`"
        )


def _same_public_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    except (ValueError, TypeError):
        return False

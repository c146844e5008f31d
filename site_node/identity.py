"""A new site's folder: its own keys, a certificate request for the lead, a default-deny policy.

``alliance site init NAME`` runs at the hospital. The site's TLS key and its Ed25519 signing
key are generated here and never leave the folder; the lead receives only the certificate
signing request (CSR) and signs it with ``alliance pki sign``. The ``site.yaml`` it writes
allows nothing until the admin approves analyses and studies (default deny).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.config import SITE_NAME, SiteConfig
from protocol.errors import ConfigError, ValidationError
from protocol.signing import SigningKey
from protocol.storage import write_new_file
from site_node.runtime import SIGNING_KEY_FILE


@dataclass(frozen=True)
class SiteFolder:
    """What ``site init`` wrote."""

    config: Path
    tls_key: Path
    csr: Path
    signing_key: Path


def site_config_template(name: str, coordinator: str) -> dict[str, object]:
    """A ``site.yaml`` that validates and allows nothing (default deny)."""
    return {
        "name": name,
        "coordinator": coordinator,
        "dictionary": "dictionary.yaml",
        "data": {"connector": "csv", "path": "data/records.csv"},
        "state_dir": "state",
        "tls": {"ca": "tls/ca.pem", "cert": "tls/site.pem", "key": "tls/site.key"},
        "policy": {"allowed_analyses": [], "studies": []},
    }


def init_site(
    folder: Path, name: str, coordinator: str = "coordinator.example.org:50051"
) -> SiteFolder:
    """Create a site folder: ``tls/site.key`` and ``tls/site.csr`` (CN = ``name``), the
    Ed25519 signing key in ``state/``, and a default-deny ``site.yaml``.

    Raises:
        ValidationError: ``name`` is not a site name.
        ConfigError: the folder already holds a site (nothing is overwritten).
    """
    if not re.match(SITE_NAME, name):
        raise ValidationError(
            f"site name {name!r}: use a letter, then up to 63 letters, digits, '_', '.' or '-'"
        )
    if name.casefold() == "coordinator":
        raise ValidationError("site name 'coordinator' is reserved; choose another site name")
    config_path = folder / "site.yaml"
    tls = folder / "tls"
    existing = [p for p in (config_path, tls / "site.key", tls / "site.csr") if p.exists()]
    if existing:
        raise ConfigError(f"{existing[0]}: already exists; {folder} holds a site already")
    template = site_config_template(name, coordinator)
    SiteConfig.model_validate(template)  # what we write must load
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_new_file(tls / "site.key", key_pem, private=True)
    write_new_file(tls / "site.csr", csr.public_bytes(serialization.Encoding.PEM), private=False)
    state = folder / "state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    SigningKey.load_or_create(state / SIGNING_KEY_FILE)
    text = (
        "# Written by `alliance site init`. Default deny: this site answers nothing until you\n"
        "# list allowed_analyses and approve studies under policy (see the README).\n"
        + yaml.safe_dump(template, sort_keys=False)
    )
    write_new_file(config_path, text.encode(), private=False)
    return SiteFolder(config_path, tls / "site.key", tls / "site.csr", state / SIGNING_KEY_FILE)

"""Ed25519 keys and signatures of the site link: signed tasks and signed receipts.

Each node keeps its own signing key in its state folder; the private key never leaves it. The
coordinator signs every task it sends, so a site can prove what it was asked; a site signs
every reply with a *receipt* over (task id, request digest, reply digest, the site's audit head
after the reply), so the coordinator holds proof of what the site answered and of how long the
site's audit log was at that moment. A site log cut off, emptied or re-chained below a receipted
head no longer matches the receipt (``alliance audit cross-check``).

A signature proves which key signed. That the key is the site's is established by the link: a
site presents its public key in its Hello over mutual TLS, and the coordinator records it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.audit import canonical_json
from protocol.errors import ConfigError
from protocol.wire import alliance_pb2 as pb

TASK_CONTEXT = "alliance-task-v1"
RECEIPT_CONTEXT = "alliance-receipt-v1"
_HEX = frozenset("0123456789abcdef")


def is_hex(text: str, length: int) -> bool:
    """Whether ``text`` is exactly ``length`` lower-case hex digits."""
    return len(text) == length and set(text) <= _HEX


class SigningKey:
    """A node's Ed25519 private key, loaded from (or created in) its key file."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_hex = raw.hex()

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key (tests; nodes use :meth:`load_or_create`)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key in ``path``; a new one written there (readable by this user only) when the
        file does not exist.

        Raises:
            ConfigError: the file exists but is not an Ed25519 private key in PEM.
        """
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: two processes starting at once must not overwrite each other's key.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.load(path)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            return cls(key)
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """The key in ``path``.

        Raises:
            ConfigError: missing, unreadable, or not an Ed25519 private key in PEM.
        """
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise ConfigError(f"signing key {path}: cannot read it ({exc.strerror})") from None
        except (ValueError, TypeError):
            raise ConfigError(
                f"signing key {path}: not an unencrypted PEM private key; move it away and "
                "restart to create a new one (receipts signed with the old key stay valid)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(
                f"signing key {path}: a {type(key).__name__}, not an Ed25519 key; move it "
                "away and restart to create a new one"
            )
        return cls(key)

    def sign(self, message: bytes) -> str:
        """The signature of ``message``, as 128 hex digits."""
        return self._key.sign(message).hex()


def verify_signature(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """Whether ``signature_hex`` is ``public_hex``'s Ed25519 signature of ``message``; False
    for any malformed key or signature (never raises)."""
    if not is_hex(public_hex, 64) or not is_hex(signature_hex, 128):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(public_hex: str) -> str:
    """A short name for a public key in messages: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_hex.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- tasks
def task_digest(task: pb.Task) -> str:
    """SHA-256 of a task as it was asked: its deterministic serialisation without the
    coordinator's signature."""
    unsigned = pb.Task()
    unsigned.CopyFrom(task)
    unsigned.ClearField("signature")
    return hashlib.sha256(unsigned.SerializeToString(deterministic=True)).hexdigest()


def _task_message(digest: str) -> bytes:
    return canonical_json([TASK_CONTEXT, digest]).encode()


def sign_task(task: pb.Task, key: SigningKey) -> None:
    """Set ``task.signature``: the coordinator's signature over the task's digest."""
    task.signature = key.sign(_task_message(task_digest(task)))


def task_signature_valid(task: pb.Task, public_hex: str) -> bool:
    """Whether ``task`` carries ``public_hex``'s signature over exactly its content."""
    return verify_signature(public_hex, _task_message(task_digest(task)), task.signature)


# ---------------------------------------------------------------------- receipts
def reply_digest(task_id: str, record: pb.AggregateRecord) -> str:
    """SHA-256 over the task id and the released record exactly as serialised."""
    return hashlib.sha256(
        task_id.encode() + record.SerializeToString(deterministic=True)
    ).hexdigest()


@dataclass(frozen=True)
class Receipt:
    """A site's signed statement: it answered ``task_id`` (asked as ``request_digest``) with
    ``reply_digest``, and its audit log's head after the reply was ``audit_seq``/``audit_hash``.

    Attributes:
        site: the site that signed.
        task_id: the task answered.
        request_digest: :func:`task_digest` of the task.
        reply_digest: :func:`reply_digest` of the reply.
        audit_seq: sequence number of the site's audit entry for this reply.
        audit_hash: that entry's hash.
        public_key: the site's Ed25519 public key (64 hex digits).
        signature: the signature (128 hex digits).
    """

    site: str
    task_id: str
    request_digest: str
    reply_digest: str
    audit_seq: int
    audit_hash: str
    public_key: str
    signature: str = ""

    def message(self) -> bytes:
        """The bytes signed: a context tag and the five signed fields, as canonical JSON."""
        return canonical_json(
            [
                RECEIPT_CONTEXT,
                self.task_id,
                self.request_digest,
                self.reply_digest,
                self.audit_seq,
                self.audit_hash,
            ]
        ).encode()

    def signed(self, key: SigningKey) -> Receipt:
        """This receipt signed with ``key`` (whose public key it must name)."""
        if key.public_hex != self.public_key:
            raise ValueError("a receipt must name the public key of the key that signs it")
        return Receipt(**{**self.to_json(), "signature": key.sign(self.message())})

    def valid(self) -> bool:
        """Whether the signature is ``public_key``'s over this receipt's fields."""
        return verify_signature(self.public_key, self.message(), self.signature)

    def to_json(self) -> dict[str, Any]:
        """Plain fields (what the coordinator stores)."""
        return {
            "site": self.site,
            "task_id": self.task_id,
            "request_digest": self.request_digest,
            "reply_digest": self.reply_digest,
            "audit_seq": self.audit_seq,
            "audit_hash": self.audit_hash,
            "public_key": self.public_key,
            "signature": self.signature,
        }

    @classmethod
    def from_reply(cls, site: str, public_key: str, reply: pb.Reply) -> Receipt:
        """The receipt a reply carries, as the site ``site`` with ``public_key`` signed it."""
        return cls(
            site=site,
            task_id=reply.task_id,
            request_digest=reply.request_digest,
            reply_digest=reply.receipt,
            audit_seq=int(reply.audit_seq),
            audit_hash=reply.audit_hash,
            public_key=public_key,
            signature=reply.signature,
        )


# ---------------------------------------------------------------------- study decisions, notices
DECISION_CONTEXT = "alliance-study-decision-v1"
NOTICE_CONTEXT = "alliance-study-notice-v1"


def study_digest(study_json: str) -> str:
    """SHA-256 of a study version's canonical JSON (what a site approves)."""
    return hashlib.sha256(study_json.encode()).hexdigest()


def _unsigned_digest(message: pb.StudyDecision | pb.StudyNotice) -> str:
    signature = message.signature
    message.signature = ""  # restored below: the digest is over the message without it
    try:
        return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()
    finally:
        message.signature = signature


def _signed_bytes(message: pb.StudyDecision | pb.StudyNotice) -> bytes:
    context = DECISION_CONTEXT if isinstance(message, pb.StudyDecision) else NOTICE_CONTEXT
    return canonical_json([context, _unsigned_digest(message)]).encode()


def sign_message(message: pb.StudyDecision | pb.StudyNotice, key: SigningKey) -> None:
    """Set ``message.signature``: ``key``'s signature over the message without it (a decision
    and a notice are signed under different context tags, so one never passes as the other)."""
    message.signature = key.sign(_signed_bytes(message))


def message_signature_valid(message: pb.StudyDecision | pb.StudyNotice, public_hex: str) -> bool:
    """Whether ``message`` carries ``public_hex``'s signature over exactly its content."""
    return verify_signature(public_hex, _signed_bytes(message), message.signature)

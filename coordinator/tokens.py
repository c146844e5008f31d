"""Where API tokens come from: ``<state_dir>/tokens.yaml``, the lead's token commands, and a
refusal of the tokens Alliance ships as examples.

The coordinator reads two sources: ``tokens:`` in ``coordinator.yaml`` (fixed until a restart)
and ``<state_dir>/tokens.yaml`` (written by ``alliance token create | revoke``, mode 0600, and
re-read when it changes, so a new or revoked token counts from the next request). A coordinator
that starts with neither creates a lead token in the file and says where it is, never what it is.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from coordinator.auth import ROLES, KnownToken, Principal, TokenBook, token_digest
from protocol.config import APIToken, CoordinatorConfig
from protocol.errors import ConfigError

log = logging.getLogger("alliance.coordinator")

FILE_NAME = "tokens.yaml"
#: Every token configs/coordinator.yaml has shipped with: public, so never a credential.
EXAMPLE_TOKENS = frozenset({"change-me-lead-token-0123456789", "change-me-researcher-token-0123"})
#: The prefix of every placeholder token in the examples and the docs.
EXAMPLE_PREFIX = "change-me"
PERSON = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$"
_HEADER = (
    "# API tokens of this coordinator, one per person and role. Keep this file private.\n"
    "# Managed by `alliance token create | list | revoke`; the coordinator re-reads it.\n"
)


class StoredToken(pydantic.BaseModel):
    """A token in ``tokens.yaml``: its SHA-256 (never the token), whose it is, its role, and
    when it was created. A file written before tokens were hashed holds ``token`` in plain
    text: it is read (hashed at once) and written hashed by the next `alliance token` command.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    token_sha256: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")
    user: str
    role: Literal["lead", "researcher", "site_admin"]
    site: str | None = None
    created: str = ""
    # A plain-text entry that is one of the public examples (known only when read as text).
    example: bool = pydantic.Field(default=False, exclude=True)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _hash_plain_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token" in data and "token_sha256" not in data:
            data = dict(data)
            token = data.pop("token")
            if not isinstance(token, str) or len(token) < 16:
                raise ValueError("token: a token has at least 16 characters")
            data["token_sha256"] = token_digest(token)
            data["example"] = is_example(token)
        return data

    def known(self) -> KnownToken:
        """What the token book holds of it."""
        return KnownToken(self.token_sha256, self.user, self.role, self.site)

    @property
    def fingerprint(self) -> str:
        """The first hex digits of the token's digest: enough to tell tokens apart."""
        return self.token_sha256[:8]


def is_example(token: str) -> bool:
    """Whether ``token`` is one of the public placeholders shipped with Alliance."""
    return token in EXAMPLE_TOKENS or token.lower().startswith(EXAMPLE_PREFIX)


def example_token_problems(
    tokens: Sequence[APIToken | StoredToken],
    source: str,
    config: str = "coordinator.yaml",
    in_file: bool = False,
) -> list[str]:
    """One line per example token in ``tokens``.

    ``source`` names where they are: the config (``config``), or the tokens file (``in_file``).
    """
    remove = (
        f"revoke it with `alliance token revoke {{user}} --config {config}`"
        if in_file
        else "delete it from the config"
    )
    return [
        f"{source}: tokens[{i}] (user {entry.user}): this token is an example shipped with "
        f"Alliance (anyone who read the README knows it); {remove.format(user=entry.user)} and "
        f"create real tokens with `alliance token create --role ROLE --person ID --config "
        f"{config}`"
        for i, entry in enumerate(tokens)
        if (entry.example if isinstance(entry, StoredToken) else is_example(entry.token))
    ]


def tokens_file(config: CoordinatorConfig) -> Path:
    """``<state_dir>/tokens.yaml``."""
    return config.state_dir / FILE_NAME


def read_tokens(path: Path) -> list[StoredToken]:
    """The tokens in ``path`` ([] when it does not exist).

    Raises:
        ConfigError: naming the file and the entry when it is not a tokens file.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: malformed YAML; it is written by `alliance token`") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected `tokens:` with a list of tokens")
    found = []
    for i, entry in enumerate(entries):
        try:
            found.append(StoredToken.model_validate(entry))
        except pydantic.ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise ConfigError(f"{path}: tokens[{i}].{where}: {problem['msg']}") from None
    return found


def write_tokens(path: Path, tokens: list[StoredToken]) -> None:
    """Replace ``path`` atomically with ``tokens``; the file is created 0600 in a 0700 folder."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tokens-", suffix=".yaml")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w") as handle:  # mkstemp creates the file 0600
            handle.write(_HEADER)
            body = {"tokens": [t.model_dump(mode="json") for t in tokens]}
            handle.write(yaml.safe_dump(body, sort_keys=False))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def check_role(role: str) -> None:
    """Raise ConfigError unless ``role`` is one the API knows."""
    if role not in ROLES:
        raise ConfigError(f"--role: {role!r} is not a role; use one of: {', '.join(ROLES)}")


def check_person(person: str) -> None:
    """Raise ConfigError unless ``person`` is a plain identifier."""
    if not re.match(PERSON, person):
        raise ConfigError(
            f"--person: {person!r} is not allowed; use a letter or digit followed by up to 63 "
            "letters, digits or . _ @ + -  (e.g. r.chen)"
        )


def create_token(config: CoordinatorConfig, role: str, person: str) -> tuple[StoredToken, str]:
    """Add a new random token for ``person`` in ``role`` to the tokens file (its digest only);
    return the entry and the token, which exists nowhere else: give it to the person."""
    check_role(role)
    check_person(person)
    path = tokens_file(config)
    tokens = read_tokens(path)
    token = secrets.token_urlsafe(32)
    entry = StoredToken(
        token_sha256=token_digest(token),
        user=person,
        role=role,  # type: ignore[arg-type]  # checked against ROLES above
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    write_tokens(path, [*tokens, entry])
    return entry, token


def revoke_tokens(config: CoordinatorConfig, person: str) -> int:
    """Remove every token of ``person`` from the tokens file; how many there were.

    Raises:
        ConfigError: when the person has no token there (saying so if the config holds one).
    """
    path = tokens_file(config)
    tokens = read_tokens(path)
    kept = [t for t in tokens if t.user != person]
    if len(kept) == len(tokens):
        in_config = any(t.user == person for t in config.tokens)
        raise ConfigError(
            f"{person} has no token in {path}"
            + (
                "; their token is in the coordinator's config: delete it there and restart "
                "the coordinator"
                if in_config
                else "; `alliance token list` shows who has one"
            )
        )
    write_tokens(path, kept)
    return len(tokens) - len(kept)


FIRST_TOKEN_FILE = "lead-token.txt"


def first_start(config: CoordinatorConfig) -> Path | None:
    """Create a lead token when the coordinator has no token at all; return the file that
    holds it (``<state_dir>/lead-token.txt``, 0600: ``tokens.yaml`` keeps only its digest, so
    this file is the one place the token exists; the lead reads it, then deletes it)."""
    path = tokens_file(config)
    if config.tokens or read_tokens(path):
        return None
    handover = config.state_dir / FIRST_TOKEN_FILE
    _, token = create_token(config, "lead", "lead")
    handover.unlink(missing_ok=True)  # a leftover from an earlier first start is stale
    fd = os.open(handover, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return handover


class LiveTokenBook(TokenBook):
    """The config's tokens plus the tokens file, re-read whenever the file changes."""

    def __init__(self, fixed: list[APIToken], path: Path) -> None:
        self.fixed = list(fixed)
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        super().__init__(self.fixed)
        self._refresh()

    def identify(self, token: str) -> Principal | None:
        """The principal a token belongs to, after picking up any change to the file."""
        self._refresh()
        return super().identify(token)

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
            stamp: tuple[int, int, int] | None = (info.st_mtime_ns, info.st_size, info.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        try:
            stored = read_tokens(self.path)
        except ConfigError as exc:  # keep serving with the tokens read last time
            log.error("%s; keeping the tokens read before", exc)
            return
        self._stamp = stamp
        usable: list[KnownToken] = []
        for entry in stored:
            if entry.example:
                log.error("%s: ignoring an example token for %s", self.path, entry.user)
            else:
                usable.append(entry.known())
        if stamp is not None and stat.S_IMODE(info.st_mode) & 0o077:
            log.warning(
                "%s is readable by other users of this machine; run `chmod 600 %s`",
                self.path,
                self.path,
            )
        # Re-running the base initialiser keeps this class independent of its internals.
        TokenBook.__init__(self, self.fixed, usable)

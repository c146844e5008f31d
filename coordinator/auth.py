"""API tokens bound to roles, and who may see and do what.

Three roles: the alliance ``lead`` (everything), a ``researcher`` (the studies that name them)
and a ``site_admin`` (their own site's part of the studies that invite it). Whatever a caller
may not see answers exactly as if it did not exist, so an id is no existence oracle.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from protocol.config import APIToken, StudyConfig

ROLES = ("lead", "researcher", "site_admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, their role, and (site admins only) their site."""

    user: str
    role: str
    site: str | None = None

    def can_read(self, study: StudyConfig) -> bool:
        """Whether this caller may see ``study`` at all (its config and its requests)."""
        if self.role == "lead":
            return True
        if self.role == "researcher":
            return self.user in study.researchers
        if self.role == "site_admin":
            return not study.sites or self.site in study.sites  # empty: every site is invited
        return False

    def can_run(self, study: StudyConfig) -> bool:
        """Whether this caller may run requests in ``study``: the lead and its researchers."""
        return self.role == "lead" or (self.role == "researcher" and self.user in study.researchers)

    def request_view(self, found: dict[str, Any]) -> dict[str, Any]:
        """A stored request as this caller may read it (``can_read`` its study first).

        A site admin reads the request's metadata and their own site's entry in ``sites``;
        never the pooled result, the other sites' entries or the error (which may quote them).
        """
        if self.role != "site_admin":
            return found
        result = found.get("result")
        own = None
        if result is not None:
            sites = [s for s in result.get("sites", []) if s.get("name") == self.site]
            own = {"analysis": found["analysis"], "sites": sites}
        return {**found, "error": None, "result": own}


def token_digest(token: str) -> str:
    """SHA-256 of a token: what the coordinator keeps of the tokens it issues."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class KnownToken:
    """A token the coordinator accepts, known by its digest only."""

    digest: str
    user: str
    role: str
    site: str | None = None


class TokenBook:
    """Looks tokens up by digest, in constant time per token."""

    def __init__(self, tokens: list[APIToken], known: list[KnownToken] | None = None) -> None:
        # Tokens written in the config are plain text there; here only their digests are kept.
        self._tokens = [
            KnownToken(token_digest(t.token), t.user, t.role, t.site) for t in tokens
        ] + list(known or [])

    def identify(self, token: str) -> Principal | None:
        """The principal a token belongs to, or None."""
        digest = token_digest(token).encode()
        found = None
        for entry in self._tokens:
            if hmac.compare_digest(entry.digest.encode(), digest):
                found = Principal(entry.user, entry.role, entry.site)
        return found

"""API tokens bound to roles: the alliance lead, site admins and researchers."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from protocol.config import APIToken

ROLES = ("lead", "researcher", "site_admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    user: str
    role: str


class TokenBook:
    """Looks tokens up in constant time per token."""

    def __init__(self, tokens: list[APIToken]) -> None:
        self._tokens = list(tokens)

    def identify(self, token: str) -> Principal | None:
        """The principal a token belongs to, or None."""
        found = None
        for entry in self._tokens:
            if hmac.compare_digest(entry.token.encode(), token.encode()):
                found = Principal(entry.user, entry.role)
        return found

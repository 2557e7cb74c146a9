"""Bearer tokens with roles. Only SHA-256 hashes are configured; tokens themselves stay secret."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ctops.config import Deployment, Role

# what each role may do; operator includes everything a viewer may
ROLE_GRANTS: dict[Role, frozenset[str]] = {
    "agent": frozenset({"agent"}),
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "act"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role

    def may(self, grant: str) -> bool:
        return grant in ROLE_GRANTS[self.role]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(24)


class TokenBook:
    def __init__(self, deployment: Deployment) -> None:
        self._by_hash = {t.sha256: Principal(t.name, t.role) for t in deployment.tokens}

    def lookup(self, token: str) -> Principal | None:
        digest = hash_token(token)
        for known, principal in self._by_hash.items():
            # constant time: a timing side channel must not reveal a prefix of a valid hash
            if hmac.compare_digest(known, digest):
                return principal
        return None

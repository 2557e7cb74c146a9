"""Bearer tokens with roles. Only SHA-256 hashes are configured; tokens themselves stay secret.

Scopes: an agent token is bound to one host (`host`) and may heartbeat and take commands only for
it; an agent token without a host may only send exceptions. A peer token (dispatchers' mutual
heartbeat) may be bound to one dispatcher (`dispatcher`).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from ctops.config import Deployment
from ctops.opsapi import Role, role_may


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    host: str | None = None  # agent tokens: the host they speak for
    dispatcher: str | None = None  # peer tokens: the dispatcher they speak for

    def may(self, grant: str) -> bool:
        if grant == "agent" and self.role == "agent" and self.host is None:
            return False  # a host-less agent token only reports exceptions
        return role_may(self.role, grant)

    def refusal(self, grant: str) -> str:
        """Why this principal may not do `grant`, in words an operator can act on."""
        if grant == "agent" and self.role == "agent" and self.host is None:
            return (f"agent token {self.name!r} is bound to no host; it may only send exceptions "
                    "(set host in its [[tokens]] entry)")
        return f"role {self.role!r} may not do this"

    def speaks_for_host(self, host: str) -> bool:
        return self.role == "agent" and self.host == host

    def speaks_for_dispatcher(self, name: str) -> bool:
        return self.role == "peer" and self.dispatcher in (None, name)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(24)


class TokenBook:
    def __init__(self, deployment: Deployment) -> None:
        self._by_hash = {t.sha256: Principal(t.name, t.role, t.host, t.dispatcher) for t in deployment.tokens}

    def lookup(self, token: str) -> Principal | None:
        # one dict probe, not a comparison with every token: at 2,000 hosts the walk cost more than the
        # rest of a heartbeat. The probe's timing depends on the SHA-256 of what the caller sent, which
        # reveals nothing usable about a stored hash (finding a token for a given hash is a preimage)
        digest = hash_token(token)
        return self._by_hash.get(digest)

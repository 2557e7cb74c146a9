"""Who is calling: bearer tokens with roles, the per-address limit on failed authentications, and
an agent's token scoped to its own host. Failures and refused scopes are audited (never the token)."""

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError

from ctops.auth import Principal, TokenBook
from dispatcher.ops.errors import ApiError
from dispatcher.ratelimit import FailureWindow, retry_after_header

log = logging.getLogger("ctops.dispatcher.ops")

AUTH_AUDIT_MAX_PER_MINUTE = 200
BEARER = HTTPBearer(auto_error=False, description="a token from the deployment's [[tokens]]")

# (who, role, action, target, result, via), e.g. Store.audit
Audit = Callable[[str, str, str, str, str, str], Awaitable[None]]
Require = Callable[[str], Callable[..., Principal]]
Authenticate = Callable[[Request, str | None, str], Awaitable[Principal]]


class Auth:
    """The ops API's authentication, as FastAPI dependencies (`principal`, `require(grant)`)."""

    def __init__(self, tokens: TokenBook, audit: Audit, via: str, failures_per_minute: int) -> None:
        self.tokens, self.audit, self.via = tokens, audit, via
        self.limit = failures_per_minute
        self.failures = FailureWindow(60.0)
        self.scope_refusals = FailureWindow(60.0)

    async def refused(self, request: Request, why: str) -> ApiError:
        """A failed authentication: counted per client address and audited (never the token).
        Past the limit the address gets 429 until its minute is over, and is audited once more."""
        addr = request.client.host if request.client else "unknown"
        n, left = self.failures.fail(addr)
        # many addresses at once must not flush the audit log either: past a total, only the log line
        total, _ = self.failures.fail("*")
        if n <= self.limit + 1 and total <= AUTH_AUDIT_MAX_PER_MINUTE:
            blocked = n > self.limit
            log.warning("failed authentication from %s on %s %s: %s%s", addr, request.method, request.url.path,
                        why, " (limit reached)" if blocked else "")
            try:
                await self.audit("-", "-", "auth_blocked" if blocked else "auth_failed", f"address {addr}",
                                 f"{why} on {request.method} {request.url.path}"
                                 + (f"; {n - 1} failures this minute, refused for {left:.0f}s" if blocked else ""),
                                 self.via)
            except (RedisError, OSError) as exc:
                log.warning("cannot audit a failed authentication: %s", exc)
        if n > self.limit:
            return ApiError(429, "too many failed authentications from this address",
                            detail={"retry_after_s": int(retry_after_header(left))},
                            headers={"Retry-After": retry_after_header(left)})
        return ApiError(401, why, headers={"WWW-Authenticate": "Bearer"})

    async def authenticate(self, request: Request, token: str | None, why_missing: str) -> Principal:
        # a valid token always passes, even from an address over the limit: tokens are 192-bit
        # random, so the limit is about noise, and a shared (NAT) address must not lock out agents
        who = self.tokens.lookup(token) if token else None
        if who is None:
            raise await self.refused(request, "invalid token" if token else why_missing)
        return who

    async def principal(self, request: Request,
                        cred: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> Principal:
        token = cred.credentials.strip() if cred is not None and cred.scheme.lower() == "bearer" else ""
        return await self.authenticate(request, token, "missing bearer token")

    def require(self, grant: str) -> Callable[..., Principal]:
        def dep(who: Annotated[Principal, Depends(self.principal)]) -> Principal:
            if not who.may(grant):
                raise ApiError(403, who.refusal(grant), detail={"needs": grant})
            return who
        return dep

    async def for_host(self, request: Request, who: Principal, host: str) -> None:
        """An agent's token speaks for its own host only."""
        if who.speaks_for_host(host):
            return
        # a host's token used for another host is a compromised or misconfigured agent: audited, once
        # a minute per token and host (an agent retries every second)
        n, _ = self.scope_refusals.fail(f"{who.name}>{host}")
        if n == 1:
            addr = request.client.host if request.client else "unknown"
            log.warning("agent token %s (host %s) refused for host %s from %s", who.name, who.host, host, addr)
            try:
                await self.audit(who.name, who.role, "scope_refused", f"host {host}",
                                 f"token is for host {who.host}; {request.method} {request.url.path} from {addr}",
                                 self.via)
            except (RedisError, OSError) as exc:
                log.warning("cannot audit a refused scope: %s", exc)
        raise ApiError(403, f"agent token {who.name!r} is for host {who.host!r}, not {host!r}",
                       detail={"token_host": who.host, "host": host})

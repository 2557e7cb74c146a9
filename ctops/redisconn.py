"""The one way every process reaches the shared state.

With `[redis] sentinels` set, a client asks the Sentinels where the primary is and asks again
whenever its connection breaks or the node it reaches turns out to be a replica (or an isolated
old primary refusing writes): every call is retried with backoff for longer than a failover takes,
so a learner's request waits through a failover instead of failing. Without Sentinels it connects
to `url`. Either way it logs in as the role's ACL user, whose password comes from the environment.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelConnection
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, ReadOnlyError, ResponseError, TimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from ctops.config import ConfigError, RedisSettings, split_hostport

Role = Literal["trainer", "dispatcher", "admin"]

# Sentinel needs `down-after-milliseconds` (1 s) plus an election and a promotion: ~2.5 s measured.
# Sleeps of 20, 40, 80 ... ms capped at 500 ms, 25 times: ~11 s of waiting, plus the tries themselves.
RETRY_BACKOFF_CAP_S = 0.5
RETRY_BACKOFF_BASE_S = 0.01
RETRIES = 25
RETRY_ON = [ConnectionError, TimeoutError, ReadOnlyError]
SENTINEL_TIMEOUT_S = 0.5

# in script errors and MULTI replies these come as plain error text, not as ReadOnlyError
_FOLLOW_MARKERS = ("READONLY", "NOREPLICAS")


def _moved(exc: ResponseError) -> bool:
    return not isinstance(exc, ReadOnlyError) and any(m in str(exc) for m in _FOLLOW_MARKERS)


class _FollowingAsyncConnection(AsyncSentinelConnection):
    """A write refused because this node is no longer the primary (a script's READONLY, or an
    isolated old primary's NOREPLICAS) means: ask the Sentinels again and retry."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if _moved(exc):
                await self.disconnect()
                raise ConnectionError(f"the node refused a write ({exc}); asking Sentinel again") from exc
            raise


class _FollowingConnection(SentinelManagedConnection):
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if _moved(exc):
                self.disconnect()
                raise ConnectionError(f"the node refused a write ({exc}); asking Sentinel again") from exc
            raise


def _env(var: str, setting: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"setting {setting}: environment variable {var} is not set")
    return value


def credentials(settings: RedisSettings, role: Role) -> tuple[str | None, str | None]:
    """The role's ACL user and password; (None, None) when the file names no user for it."""
    user = getattr(settings.users, role)
    if user is None:
        return None, None
    return user.username, _env(user.password_env, f"redis.users.{role}.password_env")


def sentinel_password(settings: RedisSettings) -> str | None:
    if not settings.sentinel_password_env:
        return None
    return _env(settings.sentinel_password_env, "redis.sentinel_password_env")


def sentinel_addresses(settings: RedisSettings) -> list[tuple[str, int]]:
    return [split_hostport(s) for s in settings.sentinels]


def _common(settings: RedisSettings, role: Role, decode_responses: bool, socket_timeout: float) -> dict[str, Any]:
    username, password = credentials(settings, role)
    opts: dict[str, Any] = {"decode_responses": decode_responses, "socket_timeout": socket_timeout,
                            "socket_connect_timeout": min(socket_timeout, 1.0), "health_check_interval": 5,
                            "retry_on_error": list(RETRY_ON)}
    if username:
        opts |= {"username": username, "password": password}
    return opts


def _sentinel_kwargs(settings: RedisSettings) -> dict[str, Any]:
    return {"password": sentinel_password(settings), "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S}


def async_client(settings: RedisSettings, role: Role, *, decode_responses: bool = False,
                 socket_timeout: float = 1.0) -> aioredis.Redis:
    """A client of the primary for this role. Make one per process and purpose, at start-up."""
    opts = _common(settings, role, decode_responses, socket_timeout)
    opts["retry"] = AsyncRetry(ExponentialBackoff(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S), RETRIES)
    if not settings.sentinels:
        return aioredis.Redis.from_url(settings.url, **opts)
    sentinel = AsyncSentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings))
    return sentinel.master_for(settings.service, db=settings.db, connection_class=_FollowingAsyncConnection, **opts)


def sync_client(settings: RedisSettings, role: Role, *, decode_responses: bool = False,
                socket_timeout: float = 1.0) -> redis.Redis:
    """The same for the CLI and tests."""
    opts = _common(settings, role, decode_responses, socket_timeout)
    opts["retry"] = Retry(ExponentialBackoff(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S), RETRIES)
    if not settings.sentinels:
        return redis.Redis.from_url(settings.url, **opts)
    sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings))
    return sentinel.master_for(settings.service, db=settings.db, connection_class=_FollowingConnection, **opts)


def primary_address(settings: RedisSettings) -> tuple[str, int] | None:
    """Where the Sentinels say the primary is now (the first that answers); None if none knows."""
    for host, port in sentinel_addresses(settings):
        s = redis.Redis(host=host, port=port, **_sentinel_kwargs(settings))
        try:
            addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", settings.service)
        except redis.RedisError:
            continue
        finally:
            s.close()
        if addr:
            h, p = addr
            return (h.decode() if isinstance(h, bytes) else h), int(p)
    return None

"""The one way every process reaches the shared state.

With `[redis] sentinels` set, a client asks the Sentinels where the primary is and asks again
whenever its connection breaks or the node it reaches turns out to be a replica (or an isolated
old primary refusing writes): every call is retried with backoff for longer than a failover takes,
so a learner's request waits through a failover instead of failing. Without Sentinels it connects
to `url`. Either way it logs in as the role's ACL user, whose password comes from the environment.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelConnection
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, ReadOnlyError, ResponseError, TimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection
from redis.typing import EncodableT, FieldT

from ctops.config import ConfigError, RedisSettings, split_hostport
from ctops.keys import Keys

log = logging.getLogger("ctops.redis")

Role = Literal["trainer", "dispatcher", "admin"]
T = TypeVar("T")

# Sentinel needs `down-after-milliseconds` (1 s) plus an election and a promotion: 2.3 s measured here.
# Sleeps of 20, 40, 80 ... ms capped at 500 ms, 25 times: ~11 s of waiting, plus the tries themselves.
RETRY_BACKOFF_CAP_S = 0.5
RETRY_BACKOFF_BASE_S = 0.01
RETRIES = 25
# what that adds up to, for callers that must retry by hand (a WATCH cannot be retried by the client)
RETRY_BUDGET_S = 11.0
RETRY_ON = [ConnectionError, TimeoutError, ReadOnlyError]
SENTINEL_TIMEOUT_S = 0.5

# in script errors and MULTI replies these come as plain error text, not as ReadOnlyError
_FOLLOW_MARKERS = ("READONLY", "NOREPLICAS")


def redis_fields(fields: Mapping[Any, EncodableT]) -> dict[FieldT, EncodableT]:
    """`fields` as HSET's mapping or XADD's fields. redis-py types those with a union key, and a
    mapping's key type is invariant, so no `dict[str, ...]` matches; redis only iterates them."""
    return cast("dict[FieldT, EncodableT]", fields)


def _moved(exc: ResponseError) -> bool:
    return not isinstance(exc, ReadOnlyError) and any(m in str(exc) for m in _FOLLOW_MARKERS)


class _FollowingAsyncConnection(AsyncSentinelConnection):
    """Asks the Sentinels for the primary on every socket connect, and takes a write refused
    because this node is no longer the primary (a script's READONLY, or an isolated old
    primary's NOREPLICAS) as a reason to ask again and retry."""

    async def _connect(self) -> None:
        # redis-py 8 reconnects a dropped connection through connect_check_health(), which retries
        # the host it had, not Sentinel's answer: a killed primary's address would be retried
        # for the whole retry budget while a replica had long been promoted
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()  # type: ignore[no-untyped-call]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if _moved(exc):
                await self.disconnect()
                raise ConnectionError(f"the node refused a write ({exc}); asking Sentinel again") from exc
            raise


class _FollowingConnection(SentinelManagedConnection):
    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()  # type: ignore[no-untyped-call]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if _moved(exc):
                self.disconnect()  # type: ignore[no-untyped-call]
                raise ConnectionError(f"the node refused a write ({exc}); asking Sentinel again") from exc
            raise


class ReplicaNotConfirmed(ResponseError):
    """A transaction reached the primary but no replica confirmed it in time: a failover now could
    lose it. The message starts like Redis's own refusal, so callers treat it as the store being away
    for a moment (a learner's request gets 503 + Retry-After and is sent again)."""


@dataclass
class ConfirmStats:
    """Per process: transactions that no replica confirmed in time (kept or refused). Hooks (e.g. the
    dispatcher's store watch) hear of each one without waiting on Redis."""

    unconfirmed: int = 0
    last_unconfirmed_ms: int | None = None
    hooks: list[Callable[[int], None]] = field(default_factory=list)

    def note(self, n: int = 1) -> None:
        self.unconfirmed += n
        self.last_unconfirmed_ms = int(time.time() * 1000)
        for hook in self.hooks:
            hook(n)


CONFIRM = ConfirmStats()
# what a role does when no replica confirms a transaction in time:
# the trainer refuses (the learner's request is retried, so nothing acknowledged can be lost);
# the dispatcher keeps staff states and audit entries (an action is not undone) and counts them
_CONFIRM_POLICY: dict[str, Literal["refuse", "report"]] = {"trainer": "refuse", "dispatcher": "report"}


@dataclass(frozen=True)
class Confirm:
    acks: int = 0
    timeout_ms: int = 0
    policy: Literal["refuse", "report"] = "report"
    # the cluster-wide counter this client adds its unconfirmed writes to (None: the hooks count)
    count_key: str | None = None


class _ConfirmingPipeline(AsyncPipeline):
    """MULTI/EXEC, then WAIT on the same connection (WAIT counts that connection's writes)."""

    confirm = Confirm()

    async def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        result = await super()._execute_transaction(connection, commands, raise_on_error)
        c = self.confirm
        if c.acks:
            await connection.send_command("WAIT", c.acks, c.timeout_ms)
            acks = int(await connection.read_response())
            if acks < c.acks:
                CONFIRM.note()
                if c.count_key:
                    await connection.send_command("INCR", c.count_key)
                    await connection.read_response()
                msg = f"on {acks} replicas after {c.timeout_ms} ms, {c.acks} needed"
                if c.policy == "refuse":
                    raise ReplicaNotConfirmed(f"NOREPLICAS write not confirmed by a replica: {msg}")
                log.warning("a write was kept though no replica confirmed it (%s); a failover now would lose it", msg)
        return result


class _ConfirmingRedis(aioredis.Redis):
    confirm = Confirm()

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> _ConfirmingPipeline:
        p = _ConfirmingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        p.confirm = self.confirm
        return p


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


ASYNC_POOL_MAX = 4096


def async_client(settings: RedisSettings, role: Role, *, decode_responses: bool = False,
                 socket_timeout: float = 1.0) -> aioredis.Redis:
    """A client of the primary for this role. Make one per process and purpose, at start-up."""
    opts = _common(settings, role, decode_responses, socket_timeout)
    # redis-py's default pool (100) fails a request outright once that many are in flight, and a herd of
    # agents moving to a new leader puts a heartbeat per agent in flight at once: each then fails, and
    # hosts are reported lost. Redis itself takes 10,000 clients; one process needs at most a few thousand.
    opts["max_connections"] = ASYNC_POOL_MAX
    opts["retry"] = AsyncRetry(ExponentialBackoff(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S), RETRIES)
    if not settings.sentinels:
        # from_url builds `cls`; redis-py types it as the base class
        client = cast(_ConfirmingRedis, _ConfirmingRedis.from_url(settings.url, **opts))
    else:
        sentinel = AsyncSentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings))
        client = sentinel.master_for(settings.service, redis_class=_ConfirmingRedis, db=settings.db,
                                     connection_class=_FollowingAsyncConnection, **opts)
    if role in _CONFIRM_POLICY:
        # every MULTI/EXEC transaction (sessions, checkpoints, idempotency outcomes, staff states,
        # audit) is acknowledged only once a replica has it; trainers add what no replica confirmed
        # to the cluster-wide counter themselves, the dispatcher's store watch does it for its process
        client.confirm = Confirm(settings.acks_needed, settings.replica_ack_timeout_ms, _CONFIRM_POLICY[role],
                                 Keys(settings.prefix).store_writes_unconfirmed if role == "trainer" else None)
    return client


def sync_client(settings: RedisSettings, role: Role, *, decode_responses: bool = False,
                socket_timeout: float = 1.0) -> redis.Redis:
    """The same for the CLI and tests."""
    opts = _common(settings, role, decode_responses, socket_timeout)
    opts["retry"] = Retry(ExponentialBackoff(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S), RETRIES)
    if not settings.sentinels:
        return redis.Redis.from_url(settings.url, **opts)
    sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings))
    client: redis.Redis = sentinel.master_for(settings.service, db=settings.db, connection_class=_FollowingConnection,
                                              **opts)
    return client


def ask_sentinels(addresses: list[tuple[str, int]], password: str | None,
                  ask: Callable[[redis.Redis], T]) -> T | None:
    """The first answer any Sentinel gives (None from all of them counts as no answer)."""
    for host, port in addresses:
        s = redis.Redis(host=host, port=port, password=password, socket_timeout=SENTINEL_TIMEOUT_S,
                        socket_connect_timeout=SENTINEL_TIMEOUT_S, decode_responses=True)
        try:
            answer = ask(s)
        except redis.RedisError:
            continue
        finally:
            s.close()
        if answer:
            return answer
    return None


def primary_address(addresses: list[tuple[str, int]], password: str | None, service: str) -> tuple[str, int] | None:
    """Where the Sentinels say the primary is now; None if none knows."""
    addr = ask_sentinels(addresses, password,
                         lambda s: s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service))
    return (addr[0], int(addr[1])) if addr else None

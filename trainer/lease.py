"""Leases in Redis: who is working on a piece of shared work, until when.

A lease is a key holding its owner's token with a TTL. The holder renews it while it works; if the
holder dies, the key expires and any server may take the work over. Every write the holder makes
is fenced: it commits only while the key still holds the holder's token, so a server that was
frozen past its lease and then thawed cannot overwrite the work of the one that took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from ctops.redisconn import RETRY_BACKOFF_CAP_S, RETRY_BUDGET_S

log = logging.getLogger("trainer.lease")

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """Another server holds the lease now; this one must drop the work without writing."""


class Lease:
    def __init__(self, client: aioredis.Redis, key: str, owner: str, ttl_ms: int) -> None:
        self.r = client
        self.key = key
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.token = f"{owner}:{secrets.token_hex(6)}"
        self.lost = False

    async def acquire(self) -> bool:
        return bool(await self.r.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def claim_in(self, pipe: Pipeline) -> None:
        """Take the lease inside a caller's transaction (for work created and started at once)."""
        pipe.set(self.key, self.token, px=self.ttl_ms)

    async def renew(self) -> bool:
        ok = bool(await self.r.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))
        self.lost = self.lost or not ok
        return ok

    async def release(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.r.eval(_RELEASE, 1, self.key, self.token)

    async def write(self, ops: Callable[[Pipeline], object]) -> None:
        """Run `ops` in one transaction if and only if this lease is still held; else LeaseLost."""
        contended = 0
        # a connection lost while WATCHing (a store failover) comes as a WatchError the client does not
        # retry by itself, since the watch is gone with the connection: watch again, within the same
        # budget the client gives any other command
        deadline = time.monotonic() + RETRY_BUDGET_S
        pause = 0.02
        while True:
            async with self.r.pipeline(transaction=True) as p:
                try:
                    await p.watch(self.key)
                    held = await p.get(self.key)
                except WatchError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, RETRY_BACKOFF_CAP_S)
                    continue
                # a bytes client returns bytes; a sealed record there is not our token either
                if (held.decode(errors="replace") if isinstance(held, bytes) else held) != self.token:
                    self.lost = True
                    raise LeaseLost(self.key)
                p.multi()
                ops(p)
                try:
                    await p.execute()
                    return
                except WatchError:
                    # our own renewal touched the key between WATCH and EXEC; look again
                    contended += 1
                    if contended >= 5:
                        raise LeaseLost(self.key) from None

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[Lease]:
        """Renew in the background while the body runs; the lease is released at the end."""
        task = asyncio.create_task(self._keep())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.release()

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                if not await self.renew():
                    log.warning("lease %s was taken over; dropping the work", self.key)
                    return
            except (RedisError, OSError) as exc:
                # a Redis blip: the next renewal may still succeed within the TTL
                log.warning("could not renew lease %s: %s", self.key, exc)

"""Sessions and submissions in Redis, so any trainer server sharing the Redis can serve any session.

Every record is sealed (`ctops.envelope`) and checked on every read. A damaged one is set aside and
replaced (`ctops.integrity.contain`): a submission by the newest intact copy among its last
`ctops.integrity.HISTORY` checkpoints, else, like a session, by a tombstone naming the quarantine entry, which the
API answers with a clear error to that learner only. Records written before envelopes are read as
they are and sealed on their next write.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from ctops import redisconn
from ctops.clock import now_ms
from ctops.config import RedisSettings
from ctops.envelope import Corrupt, unseal
from ctops.integrity import (
    HISTORY,
    SESSION,
    SUBMISSION,
    contain_session,
    contain_submission,
    read_hash,
    read_json,
    seal_hash,
    seal_json,
)
from ctops.keys import Keys

log = logging.getLogger("trainer.store")

ACTIVE_WINDOW_MS = 10 * 60 * 1000
# sessions and their results are kept for a week after the last activity
TTL_SECONDS = 7 * 24 * 3600
_INT_FIELDS = ("created_ms", "last_activity_ms")



def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_urlsafe(12)}"


def connect(settings: RedisSettings) -> aioredis.Redis:
    """The trainer's client: its own ACL user, following the primary through Sentinel if configured."""
    return redisconn.async_client(settings, "trainer", decode_responses=True, socket_timeout=2.0)


def connect_raw(settings: RedisSettings) -> aioredis.Redis:
    """The same user without decoding: records are read as bytes, so that damaged bytes are found
    by the integrity check instead of failing inside the client."""
    return redisconn.async_client(settings, "trainer", decode_responses=False, socket_timeout=2.0)


def raw_twin(client: aioredis.Redis) -> aioredis.Redis:
    """A bytes client to the same server as a given client (tests hand the app their own)."""
    kwargs = {**client.connection_pool.connection_kwargs, "decode_responses": False}
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool(
        connection_class=client.connection_pool.connection_class, **kwargs))


class Store:
    def __init__(self, client: aioredis.Redis, keys: Keys, server: str, raw: aioredis.Redis | None = None) -> None:
        self.r = client
        self.raw = raw or raw_twin(client)
        self.k = keys
        self.server = server

    # --- sessions -------------------------------------------------------------------------------
    async def _read_session(self, sid: str) -> tuple[dict, int] | None:
        key = self.k.session(sid)
        for _ in range(3):
            try:
                got = await read_hash(self.raw, key, SESSION)
            except Corrupt:
                tomb = await contain_session(self.raw, self.k, sid, self.server)
                if tomb is None:
                    continue  # rewritten meanwhile: read again
                return tomb, 0
            if got is None:
                return None
            fields, gen, _legacy = got
            return fields, gen
        return None

    async def touch(self, sid: str) -> None:
        now = now_ms()
        got = await self._read_session(sid)
        key = self.k.session(sid)
        # not a transaction: activity is no record a learner would miss, so it waits for no replica
        async with self.raw.pipeline(transaction=False) as p:
            if got is not None and "damaged" not in got[0]:
                fields = {**got[0], "last_activity_ms": now, "last_server": self.server}
                # every field at once, in one command: a partial HSET would break the hash's checksum
                p.hset(key, mapping=redisconn.redis_fields(seal_hash(key, SESSION, fields, got[1] + 1)))
            p.expire(key, TTL_SECONDS)
            p.expire(self.k.session_submissions(sid), TTL_SECONDS)
            p.zadd(self.k.server_sessions(self.server), {sid: now})
            p.zremrangebyscore(self.k.server_sessions(self.server), "-inf", now - ACTIVE_WINDOW_MS)
            await p.execute()

    async def active_sessions(self) -> int:
        return int(await self.r.zcount(self.k.server_sessions(self.server), now_ms() - ACTIVE_WINDOW_MS, "+inf"))

    def new_session(self, learner: str | None) -> tuple[dict, Callable[[Pipeline], None]]:
        """The session and the writes that create it, for the caller to commit (maybe with more)."""
        sid = new_id("s")
        now = now_ms()
        session = {"session_id": sid, "learner": learner or "", "created_ms": now, "created_by": self.server,
                   "last_activity_ms": now, "last_server": self.server}

        key = self.k.session(sid)

        def writes(p: Pipeline) -> None:
            p.hset(key, mapping=redisconn.redis_fields(seal_hash(key, SESSION, session, 0)))
            p.expire(self.k.session(sid), TTL_SECONDS)
            p.zadd(self.k.server_sessions(self.server), {sid: now})

        return session, writes

    async def get_session(self, sid: str) -> dict | None:
        """The session, or None; a damaged one comes back as {"session_id", "damaged": quarantine id}."""
        got = await self._read_session(sid)
        if got is None:
            return None
        fields: dict[str, Any] = got[0]
        for f in _INT_FIELDS:
            if f in fields and fields[f].lstrip("-").isdigit():
                fields[f] = int(fields[f])
        return fields

    async def session_submissions(self, sid: str) -> list[dict]:
        try:
            listed = await self.raw.lrange(self.k.session_submissions(sid), 0, -1)
            ids = [i.decode(errors="replace") if isinstance(i, bytes) else i for i in listed]
        except aioredis.ResponseError as exc:
            # the index of a session's submissions is no record of its own: the view goes without it
            log.error("session %s: its submissions list is unreadable (%s); listed as empty", sid, exc)
            return []
        if not ids:
            return []
        out = []
        for sub_id, raw in zip(ids, await self.raw.mget([self.k.submission(i) for i in ids]), strict=True):
            if raw is None:
                continue
            try:
                rec = unseal(self.k.submission(sub_id), raw, SUBMISSION)
                sub = json.loads(rec.payload) if rec else None
            except (Corrupt, ValueError):
                sub = await self.get_submission(sub_id, sid)
            if isinstance(sub, dict):
                out.append(sub)
        return out

    async def owns(self, sid: str, sub_id: str) -> bool:
        return await self.raw.lpos(self.k.session_submissions(sid), sub_id) is not None

    def submission_writes(self, sub: dict, new: bool = False) -> Callable[[Pipeline], None]:
        """Every step of a submission is written whole, so another server can resume from the last one.
        A new submission is also listed as open work until it is done."""

        sub["generation"] = sub.get("generation", 0) + 1
        key = self.k.submission(sub["submission_id"])
        sealed = seal_json(key, SUBMISSION, sub, sub["generation"])
        history = self.k.submission_history(sub["submission_id"])

        def writes(p: Pipeline) -> None:
            p.set(key, sealed, ex=TTL_SECONDS)
            p.lpush(history, sealed)
            p.ltrim(history, 0, HISTORY - 1)
            p.expire(history, TTL_SECONDS)
            if new:
                p.rpush(self.k.session_submissions(sub["session_id"]), sub["submission_id"])
                p.expire(self.k.session_submissions(sub["session_id"]), TTL_SECONDS)
                p.zadd(self.k.submissions_open, {sub["submission_id"]: sub["created_ms"]})

        return writes

    async def get_submission(self, sub_id: str, sid: str = "") -> dict | None:
        """The submission, checked; a damaged one is repaired from its newest intact checkpoint,
        else replaced by a failed tombstone (`"damaged"`: the quarantine id) and closed."""
        key = self.k.submission(sub_id)
        for _ in range(3):
            try:
                got = await read_json(self.raw, key, SUBMISSION)
            except Corrupt:
                pass
            else:
                return got[0] if got else None
            result = await contain_submission(self.raw, self.k, sub_id, sid, self.server)
            if result is not None:
                return result
        return None

"""Sessions and submissions in Redis, so any trainer server sharing the Redis can serve any session."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from ctops import redisconn
from ctops.config import RedisSettings
from ctops.keys import Keys

ACTIVE_WINDOW_MS = 10 * 60 * 1000
# sessions and their results are kept for a week after the last activity
TTL_SECONDS = 7 * 24 * 3600


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_urlsafe(12)}"


def connect(settings: RedisSettings) -> aioredis.Redis:
    """The trainer's client: its own ACL user, following the primary through Sentinel if configured."""
    return redisconn.async_client(settings, "trainer", decode_responses=True, socket_timeout=2.0)


class Store:
    def __init__(self, client: aioredis.Redis, keys: Keys, server: str) -> None:
        self.r = client
        self.k = keys
        self.server = server

    async def touch(self, sid: str) -> None:
        now = now_ms()
        # not a transaction: activity is no record a learner would miss, so it waits for no replica
        async with self.r.pipeline(transaction=False) as p:
            p.hset(self.k.session(sid), mapping={"last_activity_ms": now, "last_server": self.server})
            p.expire(self.k.session(sid), TTL_SECONDS)
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

        def writes(p: Pipeline) -> None:
            p.hset(self.k.session(sid), mapping=session)
            p.expire(self.k.session(sid), TTL_SECONDS)
            p.zadd(self.k.server_sessions(self.server), {sid: now})

        return session, writes

    async def get_session(self, sid: str) -> dict | None:
        raw = await self.r.hgetall(self.k.session(sid))
        if not raw:
            return None
        for f in ("created_ms", "last_activity_ms"):
            if f in raw:
                raw[f] = int(raw[f])
        return raw

    async def session_submissions(self, sid: str) -> list[dict]:
        ids = await self.r.lrange(self.k.session_submissions(sid), 0, -1)
        if not ids:
            return []
        raws = await self.r.mget([self.k.submission(i) for i in ids])
        return [json.loads(r) for r in raws if r]

    def submission_writes(self, sub: dict, new: bool = False) -> Callable[[Pipeline], None]:
        """Every step of a submission is written whole, so another server can resume from the last one.
        A new submission is also listed as open work until it is done."""

        def writes(p: Pipeline) -> None:
            p.set(self.k.submission(sub["submission_id"]), json.dumps(sub), ex=TTL_SECONDS)
            if new:
                p.rpush(self.k.session_submissions(sub["session_id"]), sub["submission_id"])
                p.expire(self.k.session_submissions(sub["session_id"]), TTL_SECONDS)
                p.zadd(self.k.submissions_open, {sub["submission_id"]: sub["created_ms"]})

        return writes

    async def get_submission(self, sub_id: str) -> dict | None:
        raw = await self.r.get(self.k.submission(sub_id))
        return json.loads(raw) if raw else None

"""`ctops.integrity` against a real Redis: damage is contained once however many read it at once,
and every kind of damage is found by the scrub."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from ctops import integrity
from ctops.keys import Keys
from ctops_tools.redis_embed import EmbeddedRedis


async def _contain_race(url: str, keys: Keys) -> tuple[list, int]:
    r = aioredis.Redis.from_url(url)
    try:
        await r.hset(keys.session("s1"), mapping={"session_id": "s1", "learner": b"\xff"})
        got = await asyncio.gather(*(integrity.contain_session(r, keys, "s1", f"reader-{i}") for i in range(8)))
        return got, await r.xlen(keys.quarantine_log)
    finally:
        await r.aclose()


def test_eight_readers_at_once_set_the_damage_aside_once(redis_server: EmbeddedRedis, key_prefix: str) -> None:
    got, logged = asyncio.run(_contain_race(redis_server.url, Keys(prefix=key_prefix)))
    assert logged == 1 and sum(1 for g in got if g) == 1


async def _scrub_all_kinds(url: str, keys: Keys) -> integrity.ScrubReport:
    r = aioredis.Redis.from_url(url)
    try:
        good = keys.submission("ok")
        await r.set(good, integrity.seal_json(good, integrity.SUBMISSION, {"submission_id": "ok"}, 1))
        await r.set(keys.submission("flipped"), integrity.seal_json(keys.submission("other"), integrity.SUBMISSION,
                                                                    {"submission_id": "x"}, 1))  # moved key
        await r.rpush(keys.submission("list"), "x")  # wrong type
        await r.set(keys.idempotency("bad"), json.dumps({"state": "done", "status": "two hundred"}))
        await r.set(keys.idempotency("pending"), json.dumps({"state": "pending", "fingerprint": "f"}))
        await r.hset(keys.session("legacy"), mapping={"session_id": "legacy", "learner": "ada"})
        await r.set(keys.submission_lease("ok"), "not a record")  # not checked: a lease
        return await integrity.scrub(r, keys, repair=False, reader="test")
    finally:
        await r.aclose()


def test_the_scrub_finds_every_kind_of_damage_and_only_damage(redis_server: EmbeddedRedis, key_prefix: str) -> None:
    keys = Keys(prefix=key_prefix)
    rep = asyncio.run(_scrub_all_kinds(redis_server.url, keys))
    reasons = {d["key"]: d["reason"] for d in rep.damaged or []}
    assert reasons == {keys.submission("flipped"): "checksum", keys.submission("list"): "type",
                       keys.idempotency("bad"): "schema"}
    assert rep.checked == 6 and rep.ok == 3 and rep.corrupt == 3

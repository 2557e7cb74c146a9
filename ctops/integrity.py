"""Damaged records: read checked, set aside, counted, and replaced, once.

Every record that matters is sealed (`ctops.envelope`) and read through the readers here, which
turn every kind of damage (a checksum mismatch, a value of the wrong Redis type, bytes that are not
UTF-8, a payload that is not the JSON object it should be) into one `Corrupt`. The caller then calls
`contain()`, which in one transaction fenced by WATCH (so two servers reading the same damaged
record at once set it aside once):
- keeps the damaged bytes aside (`DUMP`, so an admin can `RESTORE` them exactly) in a quarantine
  item with when, who read it, the learner's session and the reason;
- appends an entry to the quarantine log, which the dispatcher leader turns into a staff event
  (trainers hold no dispatcher credentials);
- counts it, by kind;
- replaces the record with a repaired copy (a previous checkpoint generation) or a sealed
  tombstone saying it was damaged, so later reads neither fail nor count it again.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError, WatchError

from ctops.envelope import Corrupt, seal, seal_fields, unseal, unseal_fields
from ctops.keys import Keys

# the log is read by the dispatcher leader within seconds; it need not hold more than a burst
LOG_MAXLEN = 10_000
# record kinds, as counted and as named in staff events
SESSION, SUBMISSION, IDEMPOTENCY = "session", "submission", "idempotency"
KINDS = (SESSION, SUBMISSION, IDEMPOTENCY)

Reader = Callable[[Any], Awaitable[object]]
Replace = Callable[[Pipeline, str], None]


def now_ms() -> int:
    return int(time.time() * 1000)


def _wrong_type(key: str, exc: ResponseError) -> Corrupt:
    if "WRONGTYPE" in str(exc):
        return Corrupt(key, "type", "the key holds a value of another Redis type")
    raise exc


async def read_json(c: Any, key: str, kind: str) -> tuple[dict, int, bool] | None:
    """A sealed JSON object stored as a string: (object, generation, legacy) or None if missing.
    `c` is a bytes client or a pipeline in immediate mode (inside WATCH)."""
    try:
        raw = await c.get(key)
    except ResponseError as exc:
        raise _wrong_type(key, exc) from None
    rec = unseal(key, raw, kind)
    if rec is None:
        return None
    try:
        obj = json.loads(rec.payload)
    except ValueError:
        raise Corrupt(key, "json", "the payload is not JSON") from None
    if not isinstance(obj, dict):
        raise Corrupt(key, "json", "the payload is not a JSON object")
    return obj, rec.generation, rec.legacy


async def read_hash(c: Any, key: str, kind: str) -> tuple[dict[str, str], int, bool] | None:
    try:
        raw = await c.hgetall(key)
    except ResponseError as exc:
        raise _wrong_type(key, exc) from None
    return unseal_fields(key, raw, kind)


def seal_json(key: str, kind: str, obj: dict, generation: int) -> bytes:
    return seal(key, kind, json.dumps(obj, separators=(",", ":")), generation)


def seal_hash(key: str, kind: str, fields: dict, generation: int) -> dict[str, str | bytes]:
    return seal_fields(key, kind, {k: str(v) for k, v in fields.items()}, generation)


@dataclass(frozen=True, slots=True)
class Contained:
    qid: str
    reason: str
    repaired: bool


async def contain(r: aioredis.Redis, keys: Keys, key: str, kind: str, read: Reader, *, reader: str,
                  session: str = "", replace: Replace | None = None, repaired: bool = False) -> Contained | None:
    """Set the damaged record at `key` aside and replace it, atomically. `read` re-reads it inside
    the WATCH: if it is intact now (someone rewrote it meanwhile) nothing is done and None is
    returned, and the caller reads again. `r` must be a bytes client (decode_responses=False)."""
    for _ in range(5):
        async with r.pipeline(transaction=True) as p:
            await p.watch(key)
            try:
                await read(p)
            except Corrupt as exc:
                damage = exc
            else:
                return None
            dump = await p.dump(key)
            ttl = await p.pttl(key)
            qid = f"q_{now_ms()}_{secrets.token_hex(3)}"
            entry = {"qid": qid, "key": key, "kind": kind, "reason": damage.reason, "detail": damage.detail,
                     "session": session, "reader": reader, "at_ms": now_ms(),
                     "outcome": "repaired" if repaired else "set aside"}
            p.multi()
            p.hset(keys.quarantine_item(qid), mapping={**entry, "ttl_ms": ttl, "dump": dump or b""})
            p.xadd(keys.quarantine_log, entry, maxlen=LOG_MAXLEN, approximate=True)
            p.hincrby(keys.quarantine_stats, "corrupt_found", 1)
            p.hincrby(keys.quarantine_stats, f"corrupt_found:{kind}", 1)
            if repaired:
                p.hincrby(keys.quarantine_stats, "repaired", 1)
                p.hincrby(keys.quarantine_stats, f"repaired:{kind}", 1)
            p.delete(key)
            if replace is not None:
                replace(p, qid)
            try:
                await p.execute()
            except WatchError:
                continue  # rewritten meanwhile: look again
            return Contained(qid, damage.reason, repaired)
    return None


async def summary(r: aioredis.Redis, keys: Keys) -> dict[str, int | None]:
    """The store's integrity counters for `ctops status` (`store.corrupt_found` ...)."""
    raw = await r.hgetall(keys.quarantine_stats)
    stats = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return {"corrupt_found": stats.get("corrupt_found", 0), "repaired": stats.get("repaired", 0),
            "last_scrub_ms": stats.get("last_scrub_ms")}

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

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError, WatchError

from ctops.clock import now_ms
from ctops.envelope import Corrupt, seal, seal_fields, unseal, unseal_fields
from ctops.keys import Keys
from ctops.redisacl import glob_escape

# the log is read by the dispatcher leader within seconds; it need not hold more than a burst
LOG_MAXLEN = 10_000
# record kinds, as counted and as named in staff events
SESSION, SUBMISSION, IDEMPOTENCY = "session", "submission", "idempotency"
KINDS = (SESSION, SUBMISSION, IDEMPOTENCY)

Reader = Callable[[Any], Awaitable[object]]
Replace = Callable[[Pipeline, str], None]



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
                if ttl > 0:
                    p.pexpire(key, ttl)  # the replacement lives as long as the record would have
            try:
                await p.execute()
            except WatchError:
                continue  # rewritten meanwhile: look again
            return Contained(qid, damage.reason, repaired)
    return None


# --- the records of trainer/ and how each is contained ------------------------------------------

# intact checkpoints kept per submission, to repair a damaged one from
HISTORY = 3
_IDEM_STATES = ("pending", "done", "damaged")


def damaged_submission(sub_id: str, sid: str, qid: str) -> dict:
    return {"submission_id": sub_id, "session_id": sid, "status": "failed", "verdict": "error",
            "damaged": qid, "tests": [], "steps": [], "review": {"status": "none", "text": "", "provider": None},
            "message": "this submission's stored record was damaged and has been set aside for staff; "
                       "submit your code again"}


async def read_idempotency(c: Any, key: str) -> tuple[dict, int, bool] | None:
    """A claim (plain JSON: it doubles as a lease token) or a sealed outcome."""
    got = await read_json(c, key, IDEMPOTENCY)
    if got is not None:
        _check_idempotency(key, got[0])
    return got


def _check_idempotency(key: str, obj: dict) -> None:
    """What a replay sends back must be an answer: a status and a JSON object."""
    state = obj.get("state")
    if state not in _IDEM_STATES:
        raise Corrupt(key, "schema", "not an idempotency claim or outcome")
    if state == "done" and not (isinstance(obj.get("status"), int) and 100 <= obj["status"] <= 599
                                and isinstance(obj.get("body"), dict) and isinstance(obj.get("headers", {}), dict)):
        raise Corrupt(key, "schema", "an outcome without a valid status, body or headers")


async def intact_checkpoint(r: aioredis.Redis, keys: Keys, sub_id: str) -> tuple[bytes, dict] | None:
    """The newest intact copy among the submission's last checkpoints."""
    key = keys.submission(sub_id)
    try:
        copies = await r.lrange(keys.submission_history(sub_id), 0, HISTORY - 1)
    except ResponseError:
        return None  # the history itself holds the wrong type: nothing to repair from
    for raw in copies:
        try:
            rec = unseal(key, raw, SUBMISSION)
            obj = json.loads(rec.payload) if rec else None
        except (Corrupt, ValueError):
            continue
        if rec is not None and not rec.legacy and isinstance(obj, dict):
            return raw, obj
    return None


async def contain_session(r: aioredis.Redis, keys: Keys, sid: str, reader: str) -> dict | None:
    """Replaced by a tombstone (nothing to repair a session from); None if it is intact after all."""
    key = keys.session(sid)
    tomb: dict = {}

    def replace(p: Pipeline, qid: str) -> None:
        tomb.update(session_id=sid, damaged=qid)
        p.hset(key, mapping=seal_hash(key, SESSION, tomb, 0))

    done = await contain(r, keys, key, SESSION, lambda c: read_hash(c, key, SESSION), reader=reader,
                         session=sid, replace=replace)
    return tomb if done else None


async def contain_submission(r: aioredis.Redis, keys: Keys, sub_id: str, sid: str, reader: str) -> dict | None:
    """Repaired from its newest intact checkpoint, else a failed tombstone taken out of all work."""
    key = keys.submission(sub_id)
    good = await intact_checkpoint(r, keys, sub_id)
    result: dict = {}
    if good is not None:
        sealed, result = good

        def replace(p: Pipeline, _qid: str) -> None:
            p.set(key, sealed)
    else:
        def replace(p: Pipeline, qid: str) -> None:
            result.update(damaged_submission(sub_id, sid, qid))
            p.set(key, seal_json(key, SUBMISSION, result, 0))
            # nobody is to work on it any more: the learner is told to submit again
            p.zrem(keys.submissions_open, sub_id)
            p.zrem(keys.reviews_pending, sub_id)

    done = await contain(r, keys, key, SUBMISSION, lambda c: read_json(c, key, SUBMISSION), reader=reader,
                         session=sid or str(result.get("session_id", "")), replace=replace,
                         repaired=good is not None)
    return result if done else None


async def contain_idempotency(r: aioredis.Redis, keys: Keys, rkey: str, reader: str) -> dict | None:
    """A tombstone: the request may have been executed, so it must not run again under this key."""
    tomb: dict = {}

    def replace(p: Pipeline, qid: str) -> None:
        tomb.update(state="damaged", quarantine=qid)
        p.set(rkey, seal_json(rkey, IDEMPOTENCY, tomb, 0))

    done = await contain(r, keys, rkey, IDEMPOTENCY, lambda c: read_idempotency(c, rkey), reader=reader,
                         replace=replace)
    return tomb if done else None


async def summary(r: aioredis.Redis, keys: Keys) -> dict[str, int | None]:
    """The store's integrity counters for `ctops status` (`store.corrupt_found` ...)."""
    raw = await r.hgetall(keys.quarantine_stats)
    stats = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return {"corrupt_found": stats.get("corrupt_found", 0), "repaired": stats.get("repaired", 0),
            "last_scrub_ms": stats.get("last_scrub_ms")}


# --- verifying the whole state: the leader's scrub and `ctops store verify` ------------------------

def classify(keys: Keys, key: str) -> tuple[str, str] | None:
    """(kind, id) of a record key this module checks; None for everything else (leases, lists...)."""
    head = keys.prefix + ":"
    if not key.startswith(head):
        return None
    parts = key[len(head):].split(":")
    if len(parts) == 2 and parts[0] in ("session", "submission", "idempotency") and parts[1]:
        return parts[0], parts[1]
    return None


def _check_fetched(kind: str, key: str, value: object) -> None:
    """Raise Corrupt if a value fetched in a scrub batch (GET or HGETALL reply, or the error) is bad."""
    if isinstance(value, ResponseError):
        raise _wrong_type(key, value)
    if isinstance(value, Exception):
        raise value
    if kind == SESSION:
        unseal_fields(key, value, SESSION)  # type: ignore[arg-type]
        return
    rec = unseal(key, value, kind)  # type: ignore[arg-type]
    if rec is None:
        return
    try:
        obj = json.loads(rec.payload)
    except ValueError:
        raise Corrupt(key, "json", "the payload is not JSON") from None
    if not isinstance(obj, dict):
        raise Corrupt(key, "schema", f"not a {kind} record")
    if kind == IDEMPOTENCY:
        _check_idempotency(key, obj)


@dataclass
class ScrubReport:
    checked: int = 0
    ok: int = 0
    repaired: int = 0
    quarantined: int = 0
    corrupt: int = 0  # found damaged and left as it is (verify without --repair)
    elapsed_ms: int = 0
    by_kind: dict[str, dict[str, int]] | None = None
    damaged: list[dict[str, str]] | None = None

    def add(self, kind: str, result: str, key: str = "", reason: str = "") -> None:
        self.by_kind = self.by_kind or {}
        k = self.by_kind.setdefault(kind, {"checked": 0, "ok": 0, "repaired": 0, "quarantined": 0, "corrupt": 0})
        k["checked"] += 1
        k[result] += 1
        self.checked += 1
        setattr(self, result, getattr(self, result) + 1)
        if result != "ok":
            self.damaged = self.damaged or []
            if len(self.damaged) < 1000:
                self.damaged.append({"key": key, "kind": kind, "reason": reason, "result": result})

    def to_dict(self) -> dict:
        return {"checked": self.checked, "ok": self.ok, "repaired": self.repaired, "quarantined": self.quarantined,
                "corrupt": self.corrupt, "elapsed_ms": self.elapsed_ms, "by_kind": self.by_kind or {},
                "damaged": self.damaged or []}


async def _contain_any(r: aioredis.Redis, keys: Keys, kind: str, ident: str, key: str, reader: str) -> str:
    if kind == SESSION:
        done = await contain_session(r, keys, ident, reader)
    elif kind == SUBMISSION:
        done = await contain_submission(r, keys, ident, "", reader)
    else:
        done = await contain_idempotency(r, keys, key, reader)
    if done is None:
        return "ok"  # rewritten intact meanwhile
    return "quarantined" if "damaged" in done or done.get("state") == "damaged" else "repaired"


async def scrub(r: aioredis.Redis, keys: Keys, *, repair: bool, reader: str, rate: float = 0.0,
                batch: int = 200) -> ScrubReport:
    """Check every record once; with `repair`, contain each damaged one as a read would. `rate`
    (records/s, 0 = unbounded) paces it so that a background pass stays out of learners' way.
    `r` must be a bytes client."""
    report = ScrubReport()
    started = time.monotonic()
    cursor: int | bytes = 0
    pattern = glob_escape(keys.prefix) + ":*"
    while True:
        cursor, names = await r.scan(cursor, match=pattern, count=batch)
        found = [(n.decode(errors="replace"), c) for n in names if (c := classify(keys, n.decode(errors="replace")))]
        if found:
            async with r.pipeline(transaction=False) as p:
                for key, (kind, _ident) in found:
                    if kind == SESSION:
                        p.hgetall(key)
                    else:
                        p.get(key)
                values = await p.execute(raise_on_error=False)
            for (key, (kind, ident)), value in zip(found, values, strict=True):
                try:
                    _check_fetched(kind, key, value)
                except Corrupt as exc:
                    result = await _contain_any(r, keys, kind, ident, key, reader) if repair else "corrupt"
                    report.add(kind, result, key, exc.reason)
                else:
                    report.add(kind, "ok")
            if rate > 0:
                # paced by what was checked so far, so the pass as a whole keeps to the rate
                ahead = report.checked / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        if not cursor:
            break
    report.elapsed_ms = int((time.monotonic() - started) * 1000)
    return report


async def record_scrub(r: aioredis.Redis, keys: Keys, report: ScrubReport) -> None:
    await r.hset(keys.quarantine_stats, mapping={"last_scrub_ms": report.elapsed_ms, "last_scrub_at_ms": now_ms(),
                                                 "last_scrub_checked": report.checked})


async def quarantine_items(r: aioredis.Redis, keys: Keys, limit: int = 500) -> list[dict[str, str]]:
    """The quarantined records, newest first (from the log; an item discarded since is left out)."""
    entries = await r.xrevrange(keys.quarantine_log, count=limit)
    out = []
    for _id, fields in entries:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode(errors="replace") if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        if await r.exists(keys.quarantine_item(f["qid"])):
            out.append(f)
    return out


class NotQuarantined(Exception):
    """No quarantined record by that id (never, or discarded or restored since)."""


async def release(r: aioredis.Redis, keys: Keys, qid: str, *, restore: bool, actor: str, role: str = "admin",
                  via: str = "ctops store") -> dict[str, str]:
    """Discard a quarantined record, or put its damaged bytes back at its key (to examine it, or
    when the check itself was wrong); either way audited, and the item is gone afterwards."""
    item = await r.hgetall(keys.quarantine_item(qid))
    if not item:
        raise NotQuarantined(f"nothing quarantined as {qid!r}")
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in item.items()}
    key = f["key"].decode() if isinstance(f["key"], bytes) else f["key"]
    async with r.pipeline(transaction=True) as p:
        if restore:
            ttl = int(f.get("ttl_ms", b"0") or 0)
            p.restore(key, max(ttl, 0), f["dump"], replace=True)
        p.delete(keys.quarantine_item(qid))
        p.xadd(keys.audit, {"ts_ms": now_ms(), "who": actor, "role": role,
                            "action": "quarantine-restore" if restore else "quarantine-discard", "target": key,
                            "result": f"ok ({qid})", "via": via}, maxlen=LOG_MAXLEN, approximate=True)
        await p.execute()
    return {"qid": qid, "key": key, "action": "restore" if restore else "discard"}

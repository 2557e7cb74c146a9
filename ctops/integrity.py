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
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError, WatchError
from redis.typing import EncodableT

from ctops.capture.fingerprint import culprit
from ctops.clock import now_ms
from ctops.envelope import SHA1, Corrupt, seal, seal_fields, unseal, unseal_fields
from ctops.keys import Keys
from ctops.redisacl import glob_escape
from ctops.redisconn import redis_fields

# the log is read by the dispatcher leader within seconds; it need not hold more than a burst
LOG_MAXLEN = 10_000
# the audit log keeps this many staff actions
AUDIT_MAXLEN = 100_000
# record kinds, as counted and as named in staff events
SESSION, SUBMISSION, IDEMPOTENCY = "session", "submission", "idempotency"
AUDIT, EXC_GROUP, EVENT = "audit", "exc-group", "event"
KINDS = (SESSION, SUBMISSION, IDEMPOTENCY, AUDIT, EXC_GROUP, EVENT)
# kinds stored as the entries of one stream (the audit log, the staff event stream)
STREAM_KINDS = (AUDIT, EVENT)
_SEVERITIES = ("info", "warning", "critical")

log = logging.getLogger("ctops.integrity")

Reader = Callable[[Any], Awaitable[object]]
Replace = Callable[[Pipeline, str], None]
# a stream entry's fields as Redis returns them (bytes from a bytes client)
RawFields = Mapping[str | bytes, str | bytes]
# an XRANGE/XREVRANGE reply as redis-py types it: ids and fields are optional there only for entries
# deleted from a consumer group's pending list, which a range never returns
_RangeReply = list[tuple[bytes | str | None, dict[bytes | str, bytes | str] | None]] | None


def as_text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


def range_reply(reply: _RangeReply) -> list[tuple[str, RawFields]]:
    """A range reply with text ids."""
    return [(as_text(eid), raw or {}) for eid, raw in reply or []]



def wrong_type(key: str, exc: ResponseError) -> Corrupt:
    if "WRONGTYPE" in str(exc):
        return Corrupt(key, "type", "the key holds a value of another Redis type")
    raise exc


async def read_json(c: Any, key: str, kind: str) -> tuple[dict[str, Any], int, bool] | None:
    """A sealed JSON object stored as a string: (object, generation, legacy) or None if missing.
    `c` is a bytes client or a pipeline in immediate mode (inside WATCH)."""
    try:
        raw = await c.get(key)
    except ResponseError as exc:
        raise wrong_type(key, exc) from None
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
        raise wrong_type(key, exc) from None
    return unseal_fields(key, raw, kind)


def seal_json(key: str, kind: str, obj: Mapping[str, Any], generation: int) -> bytes:
    return seal(key, kind, json.dumps(obj, separators=(",", ":")), generation)


def seal_hash(key: str, kind: str, fields: Mapping[str, object], generation: int) -> dict[str, str | bytes]:
    return seal_fields(key, kind, {k: str(v) for k, v in fields.items()}, generation)


@dataclass(frozen=True, slots=True)
class Contained:
    qid: str
    reason: str
    repaired: bool


def _entry(key: str, kind: str, damage: Corrupt, *, session: str, reader: str, repaired: bool,
           **more: str) -> dict[str, str | int]:
    """A quarantine log entry (also the item's description), as the leader relays it to staff."""
    return {"qid": f"q_{now_ms()}_{secrets.token_hex(3)}", "key": key, "kind": kind, "reason": damage.reason,
            "detail": damage.detail, "session": session, "reader": reader, "at_ms": now_ms(),
            "outcome": "repaired" if repaired else "set aside", **more}


def _set_aside(p: Pipeline, keys: Keys, entry: dict[str, str | int], kind: str, repaired: bool,
               kept: Mapping[str, EncodableT]) -> None:
    """Queue the quarantine item, its log entry and the counters (inside the caller's MULTI)."""
    p.hset(keys.quarantine_item(str(entry["qid"])), mapping=redis_fields({**entry, **kept}))
    p.xadd(keys.quarantine_log, redis_fields(entry), maxlen=LOG_MAXLEN, approximate=True)
    p.hincrby(keys.quarantine_stats, "corrupt_found", 1)
    p.hincrby(keys.quarantine_stats, f"corrupt_found:{kind}", 1)
    if repaired:
        p.hincrby(keys.quarantine_stats, "repaired", 1)
        p.hincrby(keys.quarantine_stats, f"repaired:{kind}", 1)


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
            entry = _entry(key, kind, damage, session=session, reader=reader, repaired=repaired)
            qid = str(entry["qid"])
            p.multi()
            _set_aside(p, keys, entry, kind, repaired, {"ttl_ms": ttl, "dump": dump or b""})
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


# --- entries of a stream (the audit log): sealed one by one, set aside one by one ---------------
# An entry cannot be rewritten in place, so a damaged one is moved into the quarantine (its fields,
# byte for byte) and deleted from the stream; the rest of the stream is served as it is.

def seal_entry(stream: str, kind: str, fields: Mapping[str, object]) -> dict[str, str | bytes]:
    """An entry's fields plus `_env` (checksum over the stream's key, the kind and the fields)."""
    return seal_fields(stream, kind, {k: str(v) for k, v in fields.items()})


def check_entry(stream: str, kind: str, raw: RawFields) -> tuple[dict[str, str], bool]:
    """(fields without `_env`, legacy); raises Corrupt. Entries written before envelopes are legacy."""
    got = unseal_fields(stream, raw, kind)
    if got is None:
        raise Corrupt(stream, "schema", "an empty entry")
    fields, _gen, legacy = got
    if kind == AUDIT and not (fields.get("action") and fields.get("ts_ms", "").isdigit()):
        raise Corrupt(stream, "schema", "not an audit entry (no action or time)")
    if kind == EVENT and not (fields.get("kind") and fields.get("ts_ms", "").isdigit()
                              and fields.get("severity") in _SEVERITIES):
        raise Corrupt(stream, "schema", "not an event (no kind, time or severity)")
    return fields, legacy


def _latin1(raw: RawFields) -> str:
    """The entry's fields as JSON, byte for byte (latin-1 maps every byte to one character)."""
    b = {(k if isinstance(k, bytes) else k.encode()).decode("latin-1"):
         (v if isinstance(v, bytes) else v.encode()).decode("latin-1") for k, v in raw.items()}
    return json.dumps(b)


async def contain_entry(r: aioredis.Redis, keys: Keys, stream: str, eid: str, kind: str, *,
                        reader: str) -> Contained | None:
    for _ in range(5):
        async with r.pipeline(transaction=True) as p:
            await p.watch(stream)
            got = range_reply(await p.xrange(stream, eid, eid))
            if not got:
                return None
            try:
                check_entry(stream, kind, got[0][1])
            except Corrupt as exc:
                damage = Corrupt(stream, exc.reason, f"entry {eid}: {exc.detail}")
            else:
                return None
            entry = _entry(stream, kind, damage, session="", reader=reader, repaired=False, entry=eid)
            p.multi()
            _set_aside(p, keys, entry, kind, False, {"entry_fields": _latin1(got[0][1]), "ttl_ms": -1, "dump": b""})
            p.xdel(stream, eid)
            try:
                await p.execute()
            except WatchError:
                continue  # another entry was added meanwhile: look again
            return Contained(str(entry["qid"]), damage.reason, False)
    return None


async def _stream_ofwrong_type(r: aioredis.Redis, keys: Keys, stream: str, kind: str, reader: str) -> None:
    async def check(c: Any) -> None:
        if (t := await c.type(stream)) not in (b"stream", "stream", b"none", "none"):
            raise Corrupt(stream, "type", f"the key holds a {t!r}, not a stream")

    await contain(r, keys, stream, kind, check, reader=reader)


async def read_entries(r: aioredis.Redis, keys: Keys, stream: str, kind: str, count: int, *,
                       reader: str) -> list[tuple[str, dict[str, str]]]:
    """The newest `count` entries, checked: a damaged one is set aside (once) and left out, so the
    rest is served. `r` must be a bytes client."""
    try:
        entries = range_reply(await r.xrevrange(stream, count=count))
    except ResponseError as exc:
        wrong_type(stream, exc)
        await _stream_ofwrong_type(r, keys, stream, kind, reader)
        return []
    return await checked_entries(r, keys, stream, kind, entries, reader=reader)


async def read_range(r: aioredis.Redis, keys: Keys, stream: str, kind: str, after: str, count: int, *,
                     reader: str) -> list[tuple[str, dict[str, str]]]:
    """Up to `count` entries after the id `after`, oldest first, checked as `read_entries`."""
    try:
        entries = range_reply(await r.xrange(stream, min=f"({after}", count=count))
    except ResponseError as exc:
        wrong_type(stream, exc)
        await _stream_ofwrong_type(r, keys, stream, kind, reader)
        return []
    return await checked_entries(r, keys, stream, kind, entries, reader=reader)


async def checked_entries(r: aioredis.Redis, keys: Keys, stream: str, kind: str,
                          entries: list[tuple[str, RawFields]], *, reader: str) -> list[tuple[str, dict[str, str]]]:
    """The intact entries among `entries` (read from `stream`), fields as text; each damaged one
    is set aside (once) with a log line and left out. Legacy (unsealed) entries are served as
    they are."""
    out = []
    for sid, raw in entries:
        try:
            fields, _legacy = check_entry(stream, kind, raw)
        except Corrupt as exc:
            log.error("damaged %s entry %s in %s (%s): set aside", kind, sid, stream, exc.reason)
            try:
                await contain_entry(r, keys, stream, sid, kind, reader=reader)
            except (RedisError, OSError) as err:
                log.warning("cannot set the damaged entry %s aside: %s", sid, err)
            continue
        out.append((sid, fields))
    return out


async def upgrade_stream(r: aioredis.Redis, keys: Keys, stream: str, kind: str) -> int:
    """Seal the legacy entries of a stream, keeping every entry's id and order: the stream is
    rebuilt beside it and swapped in, unless an entry was added meanwhile (then again). Damaged
    entries are left as they are, for the checks to set aside. How many entries were sealed."""
    tmp = f"{stream}:upgrade"
    for _ in range(5):
        async with r.pipeline(transaction=True) as p:
            await p.watch(stream)
            entries = range_reply(await p.xrange(stream))
            todo = 0
            rebuilt: list[tuple[str, Mapping[Any, str | bytes]]] = []
            for eid, raw in entries:
                try:
                    fields, legacy = check_entry(stream, kind, raw)
                except Corrupt:
                    rebuilt.append((eid, raw))
                    continue
                todo += legacy
                rebuilt.append((eid, seal_entry(stream, kind, fields) if legacy else raw))
            if not todo:
                return 0
            await r.delete(tmp)
            async with r.pipeline(transaction=False) as w:
                for eid, sealed in rebuilt:
                    w.xadd(tmp, redis_fields(sealed), id=eid)
                await w.execute()
            p.multi()
            p.rename(tmp, stream)
            try:
                await p.execute()
            except WatchError:
                continue
            return todo
    return 0


# --- exception groups: hashes that the dispatcher's ingest script seals (SHA-1, see envelope) ---

_GROUP_STATUSES = ("unresolved", "acknowledged", "resolved", "muted", "regressed")


def check_group(key: str, fields: dict[str, str]) -> None:
    """What listing a group reads must parse: numbers are numbers, the status is a status."""
    for name in ("count", "first_ms", "last_ms", "resolved_ms", "mute_until_ms"):
        if fields.get(name) and not fields[name].lstrip("-").isdigit():
            raise Corrupt(key, "schema", f"{name} is not a number")
    if fields.get("status", "unresolved") not in _GROUP_STATUSES:
        raise Corrupt(key, "schema", "not a group status")


async def read_group(c: Any, key: str) -> tuple[dict[str, str], int, bool] | None:
    got = await read_hash(c, key, EXC_GROUP)
    if got is not None:
        check_group(key, got[0])
    return got


async def _rebuilt_group(r: aioredis.Redis, keys: Keys, gid: str) -> dict[str, str] | None:
    """A damaged group's hash as its indexes and its latest intact event tell it (status reset to
    unresolved, so staff look at it again); None when the indexes no longer know it."""
    async with r.pipeline(transaction=False) as p:
        p.zscore(keys.exc_groups_index("count"), gid)
        p.zscore(keys.exc_groups_index("last"), gid)
        p.lrange(f"{keys.exc_group(gid)}:recent", 0, -1)
        count, last, recent = await p.execute(raise_on_error=False)
    if not isinstance(count, float) or not isinstance(last, float):
        return None
    events = []
    for raw in recent if isinstance(recent, list) else []:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("ts_ms"), int):
            events.append(ev)
    latest = max(events, key=lambda e: e["ts_ms"], default={})
    frames = [f for f in latest.get("frames", []) if isinstance(f, dict)]
    return {"id": gid, "type": str(latest.get("type", "?")), "culprit": culprit(frames) if frames else "",
            "status": "unresolved", "count": str(int(count)), "last_ms": str(int(last)),
            "first_ms": str(min((e["ts_ms"] for e in events), default=int(last))),
            "message": str(latest.get("message", ""))[:500]}


async def contain_group(r: aioredis.Redis, keys: Keys, gid: str, reader: str) -> Contained | None:
    """Set a damaged exception group aside; rebuilt from its indexes and latest events when they
    still know it, else dropped from the indexes (the next event of its kind starts it afresh)."""
    key = keys.exc_group(gid)
    rebuilt = await _rebuilt_group(r, keys, gid)

    def replace(p: Pipeline, _qid: str) -> None:
        if rebuilt is None:
            for index in ("last", "count", "resolved"):
                p.zrem(keys.exc_groups_index(index), gid)
            return
        p.hset(key, mapping=redis_fields(seal_fields(key, EXC_GROUP, rebuilt, 0, digest=SHA1)))
        p.zrem(keys.exc_groups_index("resolved"), gid)

    return await contain(r, keys, key, EXC_GROUP, lambda c: read_group(c, key), reader=reader, replace=replace,
                         repaired=rebuilt is not None)


# --- the records of trainer/ and how each is contained ------------------------------------------

# intact checkpoints kept per submission, to repair a damaged one from
HISTORY = 3
_IDEM_STATES = ("pending", "done", "damaged")


def damaged_submission(sub_id: str, sid: str, qid: str) -> dict[str, Any]:
    return {"submission_id": sub_id, "session_id": sid, "status": "failed", "verdict": "error",
            "damaged": qid, "tests": [], "steps": [], "review": {"status": "none", "text": "", "provider": None},
            "message": "this submission's stored record was damaged and has been set aside for staff; "
                       "submit your code again"}


async def read_idempotency(c: Any, key: str) -> tuple[dict[str, Any], int, bool] | None:
    """A claim (plain JSON: it doubles as a lease token) or a sealed outcome."""
    got = await read_json(c, key, IDEMPOTENCY)
    if got is not None:
        _check_idempotency(key, got[0])
    return got


def _check_idempotency(key: str, obj: dict[str, Any]) -> None:
    """What a replay sends back must be an answer: a status and a JSON object."""
    state = obj.get("state")
    if state not in _IDEM_STATES:
        raise Corrupt(key, "schema", "not an idempotency claim or outcome")
    if state == "done" and not (isinstance(obj.get("status"), int) and 100 <= obj["status"] <= 599
                                and isinstance(obj.get("body"), dict) and isinstance(obj.get("headers", {}), dict)):
        raise Corrupt(key, "schema", "an outcome without a valid status, body or headers")


async def intact_checkpoint(r: aioredis.Redis, keys: Keys, sub_id: str) -> tuple[bytes | str, dict[str, Any]] | None:
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


async def contain_session(r: aioredis.Redis, keys: Keys, sid: str, reader: str) -> dict[str, Any] | None:
    """Replaced by a tombstone (nothing to repair a session from); None if it is intact after all."""
    key = keys.session(sid)
    tomb: dict[str, Any] = {}

    def replace(p: Pipeline, qid: str) -> None:
        tomb.update(session_id=sid, damaged=qid)
        p.hset(key, mapping=redis_fields(seal_hash(key, SESSION, tomb, 0)))

    done = await contain(r, keys, key, SESSION, lambda c: read_hash(c, key, SESSION), reader=reader,
                         session=sid, replace=replace)
    return tomb if done else None


async def contain_submission(r: aioredis.Redis, keys: Keys, sub_id: str, sid: str,
                             reader: str) -> dict[str, Any] | None:
    """Repaired from its newest intact checkpoint, else a failed tombstone taken out of all work."""
    key = keys.submission(sub_id)
    good = await intact_checkpoint(r, keys, sub_id)
    result: dict[str, Any] = {}
    if good is not None:
        sealed, result = good

        def replace(p: Pipeline, qid: str) -> None:
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


async def contain_idempotency(r: aioredis.Redis, keys: Keys, rkey: str, reader: str) -> dict[str, Any] | None:
    """A tombstone: the request may have been executed, so it must not run again under this key."""
    tomb: dict[str, Any] = {}

    def replace(p: Pipeline, qid: str) -> None:
        tomb.update(state="damaged", quarantine=qid)
        p.set(rkey, seal_json(rkey, IDEMPOTENCY, tomb, 0))

    done = await contain(r, keys, rkey, IDEMPOTENCY, lambda c: read_idempotency(c, rkey), reader=reader,
                         replace=replace)
    return tomb if done else None


def _counts(raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    out = {}
    for k, v in raw.items():
        try:
            out[k.decode() if isinstance(k, bytes) else k] = int(v)
        except (ValueError, UnicodeDecodeError):
            continue  # a damaged counter is left out, never a failed status
    return out


async def summary(r: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """The store's integrity counters for `ctops status` (`store.corrupt_found` ...), and what was
    refused where it arrived, by source (`rejected`; torn capture spool lines as `spool_line`, from
    what the senders report)."""
    async with r.pipeline(transaction=False) as p:
        p.hgetall(keys.quarantine_stats)
        p.hgetall(keys.rejected)
        p.hgetall(keys.exc_senders)
        stats, rejected, senders = (_counts(x) for x in await p.execute())
    spool = sum(v for k, v in senders.items() if k.endswith("|corrupt"))
    return {"corrupt_found": stats.get("corrupt_found", 0), "repaired": stats.get("repaired", 0),
            "last_scrub_ms": stats.get("last_scrub_ms"),
            "rejected": {**rejected, **({"spool_line": spool} if spool else {})}}


# --- verifying the whole state: the leader's scrub and `ctops store verify` ------------------------

def classify(keys: Keys, key: str) -> tuple[str, str] | None:
    """(kind, id) of a record key this module checks; None for everything else (leases, lists...)."""
    head = keys.prefix + ":"
    if not key.startswith(head):
        return None
    parts = key[len(head):].split(":")
    if len(parts) == 2 and parts[0] in ("session", "submission", "idempotency") and parts[1]:
        return parts[0], parts[1]
    if parts == [AUDIT]:
        return AUDIT, ""
    if parts == ["events"]:
        return EVENT, ""
    if len(parts) == 3 and parts[:2] == ["exc", "group"] and parts[2]:
        return EXC_GROUP, parts[2]
    return None


def _check_fetched(kind: str, key: str, value: object) -> None:
    """Raise Corrupt if a value fetched in a scrub batch (GET or HGETALL reply, or the error) is bad."""
    if isinstance(value, ResponseError):
        raise wrong_type(key, value)
    if isinstance(value, Exception):
        raise value
    if kind in (SESSION, EXC_GROUP):
        if not isinstance(value, dict):
            raise TypeError(f"HGETALL {key} answered a {type(value).__name__}")
        got = unseal_fields(key, value, kind)
        if got is not None and kind == EXC_GROUP:
            check_group(key, got[0])
        return
    if not isinstance(value, bytes | str | None):
        raise TypeError(f"GET {key} answered a {type(value).__name__}")
    rec = unseal(key, value, kind)
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

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "ok": self.ok, "repaired": self.repaired, "quarantined": self.quarantined,
                "corrupt": self.corrupt, "elapsed_ms": self.elapsed_ms, "by_kind": self.by_kind or {},
                "damaged": self.damaged or []}


async def _contain_any(r: aioredis.Redis, keys: Keys, kind: str, ident: str, key: str, reader: str) -> str:
    if kind == EXC_GROUP:
        got = await contain_group(r, keys, ident, reader)
        return "ok" if got is None else "repaired" if got.repaired else "quarantined"
    if kind == SESSION:
        done = await contain_session(r, keys, ident, reader)
    elif kind == SUBMISSION:
        done = await contain_submission(r, keys, ident, "", reader)
    else:
        done = await contain_idempotency(r, keys, key, reader)
    if done is None:
        return "ok"  # rewritten intact meanwhile
    return "quarantined" if "damaged" in done or done.get("state") == "damaged" else "repaired"


class Pacer:
    """Spaces a walk's batches evenly at `rate` records/s (0 = unbounded). A walk that fell behind
    (its process starved of CPU, Redis slow) goes on at the rate rather than catching up in a
    burst: a burst is what learners would feel."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.due = time.monotonic()

    async def pace(self, records: int) -> None:
        if self.rate <= 0 or not records:
            return
        step = records / self.rate
        # at most one batch's worth of time owed to the past, however far behind
        self.due = max(self.due, time.monotonic() - step) + step
        if (wait := self.due - time.monotonic()) > 0:
            await asyncio.sleep(wait)


async def scrub(r: aioredis.Redis, keys: Keys, *, repair: bool, reader: str, rate: float = 0.0,
                batch: int = 200) -> ScrubReport:
    """Check every record once; with `repair`, contain each damaged one as a read would. `rate`
    (keys visited a second, 0 = unbounded) paces it so that a background pass stays out of
    learners' way.
    `r` must be a bytes client."""
    report = ScrubReport()
    started = time.monotonic()
    pacer = Pacer(rate)
    cursor = 0
    pattern = glob_escape(keys.prefix) + ":*"
    while True:
        cursor, names = await r.scan(cursor, match=pattern, count=batch)
        texts = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]
        found = [(n, c) for n in texts if (c := classify(keys, n))]
        for key, (kind, _ident) in [f for f in found if f[1][0] in STREAM_KINDS]:
            await _scrub_stream(r, keys, key, kind, report, repair=repair, reader=reader, batch=batch,
                                pacer=pacer)
        found = [f for f in found if f[1][0] not in STREAM_KINDS]
        if found:
            async with r.pipeline(transaction=False) as p:
                for key, (kind, _ident) in found:
                    if kind in (SESSION, EXC_GROUP):
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
        # paced by keys visited, not records checked: a SCAN over keys that are no records (history
        # lists, seen-markers) costs Redis as much, and must not run unpaced
        await pacer.pace(len(names))
        if not cursor:
            break
    report.elapsed_ms = int((time.monotonic() - started) * 1000)
    return report


async def _scrub_stream(r: aioredis.Redis, keys: Keys, stream: str, kind: str, report: ScrubReport, *,
                        repair: bool, reader: str, batch: int, pacer: Pacer) -> None:
    """Every entry of a stream, `batch` at a time; with `repair`, damaged ones are set aside and
    legacy ones sealed (the stream rebuilt with the same ids)."""
    legacy = 0
    after = "-"
    while True:
        try:
            entries = range_reply(await r.xrange(stream, min=after, count=batch))
        except ResponseError as exc:
            report.add(kind, "quarantined" if repair else "corrupt", stream, wrong_type(stream, exc).reason)
            if repair:
                await _stream_ofwrong_type(r, keys, stream, kind, reader)
            return
        for sid, raw in entries:
            try:
                legacy += check_entry(stream, kind, raw)[1]
            except Corrupt as exc:
                done = await contain_entry(r, keys, stream, sid, kind, reader=reader) if repair else None
                report.add(kind, "quarantined" if done else "corrupt" if not repair else "ok",
                           f"{stream}#{sid}", exc.reason)
            else:
                report.add(kind, "ok")
        if len(entries) < batch:
            break
        after = "(" + entries[-1][0]
        await pacer.pace(len(entries))
    # the event stream's legacy entries are left to age out (it is capped, and rebuilding 100,000
    # entries in one step would hold Redis for a noticeable time); the audit log is kept for good
    if repair and legacy and kind == AUDIT:
        log.info("%s: %d entries written before envelopes sealed", stream, await upgrade_stream(r, keys, stream, kind))


async def record_scrub(r: aioredis.Redis, keys: Keys, report: ScrubReport) -> None:
    await r.hset(keys.quarantine_stats, mapping={"last_scrub_ms": report.elapsed_ms, "last_scrub_at_ms": now_ms(),
                                                 "last_scrub_checked": report.checked})


async def quarantine_items(r: aioredis.Redis, keys: Keys, limit: int = 500) -> list[dict[str, str]]:
    """The quarantined records, newest first (from the log; an item discarded since is left out)."""
    entries = range_reply(await r.xrevrange(keys.quarantine_log, count=limit))
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
        if restore and f.get("entry_fields"):
            # a stream entry goes back as a new entry (a stream takes no id older than its last)
            fields = {k.encode("latin-1"): v.encode("latin-1") for k, v in json.loads(f["entry_fields"]).items()}
            p.xadd(key, redis_fields(fields))
        elif restore:
            ttl = int(f.get("ttl_ms", b"0") or 0)
            p.restore(key, max(ttl, 0), f["dump"], replace=True)
        p.delete(keys.quarantine_item(qid))
        p.xadd(keys.audit, redis_fields(seal_entry(keys.audit, AUDIT, {
            "ts_ms": now_ms(), "who": actor, "role": role,
            "action": "quarantine-restore" if restore else "quarantine-discard", "target": key,
            "result": f"ok ({qid})", "via": via})), maxlen=AUDIT_MAXLEN, approximate=True)
        await p.execute()
    return {"qid": qid, "key": key, "action": "restore" if restore else "discard"}

"""`ctops chaos corrupt KEY | --random KIND`: damage one stored record, for demos and tests.

The damage is what the integrity checks must catch: one flipped byte in the middle of a string
record, one field of a hash overwritten with bytes that are not UTF-8, one field of the middle entry
of a stream (the audit log) likewise. Nothing else is touched.
"""

from __future__ import annotations

import argparse
import random
import sys

import redis

from ctops import redisconn, statefile
from ctops.config import load
from ctops.integrity import AUDIT, EVENT, EXC_GROUP, KINDS, as_text, classify, range_reply
from ctops.keys import Keys
from ctops.redisacl import glob_escape
from ctops.redisconn import redis_fields


def _bytes(value: bytes | str | None) -> bytes:
    return value.encode() if isinstance(value, str) else value or b""


def damage(r: redis.Redis, key: str) -> str:
    """Damage the record at `key` in place; what was done, in words."""
    kind = as_text(r.type(key))
    if kind == "string":
        raw = bytearray(_bytes(r.get(key)))
        if not raw:
            raise ValueError(f"{key} is empty")
        i = len(raw) // 2
        raw[i] ^= 0xFF
        ttl = r.pttl(key)
        r.set(key, bytes(raw), px=ttl if ttl > 0 else None)
        return f"flipped byte {i} of {len(raw)}"
    if kind == "hash":
        field = sorted(_bytes(f) for f in r.hkeys(key) if _bytes(f) != b"_env")[0]
        r.hset(key, field, b"\xff\xfe damaged")
        return f"overwrote field {field.decode(errors='replace')} with bytes that are not UTF-8"
    if kind == "stream":
        return _damage_entry(r, key)
    raise ValueError(f"{key} is a {kind}; only string, hash and stream records are damaged")


def _damage_entry(r: redis.Redis, key: str) -> str:
    """A stream entry cannot be changed in place: the stream is rebuilt with the same ids, one entry
    altered, and swapped in at once."""
    entries = range_reply(r.xrange(key))
    if not entries:
        raise ValueError(f"{key} is an empty stream")
    target, fields = entries[len(entries) // 2]
    field = sorted(_bytes(f) for f in fields if _bytes(f) != b"_env")[0]
    tmp = f"{key}:chaos"
    with r.pipeline(transaction=True) as p:
        p.delete(tmp)
        for eid, f in entries:
            p.xadd(tmp, redis_fields({**f, field: b"\xff\xfe damaged"} if eid == target else f), id=eid)
        p.rename(tmp, key)
        p.execute()
    return f"overwrote field {field.decode(errors='replace')} of entry {target} with bytes that are not UTF-8"


def pick(r: redis.Redis, keys: Keys, kind: str) -> str:
    streams = {AUDIT: keys.audit, EVENT: keys.events, EXC_GROUP: keys.exc_group("*")}
    pattern = streams.get(kind, f"{keys.prefix}:{kind}:*")
    pattern = glob_escape(keys.prefix) + pattern[len(keys.prefix):]
    found = [k.decode() for k in r.scan_iter(match=pattern, count=1000)]
    found = [k for k in found if (c := classify(keys, k)) and c[0] == kind]
    if not found:
        raise ValueError(f"no {kind} record to damage")
    return random.choice(found)


def run(args: argparse.Namespace) -> int:
    try:
        dep = load(args.config or statefile.read(args.state_file).get("config") or "")
    except statefile.StateFileError as exc:
        print(f"ctops chaos corrupt: {exc}; pass --config", file=sys.stderr)
        return 2
    keys = Keys(prefix=dep.redis.prefix)
    if args.random and args.random not in KINDS:
        print(f"ctops chaos corrupt: --random takes one of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    with redisconn.sync_client(dep.redis, "admin") as r:
        try:
            key = pick(r, keys, args.random) if args.random else args.target
            if not key:
                print("ctops chaos corrupt: name a KEY or --random KIND", file=sys.stderr)
                return 2
            if not r.exists(key):
                print(f"ctops chaos corrupt: no key {key}", file=sys.stderr)
                return 1
            print(f"corrupt {key}: {damage(r, key)}")
        except (ValueError, redis.RedisError) as exc:
            print(f"ctops chaos corrupt: {exc}", file=sys.stderr)
            return 1
    return 0

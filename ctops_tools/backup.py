"""Backups of the shared state: a consistent snapshot of every key under the prefix, and its restore.

Consistent: the snapshot is taken by one Lua script (SCAN + DUMP + PTTL of every key), which Redis
runs atomically, so no write lands halfway through it. It runs on a replica when the primary has
one online, so learners' requests (served by the primary) do not wait for it.

The file is JSON lines: a manifest first (format, prefix, when, from which node, how many records,
a SHA-256 over the record lines), then one line per key (name, remaining TTL, the `DUMP` payload in
base64, an xxh3 of name + payload). `DUMP` payloads carry Redis's own CRC64 and version, checked
again by `RESTORE`. A restore checks the manifest, the SHA-256 and every line before writing
anything, and writes only into a store holding nothing under the prefix (or with `replace`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
import xxhash

from ctops.redisacl import glob_escape

FORMAT = "ctops-backup"
VERSION = 1

_SNAPSHOT = """
local out = {}
local cursor = "0"
repeat
  local r = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    local d = redis.call("DUMP", k)
    if d then
      out[#out + 1] = k
      out[#out + 1] = redis.call("PTTL", k)
      out[#out + 1] = d
    end
  end
until cursor == "0"
return out
"""


class BackupError(Exception):
    """A backup file that must not be loaded, or a store it must not be loaded into."""


def _digest(key: bytes, dump: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(key + b"\0" + dump)


def source_node(primary: redis.Redis) -> tuple[redis.Redis, str]:
    """An online replica of `primary` (same credentials) if there is one, else the primary."""
    info = primary.info("replication")
    kw = primary.connection_pool.connection_kwargs
    for i in range(int(info.get("connected_slaves", 0))):
        r = info.get(f"slave{i}")
        if isinstance(r, dict) and r.get("state") == "online":
            replica = redis.Redis(host=r["ip"], port=int(r["port"]), username=kw.get("username"),
                                  password=kw.get("password"), socket_timeout=60)
            try:
                replica.ping()
            except redis.RedisError:
                continue
            return replica, f"{r['ip']}:{r['port']} (replica)"
    return primary, "primary"


@dataclass
class BackupResult:
    path: str
    records: int
    source: str
    bytes: int
    elapsed_ms: int


def backup(primary: redis.Redis, prefix: str, path: str | Path) -> BackupResult:
    started = time.monotonic()
    node, source = source_node(primary)
    flat = node.eval(_SNAPSHOT, 0, glob_escape(prefix) + ":*")
    lines: list[bytes] = []
    for i in range(0, len(flat), 3):
        key, pttl, dump = flat[i], int(flat[i + 1]), flat[i + 2]
        lines.append(json.dumps({"k": key.decode(errors="surrogateescape"), "t": max(pttl, 0),
                                 "d": base64.b64encode(dump).decode(), "x": _digest(key, dump)}).encode() + b"\n")
    body = b"".join(lines)
    manifest = {"format": FORMAT, "version": VERSION, "prefix": prefix, "taken_at_ms": int(time.time() * 1000),
                "source": source, "records": len(lines), "sha256": hashlib.sha256(body).hexdigest()}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(json.dumps(manifest).encode() + b"\n")
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    # renamed only once complete: a backup interrupted halfway never looks like a backup
    os.replace(tmp, path)
    return BackupResult(str(path), len(lines), source, path.stat().st_size, int((time.monotonic() - started) * 1000))


def read_backup(path: str | Path, prefix: str | None = None) -> tuple[dict, list[tuple[bytes, int, bytes]]]:
    """The manifest and records, every check passed; BackupError naming the first that failed."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    head, _, body = data.partition(b"\n")
    try:
        manifest = json.loads(head)
    except ValueError:
        raise BackupError(f"{path} is not a ctops backup (no manifest line)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not a ctops backup (no manifest line)")
    if manifest.get("version") != VERSION:
        raise BackupError(f"{path} is backup format {manifest.get('version')}; this build reads {VERSION}")
    if prefix is not None and manifest.get("prefix") != prefix:
        raise BackupError(f"{path} holds prefix {manifest.get('prefix')!r}, the target store uses {prefix!r}")
    if hashlib.sha256(body).hexdigest() != manifest.get("sha256"):
        raise BackupError(f"{path} is damaged: its records do not match the manifest's SHA-256")
    records = list(_records(body, path))
    if len(records) != manifest.get("records"):
        raise BackupError(f"{path} is damaged: {len(records)} records, the manifest says {manifest.get('records')}")
    return manifest, records


def _records(body: bytes, path: str | Path) -> Iterator[tuple[bytes, int, bytes]]:
    for n, line in enumerate(body.splitlines(), start=2):
        try:
            rec = json.loads(line)
            key = rec["k"].encode(errors="surrogateescape")
            dump = base64.b64decode(rec["d"], validate=True)
            ttl = int(rec["t"])
        except (ValueError, KeyError, TypeError):
            raise BackupError(f"{path} is damaged at line {n}: not a record") from None
        if _digest(key, dump) != rec.get("x"):
            raise BackupError(f"{path} is damaged at line {n} ({rec['k']}): checksum mismatch")
        yield key, ttl, dump


def restore(target: redis.Redis, path: str | Path, prefix: str, replace: bool = False) -> int:
    """Load a checked backup; refuses a store that already holds keys under the prefix."""
    manifest, records = read_backup(path, prefix)
    if not replace and next(iter(target.scan_iter(match=glob_escape(prefix) + ":*", count=1000)), None) is not None:
        raise BackupError(f"the target store already holds keys under {prefix!r}; restore into an empty store "
                          "(or pass --replace to overwrite the keys the backup holds)")
    pipe = target.pipeline(transaction=False)
    for i, (key, ttl, dump) in enumerate(records, start=1):
        pipe.restore(key, ttl, dump, replace=replace)
        if i % 500 == 0:
            pipe.execute()
    pipe.execute()
    return manifest["records"]

"""`ctops store verify|backup|restore|quarantine`: the integrity of the shared state, on demand.

All of them log in as the admin Redis user of the deployment file (`--config`, default: the one
the demo's state file names).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ctops import integrity, redisconn, statefile
from ctops.config import Deployment, load
from ctops.keys import Keys
from ctops_tools.backup import BackupError, backup, read_backup, restore


def deployment(args: argparse.Namespace) -> Deployment:
    path = args.config
    if not path:
        try:
            path = statefile.read(args.state_file).get("config")
        except statefile.StateFileError as exc:
            raise statefile.StateFileError(f"{exc}; pass --config") from None
        if not path:
            raise statefile.StateFileError("the state file names no deployment file; pass --config")
    return load(path)


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


async def _verify(dep: Deployment, repair: bool) -> integrity.ScrubReport:
    r = redisconn.async_client(dep.redis, "admin", socket_timeout=10.0)
    try:
        keys = Keys(prefix=dep.redis.prefix)
        report = await integrity.scrub(r, keys, repair=repair, reader="ctops store verify")
        await integrity.record_scrub(r, keys, report)
        return report
    finally:
        await r.aclose()


async def _quarantine(dep: Deployment, action: str, qid: str | None) -> tuple[dict[str, Any], str]:
    r = redisconn.async_client(dep.redis, "admin", socket_timeout=10.0)
    keys = Keys(prefix=dep.redis.prefix)
    try:
        if action == "list":
            items = await integrity.quarantine_items(r, keys)
            text = "\n".join(f"{i['qid']}  {i['kind']:<12} {i['key']}  {i['reason']}  {i['outcome']}  "
                             f"session={i['session'] or '-'}" for i in items) or "nothing quarantined"
            return {"quarantined": items}, text
        if not qid:
            raise SystemExit(f"ctops store quarantine {action}: name the quarantine id")
        done = await integrity.release(r, keys, qid, restore=action == "restore", actor="ctops store")
        return done, f"{action}: {qid} ({done['key']})"
    finally:
        await r.aclose()


def run(args: argparse.Namespace) -> int:
    dep = deployment(args)
    try:
        if args.store_command == "verify":
            rep = asyncio.run(_verify(dep, args.repair))
            kinds = ", ".join(f"{k}: {v['checked']} checked, {v['ok']} ok" for k, v in (rep.by_kind or {}).items())
            _print(args, rep.to_dict(), f"{rep.checked} records checked in {rep.elapsed_ms} ms: {rep.ok} ok, "
                   f"{rep.repaired} repaired, {rep.quarantined} quarantined, {rep.corrupt} damaged "
                   f"(not repaired)\n{kinds}" + "".join(f"\n  {d['result']}: {d['key']} ({d['reason']})"
                                                        for d in rep.damaged or []))
            return 1 if rep.corrupt else 0
        if args.store_command == "backup":
            with redisconn.sync_client(dep.redis, "admin", socket_timeout=60.0) as r:
                res = backup(r, dep.redis.prefix, args.path)
            _print(args, res.__dict__, f"backup {res.path}: {res.records} records, {res.bytes} bytes, "
                   f"from the {res.source}, in {res.elapsed_ms} ms")
            return 0
        if args.store_command == "restore":
            if args.check_only:
                manifest, _ = read_backup(args.path, dep.redis.prefix)
                _print(args, manifest, f"{args.path}: intact, {manifest['records']} records")
                return 0
            with redisconn.sync_client(dep.redis, "admin", socket_timeout=60.0) as r:
                n = restore(r, args.path, dep.redis.prefix, args.replace)
            _print(args, {"restored": n, "path": args.path}, f"restored {n} records from {args.path}")
            return 0
        doc, text = asyncio.run(_quarantine(dep, args.action, args.qid))
        _print(args, doc, text)
        return 0
    except (BackupError, integrity.NotQuarantined) as exc:
        print(f"ctops store {args.store_command}: {exc}", file=sys.stderr)
        return 1

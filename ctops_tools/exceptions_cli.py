"""`ctops exceptions list|show ID|tail|ack|resolve|mute|unresolve ID...`: exception groups for
scripts (`--json`) and people. An id may be the first 6 or more hex digits of one (the dispatcher
resolves it; two groups sharing them is an error that lists both)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from ctops.capture.client import ExceptionsClient
from ctops.capture.wire import GroupList, Occurrence, traceback_text
from ctops.opsapi import GroupAction
from ctops.opsclient import OpsClient, OpsError
from ctops_tools import exitcodes
from ctops_tools.status import target

# the CLI's verbs -> the ops API's actions
TRIAGE: dict[str, GroupAction] = {"ack": "acknowledge", "resolve": "resolve", "mute": "mute",
                                  "unresolve": "unresolve"}


def _age(ms: int) -> str:
    s = max(0, time.time() - ms / 1000)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def render_list(gl: GroupList) -> str:
    st = gl.stats
    lines = [f"{gl.total} group(s); {st.events} events kept; dropped {st.dropped}, corrupt {st.corrupt}, "
             f"rejected {st.rejected}", f"{'id':<16}  {'status':<12} {'count':>6} {'last':>5}  {'type':<30} message"]
    for g in gl.groups:
        lines.append(f"{g.id:<16}  {g.status:<12} {g.count:>6} {_age(g.last_seen_ms):>5}  {g.type[:30]:<30} "
                     f"{g.message[:60]}  [{', '.join(g.services)} @ {', '.join(g.hosts)}]")
    return "\n".join(lines)


def render_occurrence(o: Occurrence) -> str:
    e = o.event
    return (f"{o.id}  {time.strftime('%H:%M:%S', time.localtime(e.ts_ms / 1000))}  {e.service}@{e.host}  "
            f"{e.type}: {e.message[:120]}  (group {o.group_id})")


async def _run(args: argparse.Namespace, urls: list[str], token: str | None) -> int:
    ops = OpsClient(urls, token, race_first=True)
    api = ExceptionsClient(ops)
    try:
        if args.exc_command == "list":
            gl = await api.groups(sort=args.sort, status=args.status, q=args.query, limit=args.limit)
            print(gl.model_dump_json(indent=2) if args.json else render_list(gl))
        elif args.exc_command == "show":
            d = await api.group(args.id)
            if args.json:
                print(d.model_dump_json(indent=2))
            else:
                g = d.group
                print(f"{g.id}  {g.type}: {g.message}\nstatus {g.status}"
                      + (f", assigned to {g.assignee}" if g.assignee else "")
                      + f"; {g.count} events, first {_age(g.first_seen_ms)} ago, last {_age(g.last_seen_ms)} ago\n"
                      f"services {', '.join(g.services)}; hosts {', '.join(g.hosts)}\n")
                if d.latest:
                    print(traceback_text(d.latest) + "\n")
                for e in d.recent:
                    print(f"  {e.event_id}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.ts_ms / 1000))}"
                          f"  {e.service}@{e.host}  {e.message[:100]}")
        elif args.exc_command in TRIAGE:
            return await triage(api, args)
        else:
            cursor = args.after
            while True:
                page = await api.tail(cursor, args.limit if not cursor or not args.follow else 500, args.query)
                for o in page.items:
                    print(o.model_dump_json() if args.json else render_occurrence(o), flush=True)
                cursor = page.cursor or cursor
                if not args.follow:
                    break
                await asyncio.sleep(1.0)
    finally:
        await ops.aclose()
    return exitcodes.OK


async def triage(api: ExceptionsClient, args: argparse.Namespace) -> int:
    """Each id in turn, each its own audited action: one unknown or ambiguous id is reported and
    the others still done (exit 1); a refused token stops at the first (exit 4, from cli.main)."""
    action = TRIAGE[args.exc_command]
    failed = 0
    for given in args.ids:
        try:
            r = await api.act(given, action, minutes=args.minutes if action == "mute" else None)
        except OpsError as exc:
            if exc.status in (401, 403):
                raise
            failed += 1
            print(f"ctops exceptions {args.exc_command}: {given}: {_sentence(exc)}", file=sys.stderr)
            if args.json:
                print(json.dumps({"id": given, "ok": False, "status": exc.status, "error": exc.error,
                                  "detail": exc.detail}), flush=True)
            continue
        g = r.group
        if args.json:
            print(json.dumps({"id": given, "ok": True, "group": g.id, "status": g.status, "by": r.by}), flush=True)
        else:
            muted = f" until {time.strftime('%H:%M', time.localtime(g.mute_until_ms / 1000))}" \
                if g.status == "muted" and g.mute_until_ms else ""
            print(f"{g.id}  {g.status}{muted}  {g.type}: {g.message[:80]}", flush=True)
    return exitcodes.FAILED if failed else exitcodes.OK


def _sentence(exc: OpsError) -> str:
    """An ops API error as a line: candidates of an ambiguous id listed, never a raw dict."""
    detail = exc.detail if isinstance(exc.detail, dict) else {}
    if exc.status == 409 and "candidates" in detail:
        more = detail.get("count", 0) - len(detail["candidates"])
        return f"{exc.error}: {', '.join(detail['candidates'])}" + (f" and {more} more" if more > 0 else "")
    return exc.error


def run(args: argparse.Namespace) -> int:
    """Errors no action handles (no dispatcher, a refused token) end in ctops_tools.cli.main."""
    urls, token = target(args, getattr(args, "role", "viewer"))
    try:
        return asyncio.run(_run(args, urls, token))
    except OpsError as exc:
        if exc.status in (401, 403):
            raise
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.error, "status": exc.status, "detail": exc.detail}), file=sys.stderr)
        print(f"ctops exceptions: {_sentence(exc)}", file=sys.stderr)
        return exitcodes.FAILED

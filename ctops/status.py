"""`ctops status`: the cluster as the leading dispatcher sees it, as a table or as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ctops import statefile
from ctops.opsclient import OpsClient, OpsError, Unreachable
from ctops.wire import ClusterState


def target(args: argparse.Namespace, role: str = "viewer") -> tuple[list[str], str | None]:
    """Explicit --url/--token win; otherwise the demo's state file."""
    token = args.token or os.environ.get("CTOPS_TOKEN")
    if args.url:
        return [u.rstrip("/") for u in args.url], token
    doc = statefile.read(args.state_file)
    return statefile.ops_urls(doc), token or statefile.token(doc, role)


async def leader_state(urls: list[str], token: str | None) -> ClusterState:
    client = OpsClient(urls, token)
    try:
        return await client.state(prefer_leader=True)
    finally:
        await client.aclose()


def render(st: ClusterState) -> str:
    lines = [f"cluster {st.cluster}: leader {st.leader or '-'} (served by {st.served_by})", "", "dispatchers:"]
    for d in st.dispatchers:
        lines.append(f"  {d.name:<10} {d.role:<8} {'healthy' if d.healthy else 'UNHEALTHY':<10} epoch {d.epoch}")
    lines += ["", f"  {'server':<12} {'state':<9} {'sessions':>8}  {'host':<8} {'hb age':>8}  diagnosis"]
    for s in st.servers:
        age = f"{s.heartbeat_age_ms} ms" if s.heartbeat_age_ms is not None else "-"
        why = f"{s.diagnosis}: {s.diagnosis_detail}" if s.diagnosis_detail else s.diagnosis
        lines.append(f"  {s.name:<12} {s.state:<9} {s.active_sessions:>8}  {s.host:<8} {age:>8}  {why}")
    lines += ["", f"  {'host':<12} {'state':<9} {'hb age':>8}  processes"]
    for h in st.hosts:
        age = f"{h.heartbeat_age_ms} ms" if h.heartbeat_age_ms is not None else "-"
        procs = ", ".join(f"{p.name}:{p.state}" for p in h.processes)
        lines.append(f"  {h.name:<12} {h.state:<9} {age:>8}  {procs}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        urls, token = target(args)
        st = asyncio.run(leader_state(urls, token))
    except statefile.StateFileError as exc:
        print(f"ctops status: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"ctops status: no dispatcher answered: {exc}", file=sys.stderr)
        return 1
    except OpsError as exc:
        print(f"ctops status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st.model_dump(mode="json"), indent=2))
    else:
        print(render(st))
    return 0

"""`ctops status`: the cluster as the leading dispatcher sees it, as a table or as JSON.

The exit code follows the monitoring-plugin convention (Nagios, Icinga, Sensu), so the command
is a check as it is: 0 healthy, 1 degraded, 2 critical, 3 unknown (the state could not be read
for a reason that says nothing about the cluster: a bad state file, a rejected token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ctops import statefile
from ctops.opsclient import OpsClient, OpsError, Unreachable
from ctops.wire import ClusterState, LLMProviderView, SpareView
from ctops_tools.exitcodes import CRITICAL, DEGRADED, OK, UNKNOWN, refused, token_source

VERDICT = {OK: "OK", DEGRADED: "DEGRADED", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


def target(args: argparse.Namespace, role: str = "viewer") -> tuple[list[str], str | None]:
    """Explicit --url/--token win; otherwise the demo's state file."""
    token = args.token or os.environ.get("CTOPS_TOKEN")
    if args.url:
        return [u.rstrip("/") for u in args.url], token
    doc = statefile.read(args.state_file)
    return statefile.ops_urls(doc), token or statefile.token(doc, role)


async def leader_state(urls: list[str], token: str | None) -> ClusterState:
    return (await leader_view(urls, token))[0]


async def leader_view(urls: list[str], token: str | None) -> tuple[ClusterState, list[LLMProviderView] | None]:
    """The state as the leader sees it, and its LLM pool (None when the pool could not be read:
    the state still makes a verdict)."""
    client = OpsClient(urls, token, race_first=True)
    try:
        st = await client.state(prefer_leader=True)
        try:
            providers: list[LLMProviderView] | None = await client.providers()
        except (OpsError, Unreachable):
            providers = None
        return st, providers
    finally:
        await client.aclose()


def assess(st: ClusterState, providers: list[LLMProviderView] | None = None) -> tuple[int, list[str]]:
    """The exit code and its reasons, worst first.

    Critical: no leader, no server up (every one disabled, down or draining: learners get 503), no
    LLM provider that can answer (reviews fail), the store has no primary or does not answer.
    Degraded: a server not up, a host lost, a dispatcher unhealthy, an LLM provider not up, a store
    replica or Sentinel not up."""
    critical: list[str] = []
    degraded: list[str] = []
    if not st.leader:
        critical.append("no leader")
    if not any(s.state == "up" for s in st.servers):
        critical.append("no server up")
    if providers:
        if not any(p.state not in ("down", "disabled") for p in providers):
            critical.append("no LLM provider can answer")
        degraded += [f"LLM provider {p.name} {p.state.replace('_', ' ')}" for p in providers if p.state != "up"]
    store = st.store
    if store is not None:
        if store.primary is None:
            critical.append("store has no primary")
        elif not store.available:
            critical.append(f"store unavailable ({store.primary} not answering)")
        degraded += [f"store replica {r.name} {r.state}" for r in store.replicas if r.state != "up"]
        degraded += [f"sentinel {s.name} {s.state}" for s in store.sentinels if s.state != "up"]
    degraded += [f"{s.name} {s.state}" for s in st.servers if s.state != "up"]
    degraded += [f"host {h.name} lost" for h in st.hosts if h.state == "lost"]
    degraded += [f"dispatcher {d.name} unhealthy" for d in st.dispatchers if not d.healthy]
    if critical:
        return CRITICAL, critical + degraded
    return (DEGRADED, degraded) if degraded else (OK, [])


def verdict_line(code: int, reasons: list[str]) -> str:
    return f"status: {VERDICT[code]}" + (f" - {'; '.join(reasons)}" if reasons else "")


def render(st: ClusterState) -> str:
    lines = [f"cluster {st.cluster}: leader {st.leader or '-'} (served by {st.served_by})", "", "dispatchers:"]
    for d in st.dispatchers:
        lines.append(f"  {d.name:<10} {d.role:<8} {'healthy' if d.healthy else 'UNHEALTHY':<10} epoch {d.epoch}")
    lines += ["", f"  {'server':<12} {'state':<9} {'sessions':>8}  {'host':<8} {'hb age':>8}  diagnosis"]
    for s in st.servers:
        age = f"{s.heartbeat_age_ms} ms" if s.heartbeat_age_ms is not None else "-"
        why = f"{s.diagnosis}: {s.diagnosis_detail}" if s.diagnosis_detail else s.diagnosis
        lines.append(f"  {s.name:<12} {s.state:<9} {s.active_sessions:>8}  {s.host:<8} {age:>8}  {why}")
    if st.store is not None:
        lines += ["", _store_line(st)]
        nodes = [(r.name, "replica", r.state, r.lag_ms) for r in st.store.replicas]
        nodes += [(s.name, "sentinel", s.state, None) for s in st.store.sentinels]
        for name, role, state, lag in nodes:
            lines.append(f"  {name:<12} {role:<9} {state:<8}" + (f" lag {lag} ms" if lag is not None else ""))
    lines += ["", f"  {'host':<12} {'state':<9} {'hb age':>8}  processes"]
    for h in st.hosts:
        age = f"{h.heartbeat_age_ms} ms" if h.heartbeat_age_ms is not None else "-"
        procs = ", ".join(f"{p.name}:{p.state}" + (f" (spare {_spare_text(p.spare)})" if p.spare else "")
                          for p in h.processes)
        lines.append(f"  {h.name:<12} {h.state:<9} {age:>8}  {procs}")
    lines += missing_spares(st)
    return "\n".join(lines)


def _spare_text(sp: SpareView) -> str:
    return sp.state.replace("_", " ") + (f" pid {sp.pid}" if sp.pid else "")


def missing_spares(st: ClusterState) -> list[str]:
    """A line for each server configured with a warm spare that has none at hand: its next restart is cold."""
    return [f"  no warm spare: {p.name} on {h.name} (spare {_spare_text(p.spare)}); a restart now starts it cold"
            for h in st.hosts if h.state != "lost"
            for p in h.processes if p.spare is not None and p.spare.state in ("none", "handed_over")]


def _store_line(st: ClusterState) -> str:
    s = st.store
    assert s is not None
    state = "available" if s.available else "UNAVAILABLE"
    line = f"store ({s.mode}): primary {s.primary or 'NONE'}, {state}, writes unconfirmed {s.writes_unconfirmed}"
    if s.failover_in_progress:
        line += ", failover in progress"
    if s.diagnosis:
        line += f"\n  {s.diagnosis}"
    return line


def run(args: argparse.Namespace) -> int:
    quiet = getattr(args, "quiet", False)

    def fail(code: int, message: str) -> int:
        if not quiet:
            print(f"ctops status: {message}", file=sys.stderr)
        return code

    try:
        urls, token = target(args)
        st, providers = asyncio.run(leader_view(urls, token))
    except statefile.StateFileError as exc:
        return fail(UNKNOWN, str(exc))
    except Unreachable as exc:
        return fail(CRITICAL, f"no dispatcher answered: {exc}")
    except OpsError as exc:
        # a dispatcher that answers 5xx is in trouble; 401/403/404 say nothing about the cluster
        if exc.status in (401, 403):
            return fail(UNKNOWN, refused(exc.status, exc.error, token_source(args, "viewer")))
        return fail(CRITICAL if exc.status >= 500 else UNKNOWN, str(exc))
    code, reasons = assess(st, providers)
    args.exit_code = code  # the verdict stands if the reader of the output leaves early (`| head`)
    if quiet:
        return code
    if args.json:
        print(json.dumps(st.model_dump(mode="json"), indent=2))
    else:
        print(render(st))
        print(verdict_line(code, reasons))
    return code

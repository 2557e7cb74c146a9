"""The two header lines: who serves and leads, and counts of dispatchers, hosts and servers by state."""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.widgets import Static

from console.client import Whoami
from console.format import STATE_STYLE
from ctops.wire import ClusterState

_HOST_STYLE = {"alive": "green", "late": "bold yellow", "lost": "bold red"}


def summary_text(state: ClusterState | None, who: Whoami | None, stale: bool, paused: bool = False) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    if state is None:
        t.append(" ctops", style="bold")
        t.append("  connecting…", style="dim")
        return t
    t.append(f" {state.cluster}", style="bold")
    t.append("  served by ")
    t.append(state.served_by, style="bold")
    t.append("  leader ")
    t.append(state.leader or "NONE", style="bold" if state.leader else "bold red")
    if who is not None:
        t.append("  you ")
        t.append(f"{who.name} ({who.role})", style="bold" if who.role == "operator" else "bold yellow")
    if stale:
        t.append("  STALE", style="bold reverse red")
    if paused:
        t.append("  PAUSED", style="bold reverse yellow")
    t.append("\n")

    healthy = sum(1 for d in state.dispatchers if d.healthy)
    t.append(" dispatchers ")
    t.append(f"{healthy}/{len(state.dispatchers)}", style="" if healthy == len(state.dispatchers) else "yellow")
    t.append(" healthy · hosts")
    hosts = Counter(h.state for h in state.hosts)
    for name in ("alive", "late", "lost"):
        if hosts[name]:
            t.append(f" {hosts[name]} {name}", style=_HOST_STYLE[name])
    if not state.hosts:
        t.append(" 0")
    t.append(f" · servers {len(state.servers)}:")
    servers = Counter(s.state for s in state.servers)
    for name, (glyph, style) in STATE_STYLE.items():
        if servers[name]:
            t.append(f" {servers[name]} {glyph} {name}", style=style)
    return t


class ClusterSummary(Static):
    def show(self, state: ClusterState | None, who: Whoami | None, stale: bool, paused: bool = False) -> None:
        self.update(summary_text(state, who, stale, paused))

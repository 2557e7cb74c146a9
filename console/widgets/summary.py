"""The header: who serves and leads, then counts of dispatchers, hosts and servers by state.

Built from short parts that wrap between parts, never inside one, so 80 columns stay readable.
"""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.events import Resize
from textual.widgets import Static

from console.capacity import provider_serves, servers_out
from console.client import Whoami
from console.format import HOST_STYLE as _HOST_STYLE
from console.format import STATE_STYLE
from ctops.wire import ClusterState, LLMProviderView

_SEP = " · "


def summary_parts(
    state: ClusterState | None, who: Whoami | None, stale: bool, paused: bool = False,
    providers: list[LLMProviderView] | None = None,
) -> list[list[Text]]:
    """Lines of parts; the widget fits each line's parts into its width.

    While STALE every figure reads "last known", without its colours: none of them is current."""
    flags: list[Text] = []
    if stale:
        flags.append(Text(" STALE ", style="bold reverse red"))
    if paused:
        flags.append(Text(" PAUSED ", style="bold reverse yellow"))
    if state is None:
        return [[*flags, Text("ctops", style="bold"), Text("connecting…", style="dim")]]

    first = [*flags, Text(state.cluster, style="bold")]
    first.append(Text.assemble("served by ", (state.served_by, "bold")))
    first.append(Text.assemble("leader ", (state.leader or "NONE", "bold" if state.leader else "bold reverse red")))
    healthy = sum(1 for d in state.dispatchers if d.healthy)
    first.append(Text.assemble("dispatchers ", (f"{healthy}/{len(state.dispatchers)}",
                                                "" if healthy == len(state.dispatchers) else "bold yellow"),
                               " healthy"))

    servers: Counter[str] = Counter(s.state for s in state.servers)
    by_state = [(f"{servers[n]} {g} {n}", style) for n, (g, style) in STATE_STYLE.items() if servers[n]]
    second = [Text.assemble(f"servers {len(state.servers)}: ", *_spaced(by_state))]
    if servers_out(state.servers):
        second = [Text.assemble((second[0].plain, "bold red"), " ", ("NO CAPACITY", "bold reverse red"))]
    hosts = Counter(h.state for h in state.hosts)
    by_host = [(f"{hosts[n]} {n}", _HOST_STYLE[n]) for n in ("alive", "late", "lost") if hosts[n]]
    second.append(Text.assemble(f"hosts {len(state.hosts)}: ", *_spaced(by_host)))
    if providers:
        second.append(_llm_part(providers))
    if state.store is not None:
        second.append(_store_part(state))
    if stale:
        first[len(flags) + 1:] = [_last_known(p) for p in first[len(flags) + 1:]]  # the name stays a name
        second = [_last_known(p) for p in second]
    if who is not None:
        first.append(Text.assemble("you ", (f"{who.name} ({who.role})",
                                            "bold" if who.role == "operator" else "bold yellow")))
    return [first, second]


def _last_known(part: Text) -> Text:
    return Text.assemble(("last known ", "italic"), (part.plain, "dim"))


def _llm_part(providers: list[LLMProviderView]) -> Text:
    serving = sum(1 for p in providers if provider_serves(p))
    style = "bold reverse red" if not serving else "" if serving == len(providers) else "bold yellow"
    pinned = next((p.name for p in providers if p.pinned), None)
    part = Text.assemble("llm ", (f"{serving}/{len(providers)}", style), " in rotation")
    if pinned:
        part.append(f" pinned {pinned}", style="cyan")
    return part


def _store_part(state: ClusterState) -> Text:
    store = state.store
    assert store is not None
    if not store.available or store.primary is None:
        return Text.assemble("store ", ("UNAVAILABLE" if store.primary else "NO PRIMARY", "bold reverse red"))
    part = Text.assemble("store ", (store.primary, "bold"))
    if store.replicas:
        up = sum(1 for r in store.replicas if r.state == "up")
        part.append_text(Text.assemble(" ", (f"{up}/{len(store.replicas)}",
                                              "" if up == len(store.replicas) else "bold yellow"), " replicas"))
    if store.failover_in_progress:
        part.append(" failing over", style="bold yellow")
    return part


def _spaced(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if i:
            out.append((" ", ""))
        out.append(item)
    return out or [("none", "dim")]


def fit(lines: list[list[Text]], width: int) -> Text:
    """Greedy: a part that would overflow starts a new line; a part wider than the line is cut."""
    out = Text(no_wrap=True, overflow="ellipsis")
    rows: list[Text] = []
    for parts in lines:
        row = Text(" ")
        for part in parts:
            joiner = "" if len(row) == 1 else _SEP
            if len(row) > 1 and len(row) + len(joiner) + len(part) > width > 0:
                rows.append(row)
                row, joiner = Text(" "), ""
            row.append(joiner)
            row.append_text(part)
        rows.append(row)
    out.append_text(Text("\n").join(rows))
    return out


class ClusterSummary(Static):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._lines: list[list[Text]] = summary_parts(None, None, False)
        self._drawn = False

    def show(self, state: ClusterState | None, who: Whoami | None, stale: bool, paused: bool = False,
             providers: list[LLMProviderView] | None = None) -> bool:
        """Returns whether anything changed; an unchanged header is not redrawn."""
        lines = summary_parts(state, who, stale, paused, providers)
        if lines == self._lines and self._drawn:
            return False
        self._lines = lines
        self._drawn = True
        self._draw(self.size.width)
        return True

    def on_resize(self, event: Resize) -> None:
        self._draw(event.size.width)

    def _draw(self, width: int) -> None:
        text = fit(self._lines, width)
        self.update(text)
        # the height follows the wrapped lines now, not at the next layout pass: a header that grew
        # a line (the role, the LLM part) must not push its last line under the tabs
        self.styles.height = len(text.plain.split("\n"))

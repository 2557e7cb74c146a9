"""Enter on a row: everything about what the row shows, k9s's `describe`.

Every field of the object (as the last fetch has it), its errors with their ages, the recent events
about it (and its host), and the audit entries naming it. It reads the app's last fetch on every
refresh, so it stays live while open; the audit entries are fetched by a worker. It scrolls, so it fits
80×24 however much there is; at 80 columns fields are one per line, from 120 columns two.

A process's log tail is not here: the ops API has no route that reads a supervised process's log
through its agent (only restart/stop/start go that way), so the view says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, cast

from pydantic import BaseModel
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.events import Resize
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Static

import console.format
from console.client import AuditEntry
from console.format import SEVERITY_STYLE, split_process_key
from console.widgets.live_table import LiveTable
from console.widgets.tables import DispatchersTable, ProcessesTable, ProvidersTable, ServersTable
from ctops.wire import Event

if TYPE_CHECKING:
    from console.app import ConsoleApp

EVENTS_SHOWN = 8
AUDIT_SHOWN = 8
TWO_COLUMNS_FROM = 120
# fields that are durations ("how long ago"), not points in time
_AGES = ("heartbeat_age_ms", "lease_age_ms", "peer_heartbeat_age_ms", "retry_after_ms", "reopen_in_ms")


@dataclass
class AuditFetched(Message):
    entries: list[AuditEntry] | None
    error: str | None = None


def ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "—"
    s = max(0, now_ms - ms) / 1000
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, console.format.LOCAL_TZ).strftime("%H:%M:%S")


def _value(name: str, v: object, now_ms: int) -> str:
    if v is None:
        return "—"
    if name in _AGES and isinstance(v, int | float):
        return f"{v / 1000:.1f} s"
    if name.endswith("_ms") and isinstance(v, int) and v > 1_000_000_000_000:  # a point in time
        return f"{_clock(v)} ({ago(v, now_ms)})"
    if name.endswith("_bytes") and isinstance(v, int):
        return f"{v >> 20} MiB"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def fields(model: BaseModel, now_ms: int, prefix: str = "") -> list[tuple[str, str]]:
    """Every field, nested models flattened ("metrics.cpu_percent"); lists are shown elsewhere."""
    out: list[tuple[str, str]] = []
    for name in type(model).model_fields:
        v = getattr(model, name)
        if isinstance(v, BaseModel):
            out += fields(v, now_ms, f"{prefix}{name}.")
        elif isinstance(v, list):
            out.append((prefix + name, f"{len(v)} item(s)"))
        else:
            out.append((prefix + name, _value(name, v, now_ms)))
    return out


@dataclass
class Subject:
    """What a row stands for: its title, fields, errors, and the names events and audit entries use."""

    title: str
    fields: list[tuple[str, str]]
    errors: list[str]
    names: set[str]  # event targets and audit targets that concern it
    notes: list[str]


def subject(app: ConsoleApp, table: LiveTable, key: str) -> Subject | None:
    st = app.cluster
    now = st.now_ms if st is not None else 0
    if isinstance(table, ServersTable) and st is not None:
        s = next((s for s in st.servers if s.name == key), None)
        if s is not None:
            errors = []
            if s.diagnosis not in ("ok", "admin") or s.diagnosis_detail:
                errors.append(f"diagnosis {s.diagnosis}" + (f": {s.diagnosis_detail}" if s.diagnosis_detail else ""))
            if s.last_error:
                when = f" (last check {ago(s.last_check_ms, now)})" if s.last_check_ms else ""
                history = " — history: the server is up again" if s.state == "up" else ""
                errors.append(f"last error: {s.last_error}{when}{history}")
            return Subject(f"Server {s.name}  {s.state}", fields(s, now), errors, {s.name, s.host}, [])
    if isinstance(table, ProcessesTable) and st is not None:
        host, process = split_process_key(key)
        h = next((h for h in st.hosts if h.name == host), None)
        if h is not None:
            p = next((p for p in h.processes if p.name == process), None)
            hf = [(f"host.{n}", v) for n, v in fields(h, now) if n != "processes"]
            errors = [f"host {h.name} is {h.state}: the values below are the last it reported"] \
                if h.state != "alive" else []
            notes = ["Log tail: not available — the ops API has no route that reads a process's log through "
                     "its agent (only restart, stop and start go that way)."]
            if p is None:
                return Subject(f"Host {h.name}  {h.state}", hf, errors, {h.name}, [])
            if p.last_exit:
                errors.append(f"last exit: {p.last_exit}")
            if p.state not in ("running",):
                errors.append(f"process {p.state}" + (f" after {p.restarts} restart(s)" if p.restarts else ""))
            return Subject(f"Process {p.name} on {h.name}  {p.state}", fields(p, now) + hf, errors,
                           {h.name, p.name, key}, notes)
    if isinstance(table, DispatchersTable) and st is not None:
        d = next((d for d in st.dispatchers if d.name == key), None)
        if d is not None:
            errors = [] if d.healthy else ["unhealthy: its peers do not hear from it"]
            return Subject(f"Dispatcher {d.name}  {d.role}", fields(d, now), errors,
                           {d.name, f"dispatcher:{d.name}"}, [])
    if isinstance(table, ProvidersTable):
        p2 = next((p for p in app.providers or [] if p.name == key), None)
        if p2 is not None:
            errors = [f"last error: {p2.last_error}"] if getattr(p2, "last_error", None) else []
            return Subject(f"LLM provider {p2.name}  {p2.state}", fields(p2, now), errors, {p2.name}, [])
    raw = table.shown(key)
    if raw is None:
        return None
    # any other table (store nodes, quarantined records): the row's own columns
    cells = [(c.label.plain, c.render(v).plain or "—") for c, v in zip(table.COLUMNS, raw, strict=True)]
    return Subject(key, cells, [], {key}, [])


def related_events(events: Iterable[Event], names: set[str]) -> list[Event]:
    # the target, the agent that reported it ("agent:host-9"), or the name a message starts with
    out = [e for e in events if e.target in names or e.source.partition(":")[2] in names
           or e.message.split(":")[0] in names]
    return out[::-1][:EVENTS_SHOWN]


def related_audit(entries: Iterable[AuditEntry], names: set[str]) -> list[AuditEntry]:
    return [a for a in entries if a.target in names or any(part in names for part in a.target.split("/"))][:AUDIT_SHOWN]


def render(sub: Subject, events: list[Event], audit: list[AuditEntry] | None, audit_error: str | None,
           now_ms: int, width: int) -> RenderableType:
    parts: list[RenderableType] = [Text(sub.title, style="bold")]
    if sub.errors:
        parts.append(Text(""))
        parts += [Text("✖ " + e, style="bold red") for e in sub.errors]
    parts += [Text(""), Text("Recent events", style="bold underline")]
    if events:
        for e in events:
            glyph, style = SEVERITY_STYLE.get(e.severity, ("?", ""))
            parts.append(Text.assemble((f"{ago(e.ts_ms, now_ms):>8} ", "dim"), (f"{glyph} {e.kind} ", style),
                                       e.message, overflow="fold"))
    else:
        parts.append(Text("none in the events this console has seen", style="dim"))
    parts += [Text(""), Text("Audit", style="bold underline")]
    if audit_error:
        parts.append(Text(f"could not read the audit log: {audit_error}", style="yellow"))
    elif audit is None:
        parts.append(Text("reading…", style="dim"))
    elif audit:
        for a in audit:
            parts.append(Text.assemble((f"{ago(a.ts_ms, now_ms):>8} ", "dim"), (a.who, "bold"), f" ({a.role}) ",
                                       (a.action, "cyan"), f" {a.target}: {a.result}", overflow="fold"))
    else:
        parts.append(Text("no audit entries name it", style="dim"))
    # what is wrong and what happened come first, so 80x24 shows them without scrolling; fields below
    grid = Table.grid(padding=(0, 2, 0, 0), expand=False)
    label = max((len(k) for k, _ in sub.fields), default=0)
    pairs = 2 if width >= TWO_COLUMNS_FROM else 1
    for _ in range(pairs):
        grid.add_column(style="dim", no_wrap=True, min_width=label)
        grid.add_column(overflow="fold", max_width=max(16, (width - 4) // pairs - label - 4))
    rows = sub.fields
    half = (len(rows) + pairs - 1) // pairs
    for i in range(half):
        cells: list[str] = []
        for j in range(pairs):
            k = i + j * half
            cells += list(rows[k]) if k < len(rows) else ["", ""]
        grid.add_row(*cells)
    for n in sub.notes:
        parts += [Text(""), Text(n, style="dim")]
    parts += [Text(""), Text("Fields", style="bold underline"), grid]
    return Group(*parts)


class DescribeScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,enter", "dismiss", "Back", id="describe.close"),
                Binding("j", "scroll('down')", "Down", show=False, id="describe.down"),
                Binding("k", "scroll('up')", "Up", show=False, id="describe.up")]
    DEFAULT_CSS = """
    DescribeScreen { background: $background; }
    #describe-box { height: 1fr; padding: 0 1; }
    #describe-hint { height: 1; background: $panel; padding: 0 1; dock: bottom; }
    """

    def __init__(self, table: LiveTable, key: str) -> None:
        super().__init__()
        self.table = table
        self.key = key
        self.audit: list[AuditEntry] | None = None
        self.audit_error: str | None = None

    @property
    def console(self) -> ConsoleApp:
        return cast("ConsoleApp", self.app)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="describe-box"):
            yield Static(id="describe")
        yield Static("[b]Esc[/b] back · [b]↑↓ PgUp PgDn[/b] scroll · live: follows every refresh", id="describe-hint")

    def on_mount(self) -> None:
        self.query_one("#describe-box").focus()
        self.show()
        self.fetch_audit()
        self.set_interval(max(1.0, self.console.interval), self._tick)

    def _tick(self) -> None:
        self.show()
        self.fetch_audit()

    def on_resize(self, _: Resize) -> None:
        self.show()

    def action_scroll(self, where: str) -> None:
        box = self.query_one("#describe-box", VerticalScroll)
        box.scroll_down() if where == "down" else box.scroll_up()

    @work(exclusive=True, group="describe-audit")
    async def fetch_audit(self) -> None:
        try:
            entries = await self.console.source.audit_log(200)
        except Exception as exc:  # noqa: BLE001 - the rest of the view stands without it
            self.post_message(AuditFetched(None, str(exc)))
        else:
            self.post_message(AuditFetched(entries))

    @on(AuditFetched)
    def _audit_fetched(self, msg: AuditFetched) -> None:
        self.audit, self.audit_error = msg.entries, msg.error
        self.show()

    def show(self) -> None:
        app = self.console
        sub = subject(app, self.table, self.key)
        now = app.cluster.now_ms if app.cluster is not None else 0
        out = self.query_one("#describe", Static)
        if sub is None:
            out.update(Text(f"{self.key} is no longer in the cluster state.", style="yellow"))
            return
        audit = None if self.audit is None else related_audit(self.audit, sub.names)
        out.update(render(sub, related_events(app.events_seen, sub.names), audit, self.audit_error, now,
                          self.size.width or app.size.width))

"""`A` or `:audit`: the audit log, newest first — who did what to which target, when, and the answer.

A live table like the others (filter with `/`, sort with `o`, j/k/g/G, Enter describes an entry); a
worker reads GET /api/v1/audit every refresh interval and the table diff-updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Static

from console.client import AuditEntry
from console.format import Column, Raw, _clock, _plain
from console.source import Source
from console.widgets.live_table import LiveTable

if TYPE_CHECKING:
    from console.app import ConsoleApp

READ = 500


def _result(v: object) -> Text:
    text = str(v or "")
    refused = text.startswith(("refused", "failed", "timeout", "unknown", "denied"))
    return Text(text, style="yellow" if refused else "", no_wrap=True, overflow="ellipsis")


AUDIT_COLUMNS: tuple[Column, ...] = (
    Column("at", Text("When"), 14, _clock),
    Column("who", Text("Who"), 8, lambda v: Text(str(v), style="bold", no_wrap=True, overflow="ellipsis")),
    Column("action", Text("Action"), 10, lambda v: Text(str(v), style="cyan", no_wrap=True, overflow="ellipsis")),
    Column("target", Text("Target"), 18, _plain),
    Column("result", Text("Result"), 40, _result),
    Column("role", Text("Role"), 8, _plain),
    Column("via", Text("Via"), 14, _plain),
)


class AuditTable(LiveTable):
    COLUMNS = AUDIT_COLUMNS

    def is_fault(self, raw: Raw) -> bool:
        return _result(raw[4]).style == "yellow"  # refused, failed, timed out


def audit_rows(entries: list[AuditEntry]) -> dict[str, Raw]:
    # keyed by time then position, so the natural order is by time; the screen shows it reversed
    n = len(entries)
    return {f"{a.ts_ms}-{n - i:06d}": (a.ts_ms, a.who, a.action, a.target, a.result, a.role, a.via)
            for i, a in enumerate(entries)}


@dataclass
class AuditRead(Message):
    entries: list[AuditEntry] | None
    error: str | None = None


class AuditScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "dismiss", "Back", id="audit.close"),
                Binding("r", "refresh", "Refresh", id="audit.refresh")]
    DEFAULT_CSS = """
    AuditScreen { background: $background; }
    #audit-title { height: 1; background: $panel; padding: 0 1; }
    #audit { height: 1fr; }
    #audit-detail { height: auto; max-height: 6; padding: 0 1; border-top: solid $primary-darken-2; }
    """

    def __init__(self, source: Source, *, interval: float = 1.0) -> None:
        super().__init__()
        self.source = source
        self.interval = interval
        self.error: str | None = None
        self.count = 0
        self.applied = 0  # reads applied: tests wait on it
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Static("[b]Audit log[/b]", id="audit-title")
        yield AuditTable(id="audit")
        yield Static("", id="audit-detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(AuditTable)
        table.set_view(reverse=True)  # newest first
        table.focus()
        self.read()

    def on_unmount(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    @work(exclusive=True, group="audit")
    async def read(self) -> None:
        try:
            entries = await self.source.audit_log(READ)
        except Exception as exc:  # noqa: BLE001 - shown in the title; the last entries stay
            self.post_message(AuditRead(None, str(exc)))
        else:
            self.post_message(AuditRead(entries))

    @on(AuditRead)
    def _read(self, msg: AuditRead) -> None:
        table = self.query_one(AuditTable)
        self.error = msg.error
        if msg.entries is not None:
            self.count = len(msg.entries)
            table.apply(audit_rows(msg.entries))
        self._title()
        self.applied += 1
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(self.interval, self.read)

    @on(LiveTable.ViewChanged)
    def _title(self) -> None:
        table = self.query_one(AuditTable)
        note = table.view_note() or f"{self.count} entries"
        err = f"  [b red]could not read: {self.error[:80]}[/]" if self.error else ""
        self.query_one("#audit-title", Static).update(
            f"[b]Audit log[/b] · {note} · [dim]newest first · / filter · Esc back[/dim]{err}")

    @on(DataTable.RowHighlighted)
    @on(DataTable.RowSelected)
    def _detail(self) -> None:
        """The selected entry in full: the result column is cut at narrow widths."""
        table = self.query_one(AuditTable)
        key = table.selected
        raw = table.shown(key) if key else None
        out = self.query_one("#audit-detail", Static)
        if raw is None:
            out.update("")
            return
        at, who, action, target, result, role, via = raw
        out.update(Text.assemble(_clock(at), "  ", (str(who), "bold"), f" ({role}) ", (str(action), "cyan"),
                                 f" {target} via {via}\n", str(result)))

    def action_refresh(self) -> None:
        self.read()

    @property
    def console(self) -> ConsoleApp:
        return cast("ConsoleApp", self.app)

"""What the console said, and one event in full: the notification history (`N`) and the event detail
(Enter on an event). Both only render what the app already holds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

import console.format
from console.format import ago, event_detail
from ctops.wire import Event

_STYLE = {"information": ("·", "dim"), "warning": ("▲", "yellow"), "error": ("✖", "bold red")}


@dataclass(frozen=True, slots=True)
class Notice:
    """One thing the console told staff. `key` names the incident: a later notice with the same key
    replaces the earlier one on screen (a "No leader" by the "Leader changed" that resolves it)."""

    severity: str
    title: str
    message: str
    key: str | None = None
    at_ms: int = 0  # wall clock


def notice_line(n: Notice, now_ms: int, replaced: bool = False) -> Text:
    glyph, style = _STYLE.get(n.severity, ("?", ""))
    stamp = datetime.fromtimestamp(n.at_ms / 1000, console.format.LOCAL_TZ).strftime("%H:%M:%S")
    line = Text.assemble((stamp, "dim"), " ", (f"{ago(now_ms - n.at_ms):>4} ago", "dim"), " ",
                         (f"{glyph} {n.title}", "dim" if replaced else style), ": ", n.message)
    if replaced:
        line.append("  (superseded)", style="dim italic")
    return line


def history(notices: Iterable[Notice], now_ms: int) -> Text:
    """Newest first; a notice a later one of the same incident replaced is marked so."""
    items = list(notices)
    if not items:
        return Text("Nothing yet: notices (actions, leader changes, critical events) are listed here.", style="dim")
    seen: set[str] = set()
    lines = []
    for n in reversed(items):
        lines.append(notice_line(n, now_ms, replaced=n.key is not None and n.key in seen))
        if n.key is not None:
            seen.add(n.key)
    return Text("\n").join(lines)


class NoticesScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,N", "dismiss", "Close", id="notices.close")]

    def __init__(self, notices: Iterable[Notice], now_ms: int) -> None:
        super().__init__()
        self.text = history(notices, now_ms)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="notices-box", classes="viewer-box"):
            yield Static("[b]Notifications[/b] [dim](newest first; Esc closes)[/dim]")
            yield Static(self.text, id="notices-list")


class EventDetail(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close", id="event.close")]

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="event-box", classes="viewer-box"):
            yield Static(f"[b]Event[/b] {self.event.kind} [dim](Esc closes)[/dim]")
            yield Static(event_detail(self.event), id="event-detail")

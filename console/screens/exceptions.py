"""Exceptions triage: groups (sorted by last seen or count, filter-as-you-type, status filter), a group's
highlighted traceback and recent occurrences, confirmed actions, and a live tail (follow / pause).

Modal, so the main screen's server keys (drain, disable, ...) cannot fire on rows that are not shown.
It reads the app's `Source` like every other view (fixed data in tests and snapshots), and its actions go
through the app's one confirm-then-act flow. Workers do the I/O; handlers update widgets. Filtering is
local, so typing never waits on the network.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, cast

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Input, RichLog, Static, TabbedContent, TabPane
from textual.widgets.data_table import CellDoesNotExist

import console.format
from console.client import OpsError, Unreachable
from console.messages import ActionDone
from console.screens.confirm import Ask, Field
from console.source import Source
from ctops.capture.wire import STATUSES, ExceptionStats, GroupDetail, GroupView, Occurrence, traceback_text

if TYPE_CHECKING:
    from console.app import ConsoleApp

STATUS_STYLE = {"unresolved": "bold red", "regressed": "bold magenta", "acknowledged": "yellow",
                "muted": "dim", "resolved": "green"}
TAIL_KEEP = 2000


@dataclass(frozen=True, slots=True)
class Key:
    key: str
    action: str
    title: str
    help: str
    show: bool = True


# the screen's one command table: bindings, footer and the help line come from it
KEYS: tuple[Key, ...] = (
    Key("a", "act('acknowledge')", "Ack", "Acknowledge the selected group (someone is on it)."),
    Key("s", "act('resolve')", "Resolve", "Resolve the selected group; if it happens again it becomes regressed."),
    Key("m", "act('mute')", "Mute", "Mute the selected group for some minutes."),
    Key("n", "act('assign')", "Assign", "Assign the selected group to a staff name."),
    Key("u", "act('unresolve')", "Reopen", "Set the selected group back to unresolved.", show=False),
    Key("slash", "focus_filter", "Filter", "Type to filter by type, message, service or host."),
    Key("f", "cycle_status", "Status", "Show only one status (cycles: all, unresolved, ...)."),
    Key("o", "toggle_sort", "Sort", "Sort by last seen or by count."),
    Key("t", "toggle_tab", "Tail", "Switch between the groups and the live tail."),
    Key("space", "toggle_follow", "Follow", "Live tail: follow or pause (paused keeps its place)."),
    Key("r", "refresh", "Refresh", "Fetch now.", show=False),
    Key("escape,q", "close", "Back", "Back to the cluster view (Esc in the filter returns to the table)."),
)


# --- messages from workers ---------------------------------------------------------------------

@dataclass
class GroupsFetched(Message):
    groups: list[GroupView]
    stats: ExceptionStats


@dataclass
class DetailFetched(Message):
    detail: GroupDetail


@dataclass
class TailFetched(Message):
    items: list[Occurrence]
    cursor: str | None


@dataclass
class ExcFailed(Message):
    what: str
    reason: str


# --- rendering ---------------------------------------------------------------------------------

CLOCK: Callable[[], float] = time.time  # tests pin it, with console.format.LOCAL_TZ, for stable snapshots


def _hms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, console.format.LOCAL_TZ).strftime("%H:%M:%S")


def ago(ms: int, now: float | None = None) -> str:
    s = max(0.0, (now or CLOCK()) - ms / 1000)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago" if s < 86400 else f"{s / 86400:.0f}d ago"


def group_matches(g: GroupView, words: list[str], status: str | None) -> bool:
    if status and g.status != status:
        return False
    hay = " ".join([g.type, g.message, g.culprit, *g.services, *g.hosts, g.assignee or ""]).lower()
    return all(w in hay for w in words)


def occurrence_matches(o: Occurrence, words: list[str]) -> bool:
    e = o.event
    hay = f"{e.type} {e.message} {e.service} {e.host}".lower()
    return all(w in hay for w in words)


def detail_renderable(d: GroupDetail) -> RenderableType:
    g = d.group
    head = Text.assemble((g.type, "bold red"), ": ", g.message[:300])
    meta = Text.assemble(
        (g.status, STATUS_STYLE.get(g.status, "")),
        f"  ·  {g.count} events  ·  first {ago(g.first_seen_ms)}  ·  last {ago(g.last_seen_ms)}",
        f"  ·  assigned to {g.assignee}" if g.assignee else "",
        f"  ·  muted until {_hms(g.mute_until_ms)[:5]}"
        if g.mute_until_ms else "",
        f"\nservices {', '.join(g.services)}  ·  hosts {', '.join(g.hosts)}  ·  in {g.culprit}  ·  group {g.id}",
        style="dim" if g.status == "muted" else "",
    )
    parts: list[RenderableType] = [head, meta, Text("")]
    if d.latest is not None:
        parts.append(Syntax(traceback_text(d.latest), "pytb", theme="ansi_dark", word_wrap=True,
                            background_color="default"))
        if d.latest.context:
            parts.append(Text("context: " + ", ".join(f"{k}={v}" for k, v in d.latest.context.items()), style="dim"))
    if d.recent:
        t = Table(title="recent occurrences", title_justify="left", box=None, expand=True, padding=(0, 1))
        for col in ("when", "service", "host", "event", "message"):
            t.add_column(col, no_wrap=col != "message")
        for e in d.recent:
            t.add_row(_hms(e.ts_ms), e.service, e.host,
                      e.event_id[:12], e.message[:120])
        parts += [Text(""), t]
    return Group(*parts)


def tail_line(o: Occurrence) -> Text:
    e = o.event
    return Text.assemble((_hms(e.ts_ms), "dim"), " ",
                         (f"{e.service}@{e.host}", "cyan"), " ", (e.type, "bold red"), ": ", e.message[:200],
                         (f"  [{o.group_id}]", "dim"))


# --- confirmation (through the app's one flow) -------------------------------------------------

_EFFECT = {
    "acknowledge": "Marks it acknowledged: staff know; it stays listed.",
    "resolve": "Marks it resolved. If it happens again it becomes [b]regressed[/b] and raises an event.",
    "unresolve": "Sets it back to unresolved.",
    "mute": "Hides it as muted for the minutes below; it still counts events, and unmutes by itself.",
    "assign": "Assigns it to the staff name below (empty to clear).",
}


def _minutes(text: str) -> str | None:
    return None if text.isdigit() and 1 <= int(text) <= 10080 else "Minutes must be 1..10080."


def _field(action: str, g: GroupView) -> Field | None:
    if action == "mute":
        return Field("60", "minutes (1..10080)", kind="integer", check=_minutes)
    if action == "assign":
        return Field(g.assignee or "", "staff name")
    return None


# --- the screen -------------------------------------------------------------------------------

class ExceptionsScreen(ModalScreen[None]):
    BINDINGS = [Binding(k.key, k.action, k.title, show=k.show, id=f"exceptions.{k.title.lower()}") for k in KEYS]
    DEFAULT_CSS = """
    ExceptionsScreen { background: $background; align: left top; }
    #exc-summary { height: auto; background: $panel; padding: 0 1; }
    #exc-filter { height: 3; }
    #exc-tabs { height: 1fr; }
    #exc-groups { height: 1fr; min-height: 5; }
    #exc-detail-box { height: 1fr; border-top: solid $primary; }
    #exc-tail-status { height: 1; background: $panel; padding: 0 1; }
    #exc-tail { height: 1fr; }
    """

    def __init__(self, source: Source, *, interval: float = 1.0) -> None:
        super().__init__()
        self.source = source
        self.interval = interval
        self.groups: list[GroupView] = []
        self.stats: ExceptionStats | None = None
        self.shown: list[GroupView] = []
        self.detail: GroupDetail | None = None
        self.status_filter: str | None = None
        self.sort = "last"
        self.following = True
        self.tail_items: deque[Occurrence] = deque(maxlen=TAIL_KEEP)
        self.tail_cursor: str | None = None
        self.error: str | None = None
        self.applied = 0  # group lists applied: tests wait on it instead of sleeping
        self.tail_applied = 0
        self.acted: list[tuple[str, str]] = []  # (group id, action) done, newest last
        self._rows: list[tuple] = []
        self._timer: Timer | None = None
        self._tail_timer: Timer | None = None
        self._detail_for: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="exc-summary")
        yield Input(placeholder="filter: type, message, service, host  (/ to focus, Enter or Esc back to the list)",
                    id="exc-filter")
        with TabbedContent(id="exc-tabs", initial="exc-groups-tab"):
            with TabPane("Groups", id="exc-groups-tab"):
                yield DataTable(id="exc-groups", cursor_type="row")
                with VerticalScroll(id="exc-detail-box"):
                    yield Static("Select a group to see its traceback.", id="exc-detail")
            with TabPane("Live tail", id="exc-tail-tab"):
                yield Static(id="exc-tail-status")
                yield RichLog(id="exc-tail", max_lines=TAIL_KEEP, wrap=False, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one("#exc-groups", DataTable)
        for key, label, width in (("status", "status", 12), ("count", "count", 7), ("last", "last seen", 10),
                                  ("type", "type", 28), ("message", "message", 40), ("services", "service", 12),
                                  ("hosts", "hosts", 16), ("assignee", "assignee", 10)):
            t.add_column(label, key=key, width=width)
        t.focus()
        self._summary()
        self._tail_status()
        self.fetch_groups()
        self.fetch_tail()

    def on_unmount(self) -> None:
        for timer in (self._timer, self._tail_timer):
            if timer is not None:
                timer.stop()

    # -- workers ---------------------------------------------------------------------------------

    @work(exclusive=True, group="exc-groups")
    async def fetch_groups(self) -> None:
        try:
            gl = await self.source.exception_groups(self.sort, 5000)
        except (OpsError, Unreachable) as exc:
            self.post_message(ExcFailed("groups", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bad answer must not kill the console
            self.post_message(ExcFailed("groups", f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(GroupsFetched(gl.groups, gl.stats))

    @work(exclusive=True, group="exc-detail")
    async def fetch_detail(self, gid: str) -> None:
        try:
            d = await self.source.exception_group(gid)
        except Exception as exc:  # noqa: BLE001
            self.post_message(ExcFailed("detail", f"{exc}"))
        else:
            self.post_message(DetailFetched(d))

    @work(exclusive=True, group="exc-tail")
    async def fetch_tail(self) -> None:
        try:
            page = await self.source.exception_tail(self.tail_cursor, 500 if self.tail_cursor else 100)
        except Exception as exc:  # noqa: BLE001
            self.post_message(ExcFailed("tail", f"{exc}"))
        else:
            self.post_message(TailFetched(page.items, page.cursor))

    # -- handlers ----------------------------------------------------------------------------------

    @on(GroupsFetched)
    def _groups_fetched(self, msg: GroupsFetched) -> None:
        self.groups, self.stats, self.error = msg.groups, msg.stats, None
        self._apply_filter()
        self.applied += 1
        self._summary()
        self._arm()

    @on(DetailFetched)
    def _detail_fetched(self, msg: DetailFetched) -> None:
        if msg.detail.group.id != self.selected:
            return
        self.detail = msg.detail
        self.query_one("#exc-detail", Static).update(detail_renderable(msg.detail))

    @on(TailFetched)
    def _tail_fetched(self, msg: TailFetched) -> None:
        if not self.following:
            return  # fetched before the pause: resuming fetches the same page again from the kept cursor
        self.tail_cursor = msg.cursor or self.tail_cursor
        log = self.query_one("#exc-tail", RichLog)
        words = self._words()
        for o in msg.items:
            self.tail_items.append(o)
            if occurrence_matches(o, words):
                log.write(tail_line(o))
        self.tail_applied += 1
        self._tail_status()
        self._arm_tail()

    @on(ExcFailed)
    def _failed(self, msg: ExcFailed) -> None:
        self.error = msg.reason
        self._summary()
        if msg.what == "groups":
            self._arm()
        elif msg.what == "tail":
            self._arm_tail()

    @on(Input.Changed, "#exc-filter")
    def _filter_changed(self) -> None:
        self._apply_filter()
        self._rerender_tail()

    @on(Input.Submitted, "#exc-filter")
    def _filter_done(self) -> None:
        self._focus_main()

    @on(DataTable.RowHighlighted, "#exc-groups")
    def _row_highlighted(self) -> None:
        gid = self.selected
        if gid and gid != self._detail_for:
            self._detail_for = gid
            self.fetch_detail(gid)

    # -- actions -----------------------------------------------------------------------------------

    def action_close(self) -> None:
        if isinstance(self.focused, Input):
            self._focus_main()
            return
        self.dismiss(None)

    def action_focus_filter(self) -> None:
        self.query_one("#exc-filter", Input).focus()

    def action_cycle_status(self) -> None:
        order = [None, *STATUSES]
        self.status_filter = order[(order.index(self.status_filter) + 1) % len(order)]
        self._apply_filter()
        self._summary()

    def action_toggle_sort(self) -> None:
        self.sort = "count" if self.sort == "last" else "last"
        self._apply_filter()
        self._summary()
        self.action_refresh()

    def action_toggle_tab(self) -> None:
        tabs = self.query_one("#exc-tabs", TabbedContent)
        tabs.active = "exc-tail-tab" if tabs.active == "exc-groups-tab" else "exc-groups-tab"
        self._focus_main()

    def action_toggle_follow(self) -> None:
        self.following = not self.following
        if self.following:
            self.fetch_tail()  # picks up from the cursor: nothing that came in while paused is skipped
        elif self._tail_timer is not None:
            self._tail_timer.stop()
        self._tail_status()

    def action_refresh(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.fetch_groups()
        if self.selected:
            self.fetch_detail(self.selected)

    def action_act(self, action: str) -> None:
        gid = self.selected
        group = next((g for g in self.shown if g.id == gid), None)
        if group is None:
            self.app.notify("Move the cursor to a group first.", title="No group selected", severity="warning")
            return
        source, acted = self.source, self.acted

        async def call(value: str) -> ActionDone:
            params: dict[str, int | str] = {}
            if action == "mute":
                params["minutes"] = int(value)
            elif action == "assign":
                params["assignee"] = value
            r = await source.exception_act(group.id, action, **params)  # type: ignore[arg-type]
            acted.append((r.group.id, action))
            return ActionDone(f"{action.capitalize()} done",
                              f"{r.group.type}: now {r.group.status}"
                              + (f", assigned to {r.group.assignee}" if r.group.assignee else "") + f" (by {r.by}).")

        cast("ConsoleApp", self.app).ask(Ask(
            f"{action.capitalize()} [b]{escape(group.type)}[/b]?",
            f"{escape(group.message[:150])}\n{group.count} events, now {group.status}. " + _EFFECT[action],
            action.capitalize(), action, f"exception group {group.id}", "exception groups", call,
            field=_field(action, group), then=self.action_refresh))

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def selected(self) -> str | None:
        t = self.query_one("#exc-groups", DataTable)
        if not t.row_count:
            return None
        try:
            key, _ = t.coordinate_to_cell_key(t.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return key.value

    def _words(self) -> list[str]:
        return self.query_one("#exc-filter", Input).value.lower().split()

    def _apply_filter(self) -> None:
        words = self._words()
        shown = [g for g in self.groups if group_matches(g, words, self.status_filter)]
        if self.sort == "count":
            shown.sort(key=lambda g: (-g.count, -g.last_seen_ms))
        else:
            shown.sort(key=lambda g: -g.last_seen_ms)
        self.shown = shown
        now = CLOCK()
        rows = [(g.id, Text(g.status, style=STATUS_STYLE.get(g.status, "")), str(g.count), ago(g.last_seen_ms, now),
                 g.type, g.message.replace("\n", " ")[:200], ",".join(g.services), ",".join(g.hosts),
                 g.assignee or "") for g in shown]
        if rows == self._rows:
            return
        t = self.query_one("#exc-groups", DataTable)
        keep = self.selected
        with self.app.batch_update():
            t.clear()
            for gid, *cells in rows:
                t.add_row(*cells, key=gid)
            ids = [r[0] for r in rows]
            if keep in ids:
                t.move_cursor(row=ids.index(keep))
        self._rows = rows
        if not rows:
            self._detail_for = None
            self.detail = None
            self.query_one("#exc-detail", Static).update("No group matches." if self.groups else "No exceptions yet.")
        else:
            self._row_highlighted()

    def _rerender_tail(self) -> None:
        log = self.query_one("#exc-tail", RichLog)
        log.clear()
        words = self._words()
        for o in self.tail_items:
            if occurrence_matches(o, words):
                log.write(tail_line(o))
        self._tail_status()

    def _summary(self) -> None:
        st = self.stats
        parts = [f"[b]Exceptions[/b]  {len(self.shown)} of {len(self.groups)} groups",
                 f"sort: {'last seen' if self.sort == 'last' else 'count'}",
                 f"status: {self.status_filter or 'all'}"]
        if st is not None:
            loss = f"dropped {st.dropped} · corrupt {st.corrupt} · rejected {st.rejected}"
            parts.append(f"[b red]{loss}[/]" if st.dropped or st.corrupt or st.rejected else f"[dim]{loss}[/]")
        if self.error:
            parts.append(f"[b red]STALE: {self.error[:80]}[/]")
        self.query_one("#exc-summary", Static).update("  ·  ".join(parts))

    def _tail_status(self) -> None:
        words = self._words()
        n = sum(1 for o in self.tail_items if occurrence_matches(o, words))
        state = "[b green]● following[/]" if self.following else "[b yellow]⏸ paused[/] (space resumes from here)"
        filt = f" · filter '{' '.join(words)}'" if words else ""
        self.query_one("#exc-tail-status", Static).update(f"{state} · {n} shown{filt}")

    def _focus_main(self) -> None:
        tabs = self.query_one("#exc-tabs", TabbedContent)
        (self.query_one("#exc-groups") if tabs.active == "exc-groups-tab" else self.query_one("#exc-tail")).focus()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(self.interval, self.fetch_groups)

    def _arm_tail(self) -> None:
        if self._tail_timer is not None:
            self._tail_timer.stop()
        if self.following:
            self._tail_timer = self.set_timer(self.interval, self.fetch_tail)


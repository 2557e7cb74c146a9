"""Exceptions triage, Sentry's way: groups (unresolved by default, sorted by last seen or count,
filter-as-you-type, status filter), a group's highlighted traceback and recent occurrences, and a live
tail (follow / pause; Enter opens a line's traceback).

Ack, resolve, reopen and mute act at once, on the marked groups (space marks, `*` marks every shown one)
or else the selected one, without a dialog: each is reversible, and `U` undoes the last one (it puts
every group back to the status it had). Assigning, and muting for a chosen time (`M`), ask for a value
through the app's one confirm-then-act flow.

Modal, so the main screen's server keys (drain, disable, ...) cannot fire on rows that are not shown.
It reads the app's `Source` like every other view (fixed data in tests and snapshots). Workers do the
I/O; handlers update widgets. Filtering is local, so typing never waits on the network.
"""

from __future__ import annotations

import re
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
from textual.events import Resize
from textual.message import Message
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane
from textual.widgets.data_table import CellDoesNotExist, ColumnKey

import console.format
from console.client import OpsError, Unreachable
from console.commands import display_key
from console.messages import ActionDone, ActionFailed
from console.screens.confirm import Ask, Field
from console.source import Source
from ctops.capture.wire import STATUSES, ExceptionStats, GroupDetail, GroupView, Occurrence, traceback_text
from ctops.opsapi import ACTION_GRANT, role_may

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
    acts: bool = False  # changes groups: a role without the act grant never sees it

    @property
    def id(self) -> str:
        """The binding id a keymap names: "exceptions.mute_for", "exceptions.mark_all"."""
        return "exceptions." + re.sub(r"[^a-z]+", "_", self.title.lower()).strip("_")


# the screen's one command table: bindings, footer, its help screen (`?`) come from it
KEYS: tuple[Key, ...] = (
    Key("a", "quick('acknowledge')", "Ack", "Acknowledge the marked (or selected) groups: someone is on it.",
        acts=True),
    Key("s", "quick('resolve')", "Resolve",
        "Resolve the marked (or selected) groups; one that happens again becomes regressed.", acts=True),
    Key("m", "quick('mute')", "Mute", f"Mute the marked (or selected) groups for {60} minutes.", acts=True),
    Key("u", "quick('unresolve')", "Reopen", "Set the marked (or selected) groups back to unresolved.", acts=True),
    Key("U", "undo", "Undo", "Undo the last ack / resolve / mute / reopen / assign: every group gets its status back.",
        acts=True),
    Key("space", "space", "Mark", "Groups: mark or unmark the selected group. Tail: follow or pause."),
    Key("asterisk", "mark_all", "Mark all", "Mark every shown group (again: unmark them all).", show=False, acts=True),
    Key("M", "act('mute')", "Mute for…", "Mute the selected group for a number of minutes you type.", show=False,
        acts=True),
    Key("n", "act('assign')", "Assign", "Assign the selected group to a staff name.", show=False, acts=True),
    Key("slash", "focus_filter", "Filter", "Type to filter by type, message, service, host or id (a prefix will do)."),
    Key("f", "cycle_status", "Status", "Show one status (cycles: unresolved (+regressed), all, acknowledged, ...)."),
    Key("o", "toggle_sort", "Sort", "Sort by last seen or by count.", show=False),
    Key("t", "toggle_tab", "Tail", "Switch between the groups and the live tail."),
    Key("enter", "open", "Open", "Tail: open the selected line's traceback.", show=False),
    Key("r", "refresh", "Refresh", "Fetch now.", show=False),
    Key("j", "move('down')", "Down", "Move down a row (groups or tail).", show=False),
    Key("k", "move('up')", "Up", "Move up a row.", show=False),
    Key("g", "move('top')", "Top", "Move to the first row.", show=False),
    Key("G", "move('bottom')", "Bottom", "Move to the last row.", show=False),
    Key("question_mark", "help", "Help", "Show these keys."),
    Key("escape,q", "close", "Back", "Back to the cluster view (first Esc clears marks; in the filter: to the list)."),
)
# actions (method names without "action_") that change groups, from the table above
ACTING_ACTIONS = frozenset(k.action.split("(")[0] for k in KEYS if k.acts)
MUTE_MINUTES = 60
# the default filter, as Sentry's is:unresolved: regressed groups are unresolved ones that came back
DEFAULT_STATUS = "unresolved"
STATUS_CYCLE: tuple[str | None, ...] = (DEFAULT_STATUS, None, *(s for s in STATUSES if s != DEFAULT_STATUS))
# the group list's columns; the message column takes what the others leave
GROUP_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("mark", "", 1), ("id", "id", 8), ("status", "status", 12), ("count", "count", 6), ("last", "last seen", 9),
    ("type", "type", 24), ("message", "message", 0), ("services", "service", 10), ("hosts", "hosts", 12),
    ("assignee", "assignee", 10),
)
NARROW_DROPS = frozenset({"id", "services", "hosts", "assignee"})  # below WIDE: in the detail pane only
WIDE = 120
MESSAGE_MIN = 20
MESSAGE_MAX = 160


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


def status_matches(g: GroupView, status: str | None) -> bool:
    if status == DEFAULT_STATUS:
        return g.status in ("unresolved", "regressed")
    return status is None or g.status == status


def group_matches(g: GroupView, words: list[str], status: str | None) -> bool:
    if not status_matches(g, status):
        return False
    hay = " ".join([g.id, g.type, g.message, g.culprit, *g.services, *g.hosts, g.assignee or ""]).lower()
    return all(w in hay for w in words)


def short_id(gid: str) -> str:
    return gid[:8]


def undo_step(g: GroupView, now_ms: int) -> tuple[str, dict[str, int | str]] | None:
    """The action that puts a group back as it was before one of ours (None: nothing to put back)."""
    if g.status in ("unresolved", "regressed"):
        return "unresolve", {}
    if g.status == "acknowledged":
        return "acknowledge", {}
    if g.status == "resolved":
        return "resolve", {}
    if g.status == "muted":
        left = max(1, -(-((g.mute_until_ms or now_ms) - now_ms) // 60_000))
        return "mute", {"minutes": min(left, 10080)}
    return None


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

@dataclass
class Acted(Message):
    """Quick actions answered: each group as it was before (for undo) and how many failed."""

    action: str
    before: list[GroupView]
    done: int
    undo: bool


def may_act(role: str | None) -> bool:
    """An unknown role (whoami not answered yet) is not narrowed: the ops API still refuses."""
    return role is None or role_may(role, ACTION_GRANT)


class ExceptionsHelp(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close", id="exceptions.help.close")]
    DEFAULT_CSS = """
    ExceptionsHelp { align: center middle; }
    #exc-help { width: 90%; max-width: 110; height: auto; max-height: 90%; border: round $primary;
                background: $panel; padding: 0 1; }
    """

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.role = role

    def compose(self) -> ComposeResult:
        t = Table(box=None, expand=True, padding=(0, 2, 0, 0))
        t.add_column("Key", no_wrap=True)
        t.add_column("Action", no_wrap=True)
        t.add_column("What it does")
        for k in KEYS:
            if k.acts and not may_act(self.role):
                continue
            t.add_row(display_key(k.key), k.title, k.help)
        with VerticalScroll(id="exc-help"):
            yield Static("[b]Exceptions — keys[/b]")
            yield Static(t, id="exc-help-keys")
            yield Static("[dim]Ack, resolve, reopen and mute act at once; U undoes. Esc or ? closes.[/dim]")


class ExceptionsScreen(ModalScreen[None]):
    BINDINGS = [Binding(k.key, k.action, k.title, show=k.show, id=k.id) for k in KEYS]
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
        self.status_filter: str | None = DEFAULT_STATUS
        self.sort = "last"
        self.following = True
        self.tail_items: deque[Occurrence] = deque(maxlen=TAIL_KEEP)
        self.tail_cursor: str | None = None
        self.error: str | None = None
        self.applied = 0  # group lists applied: tests wait on it instead of sleeping
        self.tail_applied = 0
        self.acted: list[tuple[str, str]] = []  # (group id, action) done, newest last
        self.marked: set[str] = set()
        self.undo_stack: list[tuple[str, list[GroupView]]] = []  # (action, the groups as they were before)
        self._rows: list[tuple[object, ...]] = []
        self._message_width = 0
        self._column_keys: list[str] = []
        self._timer: Timer | None = None
        self._tail_timer: Timer | None = None
        self._detail_for: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="exc-summary")
        yield Input(placeholder="filter: type, message, service, host, id  (/ to focus, Enter or Esc back to the list)",
                    id="exc-filter")
        with TabbedContent(id="exc-tabs", initial="exc-groups-tab"):
            with TabPane("Groups", id="exc-groups-tab"):
                yield DataTable(id="exc-groups", cursor_type="row")
                with VerticalScroll(id="exc-detail-box"):
                    yield Static("Select a group to see its traceback.", id="exc-detail")
            with TabPane("Live tail", id="exc-tail-tab"):
                yield Static(id="exc-tail-status")
                yield DataTable(id="exc-tail", cursor_type="row", show_header=False)
        yield Footer()

    def on_mount(self) -> None:
        self._columns(self.app.size.width)
        tail = self.query_one("#exc-tail", DataTable)
        tail.add_column("occurrence", key="line", width=max(40, self.app.size.width - 4))
        self.query_one("#exc-groups", DataTable).focus()
        self._summary()
        self._tail_status()
        self.fetch_groups()
        self.fetch_tail()

    def on_unmount(self) -> None:
        for timer in (self._timer, self._tail_timer):
            if timer is not None:
                timer.stop()

    def on_resize(self, event: Resize) -> None:
        self._columns(event.size.width)
        tail = self.query_one("#exc-tail", DataTable)
        col = tail.columns.get(ColumnKey("line"))
        if col is not None and col.width != max(40, event.size.width - 4):
            col.width = max(40, event.size.width - 4)
            tail.refresh()

    def _columns(self, width: int) -> None:
        """The message column takes the width the others leave (at 200 columns it shows 80-odd characters);
        below 120 columns the id, services, hosts and assignee are left to the detail pane."""
        cols = [c for c in GROUP_COLUMNS if width >= WIDE or c[0] not in NARROW_DROPS]
        fixed = sum(w for _, _, w in cols) + 2 * len(cols) + 2  # cell padding, scrollbar
        message = max(MESSAGE_MIN, min(MESSAGE_MAX, width - fixed))
        if message == self._message_width and len(cols) == len(self._column_keys):
            return
        self._message_width = message
        self._column_keys = [key for key, _, _ in cols]
        t = self.query_one("#exc-groups", DataTable)
        t.clear(columns=True)
        for key, label, w in cols:
            t.add_column(label, key=key, width=w or message)
        self._rows = []
        if self.groups:
            self._apply_filter()

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

    @work(group="exc-act")
    async def send(self, action: str, steps: list[tuple[GroupView, str, dict[str, int | str]]], undo: bool) -> None:
        """Quick actions, one group after another; the first refusal stops the rest (a viewer's 403
        would be the same for each)."""
        before: list[GroupView] = []
        for g, step, params in steps:
            try:
                r = await self.source.exception_act(g.id, step, **params)  # type: ignore[arg-type]
            except OpsError as exc:
                self.app.post_message(ActionFailed(f"exception group {short_id(g.id)}", step, exc.status, str(exc),
                                                   "exception groups"))
                break
            except Exception as exc:  # noqa: BLE001 - reported like any failed action
                self.app.post_message(ActionFailed(f"exception group {short_id(g.id)}", step, None, str(exc),
                                                   "exception groups"))
                break
            before.append(g)
            self.acted.append((r.group.id, step))
        self.post_message(Acted(action, before, len(before), undo))

    # -- handlers ----------------------------------------------------------------------------------

    @on(GroupsFetched)
    def _groups_fetched(self, msg: GroupsFetched) -> None:
        self.groups, self.stats, self.error = msg.groups, msg.stats, None
        self._apply_filter()
        self.applied += 1
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
        words = self._words()
        new = []
        for o in msg.items:
            self.tail_items.append(o)
            if occurrence_matches(o, words):
                new.append(o)
        self._tail_rows(new)
        self.tail_applied += 1
        self._tail_status()
        self._arm_tail()

    @on(Acted)
    def _acted(self, msg: Acted) -> None:
        if msg.done:
            if not msg.undo:
                self.undo_stack.append((msg.action, msg.before))
            what = f"{msg.done} group" + ("s" if msg.done > 1 else "")
            verb = {"acknowledge": "Acknowledged", "resolve": "Resolved", "unresolve": "Reopened",
                    "mute": f"Muted for {MUTE_MINUTES} min:", "assign": "Assigned"}.get(msg.action, msg.action)
            if msg.undo:
                self.app.notify(f"Undone: {what} back as they were.", title="Undo", timeout=4)
            else:
                self.app.notify(f"{verb} {what}. U undoes it.", title=verb.split(" ")[0], timeout=4)
        self.marked.clear()
        self.action_refresh()

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

    @on(DataTable.RowSelected, "#exc-tail")
    def _tail_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    # -- actions -----------------------------------------------------------------------------------

    def action_close(self) -> None:
        if isinstance(self.focused, Input):
            self._focus_main()
            return
        if self.marked:
            self.marked.clear()
            self._apply_filter()
            return
        self.dismiss(None)

    def action_help(self) -> None:
        self.app.push_screen(ExceptionsHelp(self.role))

    @property
    def role(self) -> str | None:
        return getattr(self.app, "role", None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # a viewer never sees or runs triage actions (footer, keys, help); the ops API refuses them too
        return may_act(self.role) or action not in ACTING_ACTIONS

    def action_focus_filter(self) -> None:
        self.query_one("#exc-filter", Input).focus()

    def action_cycle_status(self) -> None:
        order = list(STATUS_CYCLE)
        self.status_filter = order[(order.index(self.status_filter) + 1) % len(order)]
        self._apply_filter()

    def action_toggle_sort(self) -> None:
        self.sort = "count" if self.sort == "last" else "last"
        self._apply_filter()
        self.action_refresh()

    def action_toggle_tab(self) -> None:
        tabs = self.query_one("#exc-tabs", TabbedContent)
        tabs.active = "exc-tail-tab" if tabs.active == "exc-groups-tab" else "exc-groups-tab"
        self._focus_main()

    def action_space(self) -> None:
        if self._on_tail():
            self.action_toggle_follow()
            return
        gid = self.selected
        if gid is None:
            return
        self.marked ^= {gid}
        self._apply_filter()
        self.query_one("#exc-groups", DataTable).action_cursor_down()

    def action_move(self, where: str) -> None:
        t = self.query_one("#exc-tail" if self._on_tail() else "#exc-groups", DataTable)
        {"down": t.action_cursor_down, "up": t.action_cursor_up, "top": t.action_scroll_top,
         "bottom": t.action_scroll_bottom}[where]()

    def action_mark_all(self) -> None:
        ids = {g.id for g in self.shown}
        self.marked = set() if ids and ids <= self.marked else ids
        self._apply_filter()

    def action_toggle_follow(self) -> None:
        self.following = not self.following
        if self.following:
            self.fetch_tail()  # picks up from the cursor: nothing that came in while paused is skipped
            self._tail_end()
        elif self._tail_timer is not None:
            self._tail_timer.stop()
        self._tail_status()

    def action_refresh(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.fetch_groups()
        if self.selected:
            self.fetch_detail(self.selected)

    def targets(self) -> list[GroupView]:
        """The marked groups that are shown, else the selected one."""
        marked = [g for g in self.shown if g.id in self.marked]
        if marked:
            return marked
        return [g for g in self.shown if g.id == self.selected]

    def action_quick(self, action: str) -> None:
        """Ack / resolve / reopen / mute at once, no dialog: each is undone with U."""
        groups = self.targets()
        if not groups:
            self.app.notify("Move the cursor to a group first.", title="No group selected", severity="warning")
            return
        params: dict[str, int | str] = {"minutes": MUTE_MINUTES} if action == "mute" else {}
        self.send(action, [(g, action, params) for g in groups], False)

    def action_undo(self) -> None:
        if not self.undo_stack:
            self.app.notify("Nothing to undo on this screen.", title="Undo", severity="warning", timeout=4)
            return
        action, before = self.undo_stack.pop()
        now = int(CLOCK() * 1000)
        steps: list[tuple[GroupView, str, dict[str, int | str]]] = []
        for g in before:
            if action == "assign":
                steps.append((g, "assign", {"assignee": g.assignee or ""}))
            elif (step := undo_step(g, now)) is not None:
                steps.append((g, step[0], step[1]))
        self.send(action, steps, True)

    def action_open(self) -> None:
        """The selected tail line's traceback, in full."""
        if not self._on_tail():
            return
        t = self.query_one("#exc-tail", DataTable)
        if not t.row_count:
            return
        try:
            key, _ = t.coordinate_to_cell_key(t.cursor_coordinate)
        except CellDoesNotExist:
            return
        o = next((o for o in self.tail_items if o.id == key.value), None)
        if o is not None:
            self.app.push_screen(OccurrenceScreen(o))

    def action_act(self, action: str) -> None:
        """Assign, or mute for a chosen time: these ask for a value, through the app's one flow."""
        gid = self.selected
        group = next((g for g in self.shown if g.id == gid), None)
        if group is None:
            self.app.notify("Move the cursor to a group first.", title="No group selected", severity="warning")
            return
        source, acted, stack = self.source, self.acted, self.undo_stack

        async def call(value: str) -> ActionDone:
            params: dict[str, int | str] = {}
            if action == "mute":
                params["minutes"] = int(value)
            elif action == "assign":
                params["assignee"] = value
            r = await source.exception_act(group.id, action, **params)  # type: ignore[arg-type]
            acted.append((r.group.id, action))
            stack.append((action, [group]))
            return ActionDone(f"{action.capitalize()} done",
                              f"{r.group.type}: now {r.group.status}"
                              + (f", assigned to {r.group.assignee}" if r.group.assignee else "")
                              + f" (by {r.by}). U undoes it.")

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

    def _on_tail(self) -> bool:
        return self.query_one("#exc-tabs", TabbedContent).active == "exc-tail-tab"

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
        self._summary()  # the counts follow every change of what is shown, not only fetches
        now = CLOCK()
        width = self._message_width or 40
        keys = self._column_keys

        def by_column(g: GroupView) -> dict[str, object]:
            return {"mark": Text("✓", style="bold green") if g.id in self.marked else "", "id": short_id(g.id),
                    "status": Text(g.status, style=STATUS_STYLE.get(g.status, "")), "count": str(g.count),
                    "last": ago(g.last_seen_ms, now), "type": g.type, "message": g.message.replace("\n", " ")[:width],
                    "services": ",".join(g.services), "hosts": ",".join(g.hosts), "assignee": g.assignee or ""}

        rows: list[tuple[object, ...]] = [(g.id, *(row[k] for k in keys)) for g in shown for row in (by_column(g),)]
        if rows == self._rows:
            return
        t = self.query_one("#exc-groups", DataTable)
        keep = self.selected
        with self.app.batch_update():
            t.clear()
            for gid, *cells in rows:
                t.add_row(*cells, key=str(gid))
            ids = [r[0] for r in rows]
            if keep in ids:
                t.move_cursor(row=ids.index(keep), animate=False)
        self._rows = rows
        if not rows:
            self._detail_for = None
            self.detail = None
            self.query_one("#exc-detail", Static).update("No group matches." if self.groups else "No exceptions yet.")
        else:
            self._row_highlighted()

    def _tail_rows(self, items: list[Occurrence]) -> None:
        t = self.query_one("#exc-tail", DataTable)
        with self.app.batch_update():
            for o in items:
                if o.id not in t.rows:
                    t.add_row(tail_line(o), key=o.id)
            excess = t.row_count - TAIL_KEEP
            if excess > 0:
                for key in list(t.rows)[:excess]:
                    t.remove_row(key)
        if self.following and items:
            self._tail_end()

    def _tail_end(self) -> None:
        t = self.query_one("#exc-tail", DataTable)
        if t.row_count:
            t.move_cursor(row=t.row_count - 1, animate=False)

    def _rerender_tail(self) -> None:
        self.query_one("#exc-tail", DataTable).clear()
        words = self._words()
        self._tail_rows([o for o in self.tail_items if occurrence_matches(o, words)])
        self._tail_status()

    def _summary(self) -> None:
        st = self.stats
        status = {DEFAULT_STATUS: "unresolved (+regressed)", None: "all"}.get(self.status_filter, self.status_filter)
        parts = [f"[b]Exceptions[/b]  {len(self.shown)} of {len(self.groups)} groups",
                 f"status: {status}", f"sort: {'last seen' if self.sort == 'last' else 'count'}"]
        if self.marked:
            parts.append(f"[b]{len(self.marked)} marked[/b]")
        if st is not None:
            loss = f"dropped {st.dropped} · corrupt {st.corrupt} · rejected {st.rejected}"
            parts.append(f"[b red]{loss}[/]" if st.dropped or st.corrupt or st.rejected else f"[dim]{loss}[/]")
        if self.error:
            parts.append(f"[b red]STALE: {escape(self.error[:80])}[/]")
        self.query_one("#exc-summary", Static).update("  ·  ".join(parts))

    def _tail_status(self) -> None:
        words = self._words()
        n = sum(1 for o in self.tail_items if occurrence_matches(o, words))
        state = "[b green]● following[/]" if self.following else "[b yellow]⏸ paused[/] (space resumes from here)"
        filt = f" · filter '{escape(' '.join(words))}'" if words else ""
        self.query_one("#exc-tail-status", Static).update(f"{state} · {n} shown{filt} · Enter opens a line")

    def _focus_main(self) -> None:
        (self.query_one("#exc-tail") if self._on_tail() else self.query_one("#exc-groups")).focus()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(self.interval, self.fetch_groups)

    def _arm_tail(self) -> None:
        if self._tail_timer is not None:
            self._tail_timer.stop()
        if self.following:
            self._tail_timer = self.set_timer(self.interval, self.fetch_tail)


class OccurrenceScreen(ModalScreen[None]):
    """One tail line opened: the occurrence's full message, traceback and context."""

    BINDINGS = [Binding("escape,q,enter", "dismiss", "Back", id="exceptions.occurrence.close")]
    DEFAULT_CSS = """
    OccurrenceScreen { background: $background; }
    #occ-box { height: 1fr; padding: 0 1; }
    #occ-hint { height: 1; dock: bottom; background: $panel; padding: 0 1; }
    """

    def __init__(self, occurrence: Occurrence) -> None:
        super().__init__()
        self.occurrence = occurrence

    def compose(self) -> ComposeResult:
        o, e = self.occurrence, self.occurrence.event
        parts: list[RenderableType] = [
            Text.assemble((e.type, "bold red"), ": ", e.message),
            Text(f"{_hms(e.ts_ms)} · {e.service}@{e.host} · event {e.event_id} · group {o.group_id}", style="dim"),
            Text(""),
            Syntax(traceback_text(e), "pytb", theme="ansi_dark", word_wrap=True, background_color="default"),
        ]
        if e.context:
            parts.append(Text("context: " + ", ".join(f"{k}={v}" for k, v in e.context.items()), style="dim"))
        with VerticalScroll(id="occ-box"):
            yield Static(Group(*parts), id="occ-detail")
        yield Static("[b]Esc[/b] back to the tail", id="occ-hint")

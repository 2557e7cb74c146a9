"""The console app: workers fetch and parse off the loop, handlers apply, widgets render.

The fetch timer is armed only after a fetch has finished (dolphie's way), so a slow ops API
slows the refresh instead of piling requests up. One fetch cycle reads the state, the new
events (by cursor), the LLM providers and, while the Store tab is shown, the quarantined records;
parsing and row preparation run in worker threads, and the tables only touch cells whose text
changes. Each tab is a widget (console/tabs.py) that applies a fetch and owns its keys; every
action goes through `ask`, the one confirm-then-act flow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.events import Resize
from textual.notifications import Notification, Notify
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static, TabbedContent

from console.client import OpsError, Unreachable, Whoami
from console.commands import allowed, bindings, commands
from console.format import error_sentence
from console.messages import ActionDone, ActionFailed, FetchFailed, StateFetched, WhoamiFetched
from console.prepare import prepare
from console.screens.confirm import Ask, ConfirmAction, outage_step
from console.screens.help import HelpScreen
from console.screens.notices import EventDetail, Notice, NoticesScreen
from console.source import Source
from console.tabs import TABS, ConsoleTab, ServersTab
from console.undo import UndoLog
from console.widgets.banner import CapacityBanner, OutageBanner, StoreBanner
from console.widgets.events_log import EventsLog
from console.widgets.live_table import LiveTable
from console.widgets.summary import ClusterSummary
from console.widgets.tables import ServersTable
from ctops.wire import ClusterState, Event, LLMProviderView, StoreIntegrityView

Severity = Literal["information", "warning", "error"]

EVENTS_PAGE = 200
EVENT_PAGES_PER_CYCLE = 5  # a burst larger than this is caught up over the next cycles
PROVIDERS_RETRY_CYCLES = 30  # after a 404 (no LLM pool on this dispatcher), ask again this rarely
NEWS_MS = 60_000  # an event older than this (cluster clock) is history: listed, not announced
FLASH_S = {"information": 8.0, "warning": 15.0, "error": 30.0}


# the screens a toast must not cover (full views such as the exceptions screen may have toasts)
DIALOGS = (ConfirmAction, HelpScreen, NoticesScreen, EventDetail)


def incident(ask: Ask) -> str:
    """Notices about one action are one incident; every leadership move is the leader incident."""
    return "leader" if ask.what == "dispatchers" else f"action:{ask.action}:{ask.target}"


@dataclass(frozen=True, slots=True)
class Applied:
    """What one applied fetch cost, for whoever watches (`ctops bench console`); the app keeps none of it."""

    parse_ms: float  # rows prepared in the worker thread
    apply_ms: float  # on the event loop, wall
    apply_cpu_ms: float  # the same in CPU time (a busy machine does not inflate it)


class ConsoleApp(App[int]):
    CSS_PATH = "console.tcss"
    TITLE = "ctops console"
    BINDINGS = bindings()

    def __init__(
        self,
        source: Source,
        *,
        interval: float = 1.0,
        keymap: Mapping[str, str] | None = None,
        handle_sighup: bool = False,
        on_applied: Callable[[Applied], None] | None = None,
        token_from: str = "--token",
        theme: str | None = None,
    ) -> None:
        super().__init__()
        self.theme_name = theme
        self.token_from = token_from  # where the token came from, for a 401's sentence
        self.source = source
        self.interval = interval
        self.keymap_overrides = dict(keymap or {})
        self.handle_sighup = handle_sighup
        self.on_applied = on_applied
        self.cluster: ClusterState | None = None
        self.providers: list[LLMProviderView] | None = None
        self.who: Whoami | None = None
        self.stale = False
        self.paused = False
        self.applied = 0  # states applied so far: tests wait on it instead of sleeping
        self.failures = 0
        self.notices: deque[Notice] = deque(maxlen=200)  # what the console said (N shows it), newest last
        self._toasts: dict[str, Notification] = {}  # the toast shown per incident, replaced by the next
        self._alarms: set[str] = set()  # incidents whose last notice was an error: a later word on them resolves
        self._flash_timer: Timer | None = None
        self._noticed_events: deque[str] = deque(maxlen=2000)  # event ids already noticed (any dispatcher)
        self.events_seen: deque[Event] = deque(maxlen=500)  # what the events pane shows, newest last
        self._event_cursor: str | None = None
        self._events_primed = False  # the backlog shown at start is not toasted
        self._leader_known = False
        self._leader_announced: str | None = None
        self._providers_supported = True
        self._cycles = 0
        self._last_ok: float | None = None
        self._timer: Timer | None = None
        self.undo_log = UndoLog()  # reversible actions done here, newest last (console/undo.py)

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield ClusterSummary(id="summary")
        yield OutageBanner(id="banner")
        yield CapacityBanner(id="capacity-banner")
        yield StoreBanner(id="store-banner")
        with TabbedContent(id="tabs", initial="tab-servers"):
            for i, tab in enumerate(TABS, start=1):
                yield tab(i)
        yield Static("", id="flash")
        yield Footer()

    def on_mount(self) -> None:
        if self.theme_name:
            if self.theme_name not in self.available_themes:
                self.notice("warning", "Unknown theme", f"No theme {self.theme_name!r}; themes: "
                            f"{', '.join(sorted(self.available_themes))}. The default is used.")
            else:
                self.theme = self.theme_name
        if self.keymap_overrides:
            self.set_keymap(self.keymap_overrides)
        if self.handle_sighup:
            # terminal gone (SSH dropped): leave through the normal exit path so workers stop
            # and the HTTP client closes, instead of dying mid-write on a dead tty
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._terminal_gone)
            # a hang-up reaches only the session leader (make, tmux's command): a process below it
            # gets no SIGHUP, so the terminal is also looked at every second
            fd = sys.__stdin__.fileno() if sys.__stdin__ is not None else -1
            if fd >= 0 and os.isatty(fd):
                self.set_interval(1.0, partial(self._check_terminal, fd))
        self.main.query_one(OutageBanner).display = False
        self.main.query_one(StoreBanner).display = False
        self.main.query_one(CapacityBanner).display = False
        self.main.query_one("#flash").display = False
        self.main.query_one(ServersTab).fit(self.size.width, self.size.height)
        self.main.query_one(ClusterSummary).show(None, None, False)
        self.main.query_one(ServersTable).focus()
        self.fetch_whoami()
        self.fetch_state()

    def _check_terminal(self, fd: int) -> None:
        if not os.isatty(fd):  # a hung-up terminal answers no terminal call
            self._terminal_gone()

    def _terminal_gone(self) -> None:
        """Leave without drawing or restoring anything: Textual's output thread dies on a dead
        terminal, and its shutdown would then wait for ever on the full output queue."""
        driver = self._driver
        if driver is not None:
            driver.write = _discard  # type: ignore[method-assign]
            driver.flush = _nothing  # type: ignore[method-assign]
            if hasattr(driver, "_writer_thread"):
                driver._writer_thread = None  # nothing left to stop
        self.exit()

    def on_resize(self, event: Resize) -> None:
        self.main.query_one(ServersTab).fit(event.size.width, event.size.height)

    async def on_unmount(self) -> None:
        if self.handle_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.source.aclose()

    @property
    def main(self) -> Screen:
        """The screen with the tables. App.query looks at the top screen, which may be a dialog."""
        return self.screen_stack[0]

    @property
    def role(self) -> str | None:
        return self.who.role if self.who else None

    @property
    def active_tab(self) -> str:
        return (self.main.query_one(TabbedContent).active or "tab-servers").removeprefix("tab-")

    def tab(self, name: str | None = None) -> ConsoleTab:
        return self.main.query_one(f"#tab-{name or self.active_tab}", ConsoleTab)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_bindings()
        if isinstance(event.pane, ConsoleTab):
            event.pane.shown()

    # -- workers: I/O only (parsing in threads), results go back as messages ----------------------

    @work(exclusive=True, group="fetch")
    async def fetch_state(self) -> None:
        try:
            state = await self.source.state()
        except Unreachable as exc:
            self.post_message(FetchFailed(str(exc), unreachable=True))
            return
        except OpsError as exc:
            self.post_message(FetchFailed(self._token_sentence(exc) if exc.status == 401
                                          else f"{exc.status} {error_sentence(exc.error, exc.detail)}",
                                          unreachable=False))
            return
        except Exception as exc:  # noqa: BLE001 - a bad answer must not kill the console
            self.post_message(FetchFailed(f"{type(exc).__name__}: {exc}", unreachable=False))
            return
        try:
            events = await self._fetch_events()
            providers, providers_error = await self._fetch_providers()
            integrity, integrity_error = await self._fetch_integrity()
            fetched = time.perf_counter()
            prepared = await asyncio.to_thread(prepare, state, providers, integrity)
        except Exception as exc:  # noqa: BLE001 - a worker error would end the app; report it and go on
            self.post_message(FetchFailed(f"{type(exc).__name__}: {exc}", unreachable=False))
            return
        self.post_message(StateFetched(state, prepared, events, providers, providers_error, integrity,
                                       integrity_error, parse_ms=(time.perf_counter() - fetched) * 1000))

    async def _fetch_events(self) -> list[Event] | None:
        out: list[Event] = []
        after = self._event_cursor
        try:
            for _ in range(EVENT_PAGES_PER_CYCLE):
                page = await self.source.events(after, EVENTS_PAGE)
                out += page
                if after is None or len(page) < EVENTS_PAGE:
                    break  # the first read is the latest page of the backlog, not all of it
                after = page[-1].id
        except Exception:  # noqa: BLE001 - events are secondary: the state fetch reports outages
            return out or None
        return out

    async def _fetch_providers(self) -> tuple[list[LLMProviderView] | None, str | None]:
        self._cycles += 1
        if not self._providers_supported and self._cycles % PROVIDERS_RETRY_CYCLES:
            return None, None
        try:
            return await self.source.providers(), None
        except OpsError as exc:
            return None, f"{exc.status}" if exc.status == 404 else str(exc)
        except Exception as exc:  # noqa: BLE001
            return None, f"{type(exc).__name__}: {exc}"

    async def _fetch_integrity(self) -> tuple[StoreIntegrityView | None, str | None]:
        if self.active_tab != "store":
            return None, None  # the quarantine list is only read while someone looks at it
        try:
            return await self.source.integrity(), None
        except OpsError as exc:
            return None, "this dispatcher has no integrity API (404)" if exc.status == 404 else str(exc)
        except Exception as exc:  # noqa: BLE001
            return None, f"{type(exc).__name__}: {exc}"

    def _token_sentence(self, exc: OpsError) -> str:
        where = getattr(self.source, "current_url", None) or self.source.describe()
        return (f"{where} rejected the token from {self.token_from} (401: {error_sentence(exc.error)}) "
                "Pass a valid operator or viewer token with --token TOKEN or the CTOPS_TOKEN environment "
                "variable, then start the console again.")

    @work(exclusive=True, group="whoami")
    async def fetch_whoami(self) -> None:
        try:
            who = await self.source.whoami()
        except Exception:  # noqa: BLE001 - the state fetch reports outages; whoami is only a label
            return
        self.post_message(WhoamiFetched(who))

    @work(group="actions")
    async def perform(self, ask: Ask, value: str) -> None:
        try:
            done = await ask.call(value)
        except OpsError as exc:
            self.post_message(ActionFailed(ask.target, ask.action, exc.status, error_sentence(exc.error, exc.detail),
                                           ask.what))
        except Unreachable as exc:
            self.post_message(ActionFailed(ask.target, ask.action, None, str(exc), ask.what))
        except Exception as exc:  # noqa: BLE001
            self.post_message(ActionFailed(ask.target, ask.action, None, f"{type(exc).__name__}: {exc}", ask.what))
        else:
            done.key = done.key or incident(ask)
            self.post_message(done)
        if ask.then is not None:
            ask.then()

    # -- the one confirm-then-act flow -------------------------------------------------------------

    def ask(self, ask: Ask) -> None:
        """Say what will happen and wait for yes; only then act (in a worker) and report the answer."""

        def answered(value: str | None) -> None:
            if value is None:
                return
            if ask.sent is not None:
                self.notice("information", *ask.sent, key=incident(ask))
            self.perform(ask, value)

        def first(value: str | None) -> None:
            if value is not None and ask.outage is not None:
                # the last capacity: a second, explicit step; its typed name is not the action's value
                self.push_screen(outage_step(ask), lambda typed: answered(value if typed is not None else None))
                return
            answered(value)

        self.clear_notifications()  # no toast covers the dialog's buttons; the flash line and N keep them
        self.push_screen(ConfirmAction(ask.question, ask.detail, ask.verb, ask.field), first)

    # -- handlers: apply results to widgets -------------------------------------------------------

    @on(StateFetched)
    def _state_fetched(self, msg: StateFetched) -> None:
        if self._closing or self.main._closing or not self.main.query(ClusterSummary):
            return  # a fetch that lands while the app exits finds its widgets already gone
        t0, c0 = time.perf_counter(), time.thread_time()
        if msg.prepared is None:
            msg.prepared = prepare(msg.state, msg.providers, msg.integrity)
        state = msg.state
        previous = self.cluster
        self.cluster = state
        self._last_ok = time.monotonic()
        if msg.prepared.providers is not None:
            self.providers = msg.providers
            self._providers_supported = True
        elif msg.providers_error == "404":
            self._providers_supported = False
        if self.who is None:
            # the first whoami may have failed (a slow or absent dispatcher): ask again once one answers,
            # or the console would never learn its role
            self.fetch_whoami()
        if self.stale:
            self.stale = False
            self.main.query_one(OutageBanner).clear_problem()
            self.main.query_one(ServersTable).remove_class("-stale")
        active = self.active_tab
        with self.batch_update():
            for tab in self.main.query(ConsoleTab):
                tab.apply(msg, visible=tab.NAME == active)
            self.main.query_one(StoreBanner).show(state.store)
            self._show_summary()
            self._leadership(previous, state)
            if msg.events:
                self._events(msg.events)
            elif msg.events is not None:
                self._events_primed = True
        self.applied += 1
        if self.on_applied is not None:
            self.on_applied(Applied(msg.parse_ms, (time.perf_counter() - t0) * 1000,
                                    (time.thread_time() - c0) * 1000))
        self._arm()

    def _leadership(self, previous: ClusterState | None, state: ClusterState) -> None:
        if not self._leader_known:
            self._leader_known = True
            self._leader_announced = state.leader
            return
        before = previous.leader if previous else self._leader_announced
        if state.leader == before:
            return
        if state.leader is None:
            self.notice("error", "No leader",
                        f"Dispatcher {before} no longer leads and no standby has taken over yet.", key="leader")
        else:
            epoch = next((d.epoch for d in state.dispatchers if d.name == state.leader), None)
            tail = f" (epoch {epoch})" if epoch is not None else ""
            self.notice("warning", "Leader changed",
                        f"Dispatcher {state.leader} now leads{tail}; before: {before or 'none'}.", key="leader")
        self._leader_announced = state.leader

    def _events(self, events: list[Event]) -> None:
        cursor = self._event_cursor
        if cursor is not None:
            key = _stream_key(cursor)
            events = [e for e in events if _stream_key(e.id) > key]  # a cancelled fetch may overlap
        if not events:
            return
        self._event_cursor = events[-1].id
        self.events_seen.extend(events)
        for log in self.main.query(EventsLog):
            log.add(events)
        if not self._events_primed:
            self._events_primed = True
            return
        # an event is news once: not again from the other dispatcher's stream after a failover, and not
        # when it is already old (a backlog caught up late)
        now = self.cluster.now_ms if self.cluster else None
        fresh = [e for e in events if e.event_id not in self._noticed_events
                 and (now is None or now - e.ts_ms <= NEWS_MS)]
        self._noticed_events.extend(e.event_id for e in events)
        critical = [e for e in fresh if e.severity == "critical"]
        if len(critical) > 5:
            kinds = ", ".join(sorted({e.kind for e in critical}))
            self.notice("error", f"{len(critical)} critical events", f"{kinds}. See the Events tab (3).",
                        key="events:burst")
        else:
            for e in critical:
                # one incident per target: a later event about it (host back, server up) replaces this one
                self.notice("error", f"{e.kind}: {e.target or e.source}", e.message,
                            key=f"event:{e.target or e.source}")
        for e in fresh:
            if e.severity != "critical" and e.target and f"event:{e.target}" in self._alarms:
                self.notice(e.severity if e.severity == "warning" else "information",
                            f"{e.kind}: {e.target}", e.message, key=f"event:{e.target}")
            if e.kind == "leader_changed" and e.target and e.target != self._leader_announced:
                self._leader_announced = e.target
                self.notice("warning", "Leader changed", e.message, key="leader")

    @on(FetchFailed)
    def _fetch_failed(self, msg: FetchFailed) -> None:
        self.failures += 1
        self.stale = True
        banner = self.main.query_one(OutageBanner)
        if msg.unreachable:
            age = None if self._last_ok is None else time.monotonic() - self._last_ok
            banner.show_problem(msg.reason, age)
        else:
            banner.show_error(msg.reason)
        self.main.query_one(ServersTable).add_class("-stale")
        self._show_summary()
        self._arm()

    @on(WhoamiFetched)
    def _whoami_fetched(self, msg: WhoamiFetched) -> None:
        self.who = msg.who
        self._show_summary()
        self.refresh_bindings()  # the footer drops what this role may not do

    @on(ActionDone)
    def _action_done(self, msg: ActionDone) -> None:
        self.notice(msg.severity, msg.title, msg.message, key=msg.key)  # type: ignore[arg-type]
        self.action_refresh_now()

    @on(ActionFailed)
    def _action_failed(self, msg: ActionFailed) -> None:
        title = {
            401: "Token rejected",
            403: "Permission denied",
            404: f"Unknown {msg.what.rstrip('s')}",
            409: "Not applicable",
            504: "No answer in time",
            None: "Ops API unreachable",
        }.get(msg.status, f"{msg.action.capitalize()} failed")
        text = f"Could not {msg.action} {msg.target}. {msg.reason}"
        if msg.status == 403:
            role = f"role {self.who.role}" if self.who else "this token"
            text = (f"Your token ({role}) may not {msg.action} {msg.what}; nothing changed. "
                    "An operator token may.")
        self.notice("error", title, text)
        self.action_refresh_now()

    # -- app-wide actions (keys, palette); the tabs own the rest ----------------------------------

    def action_show_tab(self, name: str) -> None:
        self.main.query_one(TabbedContent).active = f"tab-{name}"

    def action_refresh_now(self) -> None:
        self._stop_timer()
        self.fetch_state()

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if self.paused:
            self._stop_timer()
        else:
            self.fetch_state()
        self._show_summary()

    def action_exceptions(self) -> None:
        from console.screens.exceptions import ExceptionsScreen  # noqa: PLC0415 - loaded when first opened

        if not isinstance(self.screen, ExceptionsScreen):
            self.push_screen(ExceptionsScreen(self.source, interval=self.interval))

    def action_cmdline(self) -> None:
        from console.screens.cmdline import open_cmdline  # noqa: PLC0415 - loaded when first used

        open_cmdline(self)

    def action_audit(self) -> None:
        from console.screens.audit import AuditScreen  # noqa: PLC0415 - loaded when first opened

        if not isinstance(self.screen, AuditScreen):
            self.push_screen(AuditScreen(self.source, interval=self.interval))

    def action_undo(self) -> None:
        from console.undo import run_undo  # noqa: PLC0415

        run_undo(self)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.keymap_overrides, self.role))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for c in commands():
            if c.palette and allowed(c, self.role):
                title = f"Show {c.title}" if c.id.startswith("console.tab.") else c.title
                yield SystemCommand(title, c.help, partial(self.run_action, c.action))
        tab = self.tab()
        for c in commands(tab.NAME):
            if c.palette and allowed(c, self.role):
                yield SystemCommand(c.title + tab.PALETTE_SUFFIX, c.help, partial(self.run_action, c.action, tab))
        from console.screens.cmdline import palette  # noqa: PLC0415 - the other tabs' commands and table keys

        yield from palette(self)

    # -- helpers ----------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._stop_timer()
        if not self.paused:
            self._timer = self.set_timer(self.interval, self.fetch_state)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _show_summary(self) -> None:
        self.main.query_one(ClusterSummary).show(self.cluster, self.who, self.stale, self.paused, self.providers)
        self.main.query_one(CapacityBanner).show(self.cluster, self.providers)

    def notice(self, severity: Severity, title: str, message: str, key: str | None = None) -> None:
        """Tell staff: always in the history (N) and the flash line; an error also as a toast, unless a
        dialog is open (a toast must not cover it). One toast per incident (`key`): the next notice
        of the same incident replaces it, so a resolved alarm does not stay up."""
        n = Notice(severity, title, message, key, int(time.time() * 1000))
        self.notices.append(n)
        if key is not None:
            (self._alarms.add if severity == "error" else self._alarms.discard)(key)
        self._flash(n)
        old = self._toasts.pop(key, None) if key else None
        if old is not None and old in self._notifications:
            self._unnotify(old)  # Textual's own removal of one notification
        if severity != "error" or isinstance(self.screen, DIALOGS):
            return
        toast = Notification(Text(message).markup, title, severity, 10)
        self.post_message(Notify(toast))
        if key:
            self._toasts[key] = toast

    def _flash(self, n: Notice) -> None:
        glyph, style = {"error": ("✖", "bold red"), "warning": ("▲", "yellow")}.get(n.severity, ("·", ""))
        flash = self.main.query("#flash")
        if not flash:
            return
        line = flash.first(Static)
        line.update(Text.assemble((f"{glyph} {n.title}", style), ": ", n.message, ("   (N: all notices)", "dim"),
                                  no_wrap=True, overflow="ellipsis"))
        line.display = True
        if self._flash_timer is not None:
            self._flash_timer.stop()
        self._flash_timer = self.set_timer(FLASH_S[n.severity], self._clear_flash)

    def _clear_flash(self) -> None:
        for flash in self.main.query("#flash"):
            flash.display = False  # its row goes back to the tables

    def action_notices(self) -> None:
        if not isinstance(self.screen, NoticesScreen):
            self.push_screen(NoticesScreen(self.notices, int(time.time() * 1000)))

    def tables(self) -> list[LiveTable]:
        return list(self.main.query(LiveTable))


def _discard(data: str) -> None:
    """Output once the terminal is gone."""


def _nothing() -> None:
    pass


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def create_app(
    source: Source,
    *,
    interval: float = 1.0,
    keymap: Mapping[str, str] | None = None,
    handle_sighup: bool = False,
    on_applied: Callable[[Applied], None] | None = None,
    token_from: str = "--token",
    theme: str | None = None,
) -> ConsoleApp:
    """The app factory: production passes a ConsoleClient, tests a FixedSource (no network)."""
    return ConsoleApp(source, interval=interval, keymap=keymap, handle_sighup=handle_sighup, on_applied=on_applied,
                      token_from=token_from, theme=theme)

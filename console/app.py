"""The console app: workers fetch and parse off the loop, handlers apply, widgets render.

The fetch timer is armed only after a fetch has finished (dolphie's way), so a slow ops API
slows the refresh instead of piling requests up. One fetch cycle reads the state, the new
events (by cursor) and the LLM providers; parsing and row preparation run in worker threads,
and the tables only touch cells whose text changes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Horizontal, Vertical
from textual.events import Resize
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from console.client import Action, OpsError, Unreachable, Whoami
from console.commands import ACTION_TAB, COMMANDS, TABS, available, bindings
from console.format import split_process_key, store_summary
from console.messages import ActionDone, ActionFailed, FetchFailed, StateFetched, WhoamiFetched
from console.prepare import prepare
from console.screens.confirm import ConfirmAction
from console.screens.help import HelpScreen
from console.source import Source
from console.widgets.banner import OutageBanner, StoreBanner
from console.widgets.events_log import EventsLog
from console.widgets.live_table import LiveTable
from console.widgets.servers_table import ServersTable
from console.widgets.summary import ClusterSummary
from console.widgets.tables import DispatchersTable, ProcessesTable, ProvidersTable, StoreTable
from ctops.wire import ClusterState, Event, LLMProviderView

Severity = Literal["information", "warning", "error"]

EVENTS_PAGE = 200
EVENT_PAGES_PER_CYCLE = 5  # a burst larger than this is caught up over the next cycles
PROVIDERS_RETRY_CYCLES = 30  # after a 404 (no LLM pool on this dispatcher), ask again this rarely
ROOMY = (110, 36)  # from this size on the servers tab also shows the dispatchers and recent events


def _discard(data: str) -> None:
    """Output once the terminal is gone."""


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Notice:
    severity: Severity
    title: str
    message: str


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
    ) -> None:
        super().__init__()
        self.source = source
        self.interval = interval
        self.keymap_overrides = dict(keymap or {})
        self.handle_sighup = handle_sighup
        self.cluster: ClusterState | None = None
        self.providers: list[LLMProviderView] | None = None
        self.who: Whoami | None = None
        self.stale = False
        self.paused = False
        self.applied = 0  # states applied so far: tests wait on it instead of sleeping
        self.failures = 0
        self.notices: deque[Notice] = deque(maxlen=50)  # what the toasts said, newest last
        self.events_seen: deque[Event] = deque(maxlen=500)  # what the events pane shows, newest last
        self.apply_ms: deque[float] = deque(maxlen=1000)  # time on the event loop per applied fetch
        self.apply_cpu_ms: deque[float] = deque(maxlen=1000)  # the same in CPU time (immune to a busy machine)
        self.parse_ms: deque[float] = deque(maxlen=1000)  # time in the worker thread per fetch
        self._event_cursor: str | None = None
        self._events_primed = False  # the backlog shown at start is not toasted
        self._leader_known = False
        self._leader_announced: str | None = None
        self._providers_supported = True
        self._cycles = 0
        self._last_ok: float | None = None
        self._timer: Timer | None = None

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield ClusterSummary(id="summary")
        yield OutageBanner(id="banner")
        yield StoreBanner(id="store-banner")
        with TabbedContent(id="tabs", initial="tab-servers"):
            for i, (name, title) in enumerate(TABS, start=1):
                with TabPane(f"{i} {title}", id=f"tab-{name}"):
                    yield from self._pane(name)
        yield Footer()

    def _pane(self, name: str) -> ComposeResult:
        if name == "servers":
            with Vertical(id="servers-pane"):
                yield ServersTable(id="servers")
                with Horizontal(id="overview"):
                    yield DispatchersTable(id="dispatchers-mini", classes="mini")
                    yield EventsLog(id="events-mini", max_lines=200, classes="mini")
        elif name == "hosts":
            yield ProcessesTable(id="processes")
        elif name == "events":
            yield EventsLog(id="events")
        elif name == "dispatchers":
            yield DispatchersTable(id="dispatchers")
            yield Static("[dim]P promotes the selected standby; D makes the leader step down. "
                         "Both ask first and are audited.[/dim]", id="dispatchers-hint")
        elif name == "llm":
            yield ProvidersTable(id="providers")
            yield Static("", id="providers-note")
        elif name == "store":
            yield Static("", id="store-summary")
            yield StoreTable(id="store-nodes")
            yield Static("[dim]F fails the store over now: the Sentinels promote a replica. "
                         "It asks first and is audited.[/dim]", id="store-hint")

    def on_mount(self) -> None:
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
        self.main.query_one("#providers-note").display = False
        for mini in self.main.query(".mini"):
            mini.can_focus = False
        self._fit_layout(self.size.width, self.size.height)
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
                driver._writer_thread = None  # type: ignore[attr-defined]  # nothing left to stop
        self.exit()

    def on_resize(self, event: Resize) -> None:
        self._fit_layout(event.size.width, event.size.height)

    def _fit_layout(self, width: int, height: int) -> None:
        self.main.query_one("#overview").display = width >= ROOMY[0] and height >= ROOMY[1]

    async def on_unmount(self) -> None:
        if self.handle_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.source.aclose()

    @property
    def main(self) -> Screen:  # type: ignore[type-arg]
        """The screen with the tables. App.query looks at the top screen, which may be a dialog."""
        return self.screen_stack[0]

    @property
    def active_tab(self) -> str:
        return (self.main.query_one(TabbedContent).active or "tab-servers").removeprefix("tab-")

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_bindings()
        for t in event.pane.query(LiveTable):
            t.catch_up()
        tables = event.pane.query(DataTable)
        if tables:
            tables.first().focus()

    # -- workers: I/O only (parsing in threads), results go back as messages ----------------------

    @work(exclusive=True, group="fetch")
    async def fetch_state(self) -> None:
        started = time.perf_counter()
        try:
            state = await self.source.state()
        except Unreachable as exc:
            self.post_message(FetchFailed(str(exc), unreachable=True))
            return
        except OpsError as exc:
            self.post_message(FetchFailed(str(exc), unreachable=False))
            return
        except Exception as exc:  # noqa: BLE001 - a bad answer must not kill the console
            self.post_message(FetchFailed(f"{type(exc).__name__}: {exc}", unreachable=False))
            return
        try:
            events = await self._fetch_events()
            providers, providers_error = await self._fetch_providers()
            fetched = time.perf_counter()
            prepared = await asyncio.to_thread(prepare, state, providers)
        except Exception as exc:  # noqa: BLE001 - a worker error would end the app; report it and go on
            self.post_message(FetchFailed(f"{type(exc).__name__}: {exc}", unreachable=False))
            return
        self.post_message(StateFetched(state, prepared, events, providers, providers_error,
                                       fetch_ms=(fetched - started) * 1000,
                                       parse_ms=(time.perf_counter() - fetched) * 1000))

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

    @work(exclusive=True, group="whoami")
    async def fetch_whoami(self) -> None:
        try:
            who = await self.source.whoami()
        except Exception:  # noqa: BLE001 - the state fetch reports outages; whoami is only a label
            return
        self.post_message(WhoamiFetched(who))

    @work(group="actions")
    async def perform(self, target: str, action: str, what: str, call: Callable[[], Awaitable[ActionDone]]) -> None:
        try:
            done = await call()
        except OpsError as exc:
            self.post_message(ActionFailed(target, action, exc.status, str(exc), what))
        except Unreachable as exc:
            self.post_message(ActionFailed(target, action, None, str(exc), what))
        except Exception as exc:  # noqa: BLE001
            self.post_message(ActionFailed(target, action, None, f"{type(exc).__name__}: {exc}", what))
        else:
            self.post_message(done)

    # -- handlers: apply results to widgets -------------------------------------------------------

    @on(StateFetched)
    def _state_fetched(self, msg: StateFetched) -> None:
        if self._closing or self.main._closing or not self.main.query(ClusterSummary):
            return  # a fetch that lands while the app exits finds its widgets already gone
        t0, c0 = time.perf_counter(), time.thread_time()
        state = msg.state
        prepared = msg.prepared if msg.prepared is not None else prepare(state, msg.providers)
        previous = self.cluster
        self.cluster = state
        self._last_ok = time.monotonic()
        if self.who is None:
            # the first whoami may have failed (a slow or absent dispatcher): ask again once one answers,
            # or the console would never learn its role
            self.fetch_whoami()
        if self.stale:
            self.stale = False
            self.main.query_one(OutageBanner).clear_problem()
            self.main.query_one(ServersTable).remove_class("-stale")
        tab = self.active_tab
        with self.batch_update():
            # tables of other tabs only keep their rows until shown: nothing of theirs is visible
            self.main.query_one(ServersTable).apply(prepared.servers, visible=tab == "servers")
            self.main.query_one(ProcessesTable).apply(prepared.processes, visible=tab == "hosts")
            for t in self.main.query(DispatchersTable):
                t.apply(prepared.dispatchers)
            self._apply_providers(msg, prepared.providers)
            self._apply_store(state, prepared.store, tab == "store")
            self._show_summary()
            self._leadership(previous, state)
            if msg.events:
                self._events(msg.events)
            elif msg.events is not None:
                self._events_primed = True
        self.applied += 1
        self.parse_ms.append(msg.parse_ms)
        self.apply_ms.append((time.perf_counter() - t0) * 1000)
        self.apply_cpu_ms.append((time.thread_time() - c0) * 1000)
        self._arm()

    def _apply_providers(self, msg: StateFetched, rows: dict[str, object] | None) -> None:
        note = self.main.query_one("#providers-note", Static)
        if rows is not None:
            self.providers = msg.providers
            self._providers_supported = True
            self.main.query_one(ProvidersTable).apply(rows)  # type: ignore[arg-type]
            note.display = False
        elif msg.providers_error == "404":
            self._providers_supported = False
            note.update("This dispatcher has no LLM pool API (/api/v1/llm/providers answered 404).")
            note.display = True
        elif msg.providers_error:
            note.update(f"Could not read the LLM providers: {msg.providers_error}")
            note.display = True

    def _apply_store(self, state: ClusterState, rows: dict[str, object], visible: bool) -> None:
        self.main.query_one(StoreTable).apply(rows, visible=visible)  # type: ignore[arg-type]
        summary = store_summary(state.store)
        pane = self.main.query_one("#store-summary", Static)
        if pane.content != summary:
            pane.update(summary)
        self.main.query_one(StoreBanner).show(state.store)

    def _leadership(self, previous: ClusterState | None, state: ClusterState) -> None:
        if not self._leader_known:
            self._leader_known = True
            self._leader_announced = state.leader
            return
        before = previous.leader if previous else self._leader_announced
        if state.leader == before:
            return
        if state.leader is None:
            self._notice("error", "No leader",
                         f"Dispatcher {before} no longer leads and no standby has taken over yet.")
        else:
            epoch = next((d.epoch for d in state.dispatchers if d.name == state.leader), None)
            tail = f" (epoch {epoch})" if epoch is not None else ""
            self._notice("warning", "Leader changed",
                         f"Dispatcher {state.leader} now leads{tail}; before: {before or 'none'}.")
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
        critical = [e for e in events if e.severity == "critical"]
        if len(critical) > 5:
            kinds = ", ".join(sorted({e.kind for e in critical}))
            self._notice("error", f"{len(critical)} critical events", f"{kinds}. See the Events tab (3).")
        else:
            for e in critical:
                self._notice("error", f"{e.kind}: {e.target or e.source}", e.message)
        for e in events:
            if e.kind == "leader_changed" and e.target and e.target != self._leader_announced:
                self._leader_announced = e.target
                self._notice("warning", "Leader changed", e.message)

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

    @on(ActionDone)
    def _action_done(self, msg: ActionDone) -> None:
        self._notice(msg.severity, msg.title, msg.message)  # type: ignore[arg-type]
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
        text = f"Could not {msg.action} {msg.target}: {msg.reason}"
        if msg.status == 403:
            role = f"role {self.who.role}" if self.who else "this token"
            text = f"Your token ({role}) may not {msg.action} {msg.what}; nothing changed. ({msg.reason})"
        self._notice("error", title, text)
        self.action_refresh_now()

    # -- actions (keys, palette) ------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        tab = ACTION_TAB.get(action)
        return tab is None or tab == self.active_tab  # False also hides the binding from the footer

    def action_show_tab(self, name: str) -> None:
        self.main.query_one(TabbedContent).active = f"tab-{name}"

    def action_drain(self) -> None:
        self._confirm_server("drain")

    def action_disable(self) -> None:
        self._confirm_server("disable")

    def action_enable(self) -> None:
        self._confirm_server("enable")

    def action_process(self, action: str) -> None:
        key = self.main.query_one(ProcessesTable).selected
        if key is None:
            self._notice("warning", "No process selected", "Move the cursor to a supervised process first.")
            return
        host, process = split_process_key(key)
        h = next((h for h in self.cluster.hosts if h.name == host), None) if self.cluster else None
        p = next((p for p in h.processes if p.name == process), None) if h else None
        if h is None or p is None:
            self._notice("warning", "No supervised process", f"Host {host} reports no supervised process.")
            return
        now = f"Now {p.state}" + (f", pid {p.pid}" if p.pid else "") + f", {p.restarts} restart(s); host {h.state}."
        effect = {
            "restart": "The agent stops it (SIGTERM, then SIGKILL after the grace period) and starts it again. "
                       "While it is down the dispatcher sends its learners to other servers.",
            "stop": "The agent stops it and leaves it stopped (no automatic restart) until you start it. "
                    "Its learners move to other servers.",
            "start": "The agent starts it and supervises it again.",
        }[action]
        if h.state != "alive":
            effect += f"\nHost {host} is {h.state}: its agent may not answer (the request gives up after ~15 s)."
        source = self.source

        async def call() -> ActionDone:
            r = await source.process_action(host, process, action)  # type: ignore[arg-type]
            return ActionDone(f"{action.capitalize()} {r.process} on {r.host}" + ("" if r.ok else " failed"),
                              f"{r.message} (by {r.by})", "information" if r.ok else "error")

        def answered(yes: bool | None) -> None:
            if yes:
                self._notice("information", f"{action.capitalize()} {process}",
                             f"Sent to the agent on {host}; its answer comes within ~15 s.")
                self.perform(f"{process} on {host}", action, "processes", call)

        self.push_screen(ConfirmAction(f"{action.capitalize()} [b]{process}[/b] on [b]{host}[/b]?",
                                       f"{now}\n{effect}", action.capitalize()), answered)

    def action_leadership(self, action: str) -> None:
        st = self.cluster
        if st is None:
            return
        selected = self.main.query_one("#dispatchers", DispatchersTable).selected
        leader = st.leader
        standbys = [d.name for d in st.dispatchers if d.name != leader and d.role == "standby" and d.healthy]
        if action == "promote":
            if selected is None or selected == leader:
                self._notice("warning", "Select a standby",
                             f"{selected or 'Nothing'} is selected; move the cursor to a standby to promote.")
                return
            target = selected
            question = f"Promote dispatcher [b]{target}[/b] to leader?"
            detail = (f"Dispatcher {leader or '(none)'} stops leading; {target} takes over within ~1 s. "
                      "Learners' requests keep being served.")
        else:
            if leader is None:
                self._notice("warning", "No leader", "No dispatcher leads right now; nothing to step down.")
                return
            target = leader
            takers = ", ".join(standbys) if standbys else "no healthy standby (!)"
            question = f"Dispatcher [b]{leader}[/b] steps down?"
            detail = (f"Dispatcher {leader} stops leading; {takers} takes over within ~1 s. "
                      "Learners' requests keep being served.")
            if not standbys:
                detail += "\nWithout a healthy standby the cluster may have no leader for a while."
        if selected is not None and action == "step-down" and selected != leader:
            detail += f"\n(The leader is {leader}, not the selected {selected}.)"
        source = self.source

        async def call() -> ActionDone:
            r = await source.leadership(target, action)  # type: ignore[arg-type]
            return ActionDone("Leadership moved",
                              f"{r.leader_before} → {r.leader_after} (epoch {r.epoch}), {r.action} by {r.by}.",
                              "warning")

        def answered(yes: bool | None) -> None:
            if yes:
                self.perform(f"dispatcher {target}", action, "dispatchers", call)

        verb = "Promote" if action == "promote" else "Step down"
        self.push_screen(ConfirmAction(question, detail, verb), answered)

    def action_provider(self, action: str) -> None:
        name = self.main.query_one(ProvidersTable).selected
        p = next((p for p in self.providers or [] if p.name == name), None)
        if p is None:
            self._notice("warning", "No provider selected", "Move the cursor to an LLM provider first.")
            return
        effect = {
            "pin": f"Every LLM request goes to {name} first, whatever the priorities, until you unpin it "
                   f"(requests still fail over when {name} fails).",
            "unpin": "Requests go by priority and health again.",
            "disable": f"{name} gets no requests; they go to the next provider by priority.",
            "enable": f"{name} gets requests again, by priority and health.",
        }[action]
        flags = ", ".join(f for f, on_ in (("pinned", p.pinned), ("disabled", p.disabled)) if on_) or "not pinned"
        detail = (f"Now {p.state}, breaker {p.breaker.replace('_', '-')}, priority {p.priority}, {flags}.\n"
                  f"{effect}\nTakes effect at once on every dispatcher.")
        source = self.source

        async def call() -> ActionDone:
            r = await source.provider_action(name, action)  # type: ignore[arg-type, arg-type]
            pinned = f"pinned: {r.pinned}" if r.pinned else "nothing pinned"
            return ActionDone(f"{action.capitalize()} {r.provider}",
                              f"{r.provider} is now {r.provider_state.state}; {pinned} (by {r.by}).")

        def answered(yes: bool | None) -> None:
            if yes:
                self.perform(f"provider {name}", action, "LLM providers", call)

        self.push_screen(ConfirmAction(f"{action.capitalize()} LLM provider [b]{name}[/b]?", detail,
                                       action.capitalize()), answered)

    def action_store_failover(self) -> None:
        store = self.cluster.store if self.cluster else None
        if store is None:
            self._notice("warning", "No store status", "This dispatcher reports no store status.")
            return
        if not store.sentinels:
            self._notice("warning", "Nothing to fail over to",
                         f"The store is one node ({store.primary}) without Sentinels or replicas.")
            return
        up = [r.name for r in store.replicas if r.state == "up"]
        detail = (f"Primary now: {store.primary or 'none'}; replicas up: {', '.join(up) or 'none (!)'}.\n"
                  "The Sentinels promote a replica and the old primary becomes a replica. Writes pause for "
                  "a few seconds; learners' requests that need the store wait or get a 503 to retry.")
        if store.failover_in_progress:
            detail += "\nA failover is already in progress."
        source = self.source

        async def call() -> ActionDone:
            r = await source.store_failover()
            return ActionDone("Store failed over", f"primary {r.primary_before} → {r.primary_after}, by {r.by}.",
                              "warning")

        def answered(yes: bool | None) -> None:
            if yes:
                self.perform("the store", "fail over", "store", call)

        self.push_screen(ConfirmAction("Fail the store over [b]now[/b]?", detail, "Fail over"), answered)

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
        from console.screens.exceptions import open_exceptions  # noqa: PLC0415 - loaded when first opened

        open_exceptions(self)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.keymap_overrides))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        tab = self.active_tab
        for c in COMMANDS:
            if c.palette and available(c, tab):
                title = c.title
                if c.tab in ("servers", "hosts", "llm"):
                    title += {"servers": " selected server", "hosts": " selected process",
                              "llm": " selected LLM provider"}[c.tab]
                elif c.id.startswith("console.tab."):
                    title = f"Show {c.title}"
                yield SystemCommand(title, c.help, partial(self.run_action, c.action))

    # -- helpers ----------------------------------------------------------------------------------

    def _confirm_server(self, action: Action) -> None:
        name = self.main.query_one(ServersTable).selected
        server = next((s for s in self.cluster.servers if s.name == name), None) if self.cluster else None
        if server is None:
            self._notice("warning", "No server selected", "Move the cursor to a server first.")
            return
        source = self.source

        async def call() -> ActionDone:
            r = await source.act(server.name, action)
            return ActionDone(f"{action.capitalize()}: {r.server}",
                              f"{r.server} is now {r.state} (admin {r.admin}), by {r.by}.")

        def answered(yes: bool | None) -> None:
            if yes:
                self.perform(server.name, action, "servers", call)

        self.push_screen(ConfirmAction.for_server(action, server), answered)

    def _arm(self) -> None:
        self._stop_timer()
        if not self.paused:
            self._timer = self.set_timer(self.interval, self.fetch_state)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _show_summary(self) -> None:
        self.main.query_one(ClusterSummary).show(self.cluster, self.who, self.stale, self.paused)

    def _notice(self, severity: Severity, title: str, message: str) -> None:
        self.notices.append(Notice(severity, title, message))
        self.notify(Text(message).markup, title=title, severity=severity, timeout=10 if severity == "error" else 5)

    def tables(self) -> list[LiveTable]:
        return list(self.main.query(LiveTable))


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
) -> ConsoleApp:
    """The app factory: production passes a ConsoleClient, tests a FixedSource (no network)."""
    return ConsoleApp(source, interval=interval, keymap=keymap, handle_sighup=handle_sighup)

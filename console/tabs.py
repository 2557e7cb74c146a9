"""The console's tabs, one widget each: it composes its tables, applies a fetch to them, and owns the keys
and actions that act on its selected row (bound from the command table), so a key acts only on the tab
whose rows are shown and the app needs no list of which action belongs where.

Every action builds an `Ask` (console/screens/confirm.py) and hands it to the app's one
confirm-then-act flow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Static, TabPane

from console.commands import TAB_TITLES, bindings, permitted
from console.format import split_process_key, store_summary
from console.messages import ActionDone, StateFetched
from console.screens.confirm import Ask, provider_effect, server_question
from console.undo import process_inverse, provider_inverse, server_inverse
from console.widgets.events_log import EventsLog
from console.widgets.live_table import LiveTable
from console.widgets.tables import (
    DispatchersTable,
    ProcessesTable,
    ProvidersTable,
    QuarantineTable,
    ServersTable,
    StoreTable,
)
from ctops.opsapi import LeadershipAction, ProcessAction, ProviderAction, QuarantineAction
from ctops.opsapi import ServerAction as Action

if TYPE_CHECKING:
    from console.app import ConsoleApp

ROOMY = (110, 36)  # from this size on the servers tab also shows the dispatchers and recent events


class ConsoleTab(TabPane):
    DEFAULT_CSS = """
    ConsoleTab > .view-note { height: 1; padding: 0 1; background: $boost; }
    """
    NAME: ClassVar[str]
    PALETTE_SUFFIX: ClassVar[str] = ""  # "Drain" + " selected server"

    def __init__(self, index: int) -> None:
        super().__init__(f"{index} {TAB_TITLES[self.NAME]}", id=f"tab-{self.NAME}")

    @property
    def console(self) -> ConsoleApp:
        return cast("ConsoleApp", self.app)

    @on(DataTable.RowSelected)
    def _describe(self, event: DataTable.RowSelected) -> None:
        """Enter on a row: the describe view of what the row shows."""
        from console.screens.describe import DescribeScreen  # noqa: PLC0415 - loaded when first opened

        if isinstance(event.data_table, LiveTable) and event.row_key.value is not None:
            event.stop()
            self.console.push_screen(DescribeScreen(event.data_table, event.row_key.value))

    @on(LiveTable.ViewChanged)
    def _view_changed(self, event: LiveTable.ViewChanged) -> None:
        """A line under the tab saying what a filter, fault-only toggle or sort hides or reorders."""
        note = event.table.view_note()
        lines = self.query("#view-note")
        if lines:
            line = lines.first(Static)
        elif not note:
            return
        else:
            line = Static("", id="view-note", classes="view-note")
            self.mount(line)
        line.update(f"[b]{escape(note)}[/b]  [dim]/ filter · f faults · o sort · Esc in / clears[/dim]")
        line.display = bool(note)

    def apply(self, msg: StateFetched, visible: bool) -> None:
        """Show one fetch; a tab that is not shown only keeps its rows until it is."""

    def shown(self) -> None:
        for t in self.query(LiveTable):
            t.catch_up()
        focusable = [w for w in self.query("*") if w.can_focus]
        if focusable:
            focusable[0].focus()

    def warn(self, title: str, message: str) -> None:
        self.console.notice("warning", title, message)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # a role that may not act never sees the action (footer, keys); console/commands.py decides
        return permitted(self.console.role, action, self.NAME)


class ServersTab(ConsoleTab):
    NAME, PALETTE_SUFFIX = "servers", " selected server"
    BINDINGS = bindings("servers")

    def compose(self) -> ComposeResult:
        with Vertical(id="servers-pane"):
            yield ServersTable(id="servers")
            with Horizontal(id="overview"):
                yield DispatchersTable(id="dispatchers-mini", classes="mini")
                yield EventsLog(id="events-mini", max_lines=200, classes="mini")

    def on_mount(self) -> None:
        for mini in self.query(".mini"):
            mini.can_focus = False

    def fit(self, width: int, height: int) -> None:
        self.query_one("#overview").display = width >= ROOMY[0] and height >= ROOMY[1]

    def apply(self, msg: StateFetched, visible: bool) -> None:
        assert msg.prepared is not None
        self.query_one(ServersTable).apply(msg.prepared.servers, visible=visible)
        self.query_one("#dispatchers-mini", DispatchersTable).apply(msg.prepared.dispatchers, visible=visible)

    def action_server(self, action: Action, name: str | None = None, undo: bool = False) -> None:
        name = name or self.query_one(ServersTable).selected
        cluster = self.console.cluster
        server = next((s for s in cluster.servers if s.name == name), None) if cluster else None
        if server is None:
            self.warn("No server selected", "Move the cursor to a server first.")
            return
        source = self.console.source
        log, inverse = self.console.undo_log, None if undo else server_inverse(action, server.name, server.admin)

        async def call(_: str) -> ActionDone:
            r = await source.act(server.name, action)
            log.push(inverse)
            return ActionDone(f"{action.capitalize()}: {r.server}",
                              f"{r.server} is now {r.state} (admin {r.admin}), by {r.by}.")

        question, detail, outage = server_question(action, server, cluster.servers if cluster else None)
        self.console.ask(Ask(question, detail, action.capitalize(), action, server.name, "servers", call,
                             outage=outage))


class HostsTab(ConsoleTab):
    NAME, PALETTE_SUFFIX = "hosts", " selected process"
    BINDINGS = bindings("hosts")

    def compose(self) -> ComposeResult:
        yield ProcessesTable(id="processes")

    def apply(self, msg: StateFetched, visible: bool) -> None:
        assert msg.prepared is not None
        self.query_one(ProcessesTable).apply(msg.prepared.processes, visible=visible)

    def action_process(self, action: ProcessAction, key: str | None = None, undo: bool = False) -> None:
        key = key or self.query_one(ProcessesTable).selected
        if key is None:
            self.warn("No process selected", "Move the cursor to a supervised process first.")
            return
        host, process = split_process_key(key)
        cluster = self.console.cluster
        h = next((h for h in cluster.hosts if h.name == host), None) if cluster else None
        p = next((p for p in h.processes if p.name == process), None) if h else None
        if h is None or p is None:
            self.warn("No supervised process", f"Host {host} reports no supervised process.")
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
        source, name = self.console.source, p.name
        log, inverse = self.console.undo_log, None if undo else process_inverse(action, key, p.state)

        async def call(_: str) -> ActionDone:
            r = await source.process_action(host, name, action)
            if r.ok:
                log.push(inverse)
            return ActionDone(f"{action.capitalize()} {r.process} on {r.host}" + ("" if r.ok else " failed"),
                              f"{r.message} (by {r.by})", "information" if r.ok else "error")

        self.console.ask(Ask(
            f"{action.capitalize()} [b]{name}[/b] on [b]{host}[/b]?", f"{now}\n{effect}", action.capitalize(),
            action, f"{name} on {host}", "processes", call,
            sent=(f"{action.capitalize()} {name}", f"Sent to the agent on {host}; its answer comes within ~15 s.")))


class EventsTab(ConsoleTab):
    NAME = "events"

    def compose(self) -> ComposeResult:
        yield EventsLog(id="events")


class DispatchersTab(ConsoleTab):
    NAME = "dispatchers"
    BINDINGS = bindings("dispatchers")

    def compose(self) -> ComposeResult:
        yield DispatchersTable(id="dispatchers")
        yield Static("[dim]P promotes the selected standby; D makes the leader step down. "
                     "Both ask first and are audited.[/dim]", id="dispatchers-hint")

    def apply(self, msg: StateFetched, visible: bool) -> None:
        assert msg.prepared is not None
        self.query_one(DispatchersTable).apply(msg.prepared.dispatchers, visible=visible)

    def action_leadership(self, action: LeadershipAction) -> None:
        st = self.console.cluster
        if st is None:
            return
        selected = self.query_one(DispatchersTable).selected
        leader = st.leader
        standbys = [d.name for d in st.dispatchers if d.name != leader and d.role == "standby" and d.healthy]
        if action == "promote":
            if selected is None or selected == leader:
                self.warn("Select a standby",
                          f"{selected or 'Nothing'} is selected; move the cursor to a standby to promote.")
                return
            target = selected
            question = f"Promote dispatcher [b]{target}[/b] to leader?"
            detail = (f"Dispatcher {leader or '(none)'} stops leading; {target} takes over within ~1 s. "
                      "Learners' requests keep being served.")
        else:
            if leader is None:
                self.warn("No leader", "No dispatcher leads right now; nothing to step down.")
                return
            target = leader
            question = f"Dispatcher [b]{leader}[/b] steps down?"
            if standbys:
                detail = (f"Dispatcher {leader} stops leading; {', '.join(standbys)} takes over within ~1 s. "
                          "Learners' requests keep being served.")
            else:
                detail = (f"Dispatcher {leader} stops leading, and no standby is healthy to take over: the "
                          "cluster may have no leader until one is. Learners' requests keep being served "
                          "on the last known routes.")
        if selected is not None and action == "step-down" and selected != leader:
            detail += f"\n(The leader is {leader}, not the selected {selected}.)"
        source = self.console.source

        async def call(_: str) -> ActionDone:
            r = await source.leadership(target, action)
            return ActionDone("Leadership moved",
                              f"{r.leader_before} → {r.leader_after} (epoch {r.epoch}), {r.action} by {r.by}.",
                              "warning")

        verb = "Promote" if action == "promote" else "Step down"
        self.console.ask(Ask(question, detail, verb, action, f"dispatcher {target}", "dispatchers", call))


class LLMTab(ConsoleTab):
    NAME, PALETTE_SUFFIX = "llm", " selected LLM provider"
    BINDINGS = bindings("llm")

    def compose(self) -> ComposeResult:
        yield ProvidersTable(id="providers")
        yield Static("", id="providers-note")

    def on_mount(self) -> None:
        self.query_one("#providers-note").display = False

    def apply(self, msg: StateFetched, visible: bool) -> None:
        note = self.query_one("#providers-note", Static)
        rows = msg.prepared.providers if msg.prepared else None
        if rows is not None:
            self.query_one(ProvidersTable).apply(rows, visible=visible)
            note.display = False
        elif msg.providers_error == "404":
            note.update("This dispatcher has no LLM pool API (/api/v1/llm/providers answered 404).")
            note.display = True
        elif msg.providers_error:
            note.update(f"Could not read the LLM providers: {msg.providers_error}")
            note.display = True

    def action_provider(self, action: ProviderAction, name: str | None = None, undo: bool = False) -> None:
        name = name or self.query_one(ProvidersTable).selected
        p = next((p for p in self.console.providers or [] if p.name == name), None)
        if p is None or name is None:
            self.warn("No provider selected", "Move the cursor to an LLM provider first.")
            return
        effect = {
            "pin": f"Every LLM request goes to {name} first, whatever the priorities, until you unpin it "
                   f"(requests still fail over when {name} fails).",
            "unpin": "Requests go by priority and health again.",
            "disable": f"{name} gets no requests; they go to the next provider by priority.",
            "enable": f"{name} gets requests again, by priority and health.",
        }[action]
        capacity, outage = provider_effect(action, p, self.console.providers or [])
        if outage:
            effect = f"{name} gets no requests, and no other provider is in rotation to take them."
        flags = ", ".join(f for f, on_ in (("pinned", p.pinned), ("disabled", p.disabled)) if on_) or "not pinned"
        detail = (f"Now {p.state}, breaker {p.breaker.replace('_', '-')}, priority {p.priority}, {flags}.\n"
                  f"{effect}\n{capacity}\nTakes effect at once on every dispatcher.")
        source = self.console.source
        log, inverse = self.console.undo_log, None if undo else provider_inverse(action, name, p.pinned, p.disabled)

        async def call(_: str) -> ActionDone:
            r = await source.provider_action(name, action)
            log.push(inverse)
            pinned = f"pinned: {r.pinned}" if r.pinned else "nothing pinned"
            return ActionDone(f"{action.capitalize()} {r.provider}",
                              f"{r.provider} is now {r.provider_state.state}; {pinned} (by {r.by}).")

        self.console.ask(Ask(f"{action.capitalize()} LLM provider [b]{name}[/b]?", detail, action.capitalize(),
                             action, f"provider {name}", "LLM providers", call, outage=outage))


class StoreTab(ConsoleTab):
    NAME, PALETTE_SUFFIX = "store", ""
    BINDINGS = bindings("store")

    def compose(self) -> ComposeResult:
        yield Static("", id="store-summary")
        yield StoreTable(id="store-nodes")
        yield Static("", id="quarantine-title")
        yield QuarantineTable(id="quarantine")
        yield Static("[dim]F fails the store over now (the Sentinels promote a replica); X discards the "
                     "selected quarantined record, R puts its bytes back. Each asks first and is audited.[/dim]",
                     id="store-hint")

    def apply(self, msg: StateFetched, visible: bool) -> None:
        assert msg.prepared is not None
        self.query_one(StoreTable).apply(msg.prepared.store, visible=visible)
        summary = store_summary(msg.state.store)
        pane = self.query_one("#store-summary", Static)
        if pane.content != summary:
            pane.update(summary)
        title = self.query_one("#quarantine-title", Static)
        rows = msg.prepared.quarantined
        if rows is not None:
            self.query_one(QuarantineTable).apply(rows, visible=visible)
            title.update(f"[b]Quarantined records[/b] {len(rows)}" + ("" if rows else " [dim](none)[/dim]"))
        elif msg.integrity_error:
            title.update(f"[b]Quarantined records[/b] [yellow]could not be read: {msg.integrity_error}[/yellow]")

    def shown(self) -> None:
        super().shown()
        self.console.action_refresh_now()  # the quarantine list is read while this tab is shown

    def action_failover(self) -> None:
        cluster = self.console.cluster
        store = cluster.store if cluster else None
        if store is None:
            self.warn("No store status", "This dispatcher reports no store status.")
            return
        if not store.sentinels:
            self.warn("Nothing to fail over to",
                      f"The store is one node ({store.primary}) without Sentinels or replicas.")
            return
        up = [r.name for r in store.replicas if r.state == "up"]
        detail = (f"Primary now: {store.primary or 'none'}; replicas up: {', '.join(up) or 'none (!)'}.\n"
                  "The Sentinels promote a replica and the old primary becomes a replica. Writes pause for "
                  "a few seconds; learners' requests that need the store wait or get a 503 to retry.")
        if store.failover_in_progress:
            detail += "\nA failover is already in progress."
        source = self.console.source

        async def call(_: str) -> ActionDone:
            r = await source.store_failover()
            return ActionDone("Store failed over", f"primary {r.primary_before} → {r.primary_after}, by {r.by}.",
                              "warning")

        self.console.ask(Ask("Fail the store over [b]now[/b]?", detail, "Fail over", "fail over", "the store",
                             "store", call))

    def action_quarantine(self, action: QuarantineAction) -> None:
        table = self.query_one(QuarantineTable)
        qid = table.selected
        row = table.shown(qid) if qid else None
        if qid is None or row is None:
            self.warn("No quarantined record selected",
                      "Move the cursor to a quarantined record first (Tab moves between the tables).")
            return
        kind, key, outcome, reason, _at, session, _ = row
        # keys and reasons come from the store: shown as text, never read as markup (test prefixes hold brackets)
        now = escape(f"{kind} record {key}, set aside ({reason}); {outcome}"
                     + (f"; session {session}" if session else ""))
        effect = {
            "discard": "Its damaged bytes are deleted for good. What is at the key now stays as it is.",
            "restore": "Its damaged bytes are put back at the key, replacing what is there now; the next read "
                       "checks them again (and sets them aside again if they are still damaged).",
        }[action]
        source = self.console.source

        async def call(_: str) -> ActionDone:
            r = await source.quarantine_action(qid, action)
            done = {"discard": "discarded", "restore": "put back"}[r.action]
            return ActionDone(f"Quarantined record {done}", f"{r.key} ({r.qid}): {done}, by you; audited.")

        self.console.ask(Ask(f"{action.capitalize()} quarantined record [b]{qid}[/b]?", f"{now}.\n{effect}",
                             action.capitalize(), action, f"quarantined record {qid}", "quarantined records",
                             call))


TABS: tuple[type[ConsoleTab], ...] = (ServersTab, HostsTab, EventsTab, DispatchersTab, LLMTab, StoreTab)

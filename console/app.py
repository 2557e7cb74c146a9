"""The console app: workers fetch, handlers apply, widgets render.

The fetch timer is armed only after a fetch has finished (dolphie's way), so a slow ops API
slows the refresh instead of piling requests up.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer

from console.client import Action, OpsError, Unreachable, Whoami
from console.commands import COMMANDS, SERVER_ACTIONS, bindings
from console.messages import ActionDone, ActionFailed, FetchFailed, StateFetched, WhoamiFetched
from console.screens.confirm import ConfirmAction
from console.screens.help import HelpScreen
from console.source import Source
from console.widgets.banner import OutageBanner
from console.widgets.servers_table import ServersTable
from console.widgets.summary import ClusterSummary
from ctops.wire import ClusterState

Severity = Literal["information", "warning", "error"]


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
        self.who: Whoami | None = None
        self.stale = False
        self.paused = False
        self.applied = 0  # states applied so far: tests wait on it instead of sleeping
        self.failures = 0
        self.notices: deque[Notice] = deque(maxlen=50)  # what the toasts said, newest last
        self._last_ok: float | None = None
        self._timer: Timer | None = None

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield ClusterSummary(id="summary")
        yield OutageBanner(id="banner")
        yield ServersTable(id="servers")
        yield Footer()

    def on_mount(self) -> None:
        if self.keymap_overrides:
            self.set_keymap(self.keymap_overrides)
        if self.handle_sighup:
            # terminal gone (SSH dropped): leave through the normal exit path so workers stop
            # and the HTTP client closes, instead of dying mid-write on a dead tty
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.exit)
        self.query_one(OutageBanner).display = False
        self.query_one(ClusterSummary).show(None, None, False)
        self.query_one(ServersTable).focus()
        self.fetch_whoami()
        self.fetch_state()

    async def on_unmount(self) -> None:
        if self.handle_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.source.aclose()

    # -- workers: I/O only, results go back as messages -------------------------------------------

    @work(exclusive=True, group="fetch")
    async def fetch_state(self) -> None:
        try:
            state = await self.source.state()
        except Unreachable as exc:
            self.post_message(FetchFailed(str(exc), unreachable=True))
        except OpsError as exc:
            self.post_message(FetchFailed(str(exc), unreachable=False))
        except Exception as exc:  # noqa: BLE001 - a bad answer must not kill the console
            self.post_message(FetchFailed(f"{type(exc).__name__}: {exc}", unreachable=False))
        else:
            self.post_message(StateFetched(state))

    @work(exclusive=True, group="whoami")
    async def fetch_whoami(self) -> None:
        try:
            who = await self.source.whoami()
        except Exception:  # noqa: BLE001 - the state fetch reports outages; whoami is only a label
            return
        self.post_message(WhoamiFetched(who))

    @work(group="actions")
    async def perform(self, server: str, action: Action) -> None:
        try:
            result = await self.source.act(server, action)
        except OpsError as exc:
            self.post_message(ActionFailed(server, action, exc.status, str(exc)))
        except Unreachable as exc:
            self.post_message(ActionFailed(server, action, None, str(exc)))
        except Exception as exc:  # noqa: BLE001
            self.post_message(ActionFailed(server, action, None, f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(ActionDone(result, action))

    # -- handlers: apply results to widgets -------------------------------------------------------

    @on(StateFetched)
    def _state_fetched(self, msg: StateFetched) -> None:
        self.cluster = msg.state
        self._last_ok = time.monotonic()
        if self.stale:
            self.stale = False
            self.query_one(OutageBanner).clear_problem()
            self.query_one(ServersTable).remove_class("-stale")
        self.query_one(ServersTable).apply(msg.state.servers)
        self._show_summary()
        self.applied += 1
        self._arm()

    @on(FetchFailed)
    def _fetch_failed(self, msg: FetchFailed) -> None:
        self.failures += 1
        self.stale = True
        banner = self.query_one(OutageBanner)
        if msg.unreachable:
            age = None if self._last_ok is None else time.monotonic() - self._last_ok
            banner.show_problem(msg.reason, age)
        else:
            banner.show_error(msg.reason)
        self.query_one(ServersTable).add_class("-stale")
        self._show_summary()
        self._arm()

    @on(WhoamiFetched)
    def _whoami_fetched(self, msg: WhoamiFetched) -> None:
        self.who = msg.who
        self._show_summary()

    @on(ActionDone)
    def _action_done(self, msg: ActionDone) -> None:
        r = msg.result
        self._notice("information", f"{msg.action.capitalize()}: {r.server}",
                     f"{r.server} is now {r.state} (admin {r.admin}), by {r.by}.")
        self.action_refresh_now()

    @on(ActionFailed)
    def _action_failed(self, msg: ActionFailed) -> None:
        title = {
            401: "Token rejected",
            403: "Permission denied",
            404: "Unknown server",
            None: "Ops API unreachable",
        }.get(msg.status, f"{msg.action.capitalize()} failed")
        text = f"Could not {msg.action} {msg.server}: {msg.reason}"
        if msg.status == 403:
            role = f"role {self.who.role}" if self.who else "this token"
            text = f"Your token ({role}) may not {msg.action} servers; nothing changed. ({msg.reason})"
        self._notice("error", title, text)

    # -- actions (keys, palette) ------------------------------------------------------------------

    def action_drain(self) -> None:
        self._confirm("drain")

    def action_disable(self) -> None:
        self._confirm("disable")

    def action_enable(self) -> None:
        self._confirm("enable")

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

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.keymap_overrides))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for c in COMMANDS:
            if c.palette:
                title = f"{c.title} selected server" if c.action in SERVER_ACTIONS else c.title
                yield SystemCommand(title, c.help, partial(self.run_action, c.action))

    # -- helpers ----------------------------------------------------------------------------------

    def _confirm(self, action: Action) -> None:
        name = self.query_one(ServersTable).selected
        server = next((s for s in self.cluster.servers if s.name == name), None) if self.cluster else None
        if server is None:
            self._notice("warning", "No server selected", "Move the cursor to a server first.")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.perform(server.name, action)

        self.push_screen(ConfirmAction(action, server), answered)

    def _arm(self) -> None:
        self._stop_timer()
        if not self.paused:
            self._timer = self.set_timer(self.interval, self.fetch_state)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _show_summary(self) -> None:
        self.query_one(ClusterSummary).show(self.cluster, self.who, self.stale, self.paused)

    def _notice(self, severity: Severity, title: str, message: str) -> None:
        self.notices.append(Notice(severity, title, message))
        self.notify(message, title=title, severity=severity, timeout=10 if severity == "error" else 4)


def create_app(
    source: Source,
    *,
    interval: float = 1.0,
    keymap: Mapping[str, str] | None = None,
    handle_sighup: bool = False,
) -> ConsoleApp:
    """The app factory: production passes a ConsoleClient, tests a FixedSource (no network)."""
    return ConsoleApp(source, interval=interval, keymap=keymap, handle_sighup=handle_sighup)

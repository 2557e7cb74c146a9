"""The console's operations views: dispatchers and leadership, hosts and supervised processes, events,
LLM providers. Pilot tests against real clusters (real processes, real signals), the same flows against
a fixed, network-free cluster, and snapshots of each view at 80x24 and 200x50."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import httpx
import pytest
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import Label, Static

import console.format
from console.app import ConsoleApp, create_app
from console.client import ConsoleClient
from console.screens.confirm import ConfirmAction
from console.screens.notices import EventDetail, NoticesScreen
from console.source import FixedSource
from console.widgets.events_log import EventsLog
from console.widgets.tables import DispatchersTable, ProcessesTable, ProvidersTable
from ctops.wire import Event
from tests.cluster import Cluster, wait_for
from tests.test_console import SIZE, fixed_events, fixed_source, fixed_state, snapshot_lines, until

TAB_KEYS = {"servers": "1", "hosts": "2", "events": "3", "dispatchers": "4", "llm": "5"}


@pytest.fixture(autouse=True)
def utc_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # event times render in the local zone; pin it so snapshots match on every machine
    monkeypatch.setattr(console.format, "LOCAL_TZ", UTC)
    yield


# --- helpers -----------------------------------------------------------------------------------

def live(c: Cluster, *dispatchers: str, token: str | None = None) -> ConsoleApp:
    urls = [c.ops_url(d) for d in (dispatchers or c.dispatchers)]
    return create_app(ConsoleClient(urls, token or c.operator_token), interval=0.3)


async def show_tab(pilot: Pilot[int], app: ConsoleApp, name: str) -> None:
    await pilot.press(TAB_KEYS[name])
    await until(pilot, f"{name} tab", lambda: app.active_tab == name)


async def select(pilot: Pilot[int], table: Any, key: str) -> None:
    await until(pilot, f"row {key}", lambda: table.shown(key) is not None)
    table.move_cursor(row=table.get_row_index(key))
    await pilot.pause()
    assert table.selected == key


async def confirm(pilot: Pilot[int], app: ConsoleApp, key: str) -> str:
    """Press `key`, wait for the dialog, return what it says (question and detail) and answer yes."""
    await pilot.press(key)
    await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
    text = " ".join(Text.from_markup(str(label.content)).plain for label in app.screen.query(Label))
    await pilot.press("y")
    return text


def audit(c: Cluster, d: str = "A") -> list[dict[str, str]]:
    r = httpx.get(f"{c.ops_url(d)}/api/v1/audit", headers=c.auth("viewer"), timeout=5)
    r.raise_for_status()
    return r.json()


def state_from_any(c: Cluster) -> dict[str, Any]:
    for d in c.dispatchers:
        try:
            return c.state(d)
        except httpx.HTTPError:
            continue
    raise httpx.ConnectError("no dispatcher answers")


def noticed(app: ConsoleApp, title: str, *words: str) -> bool:
    return any(title in n.title and all(w in n.message for w in words) for n in app.notices)


# --- real clusters ------------------------------------------------------------------------------

@pytest.fixture
def two_dispatchers(make_cluster: Callable[..., Cluster]) -> Cluster:
    c = make_cluster(dispatchers=("A", "B"))
    c.start_all()
    wait_for("one leader, seen by both", lambda: len({c.state(d)["leader"] for d in c.dispatchers} - {None}) == 1
             and all(c.state(d)["leader"] for d in c.dispatchers), 60)
    return c


def roles(c: Cluster) -> tuple[str, str]:
    leader = state_from_any(c)["leader"]
    return leader, next(d for d in c.dispatchers if d != leader)


async def test_dispatchers_panel_and_leader_change_toast(two_dispatchers: Cluster) -> None:
    c = two_dispatchers
    leader, standby = roles(c)
    app = live(c)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await show_tab(pilot, app, "dispatchers")
        table = app.query_one("#dispatchers", DispatchersTable)
        await until(pilot, "both dispatchers", lambda: table.row_count == 2)
        assert table.shown(leader)[1] == "leader" and table.shown(standby)[1] == "standby"  # type: ignore[index]
        assert table.get_cell(leader, "role").plain == "★ leader"
        c.signal(leader, signal.SIGKILL)
        await until(pilot, "a leader-change toast", lambda: noticed(app, "Leader changed", standby), timeout=60)
        await until(pilot, f"{standby} shown as leader", lambda: (table.shown(standby) or ("", ""))[1] == "leader")
        assert sum(1 for n in app.notices if n.title == "Leader changed") == 1  # state and event: one toast


async def test_switchover_from_console_is_confirmed_and_audited(two_dispatchers: Cluster) -> None:
    c = two_dispatchers
    a, b = roles(c)  # a leads now
    app = live(c)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await show_tab(pilot, app, "dispatchers")
        table = app.query_one("#dispatchers", DispatchersTable)
        await select(pilot, table, a)
        said = await confirm(pilot, app, "D")
        assert f"Dispatcher {a} stops leading; {b} takes over within ~1 s" in said
        assert "Learners' requests keep being served" in said
        await until(pilot, "the switchover result", lambda: noticed(app, "Leadership moved", f"{a} → {b}"),
                    timeout=60)
        assert wait_for(f"{b} leads", lambda: state_from_any(c)["leader"] == b, 30)
        await until(pilot, f"{b} shown as leader", lambda: (table.shown(b) or ("", ""))[1] == "leader")
        # and back: promote the standby
        await select(pilot, table, a)
        said = await confirm(pilot, app, "P")
        assert f"Dispatcher {b} stops leading; {a} takes over within ~1 s" in said
        await until(pilot, "the promotion result", lambda: noticed(app, "Leadership moved", f"{b} → {a}"),
                    timeout=60)
    mine = [(e["action"], e["target"], e["result"][:2]) for e in audit(c, a) if e["who"] == "test-operator"]
    assert ("step-down", f"dispatcher {a}", "ok") in mine
    assert ("promote", f"dispatcher {a}", "ok") in mine


async def test_restart_process_from_console(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(hosts_with_agents=True)
    c.start_all()

    def pid_of(host: str, process: str) -> int | None:
        h = next(h for h in c.state()["hosts"] if h["name"] == host)
        return next((p["pid"] for p in h["processes"] if p["name"] == process and p["state"] == "running"), None)

    old = wait_for("trainer-2 running under its agent", lambda: pid_of("host-2", "trainer-2"), 60)
    app = live(c)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await show_tab(pilot, app, "hosts")
        table = app.query_one(ProcessesTable)
        await select(pilot, table, "host-2/trainer-2")
        said = await confirm(pilot, app, "R")
        assert "Restart trainer-2 on host-2" in said and f"pid {old}" in said
        await until(pilot, "the agent's answer", lambda: noticed(app, "Restart trainer-2 on host-2"), timeout=60)
        # (a server_down toast may come too: the server is down while its process restarts)
        assert not any(n.severity == "error" and "Restart" in n.title for n in app.notices), list(app.notices)
        new = wait_for("a new pid", lambda: (p := pid_of("host-2", "trainer-2")) and p != old and p, 60)
        await until(pilot, "the new pid in the table",
                    lambda: table.get_cell("host-2/trainer-2", "pid").plain == str(new), timeout=30)
    entries = [e for e in audit(c) if e["action"] == "restart" and e["target"] == "host-2/trainer-2"]
    assert entries and entries[0]["who"] == "test-operator" and entries[0]["result"].startswith("ok")


@pytest.mark.own_cluster  # it kills a part
async def test_events_pane_shows_a_killed_server(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    c.wait_all_up()
    app = live(c)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        c.signal("trainer-3", signal.SIGKILL)  # no agent here: it stays down
        await until(pilot, "server_down for trainer-3",
                    lambda: any(e.kind == "server_down" and e.target == "trainer-3" for e in app.events_seen),
                    timeout=60)
        await until(pilot, "a critical toast", lambda: noticed(app, "server_down: trainer-3"))
        await show_tab(pilot, app, "events")
        log = app.query_one("#events", EventsLog)
        await until(pilot, "the events pane drawn", lambda: any(
            "server_down" in ln and "trainer-3" in ln for ln in pane_lines(log)))


async def test_providers_pin_and_disable_from_console(running_dispatcher: Cluster) -> None:
    c = running_dispatcher

    def pool() -> dict[str, Any]:
        r = httpx.get(f"{c.ops_url()}/api/v1/llm/providers", headers=c.auth("viewer"), timeout=5)
        r.raise_for_status()
        return r.json()

    app = live(c)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await show_tab(pilot, app, "llm")
        table = app.query_one(ProvidersTable)
        await select(pilot, table, "secondary")
        said = await confirm(pilot, app, "i")
        assert "Pin LLM provider secondary" in said
        await until(pilot, "pinned", lambda: noticed(app, "Pin secondary", "pinned: secondary"), timeout=30)
        assert pool()["pinned"] == "secondary"
        await select(pilot, table, "primary")
        await confirm(pilot, app, "x")
        await until(pilot, "disabled", lambda: noticed(app, "Disable primary"), timeout=30)
        assert next(p for p in pool()["providers"] if p["name"] == "primary")["disabled"] is True
        await until(pilot, "the table shows it", lambda: (table.shown("primary") or ())[2] == "disabled")
    mine = {(e["action"], e["target"]) for e in audit(c) if e["who"] == "test-operator"}
    assert {("llm_pin", "llm:secondary"), ("llm_disable", "llm:primary")} <= mine


# --- the same flows without network ---------------------------------------------------------------

def fixed(source: FixedSource | None = None) -> tuple[ConsoleApp, FixedSource]:
    source = source or fixed_source()
    return create_app(source, interval=3600), source


async def loaded(pilot: Pilot[int]) -> None:
    app = pilot.app
    assert isinstance(app, ConsoleApp)
    await until(pilot, "first state", lambda: app.applied >= 1 and app.who is not None)
    await pilot.pause()


async def test_keys_act_only_on_their_tab() -> None:
    app, source = fixed()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await show_tab(pilot, app, "hosts")
        await pilot.press("d")  # drain is a servers key
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAction)
        await show_tab(pilot, app, "llm")
        await select(pilot, app.query_one(ProvidersTable), "primary")
        said = await confirm(pilot, app, "x")  # x disables the selected provider here, not a server
        assert "primary" in said and "Takes effect at once on every dispatcher" in said
        await until(pilot, "done", lambda: ("provider", "primary", "disable") in source.calls)
        assert {s.admin for s in source.current.servers} == {"enabled", "draining", "disabled"}
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert "Pin selected LLM provider" in titles and "Drain selected server" not in titles


async def test_fixed_process_restart_and_step_down() -> None:
    app, source = fixed()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await show_tab(pilot, app, "hosts")
        await select(pilot, app.query_one(ProcessesTable), "host-6/trainer-6")
        said = await confirm(pilot, app, "R")
        assert "backoff" in said and "3 restart(s)" in said
        await until(pilot, "restart sent", lambda: ("process", "host-6", "trainer-6", "restart") in source.calls)
        await until(pilot, "result toast", lambda: noticed(app, "Restart trainer-6 on host-6"))
        await show_tab(pilot, app, "dispatchers")
        said = await confirm(pilot, app, "D")
        # B is unhealthy in the fixed cluster: the dialog says nobody takes over, in a sentence that reads
        assert "Dispatcher A stops leading, and no standby is healthy to take over" in said
        assert "takes over within" not in said and "(!)" not in said
        await until(pilot, "leader toast", lambda: noticed(app, "Leader changed", "B"))
        assert noticed(app, "Leadership moved", "A → B")


async def test_new_critical_events_toast_but_the_backlog_does_not() -> None:
    app, source = fixed()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert len(app.events_seen) == len(fixed_events())
        assert not app.notices  # the backlog holds critical events; opening the console is not an alarm
        t = fixed_events()[-1].ts_ms + 1000
        source.event_log.append(Event(id=f"{t}-0", event_id="new", ts_ms=t, kind="crash_loop", severity="critical",
                                      source="agent:host-2", target="trainer-2", message="trainer-2: 5 exits"))
        seen = app.applied
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied > seen)
        assert noticed(app, "crash_loop: trainer-2", "5 exits")
        app.action_refresh_now()
        await until(pilot, "another refresh", lambda: app.applied > seen + 1)
        assert sum(1 for n in app.notices if n.title.startswith("crash_loop")) == 1
        assert app.events_seen[-1].event_id == "new"


async def test_a_dead_watchdog_thread_reads_as_dead_not_ok() -> None:
    app, _ = fixed()  # host-4: checker thread dead, generation 2, one thread restart
    async with app.run_test(size=(200, 50)) as pilot:
        await loaded(pilot)
        await show_tab(pilot, app, "hosts")
        t = app.query_one(ProcessesTable)
        assert t.get_cell("host-4/trainer-4", "watchdog").plain == "✖ checker dead (gen 2)"
        assert t.get_cell("host-1/trainer-1", "watchdog").plain == "ok gen 1"
        assert t.get_cell("host-5/", "watchdog").plain == "—"  # no watchdog report: unknown, not ok


def pane_lines(widget: Any) -> list[str]:
    """What a widget shows now, line by line."""
    return [widget.render_line(y).text.rstrip() for y in range(widget.size.height)]


async def test_event_lines_fill_a_wide_terminal_and_wrap_when_narrow() -> None:
    app, _ = fixed()
    async with app.run_test(size=(200, 50)) as pilot:
        await loaded(pilot)
        await show_tab(pilot, app, "events")
        log = app.query_one("#events", EventsLog)
        whole = "trainer-9: 5 exits in 60 s; not restarting  (agent:host-9)"
        await until(pilot, "the pane drawn", lambda: any(ln.endswith(whole) for ln in pane_lines(log)))
        assert not any("…" in ln for ln in pane_lines(log))
        await pilot.resize_terminal(80, 24)  # narrower: laid out again, wrapped, nothing cut
        await until(pilot, "redrawn narrower", lambda: log.size.width <= 80)
        await pilot.pause()
        lines = pane_lines(log)
        assert all(len(ln) <= 80 for ln in lines) and not any("…" in ln for ln in lines)
        assert "(agent:host-9)" in "".join(lines) and not any(ln.endswith(whole) for ln in lines)
        await pilot.resize_terminal(200, 50)  # wider again: back on one line each
        await until(pilot, "redrawn wide", lambda: any(ln.endswith(whole) for ln in pane_lines(log)))


async def test_events_that_came_on_another_tab_are_drawn_at_full_width() -> None:
    app, source = fixed()
    async with app.run_test(size=(200, 50)) as pilot:
        await loaded(pilot)
        await show_tab(pilot, app, "hosts")
        t = fixed_events()[-1].ts_ms + 1000
        long = "trainer-2 exited with status 1 after an unhandled error in the review handler; " * 2
        source.event_log.append(Event(id=f"{t}-0", event_id="late", ts_ms=t, kind="process_exited",
                                      severity="warning", source="agent:host-2", target="trainer-2",
                                      message=long.strip()))
        seen = app.applied
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied > seen)
        await show_tab(pilot, app, "events")
        log = app.query_one("#events", EventsLog)
        await until(pilot, "the new event drawn", lambda: any("process_exited" in ln for ln in pane_lines(log)))
        first = next(ln for ln in pane_lines(log) if "process_exited" in ln)
        assert len(first) > 150  # the pane's width, not a hidden pane's 40 columns
        await pilot.press("enter")  # the newest event is highlighted: Enter opens it in full
        await until(pilot, "event detail", lambda: isinstance(app.screen, EventDetail))
        text = pane_text(app.screen.query_one("#event-detail"))
        assert long.strip() in " ".join(text.split()) or long.strip().split(";")[0] in text
        assert "agent:host-2" in text and "process_exited" in text
        await pilot.press("escape")
        await until(pilot, "detail closed", lambda: not isinstance(app.screen, EventDetail))


def pane_text(widget: Any) -> str:
    from rich.console import Console

    out = Console(width=400, record=True, file=__import__("io").StringIO())
    out.print(widget.content)
    return out.export_text()


def critical(source: FixedSource, kind: str, target: str, message: str, dt: int = 1000) -> None:
    last = source.event_log[-1].ts_ms if source.event_log else fixed_events()[-1].ts_ms
    t = last + dt
    source.event_log.append(Event(id=f"{t}-0", event_id=f"{kind}-{t}", ts_ms=t, kind=kind, severity="critical",
                                  source="dispatcher:A", target=target, message=message))


async def refreshed(pilot: Pilot[int], app: ConsoleApp) -> None:
    seen = app.applied
    app.action_refresh_now()
    await until(pilot, "refresh", lambda: app.applied > seen)
    await pilot.pause()


async def test_notices_coalesce_per_incident_and_never_cover_a_dialog() -> None:
    app, source = fixed()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        # no leader: one alarm; the leader back replaces it rather than adding a second toast
        source.current = source.current.model_copy(update={"leader": None})
        await refreshed(pilot, app)
        assert [n.title for n in app._notifications] == ["No leader"]
        source.current = source.current.model_copy(update={"leader": "A"})
        await refreshed(pilot, app)
        assert not any(n.title == "No leader" for n in app._notifications)
        assert "Leader changed" in str(app.query_one("#flash", Static).render())
        # a critical event toasts once; the same event seen again (another dispatcher's stream) does not
        critical(source, "host_lost", "host-2", "host-2: no heartbeat for 12 s")
        await refreshed(pilot, app)
        assert sum(1 for n in app._notifications if n.title == "host_lost: host-2") == 1
        dup = source.event_log[-1]
        source.event_log.append(dup.model_copy(update={"id": f"{dup.ts_ms + 5}-0"}))
        await refreshed(pilot, app)
        assert sum(1 for n in app._notifications if n.title == "host_lost: host-2") == 1
        # a dialog opens: toasts go away and none covers it while it is open
        await pilot.press("1", "down", "d")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        critical(source, "server_down", "trainer-4", "trainer-4: up -> down (connection refused)")
        await refreshed(pilot, app)
        assert not list(app._notifications)
        assert any(n.title == "server_down: trainer-4" for n in app.notices)  # kept in the history
        await pilot.press("n")
        await until(pilot, "dialog closed", lambda: not isinstance(app.screen, ConfirmAction))
        # host-2 heartbeats again: that word on the incident resolves it (even after a dialog came and went)
        critical(source, "host_back", "host-2", "host-2: heartbeats again")
        source.event_log[-1] = source.event_log[-1].model_copy(update={"severity": "info"})
        await refreshed(pilot, app)
        assert app.notices[-1].title == "host_back: host-2" and app.notices[-1].severity == "information"
        assert "host_back" in str(app.query_one("#flash", Static).render())
        await pilot.press("N")
        await until(pilot, "notices", lambda: isinstance(app.screen, NoticesScreen))
        text = pane_text(app.screen.query_one("#notices-list"))
        lines = text.splitlines()
        assert "host_back: host-2" in lines[0]  # newest first
        assert "(superseded)" in _line(lines, "host_lost: host-2")
        assert "No leader" in _line(lines, "No leader") and "(superseded)" in _line(lines, "No leader")


async def test_an_old_event_is_listed_but_not_announced() -> None:
    app, source = fixed()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        t = source.current.now_ms - 90_000
        source.event_log.append(Event(id=f"{fixed_events()[-1].ts_ms + 1}-0", event_id="old", ts_ms=t,
                                      kind="host_lost", severity="critical", source="dispatcher:A",
                                      target="host-7", message="host-7: no heartbeat for 31 s"))
        await refreshed(pilot, app)
        assert app.events_seen[-1].event_id == "old"
        assert not any(n.title.startswith("host_lost") for n in app.notices)


async def test_providers_404_says_so() -> None:
    source = FixedSource(fixed_state())  # no providers: answers 404 like a dispatcher without an LLM pool
    app, _ = fixed(source)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await show_tab(pilot, app, "llm")
        note = app.query_one("#providers-note")
        assert note.display and "404" in str(note.render())


# --- snapshots ------------------------------------------------------------------------------------

def on_tab(name: str, then: Callable[[Pilot[int]], Any] | None = None) -> Callable[[Pilot[int]], Any]:
    async def go(pilot: Pilot[int]) -> None:
        await loaded(pilot)
        await pilot.press(TAB_KEYS[name])
        await pilot.pause()
        if then is not None:
            await then(pilot)
        await pilot.pause()
    return go


def _line(lines: list[str], *words: str) -> str:
    found = [ln for ln in lines if all(w in ln for w in words)]
    assert found, f"no line with {words} in:\n" + "\n".join(lines)
    return found[0]


@pytest.mark.parametrize("tab", ["hosts", "events", "dispatchers", "llm"])
@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
def test_snapshot_tab(snap_compare: Callable[..., bool], tab: str, size: tuple[int, int],
                      request: pytest.FixtureRequest) -> None:
    assert snap_compare(fixed()[0], terminal_size=size, run_before=on_tab(tab))
    lines = snapshot_lines(request)
    wide = size[0] >= 200
    assert len(lines) == size[1] and "1 Servers" in _line(lines, "6 Store")
    # what the accepted picture shows, in words
    if tab == "hosts":
        assert "lost" in _line(lines, "host-5") and "✖ fatal" in _line(lines, "host-9", "trainer-9")
        assert "▲ backoff" in _line(lines, "host-6", "trainer-6")
        if wide:  # the watchdog column: host-4's checker thread is dead, and the row says so
            host4 = _line(lines, "host-4", "trainer-4")
            assert "✖ checker dead (gen 2)" in host4 and "ok gen" not in host4
            assert "ok gen 1" in _line(lines, "host-1", "trainer-1")
            assert "crash loop: 5 exits in 60 s" in _line(lines, "host-9")
    elif tab == "events":
        crash = _line(lines, "crash_loop", "trainer-9")
        if wide:  # the whole line, message and source, on a 200-column terminal
            assert "trainer-9: 5 exits in 60 s; not restarting  (agent:host-9)" in crash
            assert "checker thread silent for 2 s; generation 2 started  (agent:host-4)" in \
                _line(lines, "watchdog_restarted")
        else:  # wrapped, not cut: the rest of the message continues on the next line
            assert "…" not in crash and len(crash) <= 80
            assert "restarting  (agent:host-9)" in lines[lines.index(crash) + 1]
    elif tab == "dispatchers":
        leader, standby = _line(lines, "★ leader"), _line(lines, "◇ standby")
        assert leader.split()[0] == "A" and "healthy" in leader
        assert standby.split()[0] == "B" and "UNHEALTHY" in standby
    else:
        assert "✖ down" in _line(lines, "primary", "open") and "● up" in _line(lines, "secondary", "closed")


def test_snapshot_step_down_dialog(snap_compare: Callable[..., bool], request: pytest.FixtureRequest) -> None:
    async def ask(pilot: Pilot[int]) -> None:
        await pilot.press("D")
        await until(pilot, "confirm dialog", lambda: isinstance(pilot.app.screen, ConfirmAction))

    assert snap_compare(fixed()[0], terminal_size=(80, 24), run_before=on_tab("dispatchers", ask))
    screen = " ".join(ln.strip(" █") for ln in snapshot_lines(request))
    assert "Dispatcher A steps down?" in screen and "Step down (y)" in screen
    assert "no standby is healthy to take over" in " ".join(screen.split())
    assert "(!)" not in screen and "takes over within" not in screen


def test_snapshot_restart_dialog(snap_compare: Callable[..., bool], request: pytest.FixtureRequest) -> None:
    async def ask(pilot: Pilot[int]) -> None:
        await pilot.press("down", "R")
        await until(pilot, "confirm dialog", lambda: isinstance(pilot.app.screen, ConfirmAction))

    assert snap_compare(fixed()[0], terminal_size=(80, 24), run_before=on_tab("hosts", ask))
    screen = "\n".join(snapshot_lines(request))
    assert "Restart trainer-2 on host-2?" in screen and "Now running, pid 4002, 1 restart(s); host alive." in screen
    assert "Restart (y)" in screen and "Cancel (n)" in screen



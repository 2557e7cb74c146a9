"""The staff console: Pilot tests against a real dispatcher, unit tests of the diff-updated table,
and snapshots of the screens from a fixed, network-free cluster state."""

from __future__ import annotations

import html
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from rich.segment import Segment
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

import console.format
from console.app import ConsoleApp, create_app
from console.client import ConsoleClient
from console.commands import COMMANDS, display_key
from console.screens.confirm import ConfirmAction
from console.screens.help import HelpScreen
from console.source import FixedSource
from console.widgets.banner import OutageBanner
from console.widgets.live_table import LiveTable
from console.widgets.tables import ProcessesTable, ServersTable
from ctops.wire import (
    ClusterState,
    DispatcherView,
    Event,
    HostMetrics,
    HostView,
    LLMProviderView,
    ProcessMetrics,
    ServerView,
    WatchdogStatus,
)
from ctops_tools.redis_embed import free_port
from tests.cluster import Cluster

SIZE = (120, 35)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def utc_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # event times render in the local zone; pin it so snapshots match on every machine
    monkeypatch.setattr(console.format, "LOCAL_TZ", UTC)


# --- helpers -----------------------------------------------------------------------------------

async def until(pilot: Pilot[int], what: str, cond: Callable[[], object], timeout: float = 30.0) -> None:
    """Let the app run until `cond` holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def live_app(cluster: Cluster, token: str, urls: list[str] | None = None) -> ConsoleApp:
    return create_app(ConsoleClient(urls or [cluster.ops_url()], token), interval=0.3)


def table(app: ConsoleApp) -> ServersTable:
    return app.query_one(ServersTable)


def shown_state(app: ConsoleApp, name: str) -> object:
    row = table(app).shown(name)
    return row[1] if row else None


async def select_row(pilot: Pilot[int], app: ConsoleApp, name: str) -> None:
    t = table(app)
    t.move_cursor(row=t.get_row_index(name))
    await pilot.pause()
    assert t.selected == name


def static_text(widget: Static) -> str:
    out = Console(width=200, record=True, file=io.StringIO())
    out.print(widget.content)
    return out.export_text()


def footer_actions(app: ConsoleApp) -> set[str]:
    """What the footer offers now (bindings shown and enabled)."""
    return {b.binding.description for b in app.screen.active_bindings.values() if b.binding.show and b.enabled}


def act(cluster: Cluster, name: str, action: str) -> None:
    r = httpx.post(f"{cluster.ops_url()}/api/v1/servers/{name}/{action}", headers=cluster.auth("operator"), timeout=5)
    r.raise_for_status()


# --- against a real dispatcher -----------------------------------------------------------------

@pytest.fixture
def cluster(running_dispatcher: Cluster) -> Cluster:
    """The running cluster, once its ops API answers with every server up."""
    running_dispatcher.wait_all_up()
    return running_dispatcher


async def test_table_shows_servers_with_states(cluster: Cluster) -> None:
    app = live_app(cluster, cluster.operator_token)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        for name in cluster.server_names:
            assert shown_state(app, name) == "up"
            assert table(app).get_cell(name, "state").plain == "● up"
        assert table(app).row_count == len(cluster.server_names)
        await until(pilot, "whoami", lambda: app.who is not None)
        assert app.who is not None and app.who.role == "operator"
        header = static_text(app.query_one("#summary", Static))
        assert cluster.state()["cluster"] in header and "leader A" in header and "served by A" in header
        assert not app.query_one(OutageBanner).display


async def test_drain_after_confirm_changes_state(cluster: Cluster) -> None:
    app = live_app(cluster, cluster.operator_token)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await select_row(pilot, app, "trainer-2")
        await pilot.press("d")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("y")
        await until(pilot, "trainer-2 draining in the table", lambda: shown_state(app, "trainer-2") == "draining")
        assert cluster.server("trainer-2")["admin"] == "draining"
        assert cluster.server("trainer-1")["state"] == "up"
        assert any(n.severity == "information" and "trainer-2" in n.title for n in app.notices)
        assert table(app).selected == "trainer-2"


async def test_cancel_changes_nothing(cluster: Cluster) -> None:
    app = live_app(cluster, cluster.operator_token)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await select_row(pilot, app, "trainer-1")
        for key, cancel in (("d", "n"), ("x", "escape"), ("d", "enter")):  # Enter hits the focused Cancel
            await pilot.press(key)
            await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
            await pilot.press(cancel)
            await until(pilot, "dialog closed", lambda: not isinstance(app.screen, ConfirmAction))
        seen = app.applied
        await until(pilot, "two more refreshes", lambda: app.applied >= seen + 2)
        assert shown_state(app, "trainer-1") == "up"
        assert {s["admin"] for s in cluster.state()["servers"]} == {"enabled"}
        assert not app.notices


async def test_cursor_stays_on_its_row_when_states_change(cluster: Cluster) -> None:
    app = live_app(cluster, cluster.operator_token)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await select_row(pilot, app, "trainer-2")
        act(cluster, "trainer-1", "disable")
        act(cluster, "trainer-3", "drain")
        await until(pilot, "other rows changed", lambda: (shown_state(app, "trainer-1"), shown_state(app, "trainer-3"))
                    == ("disabled", "draining"))
        seen = app.applied
        await until(pilot, "two more refreshes", lambda: app.applied >= seen + 2)
        assert table(app).selected == "trainer-2"
        assert table(app).cursor_row == 1


async def test_viewer_is_not_offered_actions_and_a_wrong_token_is_named(cluster: Cluster) -> None:
    app = live_app(cluster, cluster.viewer_token)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state and whoami", lambda: app.applied >= 1 and app.who is not None)
        assert app.who is not None and app.who.role == "viewer"
        await pilot.pause()
        assert not footer_actions(app) & {"Drain", "Disable", "Enable"}
        await select_row(pilot, app, "trainer-2")
        await pilot.press("d")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmAction)
        assert cluster.server("trainer-2")["admin"] == "enabled"
    app = create_app(ConsoleClient([cluster.ops_url()], "not-a-token"), interval=0.3)
    async with app.run_test(size=SIZE) as pilot:
        banner = app.query_one(OutageBanner)
        await until(pilot, "the error banner", lambda: banner.display)
        text = static_text(banner)
        assert "rejected the token from --token" in text and "CTOPS_TOKEN" in text and "{" not in text


@pytest.mark.own_cluster  # it kills a part
async def test_unreachable_api_shows_banner_and_keeps_stale_data(cluster: Cluster) -> None:
    app = live_app(cluster, cluster.operator_token)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        cluster.signal("A", signal.SIGKILL)
        banner = app.query_one(OutageBanner)
        await until(pilot, "outage banner", lambda: banner.display)
        text = static_text(banner)
        assert "unreachable" in text and "stale" in text
        assert table(app).row_count == len(cluster.server_names)  # last data kept
        assert table(app).has_class("-stale")
        assert "STALE" in static_text(app.query_one("#summary", Static))


async def test_moves_on_to_the_next_url_when_one_is_down(cluster: Cluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = ConsoleClient([dead, cluster.ops_url()], cluster.operator_token)
    app = create_app(client, interval=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        assert client.current_url == cluster.ops_url()
        assert not app.query_one(OutageBanner).display


def _wait_for_footer(master: int) -> None:
    seen = b""
    deadline = time.monotonic() + 30
    while b"Drain" not in seen and time.monotonic() < deadline:  # the footer has been drawn
        if select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
    assert b"Drain" in seen, seen[-500:]


CONSOLE_ENV = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}


def test_sighup_exits_cleanly_with_the_terminal_still_open(tmp_path: Path) -> None:
    """SIGHUP while the terminal is still there (it is what `ctops console` gets first when an SSH
    session drops): the console leaves by its normal exit path and exits 0. The pty stays open and
    drained until the console is gone, so only the signal can end it (a closed terminal would end it
    by itself, see the next test)."""
    master, slave = pty.openpty()
    dead = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "ctops_tools.cli", "console", "--url", dead, "--token", "t"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=CONSOLE_ENV,
                            start_new_session=True)
    os.close(slave)
    try:
        _wait_for_footer(master)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:  # keep reading: a full pty would block its writes
                try:
                    os.read(master, 65536)
                except OSError:
                    pass
        assert proc.poll() == 0, f"console after SIGHUP: {proc.poll()} (None: still running)"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_terminal_gone_without_a_sighup_exits_cleanly(tmp_path: Path) -> None:
    """A hang-up signals only the session leader (here a shell that ignores it, as `make` or tmux's
    command would not pass it on): the console below it sees the dead terminal itself and exits 0."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    dead = f"http://127.0.0.1:{free_port()}"
    status = tmp_path / "status"
    script = f'trap "" HUP; "{sys.executable}" -m ctops_tools.cli console --url {dead} --token t; echo $? > "{status}"'

    def controlling_tty() -> None:  # a session of its own with the pty as its terminal, as a login has
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(["sh", "-c", script], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env=CONSOLE_ENV, preexec_fn=controlling_tty)
    os.close(slave)
    try:
        _wait_for_footer(master)
        os.close(master)  # the terminal goes away; no SIGHUP reaches the console
        assert proc.wait(timeout=30) == 0
        assert status.read_text().strip() == "0"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- without network: fixed state ----------------------------------------------------------------

def _server(i: int, state: str = "up", **kw: object) -> ServerView:
    admin = state if state in ("draining", "disabled") else "enabled"
    health = "up" if admin != "enabled" else state
    base: dict[str, object] = dict(
        name=f"trainer-{i}", url=f"http://10.0.0.{i}:8080", host=f"host-{i}", state=state, admin=admin,
        health=health, active_sessions=(i * 7) % 23, heartbeat_age_ms=200 + i * 37, cpu_percent=(i * 13) % 97,
        memory_percent=20 + (i * 11) % 70, since_ms=1_700_000_000_000,
    )
    return ServerView.model_validate(base | kw)


def fixed_state(n: int = 12) -> ClusterState:
    specials = {
        3: dict(state="suspect", last_error="health check timed out after 300 ms", heartbeat_age_ms=2400),
        5: dict(state="down", last_error="connection refused", heartbeat_age_ms=None, cpu_percent=None,
                memory_percent=None, active_sessions=0, diagnosis="host or network down",
                diagnosis_detail="no agent heartbeat for 31 s and the server does not answer"),
        6: dict(state="down", last_error="connection refused", active_sessions=0, diagnosis="software fault",
                diagnosis_detail="agent alive; server not answering"),
        7: dict(state="draining", diagnosis="admin"),
        8: dict(state="disabled", active_sessions=0, diagnosis="admin"),
        10: dict(cpu_percent=93.0, memory_percent=81.0),
    }
    servers = [_server(i, **specials.get(i, {})) for i in range(1, n + 1)]  # type: ignore[arg-type]
    metrics = HostMetrics(cpu_percent=20, memory_percent=40, memory_used_bytes=1 << 30, disk_percent=50,
                          load1=0.5, load5=0.4, load15=0.3)

    def procs(i: int) -> list[ProcessMetrics]:
        if i == 5:
            return []
        state = {6: "backoff", 9: "fatal"}.get(i, "running")
        return [ProcessMetrics(name=f"trainer-{i}", state=state, pid=None if state != "running" else 4000 + i,
                               restarts={6: 3, 9: 5, 2: 1}.get(i, 0), cpu_percent=(i * 7) % 40,
                               rss_bytes=(80 + i) << 20, check_latency_ms=3.0 + i,
                               last_exit={6: "exit 1 (crashed)", 9: "crash loop: 5 exits in 60 s",
                                          2: "killed by SIGKILL"}.get(i))]

    hosts = [HostView(name=f"host-{i}", state="lost" if i == 5 else "late" if i == 3 else "alive",
                      heartbeat_age_ms=250, metrics=metrics, processes=procs(i),
                      watchdog=None if i == 5 else WatchdogStatus(checker_alive=i != 4, guard_alive=True,
                                                                  generation=2 if i == 4 else 1,
                                                                  thread_restarts=1 if i == 4 else 0))
             for i in range(1, n + 1)]
    return ClusterState(
        cluster="training-eu", leader="A", served_by="A", now_ms=1_700_000_000_000,
        dispatchers=[
            DispatcherView(name="A", role="leader", healthy=True, ops_url="http://a:9001", data_url="http://a:80",
                           epoch=7, lease_age_ms=120, peer_heartbeat_age_ms=210),
            DispatcherView(name="B", role="standby", healthy=False, ops_url="http://b:9001", data_url="http://b:80",
                           epoch=7, peer_heartbeat_age_ms=4300),
        ],
        servers=servers, hosts=hosts,
    )


T0 = 1_700_000_000_000


def fixed_events() -> list[Event]:
    rows = [
        ("info", "leader_changed", "A", "dispatcher A now leads (epoch 7)", "dispatcher:A"),
        ("warning", "server_suspect", "trainer-3", "trainer-3: up -> suspect (health check timed out)", "dispatcher:A"),
        ("critical", "server_down", "trainer-6", "trainer-6: suspect -> down (connection refused)", "dispatcher:A"),
        ("info", "process_restarted", "trainer-2", "trainer-2 restarted after SIGKILL (pid 4002)", "agent:host-2"),
        ("critical", "host_lost", "host-5", "host-5: no heartbeat for 31 s", "dispatcher:A"),
        ("critical", "crash_loop", "trainer-9", "trainer-9: 5 exits in 60 s; not restarting", "agent:host-9"),
        ("warning", "watchdog_restarted", "host-4", "checker thread silent for 2 s; generation 2 started",
         "agent:host-4"),
    ]
    return [Event(id=f"{T0 + i * 1000}-0", event_id=f"e{i}", ts_ms=T0 + i * 1000, kind=k, severity=sev,  # type: ignore[arg-type]
                  source=src, target=t, message=m) for i, (sev, k, t, m, src) in enumerate(rows)]


def fixed_providers() -> list[LLMProviderView]:
    return [
        LLMProviderView(name="primary", base_url="http://gpt:8000/v1", model="gpt-4", priority=1, state="down",
                        breaker="open", requests=1200, failures=31, error_rate=0.62, p50_ms=840.0, p99_ms=3000.0,
                        last_error="timeout after 3000 ms"),
        LLMProviderView(name="secondary", base_url="http://backup:8000/v1", model="gpt-4o", priority=2, state="up",
                        breaker="closed", requests=340, failures=0, error_rate=0.0, p50_ms=410.0, p99_ms=920.0),
    ]


def fixed_source(state: ClusterState | None = None) -> FixedSource:
    return FixedSource(fixed_state() if state is None else state, events=fixed_events(), providers=fixed_providers())


def fixed_app(state: ClusterState | None = None, keymap: dict[str, str] | None = None) -> ConsoleApp:
    # a long interval: snapshots must not race a refresh
    return create_app(fixed_source(state), interval=3600, keymap=keymap)


async def test_help_lists_every_binding() -> None:
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await pilot.press("question_mark")
        await until(pilot, "help screen", lambda: isinstance(app.screen, HelpScreen))
        text = static_text(app.screen.query_one("#help-keys", Static))
        for c in COMMANDS:
            assert c.title in text
            assert display_key(c.key) in text
        await pilot.press("escape")
        await until(pilot, "help closed", lambda: not isinstance(app.screen, HelpScreen))


async def test_keymap_remaps_by_binding_id() -> None:
    app = fixed_app(keymap={"console.drain": "D"})
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await pilot.press("d")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAction)
        await pilot.press("D")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))


async def test_palette_offers_the_commands() -> None:
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Drain selected server", "Disable selected server", "Enable selected server", "Refresh"} <= titles


async def test_diff_update_keeps_cursor_when_rows_come_and_go() -> None:
    state = fixed_state(10)
    source = FixedSource(state)
    app = create_app(source, interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await select_row(pilot, app, "trainer-6")
        # rows above the cursor go away, a new one sorts in above it, others change state
        keep = [s for s in state.servers if s.name not in ("trainer-1", "trainer-2")]
        source.current = state.model_copy(update={"servers": [_server(0), *keep, _server(11, "down")]})
        seen = app.applied
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied > seen)
        t = table(app)
        assert t.selected == "trainer-6"
        assert [t.get_row_at(i)[0].plain for i in range(t.row_count)][:3] == ["trainer-0", "trainer-3", "trainer-4"]
        assert t.row_count == 10


async def test_diff_update_touches_only_changed_cells_at_2000_servers() -> None:
    state = fixed_state(2000)
    source = FixedSource(state)
    app = create_app(source, interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1, timeout=60)
        t = table(app)
        await select_row(pilot, app, "trainer-1500")
        before = t.cells_updated
        servers = list(state.servers)
        servers[41] = servers[41].model_copy(update={"state": "suspect", "health": "suspect"})
        servers[42] = servers[42].model_copy(update={"active_sessions": 999})
        source.current = state.model_copy(update={"servers": servers})
        seen = app.applied
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied > seen)
        assert t.cells_updated - before == 2
        assert t.get_cell("trainer-42", "state").plain == "▲ suspect"
        assert t.get_cell("trainer-43", "sessions").plain == "999"
        assert t.row_count == 2000 and t.selected == "trainer-1500"
        # nothing changed: the table is not touched at all
        before = t.cells_updated
        seen = app.applied
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied > seen)
        assert t.cells_updated == before


async def test_fast_cell_rendering_matches_datatable() -> None:
    """LiveTable renders body cells itself (see live_table's doc); every cell must match DataTable's own path."""
    app = fixed_app()
    async with app.run_test(size=(200, 50)) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        compared = 0
        for key in ("1", "2", "4", "5"):
            await pilot.press(key)
            await pilot.pause()
            for t in app.screen.query(LiveTable):
                if not t.display or not t.row_count:
                    continue
                for r in range(t.row_count):
                    for c, col in enumerate(t.ordered_columns):
                        width = col.get_render_width(t)
                        for cursor in (False, True):
                            t._cell_render_cache.clear()
                            fast = t._render_cell(r, c, t.rich_style, width, cursor)
                            t._cell_render_cache.clear()
                            slow = DataTable._render_cell(t, r, c, t.rich_style, width, cursor)
                            assert _chars(fast) == _chars(slow), (t.id, r, col.key)
                            compared += 1
        assert compared > 500


def _chars(lines: list[list[Segment]]) -> list[tuple[str, object]]:
    return [(ch, seg.style) for line in lines for seg in line for ch in seg.text]


async def test_hidden_tab_catches_up_when_shown() -> None:
    state = fixed_state()
    source = fixed_source(state)
    app = create_app(source, interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        hosts = list(state.hosts)
        procs = [hosts[0].processes[0].model_copy(update={"pid": 9999, "restarts": 4})]
        hosts[0] = hosts[0].model_copy(update={"processes": procs})
        source.current = state.model_copy(update={"hosts": hosts})
        seen = app.applied
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied > seen)
        processes = app.query_one(ProcessesTable)
        assert processes.shown("host-1/trainer-1") is None  # hidden tab: rows kept, table not touched
        await pilot.press("2")
        await until(pilot, "hosts tab", lambda: app.active_tab == "hosts")
        assert processes.shown("host-1/trainer-1")[4] == 9999  # type: ignore[index]
        assert processes.get_cell("host-1/trainer-1", "pid").plain == "9999"


async def test_no_server_selected_warns() -> None:
    app = fixed_app(fixed_state(0))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await pilot.press("d")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAction)
        assert app.notices[-1].title == "No server selected"


# --- snapshots (fixed state, no network) ---------------------------------------------------------

def svg_lines(svg: str) -> list[str]:
    """The screen's text, line by line, from a Rich SVG export (cells are 12.2 x 24.4 units there)."""
    grid: dict[int, dict[int, str]] = {}
    for m in re.finditer(r'<text class="terminal-r\d+" x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]*)</text>', svg):
        row, col = round((float(m[2]) - 20) / 24.4), round(float(m[1]) / 12.2)
        for i, ch in enumerate(html.unescape(m[3]).replace("\xa0", " ")):
            grid.setdefault(row, {})[col + i] = ch
    if not grid:
        return []
    lines = []
    for row in range(max(grid) + 1):
        cells = grid.get(row, {})
        lines.append("".join(cells.get(c, " ") for c in range(max(cells) + 1 if cells else 0)).rstrip())
    return lines


def snapshot_lines(request: pytest.FixtureRequest) -> list[str]:
    """The accepted snapshot of the running test, as lines of text: every snapshot test also says in
    words what its picture shows, so a picture accepted with a bug in it fails on the words."""
    path = Path(request.node.path).parent / "__snapshots__" / Path(request.node.path).stem / f"{request.node.name}.svg"
    return svg_lines(path.read_text())


async def _loaded(pilot: Pilot[int]) -> None:
    app = pilot.app
    assert isinstance(app, ConsoleApp)
    await until(pilot, "first state", lambda: app.applied >= 1 and app.who is not None)
    await pilot.pause()


def _line(lines: list[str], *words: str) -> str:
    found = [ln for ln in lines if all(w in ln for w in words)]
    assert found, f"no line with {words} in:\n" + "\n".join(lines)
    return found[0]


def _servers_in_words(lines: list[str]) -> None:
    """The fixed cluster's servers as the table must show them, whatever the terminal size."""
    assert "▲ suspect" in _line(lines, "trainer-3 ") and "2.4s" in _line(lines, "trainer-3 ")
    assert "✖ down" in _line(lines, "trainer-5 ", "host/net down")
    assert "✖ down" in _line(lines, "trainer-6 ", "software fault")
    assert "◐ draining" in _line(lines, "trainer-7 ") and "○ disabled" in _line(lines, "trainer-8 ")
    assert "93%" in _line(lines, "trainer-10 ")
    header = " ".join(lines[:4])
    assert "training-eu" in lines[0] and "leader A" in lines[0] and "dispatchers 1/2 healthy" in header
    assert _line(lines, "servers 12:", "7 ● up", "1 ▲ suspect", "2 ✖ down")
    assert _line(lines, "d Drain", "x Disable", "e Enable")


def test_snapshot_main_80x24(snap_compare: Callable[..., bool], request: pytest.FixtureRequest) -> None:
    assert snap_compare(fixed_app(), terminal_size=(80, 24), run_before=_loaded)
    lines = snapshot_lines(request)
    _servers_in_words(lines)
    assert not any("Dispatcher" in ln and "Role" in ln for ln in lines)  # no room for the overview


def test_snapshot_main_200x50(snap_compare: Callable[..., bool], request: pytest.FixtureRequest) -> None:
    assert snap_compare(fixed_app(), terminal_size=(200, 50), run_before=_loaded)
    lines = snapshot_lines(request)
    _servers_in_words(lines)
    assert "no agent heartbeat for 31 s" in _line(lines, "trainer-5 ")
    # the overview: dispatchers, and the recent events drawn to the pane's full width
    assert _line(lines, "★ leader").split()[0] == "A" and _line(lines, "◇ standby", "UNHEALTHY").split()[0] == "B"
    assert "trainer-9: 5 exits in 60 s; not restarting  (agent:host-9)" in _line(lines, "crash_loop")


def test_snapshot_confirm_dialog(snap_compare: Callable[..., bool], request: pytest.FixtureRequest) -> None:
    async def open_dialog(pilot: Pilot[int]) -> None:
        await _loaded(pilot)
        await pilot.press("down", "down", "d")
        await until(pilot, "confirm dialog", lambda: isinstance(pilot.app.screen, ConfirmAction))
        await pilot.pause()

    assert snap_compare(fixed_app(), terminal_size=(80, 24), run_before=open_dialog)
    screen = "\n".join(snapshot_lines(request))
    assert "Drain trainer-3?" in screen and "Now suspect (admin enabled) on host-3." in screen
    assert "its 21 active session(s)" in screen and "Drain (y)" in screen and "Cancel (n)" in screen


def test_snapshot_outage_banner(snap_compare: Callable[..., bool], request: pytest.FixtureRequest) -> None:
    source = FixedSource(fixed_state())
    app = create_app(source, interval=3600)

    async def go_dark(pilot: Pilot[int]) -> None:
        await _loaded(pilot)
        source.reachable = False
        seen = app.failures
        app._last_ok = time.monotonic()  # "from 0 s ago" however long the start took on a busy machine
        app.action_refresh_now()
        await until(pilot, "failure", lambda: app.failures > seen)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=go_dark)
    lines = snapshot_lines(request)
    assert "STALE" in lines[0]
    assert _line(lines, "⚠  ops API unreachable: fixed://training-eu: connection refused")
    assert _line(lines, "Showing the last data, from 0 s ago (stale). Retrying…")
    _servers_in_words(lines)  # the last data stays on screen
    assert "last known dispatchers 1/2 healthy" in " ".join(lines[:4])  # no figure reads as current


# --- issue 17 item 1: capacity is guarded ---------------------------------------------------------

def _confirm_text(app: ConsoleApp) -> str:
    screen = app.screen
    assert isinstance(screen, ConfirmAction)
    return f"{screen.question}\n{screen.detail}"


def three_servers(*states: str) -> ClusterState:
    base = fixed_state(3)
    return base.model_copy(update={"servers": [_server(i + 1, st) for i, st in enumerate(states)]})


async def test_disabling_the_last_server_asks_twice_and_shows_no_capacity() -> None:
    source = fixed_source(three_servers("disabled", "disabled", "up"))
    app = create_app(source, interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        assert not app.query_one("#capacity-banner").display
        await select_row(pilot, app, "trainer-3")
        await pilot.press("x")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        first = _confirm_text(app)
        assert "0 of 3 servers in rotation after this" in first and "NO CAPACITY" in first
        assert "move to other servers" not in first  # there are none
        await pilot.press("y")
        await until(pilot, "the second step", lambda: isinstance(app.screen, ConfirmAction)
                    and "outage" in app.screen.question)
        second = _confirm_text(app)
        assert "last server in rotation" in second and "503" in second
        await pilot.press("y", "enter")  # a reflex does not pass the second step: the name must be typed
        await pilot.pause()
        assert isinstance(app.screen, ConfirmAction) and source.current.servers[2].admin == "enabled"
        await pilot.press("backspace", *"trainer-3", "enter")
        await until(pilot, "trainer-3 disabled", lambda: shown_state(app, "trainer-3") == "disabled")
        banner = app.query_one("#capacity-banner", Static)
        await until(pilot, "the NO CAPACITY banner", lambda: banner.display)
        assert "NO CAPACITY" in static_text(banner) and "503" in static_text(banner)
        header = static_text(app.query_one("#summary", Static))
        assert "servers 3: 3 ○ disabled NO CAPACITY" in header
        # capacity back: the banner goes
        await pilot.press("e")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        assert "1 of 3 servers in rotation after this" in _confirm_text(app)
        await pilot.press("y")
        await until(pilot, "banner gone", lambda: not banner.display)


async def test_cancelling_the_outage_step_changes_nothing() -> None:
    source = fixed_source(three_servers("down", "disabled", "up"))
    app = create_app(source, interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await select_row(pilot, app, "trainer-3")
        await pilot.press("d", "y")
        await until(pilot, "the second step", lambda: isinstance(app.screen, ConfirmAction)
                    and "outage" in app.screen.question)
        await pilot.press("escape")
        await until(pilot, "dialog closed", lambda: not isinstance(app.screen, ConfirmAction))
        assert source.current.servers[2].admin == "enabled"


async def test_every_server_confirmation_counts_what_stays_in_rotation() -> None:
    app = fixed_app()  # 12 servers: 7 up, 1 suspect in rotation
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        for row, key, words in (("trainer-1", "d", "7 of 12 servers"), ("trainer-8", "e", "9 of 12 servers"),
                                ("trainer-5", "x", "8 of 12 servers")):
            await select_row(pilot, app, row)
            await pilot.press(key)
            await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
            assert f"{words} in rotation after this." in _confirm_text(app)
            await pilot.press("n")
            await until(pilot, "dialog closed", lambda: not isinstance(app.screen, ConfirmAction))


async def test_disabling_the_last_llm_provider_asks_twice_and_the_header_says_so() -> None:
    app = fixed_app()  # primary is down (breaker open); secondary is the only one serving
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        header = static_text(app.query_one("#summary", Static))
        assert "llm 1/2 in rotation" in header
        await pilot.press("5")
        await until(pilot, "llm tab", lambda: app.active_tab == "llm")
        providers = app.query_one("#providers", LiveTable)
        providers.move_cursor(row=providers.get_row_index("secondary"))
        await pilot.press("x")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        text = _confirm_text(app)
        assert "0 of 2 providers in rotation after this" in text and "next provider" not in text
        await pilot.press("y")
        await until(pilot, "the second step", lambda: isinstance(app.screen, ConfirmAction)
                    and "outage" in app.screen.question)
        assert "reviews cannot be served" in _confirm_text(app)
        await pilot.press(*"secondary", "enter")
        banner = app.query_one("#capacity-banner", Static)
        await until(pilot, "the NO LLM CAPACITY banner", lambda: banner.display)
        assert "NO LLM CAPACITY" in static_text(banner)
        assert "llm 0/2 in rotation" in static_text(app.query_one("#summary", Static))


# --- issue 17 item 2: only true data is shown as current ------------------------------------------

def test_a_disabled_server_keeps_its_fault_next_to_the_admin_state() -> None:
    from dispatcher.pool import Backend
    from dispatcher.runtime import diagnose

    silent = HostView(name="host-2", state="lost", heartbeat_age_ms=40_000)
    b = Backend("trainer-2", "127.0.0.1", 1, server_host="host-2", health="up", admin="disabled")
    assert diagnose(b, silent) == ("agent fault", "disabled by staff; server answers but agent host-2 is silent")
    healthy = HostView(name="host-2", state="alive", heartbeat_age_ms=300)
    assert diagnose(b, healthy) == ("admin", "disabled by staff")


async def test_old_errors_clear_and_current_ones_carry_their_age() -> None:
    state = fixed_state(3)
    servers = [
        # up again after a refused connection at start-up: that error is no longer true
        _server(1, last_error="health check failed: ConnectionRefusedError(111)"),
        _server(2, "down", last_error="connection refused", since_ms=T0 - 95_000),
        _server(3, "disabled", last_error="health check failed: ConnectionRefusedError(111)"),
    ]
    app = fixed_app(state.model_copy(update={"servers": servers}))
    async with app.run_test(size=(200, 50)) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        t = table(app)
        assert t.get_cell("trainer-1", "error").plain == ""
        assert t.get_cell("trainer-3", "error").plain == ""
        assert t.get_cell("trainer-2", "error").plain == "connection refused (for 1m)"


async def test_processes_on_a_lost_host_are_unknown_with_last_known_values_labelled() -> None:
    state = fixed_state(3)
    hosts = list(state.hosts)
    hosts[1] = hosts[1].model_copy(update={"state": "lost", "heartbeat_age_ms": 47_000})
    app = fixed_app(state.model_copy(update={"hosts": hosts}))
    async with app.run_test(size=(200, 50)) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await pilot.press("2")
        await until(pilot, "hosts tab", lambda: app.active_tab == "hosts")
        t = app.query_one(ProcessesTable)
        lost = "host-2/trainer-2"
        state_cell = t.get_cell(lost, "state")
        assert state_cell.plain == "? unknown" and "dim" in str(state_cell.text.style)
        assert t.get_cell(lost, "pid").plain == "—" and t.get_cell(lost, "cpu").plain == "—"
        detail = t.get_cell(lost, "last_exit")
        assert detail.plain.startswith("last known 47s ago: running, pid 4002") and "dim" in str(detail.text.style)
        assert t.get_cell("host-1/trainer-1", "state").plain == "● running"  # an alive host's stay as they are


async def test_stale_header_says_last_known_for_every_figure() -> None:
    source = fixed_source()
    app = create_app(source, interval=3600)
    async with app.run_test(size=(200, 50)) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        header = static_text(app.query_one("#summary", Static))
        assert "dispatchers 1/2 healthy" in header and "last known" not in header
        source.reachable = False
        app.action_refresh_now()
        await until(pilot, "stale", lambda: app.stale)
        header = static_text(app.query_one("#summary", Static))
        assert "STALE" in header
        for figure in ("dispatchers 1/2 healthy", "servers 12:", "hosts 12:", "llm 1/2 in rotation"):
            assert f"last known {figure}" in header, header
        assert "leader A" not in header.replace("last known leader A", "")


# --- issue 17 item 6: roles in the UI --------------------------------------------------------------

def viewer_app() -> ConsoleApp:
    source = FixedSource(fixed_state(), role="viewer", name="ops-viewer", events=fixed_events(),
                         providers=fixed_providers())
    return create_app(source, interval=3600)


async def test_viewer_sees_no_actions_in_footer_help_or_palette() -> None:
    app = viewer_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state and whoami", lambda: app.applied >= 1 and app.who is not None)
        await pilot.pause()
        acting = {c.title for c in COMMANDS if c.needs == "act"}
        for key in ("1", "2", "4", "5", "6"):
            await pilot.press(key)
            await pilot.pause()
            assert not footer_actions(app) & acting, (key, footer_actions(app))
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert not any(t.startswith(tuple(acting)) for t in titles), titles
            assert "Refresh" in titles
        await pilot.press("1", "x")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAction)
        await pilot.press("question_mark")
        await until(pilot, "help screen", lambda: isinstance(app.screen, HelpScreen))
        text = static_text(app.screen.query_one("#help-keys", Static))
        assert "Drain" not in text and "Promote" not in text and "Refresh" in text
        assert "changes nothing" in static_text(app.screen.query_one("#help-role", Static))


async def test_operator_footer_keeps_the_actions() -> None:
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state and whoami", lambda: app.applied >= 1 and app.who is not None)
        await pilot.pause()
        assert {"Drain", "Disable", "Enable"} <= footer_actions(app)


def test_errors_read_as_sentences() -> None:
    from console.format import error_sentence

    assert error_sentence("role 'viewer' may not do this", {"needs": "act"}) == \
        "Role 'viewer' may not do this: that needs the 'act' grant."
    assert "{" not in error_sentence("invalid request", [{"field": "minutes", "problem": "not a number"}])


# --- issue 17 item 8: the settings file ------------------------------------------------------------

def test_settings_file_is_read_and_bad_ones_are_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from console import settings

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert settings.load() == settings.Settings()  # no file: the defaults
    conf = tmp_path / "ctops" / "console.toml"
    conf.parent.mkdir()
    conf.write_text('refresh = 2.5\ntheme = "ansi"\n[keys]\n"console.drain" = "ctrl+d"\n')
    s = settings.load()
    assert (s.refresh, s.theme, s.keymap) == (2.5, "ansi-dark", {"console.drain": "ctrl+d"})
    for text, words in (('[keys]\n"console.dran" = "z"\n', "no binding 'console.dran'"),
                        ("refresh = 0\n", "refresh must be a number of seconds"),
                        ("colour = 1\n", "unknown setting(s) colour"),
                        ("refresh = \n", "not valid TOML")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(settings.SettingsError, match=re.escape(words)):
            settings.load(str(bad))
    with pytest.raises(settings.SettingsError, match="no such settings file"):
        settings.load(str(tmp_path / "absent.toml"))


def test_console_refuses_a_bad_settings_file_before_starting(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from console.main import run

    bad = tmp_path / "console.toml"
    bad.write_text('[keys]\n"console.nothing" = "z"\n')
    args = argparse.Namespace(url=[f"http://127.0.0.1:{free_port()}"], token="t", state_file="", config=str(bad))
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "no binding 'console.nothing'" in err and str(bad) in err


async def test_settings_remap_keys_set_the_refresh_and_a_16_colour_theme() -> None:
    from textual.filter import ANSIToTruecolor

    app = create_app(fixed_source(), interval=2.5, keymap={"console.drain": "ctrl+d"}, theme="ansi-dark")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        assert app.interval == 2.5 and app.theme == "ansi-dark"
        # the terminal's own 16 colours are used as they are: red stays the terminal's red
        assert not any(f.enabled for f in app._filters if isinstance(f, ANSIToTruecolor))
        await pilot.press("d")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAction)
        await pilot.press("ctrl+d")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("n")
        await pilot.press("question_mark")
        await until(pilot, "help", lambda: isinstance(app.screen, HelpScreen))
        text = static_text(app.screen.query_one("#help-keys", Static))
        assert "ctrl+d" in _line(text.splitlines(), "Drain") and "console.drain" in text


# --- snapshots of issue 17's views and dialogs (80x24 and 200x50) ----------------------------------

SIZES = [(80, 24), (200, 50)]


def no_capacity_app() -> ConsoleApp:
    providers = [p.model_copy(update={"disabled": True, "state": "disabled"}) if p.name == "secondary" else p
                 for p in fixed_providers()]
    source = FixedSource(three_servers("disabled", "disabled", "disabled"), events=fixed_events(),
                         providers=providers)
    return create_app(source, interval=3600)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_no_capacity(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                              size: tuple[int, int]) -> None:
    assert snap_compare(no_capacity_app(), terminal_size=size, run_before=_loaded)
    lines = snapshot_lines(request)
    assert _line(lines, "✖ NO CAPACITY")
    assert _line(lines, "✖ NO LLM CAPACITY")
    assert _line(lines, "servers 3: 3 ○ disabled", "NO CAPACITY")
    assert _line(lines, "llm 0/2 in rotation")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_outage_step(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                              size: tuple[int, int]) -> None:
    app = create_app(fixed_source(three_servers("disabled", "down", "up")), interval=3600)

    async def second_step(pilot: Pilot[int]) -> None:
        await _loaded(pilot)
        await pilot.press("down", "down", "x", "y")
        await until(pilot, "the second step", lambda: isinstance(app.screen, ConfirmAction)
                    and "outage" in app.screen.question)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=second_step)
    screen = " ".join(" ".join(snapshot_lines(request)).split())
    assert "This causes an outage." in screen and "Disable trainer-3?" in screen
    assert "last server in rotation" in screen and "Disable anyway (y)" in screen
    assert "type trainer-3 to confirm" in screen and "Cancel (n)" in screen


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_viewer(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                         size: tuple[int, int]) -> None:
    assert snap_compare(viewer_app(), terminal_size=size, run_before=_loaded)
    lines = snapshot_lines(request)
    footer = lines[-1]
    assert "Drain" not in footer and "Disable" not in footer and "Enable" not in footer
    assert "Refresh" in footer and "Quit" in footer
    assert _line(lines, "you ops-viewer (viewer)")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_notices(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                          size: tuple[int, int]) -> None:
    from console.screens.notices import Notice, NoticesScreen

    notices = [Notice("error", "No leader", "Dispatcher A no longer leads and no standby has taken over yet.",
                      "leader", T0),
               Notice("warning", "Leader changed", "Dispatcher B now leads (epoch 8); before: A.", "leader",
                      T0 + 4000),
               Notice("error", "host_lost: host-5", "host-5: no heartbeat for 31 s", "event:host-5", T0 + 65_000)]

    async def open_notices(pilot: Pilot[int]) -> None:
        await _loaded(pilot)
        await pilot.app.push_screen(NoticesScreen(notices, T0 + 125_000))
        await pilot.pause()

    assert snap_compare(fixed_app(), terminal_size=size, run_before=open_notices)
    lines = snapshot_lines(request)
    order = [i for i, ln in enumerate(lines) if "host_lost: host-5" in ln or "Leader changed" in ln
             or "No leader" in ln]
    assert [lines[i] for i in order][0].count("host_lost") == 1  # newest first
    assert "1m ago" in _line(lines, "host_lost: host-5") and "2m ago" in _line(lines, "Leader changed")
    assert "(superseded)" in " ".join(lines[order[-1]:order[-1] + 2])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_event_detail(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                               size: tuple[int, int]) -> None:
    async def open_event(pilot: Pilot[int]) -> None:
        await _loaded(pilot)
        await pilot.press("3")
        await until(pilot, "events tab", lambda: pilot.app.active_tab == "events")  # type: ignore[attr-defined]
        await pilot.press("up", "enter")  # the one before the newest: crash_loop of trainer-9
        await pilot.pause()

    assert snap_compare(fixed_app(), terminal_size=size, run_before=open_event)
    lines = snapshot_lines(request)
    assert _line(lines, "Event", "crash_loop")
    assert "2023-11-14 22:13:25" in _line(lines, "When")
    assert "✖ critical" in _line(lines, "Severity") and "trainer-9" in _line(lines, "Target")
    assert "agent:host-9" in _line(lines, "Source")
    assert _line(lines, "trainer-9: 5 exits in 60 s; not restarting")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_lost_host_processes(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                                      size: tuple[int, int]) -> None:
    state = fixed_state()
    hosts = list(state.hosts)
    hosts[1] = hosts[1].model_copy(update={"state": "lost", "heartbeat_age_ms": 47_000})
    app = fixed_app(state.model_copy(update={"hosts": hosts}))

    async def hosts_tab(pilot: Pilot[int]) -> None:
        await _loaded(pilot)
        await pilot.press("2")
        await until(pilot, "hosts tab", lambda: app.active_tab == "hosts")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=hosts_tab)
    lines = snapshot_lines(request)
    row = _line(lines, "host-2", "trainer-2")
    assert "lost" in row and "? unknown" in row and "4002" not in row.split("last known")[0]
    if size[0] >= 200:
        assert "last known 47s ago: running, pid 4002" in row
    assert "● running" in _line(lines, "host-1", "trainer-1")

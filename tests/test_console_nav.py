"""Navigation and drill-down in the console (issue 17 items 4 and 5): Enter describes a row, `/` filters
and `o` sorts every table, j/k/g/G move, `:` reaches views and actions by name, the palette lists every
tab's commands, `f` shows faults only, `A` shows the audit log, `U` undoes. Fixed data, no network."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC

import pytest
from textual.coordinate import Coordinate
from textual.pilot import Pilot
from textual.widgets import Static

import console.format
from console.app import ConsoleApp, create_app
from console.screens.audit import AuditScreen, AuditTable
from console.screens.cmdline import Prompt, resolve
from console.screens.confirm import ConfirmAction
from console.screens.describe import DescribeScreen
from console.source import FixedSource
from console.widgets.live_table import LiveTable
from console.widgets.tables import ProcessesTable, ProvidersTable, ServersTable
from tests.test_console import fixed_events, fixed_providers, fixed_state, snapshot_lines, static_text

SMALL = (80, 24)


@pytest.fixture(autouse=True)
def utc_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console.format, "LOCAL_TZ", UTC)


async def until(pilot: Pilot[int], what: str, cond: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def source() -> FixedSource:
    return FixedSource(fixed_state(), events=fixed_events(), providers=fixed_providers())


def app_for(src: FixedSource | None = None) -> ConsoleApp:
    return create_app(src or source(), interval=3600)  # no refresh races a key press


async def loaded(pilot: Pilot[int]) -> ConsoleApp:
    app = pilot.app
    assert isinstance(app, ConsoleApp)
    await until(pilot, "first state", lambda: app.applied >= 1 and app.who is not None)
    await pilot.pause()
    return app


def keys(table: LiveTable) -> list[str]:
    """Row keys in the order they are drawn."""
    return [str(table.coordinate_to_cell_key(Coordinate(i, 0))[0].value) for i in range(table.row_count)]


def text_of(widget: Static) -> str:
    return static_text(widget)


async def describe(pilot: Pilot[int], *press: str) -> DescribeScreen:
    await pilot.press(*press, "enter")
    await until(pilot, "describe view", lambda: isinstance(pilot.app.screen, DescribeScreen))
    scr = pilot.app.screen
    assert isinstance(scr, DescribeScreen)
    await until(pilot, "audit entries read", lambda: scr.audit is not None)
    await pilot.pause()
    return scr


# --- item 4: drill-down -------------------------------------------------------------------------

async def test_enter_opens_describe_that_fits_80x24() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        scr = await describe(pilot, "j", "j", "j", "j")  # trainer-5: down, host lost
        text = text_of(scr.query_one("#describe", Static))
        assert "Server trainer-5  down" in text
        assert "diagnosis host or network down: no agent heartbeat for 31 s" in text
        assert "host_lost" in text  # the event about its host
        assert "url" in text and "http://10.0.0.5:8080" in text  # every field
        # it fits: nothing wider than the screen, and it scrolls rather than overflowing
        box = scr.query_one("#describe-box")
        assert box.size.width <= 80 and scr.size.height == 24
        assert box.max_scroll_x == 0
        await pilot.press("escape")
        await until(pilot, "back", lambda: not isinstance(app.screen, DescribeScreen))


async def test_describe_a_process_says_where_its_log_is_not() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await until(pilot, "hosts shown", lambda: app.active_tab == "hosts" and app.query_one(ProcessesTable).row_count)
        scr = await describe(pilot, "j" * 1, "j", "j", "j", "j", "j", "j", "j")  # host-9/trainer-9
        text = text_of(scr.query_one("#describe", Static))
        assert "Process trainer-9 on host-9  fatal" in text
        assert "last exit: crash loop: 5 exits in 60 s" in text
        assert "crash_loop" in text
        assert "Log tail: not available" in text


async def test_describe_shows_audit_entries_of_its_object() -> None:
    src = source()
    app = app_for(src)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await src.act("trainer-2", "drain")
        await src.act("trainer-3", "drain")
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied >= 2)
        scr = await describe(pilot, "j")  # trainer-2
        text = text_of(scr.query_one("#describe", Static))
        assert "test (operator) drain trainer-2: ok" in text
        assert "trainer-3" not in text.split("Audit", 1)[1]


# --- item 5: navigation -------------------------------------------------------------------------

async def test_slash_filters_the_table_and_esc_clears() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        table = app.query_one(ServersTable)
        assert table.row_count == 12
        await pilot.press("slash")
        await until(pilot, "prompt", lambda: isinstance(app.screen, Prompt))
        await pilot.press(*"down")
        await until(pilot, "filtered", lambda: keys(table) == ["trainer-5", "trainer-6"])
        await pilot.press("enter")
        await until(pilot, "prompt closed", lambda: not isinstance(app.screen, Prompt))
        assert keys(table) == ["trainer-5", "trainer-6"]
        note = text_of(app.query_one("#view-note", Static))
        assert "2 of 12 rows" in note and "filter 'down'" in note
        # a refresh keeps the filter
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied >= 2)
        assert keys(table) == ["trainer-5", "trainer-6"]
        await pilot.press("slash")
        await until(pilot, "prompt", lambda: isinstance(app.screen, Prompt))
        await pilot.press("escape")
        await until(pilot, "cleared", lambda: table.row_count == 12)


@pytest.mark.parametrize(("tab", "word", "expected", "title"), [
    ("2", "fatal", ["host-9/trainer-9"], "Process trainer-9 on host-9  fatal"),
    ("4", "standby", ["B"], "Dispatcher B  standby"),
    ("5", "4o", ["secondary"], "LLM provider secondary  up"),
], ids=["hosts", "dispatchers", "llm"])
async def test_every_tab_filters_and_describes(tab: str, word: str, expected: list[str], title: str) -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await pilot.press(tab)
        await pilot.pause()
        table = app.main.focused
        assert isinstance(table, LiveTable)
        await until(pilot, "rows", lambda: table.row_count > 0)
        await pilot.press("slash", *word, "enter")
        await until(pilot, "filtered", lambda: keys(table) == expected)
        scr = await describe(pilot)
        assert title in text_of(scr.query_one("#describe", Static))


async def test_sort_by_a_column_and_reverse() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        table = app.query_one(ServersTable)
        await pilot.press("j", "j")  # trainer-3 selected
        await pilot.press("o", "o", "o", "o", "o")  # name, state, diagnosis, HB age, CPU
        assert table.sort_column == 4
        cpu = [table.shown(k)[4] for k in keys(table)]  # type: ignore[index]
        numbers = [c for c in cpu if c is not None]
        assert numbers == sorted(numbers) and cpu[-1] is None  # blanks last
        assert table.selected == "trainer-3"  # the cursor stays on its row
        await pilot.press("O")
        assert keys(table)[0] == "trainer-10"  # 93% CPU first
        assert "sorted by CPU (descending)" in text_of(app.query_one("#view-note", Static))


async def test_sorted_rows_move_when_their_values_change() -> None:
    """A refresh that only reorders rows moves them in place (no rebuild); what is drawn follows."""
    src = source()
    app = app_for(src)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        table = app.query_one(ServersTable)
        await pilot.press("j")  # trainer-2
        table.set_view(sort_column=4)  # CPU
        servers = [s.model_copy(update={"cpu_percent": float(100 - i)}) if s.cpu_percent is not None else s
                   for i, s in enumerate(src.current.servers)]
        src.current = src.current.model_copy(update={"servers": servers})
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied >= 2)
        await pilot.pause()
        cpu = [table.shown(k)[4] for k in keys(table)]  # type: ignore[index]
        numbers = [c for c in cpu if c is not None]
        assert numbers == sorted(numbers) and keys(table)[0] == "trainer-12"
        # the drawn rows are the ones in that order, and the cursor stayed on trainer-2
        drawn = [str(table.get_row_at(i)[0].plain) for i in range(table.row_count)]  # type: ignore[attr-defined]
        assert drawn == keys(table)
        assert table.selected == "trainer-2"


async def test_vim_keys_move_the_cursor() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        table = app.query_one(ServersTable)
        await pilot.press("j", "j", "j")
        assert table.selected == "trainer-4"
        await pilot.press("k")
        assert table.selected == "trainer-3"
        await pilot.press("G")
        assert table.selected == "trainer-12"
        await pilot.press("g")
        assert table.selected == "trainer-1"


async def test_fault_only_toggle() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        table = app.query_one(ServersTable)
        await pilot.press("f")
        # suspect, two down, draining, disabled (admin states are shown: they take capacity away)
        assert keys(table) == ["trainer-3", "trainer-5", "trainer-6", "trainer-7", "trainer-8"]
        await pilot.press("f")
        assert table.row_count == 12


async def test_colon_reaches_a_view_and_an_action() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await pilot.press("colon")
        await until(pilot, "prompt", lambda: isinstance(app.screen, Prompt))
        await pilot.press(*"hosts", "enter")
        await until(pilot, "hosts tab", lambda: app.active_tab == "hosts")
        await pilot.press("colon", *"servers", "space", *"down", "enter")
        await until(pilot, "servers filtered",
                    lambda: app.active_tab == "servers"
                    and keys(app.query_one(ServersTable)) == ["trainer-5", "trainer-6"])
        await pilot.press("colon", *"audit", "enter")
        await until(pilot, "audit view", lambda: isinstance(app.screen, AuditScreen))
        await pilot.press("escape")
        await until(pilot, "back", lambda: not isinstance(app.screen, AuditScreen))
        await pilot.press("colon", *"llm", "space", *"disable", "enter")
        await until(pilot, "confirm", lambda: isinstance(app.screen, ConfirmAction))
        assert app.active_tab == "llm" and "provider" in static_text(app.screen.query_one("#confirm-question", Static))


def test_resolve_names() -> None:
    assert resolve("disable", "llm").command.id == "console.llm.disable"  # type: ignore[union-attr]
    assert resolve("disable", "servers").command.id == "console.disable"  # type: ignore[union-attr]
    assert resolve("disable", "events").command.id == "console.disable"  # type: ignore[union-attr]
    assert resolve("llm enable", "servers").command.id == "console.llm.enable"  # type: ignore[union-attr]
    assert resolve("step-down", "servers").command.id == "console.dispatcher.step_down"  # type: ignore[union-attr]
    target = resolve("hosts host-3", "servers")
    assert target is not None and target.command.id == "console.tab.hosts" and target.words == ("host-3",)
    target = resolve("servers down", "hosts")  # a filter, not the table's "down" key
    assert target is not None and target.command.id == "console.tab.servers" and target.words == ("down",)
    assert resolve("nonsense", "servers") is None


async def test_palette_lists_the_commands_of_every_tab() -> None:
    app = app_for()
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert "Drain selected server" in titles  # the shown tab's, as before
        assert {"Restart (Hosts)", "Promote (Dispatchers)", "Pin (LLM)", "Fail over (Store)",
                "Filter (the shown table)", "Sort (the shown table)", "Audit log", "Undo"} <= titles


async def test_undo_reverses_a_disable() -> None:
    src = source()
    app = app_for(src)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await pilot.press("j", "x")  # disable trainer-2
        await until(pilot, "confirm", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("y")
        await until(pilot, "disabled", lambda: app.query_one(ServersTable).shown("trainer-2")[1] == "disabled")  # type: ignore[index]
        await pilot.press("U")
        await until(pilot, "undo asks", lambda: isinstance(app.screen, ConfirmAction))
        assert app.notices[-1].title == "Undo" and "disable trainer-2" in app.notices[-1].message
        await pilot.press("y")
        await until(pilot, "enabled again", lambda: app.query_one(ServersTable).shown("trainer-2")[1] == "up")  # type: ignore[index]
        assert [a for _, a, t in src.audit if t == "trainer-2"] == ["disable", "enable"]
        await pilot.press("U")  # nothing left: says so, asks nothing
        await until(pilot, "nothing to undo", lambda: app.notices and app.notices[-1].title == "Nothing to undo")
        assert not isinstance(app.screen, ConfirmAction)


async def test_undo_reverses_an_unpin_on_the_llm_tab() -> None:
    providers = [p.model_copy(update={"pinned": p.name == "secondary"}) for p in fixed_providers()]
    src = FixedSource(fixed_state(), providers=providers)
    app = app_for(src)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await pilot.press("5", "j", "u")
        await until(pilot, "confirm", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("y")
        await until(pilot, "unpinned", lambda: not any(p.pinned for p in src.providers_list or []))
        await pilot.press("1", "U")  # from another tab: the undo goes to the LLM tab
        await until(pilot, "undo asks", lambda: isinstance(app.screen, ConfirmAction))
        assert app.active_tab == "llm"
        await pilot.press("y")
        await until(pilot, "pinned again", lambda: any(p.pinned and p.name == "secondary"
                                                      for p in src.providers_list or []))
        assert app.query_one(ProvidersTable).row_count == 2


async def test_audit_view_lists_newest_first_and_filters() -> None:
    src = source()
    for name in ("trainer-2", "trainer-3", "trainer-4"):
        await src.act(name, "drain")
    app = app_for(src)
    async with app.run_test(size=SMALL) as pilot:
        await loaded(pilot)
        await pilot.press("A")
        await until(pilot, "audit view", lambda: isinstance(app.screen, AuditScreen))
        scr = app.screen
        assert isinstance(scr, AuditScreen)
        table = scr.query_one(AuditTable)
        await until(pilot, "entries", lambda: table.row_count == 3)
        targets = [table.shown(k)[3] for k in keys(table)]  # type: ignore[index]
        assert targets == ["trainer-4", "trainer-3", "trainer-2"]
        await pilot.press("slash", *"trainer-3", "enter")
        await until(pilot, "filtered", lambda: table.row_count == 1)
        assert table.shown(keys(table)[0])[3] == "trainer-3"  # type: ignore[index]


# --- snapshots ----------------------------------------------------------------------------------

def _line(lines: list[str], *words: str) -> str:
    found = [ln for ln in lines if all(w in ln for w in words)]
    assert found, f"no line with {words} in:\n" + "\n".join(lines)
    return found[0]


async def _describe_trainer_6(pilot: Pilot[int]) -> None:
    app = await loaded(pilot)
    src = app.source
    assert isinstance(src, FixedSource)
    await src.act("trainer-6", "disable")
    app.action_refresh_now()
    await until(pilot, "refresh", lambda: app.applied >= 2)
    await pilot.press("j", "j", "j", "j", "j", "enter")
    await until(pilot, "describe", lambda: isinstance(app.screen, DescribeScreen))
    scr = app.screen
    assert isinstance(scr, DescribeScreen)
    await until(pilot, "audit", lambda: scr.audit is not None)
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
def test_snapshot_describe(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                           size: tuple[int, int]) -> None:
    assert snap_compare(app_for(), terminal_size=size, run_before=_describe_trainer_6)
    lines = snapshot_lines(request)
    screen = "\n".join(lines)
    assert lines[0].strip() == "Server trainer-6  disabled"
    assert "✖ diagnosis software fault: agent alive; server not answering" in screen
    assert "server_down" in screen and "trainer-6: suspect -> down" in screen
    assert "test (operator) disable trainer-6: ok" in screen
    assert "Esc back" in lines[-1]
    assert max(len(ln) for ln in lines) <= size[0]
    # what is wrong and what happened come before the fields: at 80x24 without scrolling
    fields_at = screen.index("Fields")
    assert screen.index("server_down") < fields_at and screen.index("disable trainer-6") < fields_at
    if size == (200, 50):
        # two columns of fields side by side, every field on the one screen
        assert any("url" in ln and "http://10.0.0.6:8080" in ln and "last_error" in ln for ln in lines)
        assert "agent alive; server not answering" in _line(lines, "diagnosis_detail")
    else:
        assert "Fields" in screen  # the first fields show; the rest scroll



async def _audit_open(pilot: Pilot[int]) -> None:
    app = await loaded(pilot)
    src = app.source
    assert isinstance(src, FixedSource)
    await src.act("trainer-2", "drain")
    await src.act("trainer-8", "enable")
    await pilot.press("A")
    await until(pilot, "audit", lambda: isinstance(app.screen, AuditScreen) and app.screen.applied >= 1)
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
def test_snapshot_audit(snap_compare: Callable[..., bool], request: pytest.FixtureRequest,
                        size: tuple[int, int]) -> None:
    assert snap_compare(app_for(), terminal_size=size, run_before=_audit_open)
    lines = snapshot_lines(request)
    assert "Audit log" in lines[0] and "2 entries" in lines[0]
    enable = next(i for i, ln in enumerate(lines) if "enable" in ln and "trainer-8" in ln)
    drain = next(i for i, ln in enumerate(lines) if "drain" in ln and "trainer-2" in ln)
    assert enable < drain  # newest first
    assert "test" in lines[enable] and "ok" in lines[enable]  # who and the answer, even at 80 columns
    assert _line(lines, "enable trainer-8 via fixed")  # the selected entry in full, under the table

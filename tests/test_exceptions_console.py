"""The console's exceptions view against a real dispatcher and a real trainer that raises on request."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from textual.binding import Binding
from textual.pilot import Pilot
from textual.widgets import Input, Static

import console.format
import console.screens.exceptions
from console.app import ConsoleApp, create_app
from console.client import ConsoleClient
from console.screens.confirm import ConfirmAction
from console.screens.exceptions import ExceptionsHelp, ExceptionsScreen, OccurrenceScreen
from console.source import FixedSource
from ctops.capture.wire import ExceptionEvent, Frame, GroupDetail, GroupView, Occurrence
from tests.cluster import Cluster, wait_for
from tests.test_console import fixed_state, snapshot_lines

SIZE = (140, 45)


async def until(pilot: Pilot[int], what: str, cond: Callable[[], object], timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def rendered(widget: Static) -> str:
    out = Console(width=200, record=True, file=io.StringIO())
    out.print(widget.content)
    return out.export_text()


def api(c: Cluster, path: str) -> Any:
    r = httpx.get(f"{c.ops_url()}/api/v1/exceptions{path}", headers=c.auth("viewer"), timeout=10)
    r.raise_for_status()
    return r.json()


def audit_log(c: Cluster) -> list[dict[str, str]]:
    return httpx.get(f"{c.ops_url()}/api/v1/audit", headers=c.auth("viewer"), timeout=5).json()


def raise_in_trainer(c: Cluster, label: str) -> None:
    assert httpx.post(f"{c.trainer_url('trainer-1')}/_debug/raise", params={"label": label}, timeout=10).status_code \
        == 500


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster], tmp_path: Path) -> Cluster:
    c = make_cluster(trainers=1)
    c.env |= {"CTOPS_TRAINER_DEBUG": "1", "CTOPS_CAPTURE_SPOOL": str(tmp_path / "spool")}
    c.start("A")
    c.start("trainer-1")
    wait_for("trainer", lambda: httpx.get(f"{c.trainer_url('trainer-1')}/healthz", timeout=2).status_code == 200)
    wait_for("ops API", lambda: api(c, "/stats") is not None)
    return c


async def test_trainer_exception_shows_with_its_traceback_and_can_be_triaged(cluster: Cluster) -> None:
    raise_in_trainer(cluster, "first")
    wait_for("the event at the dispatcher", lambda: api(cluster, "/stats")["events"] == 1)
    app = create_app(ConsoleClient([cluster.ops_url()], cluster.operator_token), interval=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("E")
        await until(pilot, "exceptions screen", lambda: isinstance(app.screen, ExceptionsScreen))
        scr = app.screen
        assert isinstance(scr, ExceptionsScreen)
        await until(pilot, "a group listed", lambda: len(scr.shown) == 1)
        g = scr.shown[0]
        assert g.type == "trainer.debug.DebugFailure" and g.hosts == ["host-1"] and g.services == ["trainer"]
        await until(pilot, "its detail", lambda: scr.detail is not None)
        assert scr.detail is not None and scr.detail.latest is not None
        in_app = [f.function for f in scr.detail.latest.frames if f.in_app]
        assert in_app[-2:] == ["add_debug_routes.<locals>.debug_raise", "explode"]
        text = rendered(scr.query_one("#exc-detail", Static))
        assert "Traceback (most recent call last):" in text
        assert 'trainer/debug.py", line' in text and "in explode" in text
        assert 'raise DebugFailure(f"debug failure requested: {label}")' in text
        assert "trainer.debug.DebugFailure: debug failure requested: first" in text

        # filter as you type, then the status filter
        await pilot.press("slash", "z", "z", "q")
        await until(pilot, "nothing matches", lambda: scr.shown == [])
        await pilot.press("backspace", "backspace", "backspace", "h", "o", "s", "t", "-", "1")
        await until(pilot, "host-1 matches", lambda: len(scr.shown) == 1)
        await pilot.press("escape")
        await until(pilot, "focus back on the list", lambda: not isinstance(scr.focused, Input))
        assert scr.status_filter == "unresolved"  # the default, as Sentry's
        await pilot.press("f")  # all
        await until(pilot, "all shown", lambda: scr.status_filter is None and len(scr.shown) == 1)
        await pilot.press("f")  # acknowledged
        await until(pilot, "no acknowledged group", lambda: scr.shown == [])
        for _ in range(5):  # resolved, muted, regressed, unresolved, all
            await pilot.press("f")
        assert scr.status_filter is None

        # resolve at once (no dialog: U undoes it), then it happens again: regressed
        await pilot.press("s")
        await until(pilot, "resolved", lambda: scr.shown and scr.shown[0].status == "resolved")
        assert not isinstance(app.screen, ConfirmAction)
        raise_in_trainer(cluster, "again")
        await until(pilot, "regressed", lambda: scr.shown and scr.shown[0].status == "regressed")
        assert scr.shown[0].count == 2

        # mute at once for an hour; assign takes a value in the dialog, and U takes it back
        await pilot.press("m")
        await until(pilot, "muted", lambda: scr.shown and scr.shown[0].status == "muted")
        await pilot.press("n")
        await until(pilot, "assign dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("a", "n", "a", "enter")
        await until(pilot, "assigned", lambda: scr.shown and scr.shown[0].assignee == "ana")
        await pilot.press("U")
        await until(pilot, "assignment undone", lambda: scr.shown and scr.shown[0].assignee is None)
        assert scr.shown[0].status == "muted"
        # a cancelled dialog changes nothing
        await pilot.press("M")
        await until(pilot, "mute-for dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("escape")
        await until(pilot, "dialog closed", lambda: app.screen is scr)
        assert [a for _, a in scr.acted] == ["resolve", "mute", "assign", "assign"]
        audit = audit_log(cluster)
        assert {a["action"] for a in audit} >= {"exception_resolve", "exception_mute", "exception_assign"}
        assert "exception_acknowledge" not in {a["action"] for a in audit}


async def test_live_tail_follows_pauses_and_filters(cluster: Cluster) -> None:
    raise_in_trainer(cluster, "one")
    wait_for("the event at the dispatcher", lambda: api(cluster, "/stats")["events"] == 1)
    app = create_app(ConsoleClient([cluster.ops_url()], cluster.viewer_token), interval=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("E")
        await until(pilot, "exceptions screen", lambda: isinstance(app.screen, ExceptionsScreen))
        scr = app.screen
        assert isinstance(scr, ExceptionsScreen)
        await pilot.press("t")
        await until(pilot, "the first tail line", lambda: len(scr.tail_items) == 1)
        raise_in_trainer(cluster, "two")
        await until(pilot, "followed", lambda: len(scr.tail_items) == 2)
        await pilot.press("space")
        await until(pilot, "paused", lambda: not scr.following)
        raise_in_trainer(cluster, "three")
        wait_for("three stored", lambda: api(cluster, "/stats")["events"] == 3)
        seen = scr.applied
        await until(pilot, "some refreshes", lambda: scr.applied >= seen + 3)
        assert len(scr.tail_items) == 2  # paused
        await pilot.press("space")
        await until(pilot, "caught up after resuming", lambda: len(scr.tail_items) == 3)
        assert [o.event.message.rsplit(": ", 1)[1] for o in scr.tail_items] == ["one", "two", "three"]
        status = rendered(scr.query_one("#exc-tail-status", Static))
        assert "following" in status and "3 shown" in status
        await pilot.press("slash", "t", "w", "o")
        await until(pilot, "the filter applied to the tail",
                    lambda: "1 shown" in rendered(scr.query_one("#exc-tail-status", Static)))
        await pilot.press("backspace", "backspace", "backspace", "escape", "t")  # groups: a viewer may not resolve
        await until(pilot, "a group", lambda: len(scr.shown) == 1)
        await pilot.press("s")  # not offered to a viewer: the key does nothing, nothing is sent
        seen = scr.applied
        await until(pilot, "some refreshes", lambda: scr.applied >= seen + 2)
        assert scr.acted == [] and api(cluster, "/groups")["groups"][0]["status"] == "unresolved"
        await pilot.press("escape")
        await until(pilot, "back on the main screen", lambda: not isinstance(app.screen, ExceptionsScreen))


# --- the same screen from a fixed Source: no cluster, snapshots read back in words -------------------

T0 = 1_700_000_000_000


def _event(i: int, etype: str, message: str, host: str, ts: int, *, service: str = "trainer") -> ExceptionEvent:
    frames = [Frame(filename="/srv/trainer/app.py", module="trainer.app", function="submit", lineno=88, in_app=True,
                    context_line="result = run_checks(sub)"),
              Frame(filename="/srv/trainer/checks.py", module="trainer.checks", function="run_checks", lineno=41,
                    in_app=True, context_line="return parse(out)[\"verdict\"]")]
    return ExceptionEvent(event_id=f"evt-{i:08d}", ts_ms=ts, service=service, host=host, type=etype, message=message,
                          frames=frames, context={"submission": f"u-{i}"})


def fixed_exceptions() -> tuple[list[tuple[GroupView, GroupDetail]], list[Occurrence]]:
    rows = [
        ("g-keyerror", "KeyError", "'verdict'", "unresolved", 41, "host-2", T0 - 20_000, None),
        ("g-timeout", "TimeoutError", "LLM review timed out after 30 s", "regressed", 7, "host-1", T0 - 95_000, None),
        ("g-decode", "json.decoder.JSONDecodeError", "Expecting value: line 1 column 1 (char 0)", "muted", 3,
         "host-3", T0 - 3_600_000, "ana"),
    ]
    groups, tail = [], []
    for i, (gid, etype, msg, status, count, host, last, assignee) in enumerate(rows):
        e = _event(i, etype, msg, host, last)
        g = GroupView(id=gid, type=etype, message=msg, culprit="trainer.checks.run_checks", count=count,
                      first_seen_ms=last - 86_400_000, last_seen_ms=last, hosts=[host], services=["trainer"],
                      status=status, assignee=assignee,  # type: ignore[arg-type]
                      mute_until_ms=T0 + 3_600_000 if status == "muted" else None)
        groups.append((g, GroupDetail(group=g, latest=e, recent=[e])))
        tail.append(Occurrence(id=f"{last}-0", group_id=gid, event=e))
    tail.sort(key=lambda o: o.event.ts_ms)
    return groups, tail


@pytest.fixture
def pinned_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console.format, "LOCAL_TZ", UTC)
    monkeypatch.setattr(console.screens.exceptions, "CLOCK", lambda: T0 / 1000)


def fixed_app(role: str = "operator") -> tuple[ConsoleApp, FixedSource]:
    groups, tail = fixed_exceptions()
    source = FixedSource(fixed_state(), role=role, exceptions=groups, tail=tail)
    return create_app(source, interval=3600), source


async def opened(pilot: Pilot[int]) -> ExceptionsScreen:
    app = pilot.app
    await until(pilot, "first state", lambda: getattr(app, "applied", 0) >= 1)
    await pilot.press("E")
    await until(pilot, "exceptions screen", lambda: isinstance(app.screen, ExceptionsScreen))
    scr = app.screen
    assert isinstance(scr, ExceptionsScreen)
    # unresolved by default: the muted group is not shown
    await until(pilot, "groups and detail", lambda: len(scr.shown) == 2 and scr.detail is not None)
    await pilot.pause()
    return scr


async def test_fixed_groups_resolve_at_once_and_undo(pinned_clock: None) -> None:
    app, source = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        scr = await opened(pilot)
        assert [g.id for g in scr.shown] == ["g-keyerror", "g-timeout"]  # last seen first
        await pilot.press("s")
        await until(pilot, "resolved", lambda: source.groups["g-keyerror"].group.status == "resolved")
        assert not isinstance(app.screen, ConfirmAction)  # no dialog for a reversible action
        await until(pilot, "gone from the unresolved list", lambda: [g.id for g in scr.shown] == ["g-timeout"])
        assert source.audit == [("test", "exception_resolve", "g-keyerror")]
        await pilot.press("U")
        await until(pilot, "back", lambda: source.groups["g-keyerror"].group.status == "unresolved")
        await until(pilot, "listed again", lambda: len(scr.shown) == 2)
        assert source.audit[-1] == ("test", "exception_unresolve", "g-keyerror")


async def test_fixed_bulk_resolve_of_marked_groups(pinned_clock: None) -> None:
    app, source = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        scr = await opened(pilot)
        await pilot.press("j")
        assert scr.selected == "g-timeout"
        await pilot.press("k", "space", "space")  # marks both, the cursor moving down
        await until(pilot, "two marked", lambda: scr.marked == {"g-keyerror", "g-timeout"})
        assert "2 marked" in rendered(scr.query_one("#exc-summary", Static))
        await pilot.press("s")
        await until(pilot, "both resolved", lambda: all(source.groups[g].group.status == "resolved"
                                                        for g in ("g-keyerror", "g-timeout")))
        await until(pilot, "none left unresolved", lambda: scr.shown == [] and not scr.marked)
        assert source.groups["g-decode"].group.status == "muted"  # not marked, not touched
        await pilot.press("U")  # one undo puts each back as it was: one unresolved, one regressed→unresolved
        await until(pilot, "both back", lambda: all(source.groups[g].group.status == "unresolved"
                                                    for g in ("g-keyerror", "g-timeout")))
        # `*` marks every shown group; mute them all at once
        await until(pilot, "listed again", lambda: len(scr.shown) == 2)
        await pilot.press("asterisk", "m")
        await until(pilot, "both muted", lambda: all(source.groups[g].group.status == "muted"
                                                     for g in ("g-keyerror", "g-timeout")))
        assert source.groups["g-keyerror"].group.mute_until_ms == T0 + 60 * 60_000


async def test_fixed_mute_for_asks_minutes(pinned_clock: None) -> None:
    app, source = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        scr = await opened(pilot)
        await pilot.press("M")
        await until(pilot, "mute dialog", lambda: isinstance(app.screen, ConfirmAction))
        app.screen.query_one(Input).value = "0"
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmAction) and source.audit == []  # a bad value changes nothing
        app.screen.query_one(Input).value = "15"
        await pilot.press("enter")
        await until(pilot, "muted", lambda: source.groups["g-keyerror"].group.status == "muted")
        assert source.groups["g-keyerror"].group.mute_until_ms == T0 + 15 * 60_000
        assert [a for _, a in scr.acted] == ["mute"]


async def test_fixed_counts_follow_the_filter(pinned_clock: None) -> None:
    app, _ = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        scr = await opened(pilot)
        summary = scr.query_one("#exc-summary", Static)
        assert "2 of 3 groups" in rendered(summary) and "status: unresolved (+regressed)" in rendered(summary)
        await pilot.press("slash", *"keyerror")
        await until(pilot, "one shown", lambda: len(scr.shown) == 1)
        # the header counts what the table shows, typed filter included
        assert "1 of 3 groups" in rendered(summary) and scr.query_one("#exc-groups").row_count == 1  # type: ignore[attr-defined]
        await pilot.press("escape", "f")
        await until(pilot, "all", lambda: len(scr.shown) == 1 and scr.status_filter is None)
        await pilot.press("slash", *["backspace"] * 8, "escape")
        await until(pilot, "all three", lambda: len(scr.shown) == 3)
        assert "3 of 3 groups" in rendered(summary)
        # a short id prefix finds its group
        await pilot.press("slash", *"g-dec")
        await until(pilot, "by id", lambda: [g.id for g in scr.shown] == ["g-decode"])


async def test_fixed_help_and_tail_line_opens(pinned_clock: None) -> None:
    app, _ = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        scr = await opened(pilot)
        await pilot.press("question_mark")
        await until(pilot, "help", lambda: isinstance(app.screen, ExceptionsHelp))
        text = rendered(app.screen.query_one("#exc-help-keys", Static))
        assert "Undo" in text and "Reopen" in text and "Mark all" in text
        await pilot.press("escape")
        await until(pilot, "help closed", lambda: app.screen is scr)
        footer_keys = {b.key for b in scr.BINDINGS if isinstance(b, Binding) and b.show}
        assert "u" in footer_keys  # reopen is in the footer
        await pilot.press("t")
        await until(pilot, "the tail", lambda: len(scr.tail_items) == 3)
        await pilot.press("enter")  # the newest line: KeyError
        await until(pilot, "occurrence", lambda: isinstance(app.screen, OccurrenceScreen))
        text = rendered(app.screen.query_one("#occ-detail", Static))
        assert "KeyError: 'verdict'" in text and "group g-keyerror" in text
        assert 'File "/srv/trainer/checks.py", line 41, in run_checks' in text


async def test_fixed_viewer_is_offered_no_triage_and_nothing_changes(pinned_clock: None) -> None:
    app, source = fixed_app(role="viewer")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "whoami", lambda: app.who is not None)
        scr = await opened(pilot)
        shown = {b.binding.description for b in scr.active_bindings.values() if b.binding.show and b.enabled}
        # a viewer reads, filters and tails; it is never offered what its token may not do
        assert {"Filter", "Tail", "Help"} <= shown and not shown & {"Ack", "Resolve", "Mute", "Reopen", "Undo"}, shown
        await pilot.press("a", "s", "m", "U", "asterisk")
        await pilot.pause(0.3)
        assert source.audit == [] and scr.shown[0].status == "unresolved" and scr.acted == [] and not scr.marked
        await pilot.press("question_mark")
        await until(pilot, "help", lambda: isinstance(app.screen, ExceptionsHelp))
        text = rendered(app.screen.query_one("#exc-help-keys", Static))
        assert "Filter" in text and not any(w in text for w in ("Ack", "Resolve", "Undo", "Mute"))


@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
def test_snapshot_exceptions(snap_compare: Callable[..., bool], size: tuple[int, int], pinned_clock: None,
                             request: pytest.FixtureRequest) -> None:
    assert snap_compare(fixed_app()[0], terminal_size=size, run_before=opened)
    lines = snapshot_lines(request)
    assert len(lines) == size[1]
    assert "Exceptions  2 of 3 groups" in lines[0] and "status: unresolved (+regressed)" in lines[0]
    keyerror = next(ln for ln in lines if "KeyError" in ln and "unresolved" in ln)
    assert "41" in keyerror and "20s ago" in keyerror
    assert any("regressed" in ln and "TimeoutError" in ln and "2m ago" in ln for ln in lines)
    assert not any("JSONDecodeError" in ln for ln in lines)  # muted: not in the default view
    assert any("u Reopen" in ln and "U Undo" in ln for ln in lines[-1:])  # the footer
    # the selected (first) group's traceback, below the list
    assert any("Traceback (most recent call last):" in ln for ln in lines)
    # the message column uses the width: at 80 columns it is on screen, at 200 it is 80-odd wide
    assert "'verdict'" in keyerror and "LLM review" in next(ln for ln in lines if "TimeoutError" in ln)
    if size[0] >= 200:
        header = next(ln for ln in lines if " message " in ln and "service" in ln)
        assert header.index("service") - header.index("message") >= 80
        assert "g-keyerr" in keyerror  # short ids, from 120 columns
    if size[1] >= 50:
        assert any('File "/srv/trainer/checks.py", line 41, in run_checks' in ln for ln in lines)
        assert any("KeyError: 'verdict'" in ln for ln in lines)


def test_snapshot_exceptions_tail(snap_compare: Callable[..., bool], pinned_clock: None,
                                  request: pytest.FixtureRequest) -> None:
    async def tail(pilot: Pilot[int]) -> None:
        scr = await opened(pilot)
        await pilot.press("t")
        await until(pilot, "the tail", lambda: len(scr.tail_items) == 3)
        await pilot.pause()

    assert snap_compare(fixed_app()[0], terminal_size=(120, 30), run_before=tail)
    lines = snapshot_lines(request)
    assert any("● following · 3 shown" in ln for ln in lines)
    order = [i for i, ln in enumerate(lines) if "trainer@host-" in ln]
    assert len(order) == 3
    assert "json.decoder.JSONDecodeError" in lines[order[0]] and "KeyError: 'verdict'" in lines[order[2]]
    assert "22:13:00" in lines[order[2]] and "[g-keyerror]" in lines[order[2]]


def test_snapshot_mute_dialog(snap_compare: Callable[..., bool], pinned_clock: None,
                              request: pytest.FixtureRequest) -> None:
    async def ask(pilot: Pilot[int]) -> None:
        await opened(pilot)
        await pilot.press("M")
        await until(pilot, "mute dialog", lambda: isinstance(pilot.app.screen, ConfirmAction))
        await pilot.pause()

    assert snap_compare(fixed_app()[0], terminal_size=(80, 24), run_before=ask)
    screen = "\n".join(snapshot_lines(request))
    assert "Mute KeyError?" in screen and "41 events, now unresolved" in screen
    assert "60" in screen and "Mute (y)" in screen and "Cancel (n)" in screen

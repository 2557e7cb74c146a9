"""The console's exceptions view against a real dispatcher and a real trainer that raises on request."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Input, Static

from console.app import create_app
from console.client import ConsoleClient
from console.screens.confirm import ConfirmAction
from console.screens.exceptions import ExceptionsScreen
from tests.cluster import Cluster, wait_for

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
        await pilot.press("f")  # unresolved
        await until(pilot, "unresolved shown", lambda: scr.status_filter == "unresolved" and len(scr.shown) == 1)
        await pilot.press("f")  # acknowledged
        await until(pilot, "no acknowledged group", lambda: scr.shown == [])
        for _ in range(4):  # back round to all
            await pilot.press("f")
        assert scr.status_filter is None

        # resolve (confirmed), then it happens again: regressed
        await pilot.press("s")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("y")
        await until(pilot, "resolved", lambda: scr.shown and scr.shown[0].status == "resolved")
        raise_in_trainer(cluster, "again")
        await until(pilot, "regressed", lambda: scr.shown and scr.shown[0].status == "regressed")
        assert scr.shown[0].count == 2

        # mute and assign take a value in the dialog
        await pilot.press("m")
        await until(pilot, "mute dialog", lambda: isinstance(app.screen, ConfirmAction))
        app.screen.query_one(Input).value = "15"
        await pilot.press("enter")
        await until(pilot, "muted", lambda: scr.shown and scr.shown[0].status == "muted")
        await pilot.press("n")
        await until(pilot, "assign dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("a", "n", "a", "enter")
        await until(pilot, "assigned", lambda: scr.shown and scr.shown[0].assignee == "ana")
        # a cancelled action changes nothing
        await pilot.press("a")
        await until(pilot, "ack dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("n")
        await until(pilot, "dialog closed", lambda: app.screen is scr)
        assert [a for _, a in scr.acted] == ["resolve", "mute", "assign"]
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
        await pilot.press("s")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("y")
        await until(pilot, "refusal toast", lambda: any("may not" in n.message for n in app._notifications))
        assert api(cluster, "/groups")["groups"][0]["status"] == "unresolved"
        await pilot.press("escape")
        await until(pilot, "back on the main screen", lambda: not isinstance(app.screen, ExceptionsScreen))

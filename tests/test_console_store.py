"""The console's Store tab (6): its confirmed, audited "fail over the store now" action, the quarantined
records with their confirmed, audited discard / restore, the shared-state banner, and snapshots at
80x24 and 200x50 (whose text is also checked in words)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import Label, Static

import console.format
from console.app import ConsoleApp, create_app
from console.client import ConsoleClient
from console.screens.confirm import ConfirmAction
from console.source import FixedSource
from console.widgets.banner import StoreBanner
from console.widgets.tables import QuarantineTable, StoreTable
from ctops import integrity
from ctops.envelope import Corrupt
from ctops.keys import Keys
from ctops.wire import ClusterState, QuarantinedRecord, StoreReplicaView, StoreSentinelView, StoreView
from tests.cluster import Cluster
from tests.test_console import SIZE, T0, fixed_events, fixed_providers, fixed_state, svg_lines, until

SNAPSHOTS = Path(__file__).parent / "__snapshots__" / "test_console_store"


@pytest.fixture(autouse=True)
def utc_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(console.format, "LOCAL_TZ", UTC)
    yield


def fixed_store(**kw: Any) -> StoreView:
    base = StoreView(
        mode="sentinel", available=True, primary="redis-1",
        replicas=[StoreReplicaView(name="redis-2", state="up", lag_ms=0, address="127.0.1.2:6379"),
                  StoreReplicaView(name="redis-3", state="down", lag_ms=None, address="127.0.1.3:6379")],
        sentinels=[StoreSentinelView(name=f"sentinel-{i}", state="down" if i == 3 else "up",
                                     address=f"127.0.1.{i}:26379") for i in (1, 2, 3)],
        last_failover_ms=T0 - 3_600_000, writes_unconfirmed=3, corrupt_found=3, repaired=1, last_scrub_ms=2500)
    return base.model_copy(update=kw)


def store_state(**kw: Any) -> ClusterState:
    return fixed_state().model_copy(update={"store": fixed_store(**kw)})


def fixed_quarantine() -> list[QuarantinedRecord]:
    return [
        QuarantinedRecord(qid="q_1700000000000_a1b2c3", key="ctops:session:s-7f3a", kind="session",
                          reason="checksum", detail="crc32c mismatch", session="s-7f3a", reader="trainer-2",
                          at_ms=T0 - 60_000, outcome="set aside"),
        QuarantinedRecord(qid="q_1699999000000_d4e5f6", key="ctops:submission:u-19", kind="submission",
                          reason="undecodable", session="s-0c11", reader="ctops store verify",
                          at_ms=T0 - 1_060_000, outcome="repaired"),
    ]


def fixed(state: ClusterState | None = None, role: str = "operator",
          quarantined: list[QuarantinedRecord] | None = None) -> tuple[ConsoleApp, FixedSource]:
    source = FixedSource(state or store_state(), role=role, events=fixed_events(), providers=fixed_providers(),
                         quarantined=fixed_quarantine() if quarantined is None else quarantined)
    return create_app(source, interval=3600), source


async def loaded(pilot: Pilot[int]) -> None:
    app = pilot.app
    assert isinstance(app, ConsoleApp)
    await until(pilot, "first state", lambda: app.applied >= 1 and app.who is not None)
    await pilot.pause()


async def store_tab(pilot: Pilot[int]) -> None:
    await loaded(pilot)
    await pilot.press("6")
    app = pilot.app
    assert isinstance(app, ConsoleApp)
    await until(pilot, "store tab", lambda: app.active_tab == "store")
    await pilot.pause()


async def confirm(pilot: Pilot[int], key: str) -> str:
    app = pilot.app
    await pilot.press(key)
    await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
    text = " ".join(Text.from_markup(str(label.content)).plain for label in app.screen.query(Label))
    await pilot.press("y")
    return text


def noticed(app: ConsoleApp, title: str, *words: str) -> bool:
    return any(title in n.title and all(w in n.message for w in words) for n in app.notices)


def static_plain(w: Static) -> str:
    c = w.content
    return c.plain if isinstance(c, Text) else str(c)


# --- without network ------------------------------------------------------------------------------

async def test_store_tab_shows_topology_and_fails_over_when_confirmed() -> None:
    app, source = fixed()
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        table = app.query_one(StoreTable)
        assert table.get_cell("redis-1", "role").plain == "★ primary"
        assert table.get_cell("redis-3", "state").plain == "✖ down"
        assert table.get_cell("sentinel-3", "state").plain == "✖ down"
        summary = static_plain(app.query_one("#store-summary", Static))
        assert "primary redis-1" in summary and "writes unconfirmed 3" in summary
        assert "Last failover 2023-11-14 21:13:20" in summary
        said = await confirm(pilot, "F")
        assert "Fail the store over now?" in said and "Primary now: redis-1; replicas up: redis-2." in said
        await until(pilot, "the result", lambda: noticed(app, "Store failed over", "redis-1 → redis-2"))
        assert source.calls == [("store_failover",)]
        await until(pilot, "the new primary shown", lambda: (table.shown("redis-2") or ("", ""))[1] == "primary")
        assert table.get_cell("redis-1", "role").plain == "replica"


async def test_failover_is_asked_first_and_cancel_changes_nothing() -> None:
    app, source = fixed()
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        await pilot.press("F")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("enter")  # Cancel has the focus: a stray Enter changes nothing
        await until(pilot, "dialog closed", lambda: not isinstance(app.screen, ConfirmAction))
        await pilot.pause()
        assert source.calls == []
        await pilot.press("1", "F")  # F belongs to the Store tab only
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAction)


async def test_a_viewer_is_told_no() -> None:
    app, source = fixed(role="viewer")
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        await until(pilot, "whoami", lambda: app.who is not None)
        await pilot.press("F")  # a viewer is not offered the action at all (issue 17 item 6)
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmAction)
        assert source.calls == [] and source.current.store.primary == "redis-1"  # type: ignore[union-attr]


async def test_store_away_shows_a_banner_not_a_host_failure() -> None:
    state = store_state(available=False, unavailable_since_ms=T0 - 5000,
                        diagnosis="shared state unavailable: redis-1 not answering for 5 s; routing continues "
                                  "on the last known state")
    app, source = fixed(state)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        banner = app.query_one(StoreBanner)
        assert banner.display
        assert "shared state unavailable: redis-1 not answering" in static_plain(banner)
        source.current = store_state()
        seen = app.applied
        app.action_refresh_now()
        await until(pilot, "refresh", lambda: app.applied > seen)
        assert not banner.display


async def quarantine_row(pilot: Pilot[int], qid: str) -> QuarantineTable:
    app = pilot.app
    table = app.query_one(QuarantineTable)
    await until(pilot, "the quarantined records", lambda: table.shown(qid) is not None)
    table.focus()
    table.move_cursor(row=table.get_row_index(qid))
    await pilot.pause()
    assert table.selected == qid
    return table


async def test_quarantined_records_are_listed_and_discarded_when_confirmed() -> None:
    app, source = fixed()
    q1, q2 = (q.qid for q in fixed_quarantine())
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        table = await quarantine_row(pilot, q1)
        assert table.row_count == 2
        assert table.get_cell(q1, "key").plain == "ctops:session:s-7f3a"
        assert table.get_cell(q1, "outcome").plain == "set aside"
        assert table.get_cell(q2, "outcome").plain == "repaired"
        title = static_plain(app.query_one("#quarantine-title", Static))
        assert "Quarantined records 2" in Text.from_markup(title).plain
        summary = static_plain(app.query_one("#store-summary", Static))
        assert "Damaged records found 3 · repaired 1" in summary
        said = await confirm(pilot, "X")
        assert f"Discard quarantined record {q1}?" in said
        assert "session record ctops:session:s-7f3a, set aside (checksum); set aside; session s-7f3a" in said
        assert "deleted for good" in said
        await until(pilot, "the result", lambda: noticed(app, "Quarantined record discarded", q1, "audited"))
        assert source.calls == [("quarantine", q1, "discard")]
        assert source.audit == [("test", "quarantine-discard", "ctops:session:s-7f3a")]
        await until(pilot, "the row gone", lambda: table.shown(q1) is None)
        assert table.row_count == 1


async def test_a_quarantined_record_is_put_back_when_confirmed_and_cancel_changes_nothing() -> None:
    app, source = fixed()
    q1, q2 = (q.qid for q in fixed_quarantine())
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        await quarantine_row(pilot, q2)
        await pilot.press("R")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        await pilot.press("n")
        await until(pilot, "dialog closed", lambda: not isinstance(app.screen, ConfirmAction))
        assert source.calls == [] and len(source.quarantined) == 2
        said = await confirm(pilot, "R")
        assert f"Restore quarantined record {q2}?" in said and "put back at the key" in said
        await until(pilot, "the result", lambda: noticed(app, "Quarantined record put back", q2))
        assert source.calls == [("quarantine", q2, "restore")]
        assert [q.qid for q in source.quarantined] == [q1]


async def test_a_viewer_may_not_discard_a_quarantined_record() -> None:
    app, source = fixed(role="viewer")
    q1 = fixed_quarantine()[0].qid
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        await quarantine_row(pilot, q1)
        await until(pilot, "whoami", lambda: app.who is not None)
        await pilot.press("X")  # not offered to a viewer: no dialog, nothing sent
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmAction)
        assert source.calls == [] and len(source.quarantined) == 2 and source.audit == []


async def test_discard_keys_act_only_on_the_store_tab_and_need_a_selected_record() -> None:
    app, source = fixed(quarantined=[])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("X")  # a Store key, on the Servers tab: nothing
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmAction)
        await store_tab(pilot)
        await pilot.press("X")
        await until(pilot, "told to select one", lambda: noticed(app, "No quarantined record selected"))
        assert not isinstance(app.screen, ConfirmAction) and source.calls == []


# --- snapshots, read back in words ----------------------------------------------------------------

@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
def test_snapshot_store_tab(snap_compare: Callable[..., bool], size: tuple[int, int],
                            request: pytest.FixtureRequest) -> None:
    assert snap_compare(fixed()[0], terminal_size=size, run_before=store_tab)
    svg = (SNAPSHOTS / f"{request.node.name}.svg").read_text()
    lines = svg_lines(svg)
    screen = "\n".join(lines)
    # the accepted picture: tab 6 open, the topology with its down nodes, the failover key in the footer
    assert "6 Store" in screen and "1 Servers" in screen
    assert any("Store sentinel · primary redis-1 · available" in ln for ln in lines)
    assert any("store redis-1 1/2 replicas" in ln for ln in lines[:5])  # the header (5 lines at 80), every tab
    assert any("writes unconfirmed 3" in ln for ln in lines)
    assert any("redis-1" in ln and "★ primary" in ln and "● up" in ln for ln in lines)
    assert any("redis-2" in ln and "replica" in ln and "0ms" in ln for ln in lines)
    assert any("redis-3" in ln and "✖ down" in ln for ln in lines)
    assert any("sentinel-3" in ln and "✖ down" in ln for ln in lines)
    assert any("F" in ln and "Fail over" in ln and "Discard" in ln and "Restore" in ln for ln in lines[-2:])
    assert len(lines) == size[1]
    # the damage found and the quarantined records, each with its key, kind and outcome
    assert any("Damaged records found 3 · repaired 1 · last full check took 2.5 s" in ln for ln in lines)
    assert any("Quarantined records 2" in ln for ln in lines)
    assert any("session" in ln and "ctops:session:s-7f3a" in ln and "set aside" in ln for ln in lines)
    assert any("submission" in ln and "ctops:submission:u-19" in ln and "repaired" in ln for ln in lines)
    if size[0] >= 200:
        assert any("q_1700000000000_a1b2c3" in ln and "checksum" in ln and "s-7f3a" in ln for ln in lines)


def test_snapshot_failover_dialog(snap_compare: Callable[..., bool]) -> None:
    async def ask(pilot: Pilot[int]) -> None:
        await store_tab(pilot)
        await pilot.press("F")
        await until(pilot, "confirm dialog", lambda: isinstance(pilot.app.screen, ConfirmAction))

    assert snap_compare(fixed()[0], terminal_size=(80, 24), run_before=ask)
    screen = "\n".join(svg_lines((SNAPSHOTS / "test_snapshot_failover_dialog.svg").read_text()))
    assert "Fail the store over now?" in screen and "Fail over (y)" in screen and "Cancel (n)" in screen


# --- a real cluster -------------------------------------------------------------------------------

def audit(c: Cluster) -> list[dict[str, str]]:
    r = httpx.get(f"{c.ops_url()}/api/v1/audit", headers=c.auth("viewer"), timeout=5)
    r.raise_for_status()
    return r.json()


def store_view(c: Cluster) -> dict[str, Any]:
    r = httpx.get(f"{c.ops_url()}/api/v1/store", headers=c.auth("viewer"), timeout=10)
    r.raise_for_status()
    return r.json()


def failover_as(c: Cluster, role: str) -> httpx.Response:
    return httpx.post(f"{c.ops_url()}/api/v1/store/failover", headers=c.auth(role), timeout=30)


async def test_one_node_store_on_a_live_cluster(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    app = create_app(ConsoleClient([c.ops_url()], c.operator_token), interval=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        table = app.query_one(StoreTable)
        node = f"127.0.0.1:{c.redis.port}"
        await until(pilot, "the node as primary", lambda: (table.shown(node) or ("", "", ""))[2] == "up")
        assert table.get_cell(node, "role").plain == "★ primary" and table.row_count == 1
        await pilot.press("F")
        await until(pilot, "told why not", lambda: noticed(app, "Nothing to fail over to", node))
        assert not isinstance(app.screen, ConfirmAction)
    # the route refuses (and audits) a failover of a one-node store
    r = failover_as(c, "operator")
    assert r.status_code == 409 and "one node" in r.json()["error"]
    assert failover_as(c, "viewer").status_code == 403
    entry = next(e for e in audit(c) if e["action"] == "store_failover")
    assert entry["who"] == "test-operator" and entry["result"].startswith("refused: this store is one node")
    view = store_view(c)
    assert view["mode"] == "single" and view["primary"] == node and view["replicas"] == view["sentinels"] == []


async def quarantine(c: Cluster, key: str, session: str) -> str:
    """Damage the record at `key` and set it aside through the store's own containment code."""
    r = aioredis.Redis.from_url(c.redis.url)  # bytes, as integrity.contain wants
    try:
        await r.set(key, b"\x00garbage \xff not a record")

        async def damaged(_: object) -> object:
            raise Corrupt(key, "checksum", "damaged by the test")

        got = await integrity.contain(r, Keys(prefix=c.prefix), key, "session", damaged, reader="test",
                                      session=session)
        assert got is not None
        return got.qid
    finally:
        await r.aclose()


def discard_as(c: Cluster, role: str, qid: str) -> httpx.Response:
    return httpx.post(f"{c.ops_url()}/api/v1/store/quarantine/{qid}/discard", json={"confirm": qid},
                      headers=c.auth(role), timeout=10)


def integrity_view(c: Cluster, role: str = "viewer") -> dict[str, Any]:
    r = httpx.get(f"{c.ops_url()}/api/v1/store/integrity", headers=c.auth(role), timeout=10)
    r.raise_for_status()
    return r.json()


async def test_a_quarantined_record_is_discarded_from_the_console_on_a_live_cluster(
        running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    k = Keys(prefix=c.prefix)
    gone, kept = k.session("s-console-1"), k.session("s-console-2")
    q1 = await quarantine(c, gone, "s-console-1")
    q2 = await quarantine(c, kept, "s-console-2")
    # a viewer may list them but not act on them
    assert {q["qid"] for q in integrity_view(c)["quarantined"]} == {q1, q2}
    assert discard_as(c, "viewer", q1).status_code == 403
    app = create_app(ConsoleClient([c.ops_url()], c.operator_token), interval=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await store_tab(pilot)
        table = await quarantine_row(pilot, q1)
        assert table.get_cell(q1, "key").plain == gone and table.get_cell(q1, "outcome").plain == "set aside"
        assert table.get_cell(q2, "key").plain == kept
        said = await confirm(pilot, "X")
        assert f"Discard quarantined record {q1}?" in said and "session s-console-1" in said
        await until(pilot, "the discard result", lambda: noticed(app, "Quarantined record discarded", q1), timeout=30)
        await until(pilot, "the row gone", lambda: table.shown(q1) is None, timeout=30)
        assert table.shown(q2) is not None
    assert [q["qid"] for q in integrity_view(c)["quarantined"]] == [q2]
    mine = [(e["action"], e["target"], e["who"]) for e in audit(c) if e["action"].startswith("quarantine-")]
    assert mine == [("quarantine-discard", gone, "test-operator")]

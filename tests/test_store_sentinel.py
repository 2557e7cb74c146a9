"""Staff see the duplicated store (issue 11, item 7) on a real primary + 2 replicas + 3 Sentinels:
`store` in /api/v1/state and `ctops status`, a stopped replica shown down, a killed primary replaced
(primary changes, failover events), and a failover started from the console, confirmed and audited."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.text import Text
from textual.widgets import Label

from console.app import create_app
from console.client import ConsoleClient
from console.screens.confirm import ConfirmAction
from console.widgets.tables import StoreTable
from ctops_tools.procs import ctops_argv
from ctops_tools.redis_embed import EmbeddedStore
from tests.cluster import Cluster, events, wait_for
from tests.test_console import SIZE, until


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "store").start()
    yield s
    s.stop()


@pytest.fixture
def cluster(tmp_path: Path, store: EmbeddedStore, key_prefix: str) -> Iterator[Cluster]:
    (tmp_path / "c").mkdir()
    c = Cluster(tmp_path / "c", store, key_prefix, hosts_with_agents=True)
    try:
        c.start_all()
        wait_for("the whole store seen", lambda: topology(c) == ("redis-1", {"redis-2": "up", "redis-3": "up"},
                                                                  {f"sentinel-{i}": "up" for i in (1, 2, 3)}), 60)
        yield c
    finally:
        c.stop()


def topology(c: Cluster) -> tuple[str | None, dict[str, str], dict[str, str]]:
    s = c.state()["store"]
    return s["primary"], {r["name"]: r["state"] for r in s["replicas"]}, {x["name"]: x["state"] for x in s["sentinels"]}


def status(c: Cluster) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ctops_argv("status", "--url", c.ops_url(), "--token", c.viewer_token),
                          capture_output=True, text=True, timeout=60)


def test_replica_stopped_and_primary_killed(cluster: Cluster, store: EmbeddedStore) -> None:
    c = cluster
    st: dict[str, Any] = c.state()["store"]
    assert st["mode"] == "sentinel" and st["available"] and st["writes_unconfirmed"] == 0
    assert all(r["lag_ms"] is not None for r in st["replicas"])
    wait_for("healthy", lambda: status(c).returncode == 0, 60)
    start = events(c)[-1]["id"]

    replica = store.node("redis-3")
    assert replica.pid is not None
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        wait_for("redis-3 shown down", lambda: topology(c)[1]["redis-3"] == "down", 30)
        r = status(c)
        assert r.returncode == 1 and "store replica redis-3 down" in r.stdout.splitlines()[-1], r.stdout
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    wait_for("redis-3 back", lambda: topology(c)[1]["redis-3"] == "up", 60)

    old = store.node("redis-1")
    assert old.proc is not None
    old.proc.kill()
    primary = wait_for("a new primary", lambda: (p := topology(c)[0]) not in (None, "redis-1") and p, 60)
    assert primary in ("redis-2", "redis-3")
    wait_for("redis-1 shown as a replica that is down", lambda: topology(c)[1].get("redis-1") == "down", 60)
    after = c.state()["store"]
    assert after["last_failover_ms"] is not None and after["available"]
    kinds = wait_for("store events", lambda: (e := events(c, after=start)) and {
        "store_replica_lost", "store_replica_back", "store_failover"} <= {x["kind"] for x in e} and e, 60)
    failover = [e for e in kinds if e["kind"] == "store_failover"]
    assert len(failover) == 1 and f"redis-1 -> {primary}" in failover[0]["message"]
    assert any(e["kind"] == "store_replica_lost" and e["target"] == "redis-3" for e in kinds)
    # the store is degraded now (one node down) but has a primary: learners are served
    r = httpx.post(c.data_url() + "/api/sessions", json={"learner": "ada"}, timeout=30)
    assert r.status_code == 201, r.text
    final = status(c)
    assert final.returncode == 1 and "store replica redis-1 down" in final.stdout, final.stdout


def noticed(app: Any, title: str, *words: str) -> bool:
    return any(title in n.title and all(w in n.message for w in words) for n in app.notices)


def audit(c: Cluster) -> list[dict[str, str]]:
    r = httpx.get(f"{c.ops_url()}/api/v1/audit", headers=c.auth("viewer"), timeout=10)
    r.raise_for_status()
    return r.json()


async def test_failover_from_the_console_is_confirmed_and_audited(cluster: Cluster) -> None:
    c = cluster
    app = create_app(ConsoleClient([c.ops_url()], c.operator_token), interval=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "first state", lambda: app.applied >= 1)
        await pilot.press("6")
        await until(pilot, "store tab", lambda: app.active_tab == "store")
        table = app.query_one(StoreTable)
        await until(pilot, "redis-1 as primary", lambda: (table.shown("redis-1") or ("", ""))[1] == "primary")
        await pilot.press("F")
        await until(pilot, "confirm dialog", lambda: isinstance(app.screen, ConfirmAction))
        said = " ".join(Text.from_markup(str(label.content)).plain for label in app.screen.query(Label))
        assert "Primary now: redis-1; replicas up: redis-2, redis-3." in said
        await pilot.press("y")
        await until(pilot, "the result", lambda: noticed(app, "Store failed over", "primary redis-1 →"), timeout=60)
        await until(pilot, "the new primary shown",
                    lambda: (table.shown("redis-1") or ("", ""))[1] == "replica", timeout=60)
    entry = next(e for e in audit(c) if e["action"] == "store_failover")
    assert entry["who"] == "test-operator" and entry["result"].startswith("ok: primary redis-1 -> redis-")
    assert topology(c)[0] in ("redis-2", "redis-3")


def test_writes_no_replica_confirmed_are_counted_and_reported(cluster: Cluster, store: EmbeddedStore) -> None:
    c = cluster
    start = events(c)[-1]["id"]
    replicas = [store.node("redis-2"), store.node("redis-3")]
    for n in replicas:
        assert n.pid is not None
        os.kill(n.pid, signal.SIGSTOP)
    try:
        # at once, while the primary still counts its replicas as good: the write is taken, its WAIT
        # times out, and the dispatcher keeps the staff action and counts it
        r = httpx.post(f"{c.ops_url()}/api/v1/servers/trainer-2/disable", headers=c.auth("operator"), timeout=30)
        assert r.status_code == 200, r.text
    finally:
        for n in replicas:
            os.kill(n.pid, signal.SIGCONT)  # type: ignore[arg-type]
    counted = wait_for("the write counted", lambda: (n := c.state()["store"]["writes_unconfirmed"]) >= 1 and n, 30)
    reported = wait_for("reported as an event", lambda: [e for e in events(c, after=start)
                                                          if e["kind"] == "store_writes_unconfirmed"], 30)
    assert "not confirmed by a replica" in reported[0]["message"] and counted >= 1

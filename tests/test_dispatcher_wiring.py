"""The dispatcher is wired in one place (`dispatcher.main.build`): every part gets what it needs
from there, and no part writes itself into another (the pool holding the data plane, the exceptions
router hanging its store on the runtime). Pure: parts are built, nothing is started or connected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from ctops import config
from dispatcher.main import Parts, build, ops_app, watched_loops
from dispatcher.proxy import DataPlane, ProxySettings

CONFIG = """
cluster = "t"
[[dispatchers]]
name = "A"
data = "127.0.0.1:18080"
ops = "127.0.0.1:19080"
[[dispatchers]]
name = "B"
data = "127.0.0.1:18081"
ops = "127.0.0.1:19081"
[[servers]]
name = "trainer-1"
url = "http://127.0.0.1:18101"
host = "host-1"
[[agents]]
name = "host-1"
[[agents.processes]]
name = "trainer-1"
command = ["true"]
[[webhooks]]
name = "chat"
url = "http://127.0.0.1:18999/hook"
"""


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    (tmp_path / "ctops.toml").write_text(CONFIG)
    dep = config.load(tmp_path / "ctops.toml")
    # clients only: nothing connects until a part is used
    p = build(dep, dep.dispatcher("A"), Redis(host="127.0.0.1", port=1), Redis(host="127.0.0.1", port=1))
    yield p
    for h in p.webhooks:
        await h.aclose()
    await p.peers.aclose()
    await p.storewatch.aclose()


def test_each_part_gets_the_parts_it_works_with(parts: Parts) -> None:
    p, rt = parts, parts.runtime
    assert (rt.pool, rt.lease, rt.store, rt.events, rt.storewatch, rt.peers, rt.health) == (
        p.pool, p.lease, p.store, p.events, p.storewatch, p.peers, p.health)
    assert p.health.pool is p.pool
    assert p.integrity.lease is p.lease and p.integrity.events is p.events
    assert [h.spec.name for h in p.webhooks] == ["chat"] and p.webhooks[0].fenced == p.lease.fenced
    assert p.commands.r is p.redis_blocking  # long polls on the client with the long timeout
    assert p.store.r is p.redis and p.exceptions.r is p.redis
    # server state changes reach the runtime (events, publishing) through the pool's listeners
    assert rt.on_server_state_change in p.pool.listeners
    # a standby holds off taking the lease while the store says so
    assert p.lease.hold_off is not None and p.lease.hold_off() == p.storewatch.defer_leadership()
    # the loops that decide health and leadership are the parts' own, all watched
    loops = {name: factory for name, factory, _, _ in watched_loops(p)}
    assert loops == {"health": p.health.run, "lease": p.lease.run, "sync": rt.sync_loop, "store": p.storewatch.run}


def test_no_part_writes_itself_into_another(parts: Parts) -> None:
    pool_attrs, rt_attrs = dict(vars(parts.pool)), set(vars(parts.runtime))
    plane = DataPlane(parts.pool, ProxySettings.from_deployment(parts.dep))
    app = ops_app(parts, plane)
    assert set(vars(parts.pool)) == set(pool_attrs)
    assert plane not in vars(parts.pool).values()
    assert set(vars(parts.runtime)) == rt_attrs
    # the ops app got the parts it serves: every area's routes are there
    paths = set(app.openapi()["paths"])
    for path in ("/api/v1/whoami", "/api/v1/heartbeat", "/api/v1/state", "/api/v1/peer/heartbeat",
                 "/api/v1/servers/{name}/{action}", "/api/v1/dispatchers/{name}/{action}",
                 "/api/v1/hosts/{host}/processes/{process}/{action}", "/api/v1/agents/{host}/commands",
                 "/api/v1/events", "/api/v1/audit", "/api/v1/exceptions", "/api/v1/store/integrity",
                 "/api/v1/store"):
        assert path in paths, path

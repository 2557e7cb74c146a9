"""The dispatcher's internal loops are watched like the agent's processes: a stalled health-check
loop is restarted and reported, and health checking goes on; and a real dispatcher whose event loop
is blocked exits, so that its peer leads and its supervisor starts it again.

In-process, with the parts the composition root builds and the loops it watches: a real health
checker against a real server, events in a real Redis. No code path in the dispatcher can stall the
loop on purpose (every check is bounded), so the test hands the watch a first run that never ends,
as a bug in a check could leave it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from ctops import config
from ctops_tools.redis_embed import EmbeddedRedis
from ctops_tools.threadstop import stopped_thread
from dispatcher.loopwatch import EXIT_BLOCKED, LoopWatch
from dispatcher.main import build, watched_loops
from tests.cluster import Cluster, wait_for


async def until(what: str, cond: Callable[[], Awaitable[object]], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := await cond():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def answer_ready(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    await writer.drain()
    writer.close()


async def test_stalled_health_loop_is_restarted_and_reported(tmp_path: Path, redis_server: EmbeddedRedis,
                                                             key_prefix: str) -> None:
    server = await asyncio.start_server(answer_ready, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "ctops.toml").write_text(f"""
cluster = "t"
[redis]
url = "{redis_server.url}"
prefix = "{key_prefix}"
[timings]
health_interval_ms = 100
health_timeout_ms = 200
[[dispatchers]]
name = "A"
data = "127.0.0.1:1"
ops = "127.0.0.1:2"
[[servers]]
name = "trainer-1"
url = "http://127.0.0.1:{port}"
""")
    dep = config.load(tmp_path / "ctops.toml")
    redis = Redis.from_url(redis_server.url)
    p = build(dep, dep.dispatcher("A"), redis, redis)
    runs = 0

    def health_run():  # noqa: ANN202 - a coroutine, as the watch expects
        nonlocal runs
        runs += 1
        return asyncio.Event().wait() if runs == 1 else p.health.run()

    watch = LoopWatch(p.runtime.loop_restarted, blocked_exit_after=3600)
    name, _, progress, stall_after = next(loop for loop in watched_loops(p) if loop[0] == "health")
    watch.start(name, health_run, progress, stall_after=stall_after)
    watching = asyncio.create_task(watch.run())
    b = p.pool.get("trainer-1")
    assert b is not None
    try:
        async def restart_reported() -> list:
            return [e for e in await p.events.read(None, 100) if e.kind == "loop_restarted"]
        found = await until("loop restart reported", restart_reported)
        assert isinstance(found, list) and found[0].target == "A/health" and "stalled" in found[0].message
        # checks go on after the restart: the server is seen up, and a server that stops answering
        # is taken out of rotation
        await until("server up", lambda: asyncio.sleep(0, b.health == "up"))
        server.close()
        await server.wait_closed()
        await until("server down", lambda: asyncio.sleep(0, b.health == "down"))
        assert runs == 2 and watch.loops["health"].restarts == 1
    finally:
        watch.stop()
        watching.cancel()
        server.close()
        await p.peers.aclose()
        await p.storewatch.aclose()
        await redis.aclose()


@pytest.mark.quick_timings  # the loop-guard gives up after 2 s
def test_a_real_dispatcher_whose_event_loop_is_blocked_exits_and_its_peer_leads(
        exec_processes: None, make_cluster: Callable[..., Cluster]) -> None:
    """Two real dispatchers; the leader's event-loop thread is stopped (ptrace, one thread only, as a
    blocking call on the loop leaves it) while its other threads run on: the loop-guard thread sees the
    loop silent and exits the process (EXIT_BLOCKED), the lease lapses and the peer leads."""
    c = make_cluster(dispatchers=("A", "B"), trainers=1)
    c.start_all()
    leader = wait_for("a leader both agree on", lambda: (a := c.state("A")["leader"]) and a == c.state("B")["leader"]
                      and a, 60)
    peer = "B" if leader == "A" else "A"
    child = c.children[leader]
    with stopped_thread(child.pid):
        wait_for(f"{leader} to exit", lambda: child.proc.poll() is not None, 60)
    assert child.proc.returncode == EXIT_BLOCKED
    assert "event loop blocked" in c.log(leader) and "exiting so the supervisor restarts" in c.log(leader)
    wait_for(f"{peer} to lead", lambda: c.state(peer)["leader"] == peer, 60)
    # started again by its supervisor (here, the test), it follows
    c.start(leader)
    wait_for(f"{leader} back, following {peer}", lambda: c.state(leader)["leader"] == peer, 60)

"""The ops-API contract (ctops/opsapi.py) and the one URL-failover policy (ctops/failover.py), without a cluster.

The dispatcher's routes are read from the OpenAPI document its ops app builds (no Redis is reached:
building the app connects to nothing), so an action served but missing from the contract, or in the
contract but no longer served, fails here.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from types import SimpleNamespace
from typing import get_args

import httpx
import pytest
from redis.asyncio import Redis

from agents import commands as agent_commands
from ctops import config, opsapi, serving
from ctops.auth import Principal
from ctops.failover import MAYBE_DONE, Failover, TryNext, Unreachable
from ctops.opsclient import OpsClient
from dispatcher.llm.pool import LLMPool
from dispatcher.main import build as build_parts
from dispatcher.main import ops_app


def ops_openapi() -> dict:
    dep = config.parse({
        "dispatchers": [{"name": "A", "data": "127.0.0.1:1", "ops": "127.0.0.1:2"}],
        "llm_providers": [{"name": "primary", "base_url": "http://127.0.0.1:1/v1", "priority": 1}],
    })

    async def build() -> dict:
        redis = Redis.from_url("redis://127.0.0.1:1/0")  # never connected: building the app reads nothing
        parts = build_parts(dep, dep.dispatchers[0], redis, redis)
        llm = SimpleNamespace(pool=LLMPool(dep.llm_providers, dep.llm, None, None, lambda *_: None, "A"))
        try:
            return ops_app(parts, llm=llm).openapi()  # type: ignore[arg-type] - only .pool is read
        finally:
            await redis.aclose()

    return asyncio.run(build())


@pytest.fixture(scope="module")
def openapi() -> dict:
    return ops_openapi()


def test_every_action_the_dispatcher_serves_is_in_the_contract_and_back(openapi: dict) -> None:
    served: dict[str, tuple[str, ...]] = {}
    for path, item in openapi["paths"].items():
        params = {p["name"]: p["schema"] for p in item.get("post", {}).get("parameters", []) if p["in"] == "path"}
        if "action" in params:
            served[path.removeprefix(opsapi.API)] = tuple(params["action"]["enum"])
    assert served.keys() == opsapi.ACTION_ROUTES.keys()
    for path, actions in served.items():
        assert sorted(actions) == sorted(opsapi.ACTION_ROUTES[path]), path


def test_every_staff_action_needs_the_act_grant_that_only_operators_hold(openapi: dict) -> None:
    # the dispatcher's action routes all declare 403: a role without `act` is refused
    for path in opsapi.ACTION_ROUTES:
        assert "403" in openapi["paths"][opsapi.API + path]["post"]["responses"], path
    may_act = {role for role in get_args(opsapi.Role) if Principal("t", role).may(opsapi.ACTION_GRANT)}
    assert may_act == {"operator"}
    # an operator may read everything a viewer may
    assert opsapi.ROLE_GRANTS["viewer"] <= opsapi.ROLE_GRANTS["operator"]


def test_every_server_action_names_the_admin_state_it_sets() -> None:
    assert set(opsapi.ADMIN_FOR) == set(get_args(opsapi.ServerAction))
    assert set(opsapi.ADMIN_FOR.values()) == set(get_args(opsapi.AdminState))


def test_the_timeouts_chain_holds_each_outer_wait_exceeds_the_inner_one(openapi: dict) -> None:
    c = opsapi
    # staff action on a process: watchdog < ops API's wait for the agent < console's wait for the ops API
    assert c.WATCHDOG_COMMAND_S < c.COMMAND_WAIT_S < c.PROCESS_ACTION_S
    # a restart's graceful stop fits in the watchdog's time, with room for the start
    assert config.ProcessSpec.model_fields["stop_grace_ms"].default / 1000 < c.WATCHDOG_COMMAND_S
    # agent's long poll <= the ops API's cap < the agent's HTTP timeout on it... and the dispatcher's
    # blocking Redis socket outlasts the longest BLPOP the ops API may start
    assert c.COMMAND_POLL_S <= c.COMMAND_POLL_MAX_S
    assert c.COMMAND_POLL_S < c.AGENT_POLL_HTTP_S
    assert max(c.COMMAND_POLL_MAX_S, c.COMMAND_WAIT_S) < c.REDIS_BLOCKING_S
    # store failover and leadership: the console outwaits the dispatcher (default lease TTL)
    assert c.STORE_FAILOVER_WAIT_S < c.STORE_FAILOVER_S
    assert c.LEASE_TTLS_TO_MOVE * config.Timings().lease_ttl_ms / 1000 < c.LEADERSHIP_S
    # and the services use the chain: the ops API's cap and default, the agent's poll
    wait = next(p for p in openapi["paths"][opsapi.API + "/agents/{host}/commands"]["get"]["parameters"]
                if p["name"] == "wait_ms")["schema"]
    assert wait["maximum"] == c.COMMAND_POLL_MAX_S * 1000 and wait["default"] == c.COMMAND_POLL_S * 1000
    assert agent_commands.WAIT_MS == c.COMMAND_POLL_S * 1000


def test_the_error_shape_is_error_and_detail() -> None:
    assert opsapi.ErrorBody(**opsapi.error_body("no such server", {"known": ["a"]})).model_dump() == {
        "error": "no such server", "detail": {"known": ["a"]}}


# --- the one multi-URL retry policy -----------------------------------------------------------
URLS = ["http://127.0.0.1:1", "http://127.0.0.1:2/", "http://127.0.0.1:3"]


def test_failover_starts_where_it_was_last_answered_and_sticks_there() -> None:
    f = Failover(URLS)
    asked: list[str] = []

    def send(url: str) -> str:
        asked.append(url)
        if url.endswith(":1"):
            raise TryNext("connection refused", reached=False)
        return url

    assert f.call_sync(send, safe=False) == "http://127.0.0.1:2"  # trailing slash gone
    assert f.current_url == "http://127.0.0.1:2"
    assert f.call_sync(send, safe=False) == "http://127.0.0.1:2"
    assert asked == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:2"]


def test_an_unsafe_request_that_may_have_arrived_is_not_sent_elsewhere() -> None:
    f = Failover(URLS)
    asked: list[str] = []

    def send(url: str) -> str:
        asked.append(url)
        raise TryNext("timed out", reached=True)

    with pytest.raises(Unreachable) as err:
        f.call_sync(send, safe=False)
    assert asked == [URLS[0]] and err.value.tried[-1][1].endswith(MAYBE_DONE)
    asked.clear()
    with pytest.raises(Unreachable) as err:
        f.call_sync(send, safe=True)  # a GET goes everywhere
    assert len(asked) == 3 and len(err.value.tried) == 3 and err.value.last is not None


def test_failover_follows_the_leader_it_knows_and_ignores_others() -> None:
    f = Failover(URLS)
    assert f.follow("http://127.0.0.1:3/") and f.current_url == "http://127.0.0.1:3"
    assert not f.follow("http://127.0.0.1:9") and not f.follow(None)
    assert f.current_url == "http://127.0.0.1:3"


def test_attempts_past_the_url_count_wrap_around_async() -> None:
    f = Failover(URLS[:2], start=1)
    asked: list[str] = []

    async def send(url: str) -> str:
        asked.append(url)
        if len(asked) < 3:
            raise TryNext("connect", reached=False)
        return url

    assert asyncio.run(f.call(send, safe=False, attempts=3)) == "http://127.0.0.1:2"
    assert asked == ["http://127.0.0.1:2", "http://127.0.0.1:1", "http://127.0.0.1:2"]


def test_no_urls_is_unreachable_not_a_crash() -> None:
    with pytest.raises(Unreachable, match="no URL configured"):
        Failover([]).call_sync(lambda url: url, safe=True, attempts=2)


# --- the one client over real sockets: what moves on and what does not ------------------------
def test_client_moves_a_read_on_but_never_sends_an_action_that_may_have_arrived_elsewhere() -> None:
    async def run() -> None:
        seen: list[str] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            seen.append(head.split(" ", 2)[0] + " " + head.split(" ", 2)[1])
            body = b'{"name": "ops", "role": "operator"}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        live = await asyncio.start_server(answer, "127.0.0.1", 0)
        # accepts connections (the kernel's backlog) but never answers: a frozen dispatcher
        frozen = socket.socket()
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)
        urls = [f"http://127.0.0.1:{frozen.getsockname()[1]}", f"http://127.0.0.1:{live.sockets[0].getsockname()[1]}"]
        client = OpsClient(urls, "t", timeout=0.5)
        try:
            with pytest.raises(Unreachable) as err:
                await client.act("trainer-1", "drain")
            assert err.value.tried[-1][1].endswith(MAYBE_DONE)
            assert seen == []  # the drain went nowhere else
            who = await client.whoami()  # a read moves on to the dispatcher that answers, and stays there
            assert who.role == "operator" and client.current_url == urls[1]
            assert seen == ["GET /api/v1/whoami"]
        finally:
            await client.aclose()
            frozen.close()
            live.close()
            await live.wait_closed()

    asyncio.run(run())


# --- the one way to serve an ASGI app ------------------------------------------------------------
def test_a_server_in_our_loop_answers_and_leaves_the_process_signals_to_its_owner() -> None:
    async def hello(scope: dict, receive: object, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> None:
        mine = signal.getsignal(signal.SIGTERM)
        served = await serving.start(serving.config(hello, "127.0.0.1", 0))
        try:
            # the dispatcher stops all its servers and loops together on its own SIGTERM handler
            assert signal.getsignal(signal.SIGTERM) is mine
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://127.0.0.1:{served.port}/")
            assert r.status_code == 200 and r.text == "ok"
        finally:
            await served.stop()
        assert served.task.done()

    asyncio.run(run())

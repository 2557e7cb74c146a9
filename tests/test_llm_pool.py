"""The dispatcher's LLM pool against real fake-LLM processes over real HTTP: failover, breakers,
streaming through the real `openai` client, staff pin/disable shared through Redis, bad requests.

Outcomes are asserted (who answered, how many calls each provider saw), never durations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from ctops import config
from ctops.auth import hash_token, new_token
from ctops.keys import Keys
from ctops_tools.procs import Child, ctops_argv, spawn, stop_all
from ctops_tools.redis_embed import EmbeddedRedis, free_port
from dispatcher.llm import LLMPoolHandle, start_llm_pool
from dispatcher.llm.breaker import Breaker
from tests.cluster import wait_for
from trainer.fake_llm import CONTROL_TOKEN_ENV, control_headers, control_token

TIMEOUT_MS = 3000  # each fake's per-try timeout
TOKENS = {"operator": new_token(), "viewer": new_token()}


# --- fakes and pools -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("llm-fakes")
    ports = {n: free_port() for n in ("primary", "secondary")}
    children: list[Child] = [spawn(n, ctops_argv("fake-llm", "--port", str(p), "--name", n), str(logs / f"{n}.log"),
                                   {CONTROL_TOKEN_ENV: control_token()})
                             for n, p in ports.items()]
    urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    try:
        for u in urls.values():
            wait_for(f"{u} to answer", lambda u=u: httpx.get(u + "/_fake/mode", timeout=2).status_code == 200)
        yield urls
    finally:
        stop_all(children)


@pytest.fixture(autouse=True)
def _fakes_ok(request: pytest.FixtureRequest) -> None:
    if "fakes" in request.fixturenames:
        for u in request.getfixturevalue("fakes").values():
            set_mode(u, "ok")


def set_mode(url: str, mode: str) -> None:
    httpx.post(url + "/_fake/mode", json={"mode": mode}, headers=control_headers(), timeout=5).raise_for_status()


def calls(url: str) -> int:
    return httpx.get(url + "/_fake/stats", timeout=5).json()["requests"].get("total", 0)


def deployment(fakes: dict[str, str], timeout_ms: int = TIMEOUT_MS, **llm: Any) -> config.Deployment:
    return config.parse({
        "dispatchers": [{"name": "A", "data": "127.0.0.1:1", "ops": "127.0.0.1:2"}],
        "llm_providers": [{"name": n, "base_url": f"{u}/v1", "priority": i, "timeout_ms": timeout_ms}
                          for i, (n, u) in enumerate(fakes.items(), start=1)],
        "llm": {"cooldown_ms": 1000, "health_interval_ms": 500, **llm},
        "tokens": [{"name": f"test-{r}", "role": r, "sha256": hash_token(t)} for r, t in TOKENS.items()],
    })


class Pools:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self.events: list[tuple[str, str | None]] = []
        self.handles: list[LLMPoolHandle] = []

    async def start(self, dep: config.Deployment, name: str = "A") -> LLMPoolHandle:
        h = await start_llm_pool(dep, self.redis, self.keys, lambda k, _s, _m, t: self.events.append((k, t)),
                                 lambda: True, name=name)
        self.handles.append(h)
        return h


@pytest.fixture
async def pools(redis_server: EmbeddedRedis, key_prefix: str) -> AsyncIterator[Pools]:
    redis = Redis.from_url(redis_server.url)
    p = Pools(redis, Keys(key_prefix))
    yield p
    for h in p.handles:
        await h.stop()
    await redis.aclose()


async def chat(client: httpx.AsyncClient, h: LLMPoolHandle, **over: Any) -> httpx.Response:
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "Exercise: fizzbuzz"}], **over}
    return await client.post(f"{h.url}/llm/v1/chat/completions", json=body, timeout=30)


def provider(h: LLMPoolHandle, name: str) -> dict[str, Any]:
    return next(p for p in h.pool.view().model_dump()["providers"] if p["name"] == name)


# --- breaker unit ----------------------------------------------------------------------------------
def test_breaker_opens_on_consecutive_failures_or_rate_and_closes_after_probe() -> None:
    changes: list[tuple[str, str]] = []
    b = Breaker(threshold=3, rate=0.5, window=4, cooldown_ms=1000, on_change=lambda o, n, _r: changes.append((o, n)))
    b.failure(0, "x")
    b.failure(0, "x")
    assert b.allows()
    b.failure(0, "x")
    assert not b.allows() and b.state == "open"
    assert not b.probe_due(0.5) and b.probe_due(1.0)
    b.start_probe(1.0)
    b.failure(1.0, "still broken")  # cooldown doubles
    assert b.state == "open" and not b.probe_due(2.5) and b.probe_due(3.0)
    b.start_probe(3.0)
    b.success(3.0)
    assert b.allows()
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open"),
                       ("half_open", "closed")]
    rate = Breaker(threshold=10, rate=0.5, window=4)
    for ok in (True, False, True, False):
        rate.success(0) if ok else rate.failure(0, "x")
    assert rate.state == "open"


# --- bad requests ------------------------------------------------------------------------------------
async def test_bad_requests_get_openai_errors_and_call_no_provider(fakes: dict[str, str], pools: Pools) -> None:
    h = await pools.start(deployment(fakes))
    before = {n: calls(u) for n, u in fakes.items()}
    url = f"{h.url}/llm/v1/chat/completions"
    async with httpx.AsyncClient(timeout=10) as c:
        cases = [
            (await c.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, None),
            (await c.post(url, json=["a list"]), 400, None),
            (await c.post(url, json={"model": "gpt-4"}), 400, "missing_messages"),
            (await c.post(url, json={"model": "gpt-4", "messages": []}), 400, "invalid_type"),
            (await c.post(url, json={"messages": [{"role": "user", "content": "x"}]}), 400, "missing_model"),
            (await c.post(url, json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404,
             "model_not_found"),
            (await c.get(f"{h.url}/llm/v1/nothing"), 404, "unknown_url"),
        ]
        models = (await c.get(f"{h.url}/llm/v1/models")).json()
    for resp, status, code in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["message"] and err["type"], err
        if code:
            assert err["code"] == code, err
    assert [m["id"] for m in models["data"]] == ["gpt-4"]
    assert {n: calls(u) for n, u in fakes.items()} == before, "no provider may be called for a bad request"


# --- failover and breakers ------------------------------------------------------------------------------
async def test_primary_500s_then_hangs_requests_keep_succeeding_without_waiting(
        fakes: dict[str, str], pools: Pools) -> None:
    h = await pools.start(deployment(fakes))
    async with httpx.AsyncClient() as c:
        first = await chat(c, h)
        assert first.status_code == 200 and first.headers["x-ctops-llm-provider"] == "primary"
        base = calls(fakes["primary"])

        set_mode(fakes["primary"], "500")
        served = []
        for _ in range(6):
            r = await chat(c, h)
            assert r.status_code == 200, r.text
            assert "[secondary]" in r.json()["choices"][0]["message"]["content"]
            served.append(r.headers["x-ctops-llm-provider"])
        assert served == ["secondary"] * 6
        assert provider(h, "primary")["breaker"] != "closed"
        assert ("llm_provider_down", "primary") in pools.events
        # the breaker opened after 3 failures; later the primary only sees background probes
        assert calls(fakes["primary"]) - base <= 3 + h.pool.by_name["primary"].probes

        set_mode(fakes["primary"], "hang")
        base = calls(fakes["primary"])
        for _ in range(8):
            r = await chat(c, h)
            assert r.status_code == 200 and r.headers["x-ctops-llm-provider"] == "secondary"
            await asyncio.sleep(0.2)  # spread over more than one cooldown, so probes happen meanwhile
        # no request was sent to the hung primary (so none waited on it): it saw background probes only
        assert calls(fakes["primary"]) - base <= h.pool.by_name["primary"].probes
        assert provider(h, "primary")["breaker"] != "closed"

        set_mode(fakes["primary"], "ok")
        await async_wait("primary's breaker to close after a probe",
                         lambda: provider(h, "primary")["breaker"] == "closed")
        r = await chat(c, h)
        assert r.headers["x-ctops-llm-provider"] == "primary"
        assert ("llm_provider_up", "primary") in pools.events


async def test_healthy_primary_that_hangs_is_hedged_and_breaker_opens_after_three(
        fakes: dict[str, str], pools: Pools) -> None:
    # tries may take 10 minutes: a request the pool did not hedge would outlast the client's 30 s
    # timeout below and fail, so an answer shows the hedge (no duration is measured)
    h = await pools.start(deployment(fakes, timeout_ms=600_000, total_timeout_ms=600_000))
    async with httpx.AsyncClient() as c:
        for _ in range(8):  # the pool learns the primary's usual latency
            assert (await chat(c, h)).headers["x-ctops-llm-provider"] == "primary"
        set_mode(fakes["primary"], "hang")
        base = calls(fakes["primary"])
        results = []
        for _ in range(10):
            r = await chat(c, h)
            results.append((r.status_code, r.headers.get("x-ctops-llm-provider")))
        assert all(s == 200 and p == "secondary" for s, p in results), results
        await async_wait("primary's breaker to open", lambda: provider(h, "primary")["breaker"] != "closed")
        # at most 3 stalled tries opened the breaker; anything more is a background probe
        assert calls(fakes["primary"]) - base <= 3 + h.pool.by_name["primary"].probes


async def test_429_retry_after_is_honoured(fakes: dict[str, str], pools: Pools) -> None:
    h = await pools.start(deployment(fakes))
    set_mode(fakes["primary"], "429")  # the fake sends Retry-After: 1
    async with httpx.AsyncClient() as c:
        r = await chat(c, h)
        assert r.status_code == 200 and r.headers["x-ctops-llm-provider"] == "secondary"
        view = provider(h, "primary")
        assert view["rate_limited"] == 1
        assert view["breaker"] == "closed", "a 429 is not a breakdown"
        set_mode(fakes["secondary"], "429")
        r = await chat(c, h)  # both rate limited: the client is told when to come back
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


# --- streaming with the real openai client --------------------------------------------------------------
async def test_streaming_through_the_pool_with_the_openai_client(fakes: dict[str, str], pools: Pools) -> None:
    h = await pools.start(deployment(fakes))
    client = openai.OpenAI(base_url=f"{h.url}/llm/v1", api_key="anything", max_retries=0, timeout=30)

    def stream() -> list[str]:
        out = client.chat.completions.create(model="gpt-4", stream=True,
                                             messages=[{"role": "user", "content": "Exercise: fizzbuzz"}])
        return [ch.choices[0].delta.content or "" for ch in out if ch.choices]

    def plain() -> str:
        r = client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        return r.choices[0].message.content or ""

    chunks = await asyncio.to_thread(stream)
    assert len(chunks) > 3, chunks
    assert "".join(chunks).startswith("[primary] Review of fizzbuzz")
    assert (await asyncio.to_thread(plain)).startswith("[primary]")
    assert [m.id for m in await asyncio.to_thread(lambda: list(client.models.list()))] == ["gpt-4"]

    set_mode(fakes["primary"], "500")  # a failure before the first byte moves the stream to the secondary
    assert "".join(await asyncio.to_thread(stream)).startswith("[secondary]")

    def bad_model() -> openai.NotFoundError:
        with pytest.raises(openai.NotFoundError) as exc:
            client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
        return exc.value

    assert "gpt-9" in str(await asyncio.to_thread(bad_model))
    client.close()


# --- staff control, through real dispatchers ----------------------------------------------------------------
def test_pin_and_disable_change_routing_at_once_on_every_dispatcher(make_cluster: Callable[..., Any]) -> None:
    """Two real dispatchers over one Redis: a pin or disable made on one takes effect there at once
    and on the other soon after; each is audited by the dispatcher's real audit log."""
    c = make_cluster(dispatchers=("A", "B"), trainers=1)
    c.start_all()
    fake = {p: f"http://127.0.0.1:{c.ports[p]}" for p in ("primary", "secondary")}
    lead = wait_for("a leader", lambda: c.state("A")["leader"])
    other = "B" if lead == "A" else "A"
    ops = f"{c.ops_url(lead)}/api/v1/llm/providers"
    op, viewer = c.auth("operator"), c.auth("viewer")

    def served_by(d: str) -> str:
        r = httpx.post(f"{c.data_url(d)}/llm/v1/chat/completions", timeout=30,
                       json={"model": "gpt-4", "messages": [{"role": "user", "content": "Exercise: fizzbuzz"}]})
        assert r.status_code == 200, r.text
        return r.headers["x-ctops-llm-provider"]

    assert served_by(lead) == "primary"
    assert httpx.post(f"{ops}/secondary/pin", headers=viewer).status_code == 403
    assert httpx.post(f"{ops}/secondary/pin").status_code == 401
    assert httpx.post(f"{ops}/nobody/pin", headers=op).status_code == 404

    r = httpx.post(f"{ops}/secondary/pin", headers=op, timeout=10)
    assert r.status_code == 200 and r.json()["pinned"] == "secondary", r.text
    assert served_by(lead) == "secondary", "a pin takes effect at once where it was made"
    wait_for(f"{other} to follow the pin", lambda: served_by(other) == "secondary")

    assert httpx.post(f"{ops}/secondary/unpin", headers=op, timeout=10).status_code == 200
    assert served_by(lead) == "primary"

    r = httpx.post(f"{ops}/primary/disable", headers=op, timeout=10)
    assert r.status_code == 200 and r.json()["provider_state"]["state"] == "disabled", r.text
    assert [served_by(lead) for _ in range(3)] == ["secondary"] * 3, "a disable takes effect at once where made"
    # until the other dispatcher has followed, its requests may still reach the primary: count after
    wait_for(f"{other} to follow the disable", lambda: served_by(other) == "secondary")
    before = calls(fake["primary"])
    assert [served_by(d) for d in (lead, other) for _ in range(3)] == ["secondary"] * 6
    assert calls(fake["primary"]) == before, "a disabled provider gets no requests"
    assert httpx.post(f"{ops}/primary/pin", headers=op, timeout=10).status_code == 409

    listing = httpx.get(f"{c.ops_url(other)}/api/v1/llm/providers", headers=viewer, timeout=10).json()
    assert {p["name"]: p["state"] for p in listing["providers"]} == {"primary": "disabled", "secondary": "up"}

    assert httpx.post(f"{ops}/primary/enable", headers=op, timeout=10).status_code == 200
    assert served_by(lead) == "primary"
    wait_for(f"{other} to follow the enable", lambda: served_by(other) == "primary")
    audit = httpx.get(f"{c.ops_url(other)}/api/v1/audit", headers=viewer, timeout=10).json()
    actions = [(e["who"], e["action"], e["target"], e["result"].split(":")[0]) for e in audit]
    assert ("test-operator", "llm_pin", "llm:secondary", "ok") in actions
    assert ("test-operator", "llm_disable", "llm:primary", "ok") in actions
    assert ("test-operator", "llm_enable", "llm:primary", "ok") in actions
    assert ("test-operator", "llm_pin", "llm:nobody", "unknown provider") in actions


async def async_wait(what: str, cond: Callable[[], bool], timeout: float = 30.0,
                     probe: Callable[[], Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe is not None:
                await probe()
            if cond():
                return
        except (httpx.HTTPError, OSError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- through a real dispatcher ---------------------------------------------------------------------------------
def test_through_a_real_dispatcher_data_port_and_ops_api(make_cluster: Callable[..., Any]) -> None:
    c = make_cluster(trainers=1)
    c.start_all()
    client = openai.OpenAI(base_url=f"{c.data_url()}/llm/v1", api_key="anything", max_retries=0, timeout=30)
    try:
        chunks = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="gpt-4", stream=True, messages=[{"role": "user", "content": "Exercise: fizzbuzz"}]) if ch.choices]
        assert len(chunks) > 3 and "".join(chunks).startswith("[primary]")
        ops = f"{c.ops_url()}/api/v1/llm/providers"
        listing = httpx.get(ops, headers=c.auth("viewer"), timeout=10).json()
        assert [p["name"] for p in listing["providers"]] == ["primary", "secondary"]
        r = httpx.post(f"{ops}/secondary/pin", headers=c.auth("operator"), timeout=10)
        assert r.status_code == 200, r.text
        plain = client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
        assert (plain.choices[0].message.content or "").startswith("[secondary]")
        audit = httpx.get(f"{c.ops_url()}/api/v1/audit", headers=c.auth("viewer"), timeout=10).json()
        assert any(e["action"] == "llm_pin" and e["target"] == "llm:secondary" for e in audit)
        bad = httpx.post(f"{c.data_url()}/llm/v1/chat/completions", content=b"nope", timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    finally:
        client.close()

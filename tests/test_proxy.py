"""The data plane against real backends (tests/backends.py, a separate process) over real sockets.

Each test runs the proxy in its own uvloop event loop in this process, so it can look at the
server pool and at the proxy's transports. Nothing is timed: waits poll for a state, with
generous limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import uvloop

import dispatcher.proxy
from ctops.config import ServerSpec
from ctops_tools.redis_embed import free_port  # a port nobody listens on
from dispatcher.planebuild import RECORD, data_plane_build
from dispatcher.pool import ServerPool
from dispatcher.proxy import ClientConnection, DataPlane, ProxySettings

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("proxy_test_backends", HERE / "backends.py")
backends_mod = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(backends_mod)  # type: ignore[union-attr]
pattern = backends_mod.pattern

# Every test runs against the data plane as installed (compiled by setup.py where it could be) and
# against its source as plain Python, the fallback where it could not.
_source_spec = importlib.util.spec_from_file_location("dispatcher_proxy_source",
                                                      HERE.parent / "dispatcher" / "proxy.py")
proxy_source = importlib.util.module_from_spec(_source_spec)  # type: ignore[arg-type]
sys.modules[proxy_source.__name__] = proxy_source  # dataclasses look their module up while it runs
_source_spec.loader.exec_module(proxy_source)  # type: ignore[union-attr]
BUILDS = {"installed": dispatcher.proxy, "source": proxy_source}
PLANE = dispatcher.proxy  # the build the running test uses


INSTALLED = data_plane_build()

# the tests that never touch the data plane (the pool alone, or which build is which) run once
NO_DATA_PLANE = {"test_both_builds_are_tested", "test_least_outstanding_weights_and_slow_start",
                 "test_a_stale_compiled_build_is_found"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ not in NO_DATA_PLANE:
        metafunc.parametrize("build", list(BUILDS), indirect=True)


@pytest.fixture(autouse=True)
def build(request: pytest.FixtureRequest) -> Iterator[str | None]:
    global PLANE
    param = getattr(request, "param", None)  # None: a test in NO_DATA_PLANE
    if param == "installed" and INSTALLED["kind"] != "compiled":
        pytest.skip("the installed data plane is plain Python here (no compiled build): the 'source' run covers it")
    PLANE = BUILDS[param or "installed"]
    yield param
    PLANE = dispatcher.proxy


SETTINGS = ProxySettings(client_header_timeout=10, client_idle_timeout=10, upstream_connect_timeout=3,
                         upstream_read_timeout=10, header_max_bytes=16 * 1024, high_water=64 * 1024, pool_size=8)
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@dataclass
class Backends:
    http: dict[str, int]
    ws: int


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    proc = subprocess.Popen([sys.executable, str(HERE / "backends.py"), "--names", "a,b,c"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        yield Backends(info["http"], info["ws"])
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    async def guarded() -> Any:
        return await asyncio.wait_for(scenario(), 30)

    return uvloop.run(guarded())


def make_pool(ports: dict[str, int], health: str = "up") -> ServerPool:
    specs = [ServerSpec(name=n, url=f"http://127.0.0.1:{p}") for n, p in ports.items()]
    return ServerPool(specs, initial_health=health)


@asynccontextmanager
async def proxy(pool: ServerPool, **settings: Any) -> AsyncIterator[DataPlane]:
    plane = PLANE.DataPlane(pool, replace(SETTINGS, **settings))
    await plane.start("127.0.0.1", 0)
    try:
        yield plane
    finally:
        await plane.close()


async def eventually(check: Callable[[], Any], what: str, limit: float = 10.0) -> Any:
    """Poll until check() is truthy (a state, not a time, is what the test asserts)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        value = check()
        if value:
            return value
        assert loop.time() < end, f"never happened: {what}"
        await asyncio.sleep(0.02)


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    raw_headers: list[tuple[str, str]]
    body: bytes


class Client:
    """A raw HTTP/1.1 client, so tests control exactly what goes on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, **kw: Any) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MB, **kw)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, path: str, body: bytes | None = None, headers: tuple = (),
                      chunked: bool = False, version: str = "1.1") -> Response:
        head = [f"{method} {path} HTTP/{version}", "Host: test"] + [f"{k}: {v}" for k, v in headers]
        if chunked:
            head.append("Transfer-Encoding: chunked")
        elif body is not None:
            head.append(f"Content-Length: {len(body)}")
        await self.send(("\r\n".join(head) + "\r\n\r\n").encode())
        if body is not None:
            if chunked:
                for i in range(0, len(body), 100_000):
                    part = body[i:i + 100_000]
                    await self.send(b"%x\r\n%b\r\n" % (len(part), part))
                await self.send(b"0\r\n\r\n")
            else:
                await self.send(body)
        return await self.response(method)

    async def response(self, method: str = "GET") -> Response:
        while True:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            if not (100 <= status < 200):
                break
        pairs = [(k.strip(), v.strip()) for k, v in (x.split(":", 1) for x in lines[1:] if x)]
        headers = {k.lower(): v for k, v in pairs}
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", ""):
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:
            body = await self.reader.read()
        return Response(status, headers, pairs, body)

    async def closed_by_peer(self) -> bool:
        """True once the proxy has closed the connection (EOF), after any bytes still in flight."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


def affinity_cookie(r: Response) -> str:
    """The value of the ctops_srv cookie a response sets."""
    value = r.headers["set-cookie"].split(";")[0]
    assert value.startswith("ctops_srv="), value
    return value.removeprefix("ctops_srv=")


async def seen(backends: Backends, tag: str) -> list[dict]:
    """The request heads any backend received whose target contains `tag` (asked of a backend directly)."""
    c = await Client.open(backends.http["a"])
    try:
        return json.loads((await c.request("GET", f"/seen?tag={tag}")).body)
    finally:
        c.close()


async def refused(port: int, raw: bytes) -> Response:
    """Send `raw` on a new connection; the proxy's answer, after which it must have closed."""
    c = await Client.open(port)
    await c.send(raw)
    r = await c.response()
    assert await c.closed_by_peer()
    return r


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# requests and bodies


def test_both_builds_are_tested() -> None:
    """Where Cython and a C compiler are at hand, setup.py compiled the data plane from the sources as
    they are now, and that build is the one installed; the other build under test is the source, run
    as plain Python. Without a compiler this says so as a skip, with its reason."""
    import shutil

    assert Path(proxy_source.__file__).suffix == ".py" and hasattr(proxy_source.Request(None), "__dict__")
    if INSTALLED["kind"] != "compiled":
        assert importlib.util.find_spec("Cython") is None or not shutil.which("cc"), (
            "Cython and a C compiler are here, yet the data plane runs as plain Python: run make")
        pytest.skip("no Cython or C compiler: the data plane runs as plain Python; only the source build is tested")
    assert Path(dispatcher.proxy.__file__).suffix == ".so", dispatcher.proxy.__file__
    assert not INSTALLED["stale"], (f"{INSTALLED['module']} was compiled from other sources than "
                                    "dispatcher/proxy.py and .pxd now: run make")
    assert not hasattr(dispatcher.proxy.Request(None), "__dict__")  # requests are C structs


def test_a_stale_compiled_build_is_found(tmp_path: Path) -> None:
    """The record setup.py writes next to the compiled module names the sources it came from: an edit
    since, or no record at all, makes the build stale."""
    here = HERE.parent / "dispatcher"
    module = tmp_path / "proxy.cpython-311-x86_64-linux-gnu.so"
    module.write_bytes(b"not really a module; only its name and neighbours matter here")
    for name in ("proxy.py", "proxy.pxd"):
        (tmp_path / name).write_bytes((here / name).read_bytes())
    assert data_plane_build(str(module))["stale"], "a compiled module without a record is stale"
    current = data_plane_build(str(module))["source_sha256"]
    (tmp_path / RECORD).write_text(json.dumps({"source_sha256": current}))
    assert data_plane_build(str(module)) | {"module": ""} == {
        "kind": "compiled", "module": "", "source_sha256": current, "built_from": current, "stale": False}
    with (tmp_path / "proxy.py").open("a") as f:
        f.write("# an edit after the build\n")
    assert data_plane_build(str(module))["stale"]
    assert not data_plane_build(str(tmp_path / "proxy.py"))["stale"], "plain Python is never stale"


def test_get_and_post_with_length_and_chunks(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            c = await Client.open(plane.port)
            r = await c.request("GET", "/hello")
            assert (r.status, r.body, r.headers["x-backend"]) == (200, b"hello from a", "a")

            r = await c.request("POST", "/echo", b"payload with a length")
            assert r.body == b"payload with a length" and r.headers["x-body-len"] == "21"

            # chunked both ways: the request is re-chunked upstream, the response re-chunked to us
            r = await c.request("POST", "/echo?mode=chunked", b"x" * 250_000, chunked=True)
            assert r.headers["transfer-encoding"] == "chunked"
            assert r.body == b"x" * 250_000 and r.headers["x-body-len"] == "250000"

            # a body that ends when the server closes reaches an HTTP/1.1 client chunked, and the
            # client's connection stays usable
            r = await c.request("POST", "/echo?mode=close", b"until close")
            assert r.headers["transfer-encoding"] == "chunked" and r.body == b"until close"

            r = await c.request("HEAD", "/hello")
            assert r.status == 200 and r.headers["content-length"] == "12"
            r = await c.request("GET", "/hello")  # the HEAD response left no stray body behind
            assert r.body == b"hello from a"
            c.close()
            assert plane.pool.get("a").outstanding == 0  # type: ignore[union-attr]

    run(scenario)


def test_ten_megabytes_each_way(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            c = await Client.open(plane.port)
            up = pattern(10 * MB)
            r = await c.request("POST", "/echo?mode=cl", up)
            assert r.headers["x-body-sha256"] == sha(up) and sha(r.body) == sha(up)

            r = await c.request("POST", "/echo?mode=chunked", up, chunked=True)
            assert r.headers["x-body-sha256"] == sha(up) and sha(r.body) == sha(up)

            r = await c.request("GET", f"/big?n={10 * MB}&mode=chunked")
            assert len(r.body) == 10 * MB and sha(r.body) == sha(up)
            c.close()

    run(scenario)


def test_keep_alive_reuses_client_and_upstream_connections(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            c = await Client.open(plane.port)
            seen = [await c.request("GET", "/hello") for _ in range(5)]
            assert len({r.headers["x-conn-id"] for r in seen}) == 1  # one upstream connection...
            assert [r.headers["x-conn-requests"] for r in seen] == ["1", "2", "3", "4", "5"]  # ...reused
            c.close()

            # another client gets the pooled upstream connection
            c2 = await Client.open(plane.port)
            r = await c2.request("GET", "/hello")
            assert r.headers["x-conn-id"] == seen[0].headers["x-conn-id"]
            assert r.headers["x-conn-requests"] == "6"
            c2.close()

            # HTTP/1.0 keeps the connection only when asked to
            c3 = await Client.open(plane.port)
            for _ in range(2):
                r = await c3.request("GET", "/hello", version="1.0", headers=(("Connection", "keep-alive"),))
                assert r.status == 200 and r.headers["connection"].lower() == "keep-alive"
            r = await c3.request("GET", "/hello", version="1.0")
            assert r.status == 200 and r.headers["connection"].lower() == "close"
            assert await c3.closed_by_peer()

    run(scenario)


def test_pipelined_requests_are_answered_in_order(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"], "b": backends.http["b"]})) as plane:
            c = await Client.open(plane.port)
            await c.send(b"GET /slow?ms=300 HTTP/1.1\r\nHost: t\r\n\r\n"
                         b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nsecond"
                         b"POST /echo?mode=chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nthird\r\n0\r\n\r\n"
                         b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            first = await c.response()
            second = await c.response()
            third = await c.response()
            fourth = await c.response()
            assert first.status == 200 and first.body.startswith(b"hello from")
            assert second.body == b"second" and third.body == b"third"
            assert fourth.body.startswith(b"hello from")
            r = await c.request("GET", "/hello")  # still in step afterwards
            assert r.status == 200
            c.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------
# faults on either side


async def backend_stats(port: int) -> dict:
    c = await Client.open(port)
    r = await c.request("GET", "/stats")
    c.close()
    return json.loads(r.body)


def test_client_disconnecting_mid_request_releases_the_upstream(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool({"a": backends.http["a"]})
        async with proxy(pool) as plane:
            before = (await backend_stats(backends.http["a"]))["truncated_bodies"]
            c = await Client.open(plane.port)
            await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"y" * 100_000)
            await eventually(lambda: pool.get("a").outstanding == 1, "request forwarded")  # type: ignore[union-attr]
            c.writer.transport.abort()

            # the proxy closed its upstream connection: the server saw the body cut short
            async def truncated() -> bool:
                return (await backend_stats(backends.http["a"]))["truncated_bodies"] > before

            for _ in range(250):
                if await truncated():
                    break
                await asyncio.sleep(0.02)
            assert await truncated()
            await eventually(lambda: pool.get("a").outstanding == 0, "outstanding released")  # type: ignore[union-attr]
            await eventually(lambda: not plane.conns, "client connection forgotten")

            c2 = await Client.open(plane.port)  # and others are still served
            assert (await c2.request("GET", "/hello")).status == 200
            c2.close()

    run(scenario)


def test_malformed_requests_get_400_and_close(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            bad = [
                b"NOT A REQUEST\r\n\r\n",
                b"GET /hello HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                # a bad chunk after a good head, which was already on its way upstream
                b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ]
            for raw in bad:
                c = await Client.open(plane.port)
                await c.send(raw)
                r = await c.response()
                assert r.status == 400, raw
                assert json.loads(r.body) == {"error": "malformed request"}
                assert await c.closed_by_peer()

            c = await Client.open(plane.port)
            await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: " + b"z" * 20_000 + b"\r\n\r\n")
            r = await c.response()
            assert r.status == 431 and await c.closed_by_peer()

            # a good request, then garbage: the good one is answered first
            c = await Client.open(plane.port)
            await c.send(b"GET /slow?ms=200 HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE GARBAGE\r\n\r\n")
            assert (await c.response()).status == 200
            assert (await c.response()).status == 400

            c = await Client.open(plane.port)
            assert (await c.request("GET", "/hello")).status == 200
            c.close()
            await eventually(lambda: plane.pool.get("a").outstanding == 0, "no request left in flight")  # type: ignore[union-attr]

    run(scenario)


def test_upstream_closing_mid_response_cuts_the_client(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            c = await Client.open(plane.port)
            await c.send(b"GET /close-mid HTTP/1.1\r\nHost: t\r\n\r\n")
            raw = await c.reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in raw and b"Content-Length: 1000000" in raw
            got = await c.reader.read()  # until the proxy closes
            assert 0 < len(got) < 1_000_000

    run(scenario)


def test_upstream_closing_before_responding_gives_502(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]}), replay_max=1024) as plane:
            c = await Client.open(plane.port)
            # a POST too big to have been kept for replay is not sent again
            r = await c.request("POST", "/close-before", b"x" * 2048)
            assert r.status == 502 and "error" in json.loads(r.body)
            assert r.headers["content-type"] == "application/json"
            # a small one is (it carries an Idempotency-Key), as is a GET, but there is no other
            # server: 503 with Retry-After
            plane.pool.get("a").health = "up"  # type: ignore[union-attr]
            c = await Client.open(plane.port)
            r = await c.request("POST", "/close-before", b"x")
            assert r.status == 503 and r.headers["retry-after"] == "1"
            plane.pool.get("a").health = "up"  # type: ignore[union-attr]
            c = await Client.open(plane.port)
            r = await c.request("GET", "/close-before")
            assert r.status == 503 and r.headers["retry-after"] == "1"

    run(scenario)


def test_dead_pooled_connection_is_retried_for_idempotent_requests(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool({"a": backends.http["a"]})
        async with proxy(pool) as plane:
            c = await Client.open(plane.port)
            first = await c.request("GET", "/once")  # the server will drop this connection on reuse
            r = await c.request("GET", "/hello")
            assert r.status == 200
            assert r.headers["x-conn-id"] != first.headers["x-conn-id"] and r.headers["x-conn-requests"] == "1"
            assert pool.get("a").state == "up"  # type: ignore[union-attr]

            # so is a POST without a key: the proxy gave it one, so the server runs it once at most
            await c.request("GET", "/once")
            r = await c.request("POST", "/echo", b"once only")
            assert r.status == 200 and r.body == b"once only"
            c.close()

    run(scenario)


def test_refused_backend_is_marked_down_and_another_serves(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool({"dead": free_port(), "a": backends.http["a"]})
        async with proxy(pool) as plane:
            c = await Client.open(plane.port)
            served = [(await c.request("GET", "/hello")).headers["x-backend"] for _ in range(4)]
            assert served == ["a"] * 4
            dead = pool.get("dead")
            assert dead is not None and dead.state == "down" and "passive" in (dead.last_error or "")
            assert dead.outstanding == 0 and pool.get("a").outstanding == 0  # type: ignore[union-attr]
            c.close()

    run(scenario)


def test_no_healthy_server_gives_503_with_retry_after(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]}, health="down")) as plane:
            c = await Client.open(plane.port)
            r = await c.request("GET", "/hello")
            assert r.status == 503 and r.headers["retry-after"] == "1"
            assert json.loads(r.body)["error"] == "no healthy trainer server"
            c.close()

        pool = make_pool({"x": free_port(), "y": free_port()})  # "up" but refusing
        async with proxy(pool) as plane:
            c = await Client.open(plane.port)
            r = await c.request("GET", "/hello")
            assert r.status == 503 and r.headers["retry-after"] == "1"
            assert [b.state for b in pool] == ["down", "down"]
            r = await c.request("GET", "/hello")  # the connection survives a 503
            assert r.status == 503
            c.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------
# headers, upgrades, flow control, timeouts


def test_hop_by_hop_headers_removed_and_forwarded_headers_added(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            c = await Client.open(plane.port)
            r = await c.request("GET", "/headers", headers=(
                ("Connection", "keep-alive, X-Private"), ("Keep-Alive", "timeout=5"), ("X-Private", "1"),
                ("Proxy-Authorization", "Basic eA=="), ("TE", "trailers"), ("X-Forwarded-For", "10.1.2.3"),
                ("X-Forwarded-Proto", "https"), ("X-Kept", "yes"), ("PROXY-CONNECTION", "keep-alive")))
            seen = {k.lower(): v for k, v in json.loads(r.body)["headers"]}
            for hop in ("connection", "keep-alive", "x-private", "proxy-authorization", "te", "proxy-connection"):
                assert hop not in seen, hop
            assert seen["x-kept"] == "yes" and seen["host"] == "test"
            assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"

            r = await c.request("GET", "/hop")  # and on the way back
            for hop in ("keep-alive", "x-hop-private", "proxy-authenticate", "connection"):
                assert hop not in r.headers, hop
            assert r.headers["x-end-to-end"] == "kept"
            c.close()

    run(scenario)


def test_answers_relayed_whole_or_cut_to_their_length(backends: Backends) -> None:
    """Plain answers pass through as they came (even across reads); one that sends more than its
    Content-Length or repeats it never reaches a client as another answer, and its connection is dropped."""
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            c = await Client.open(plane.port)
            for kind in ("split", "head-then-body"):
                r = await c.request("GET", f"/raw?kind={kind}")
                assert r.status == 200 and r.body == (b"hello, world" if kind == "split" else b"hello"), kind
            r = await c.request("GET", "/raw?kind=hop-last")
            assert r.body == b"hello" and r.headers["x-kept"] == "yes" and "keep-alive" not in r.headers
            for kind in ("overlong", "overlong-split"):
                r = await c.request("GET", f"/raw?kind={kind}")
                assert r.status == 200 and r.body == b"hello", kind
                after = await c.request("GET", "/hello")  # the same client connection: the next answer is its own
                assert after.status == 200 and after.body == b"hello from a", kind
                assert after.headers["x-conn-id"] != r.headers["x-conn-id"], kind  # the talkative one was dropped
            r = await c.request("GET", "/raw?kind=dup-length")
            assert r.status == 502
            r = await c.request("GET", "/hello")
            assert r.status == 200 and r.body == b"hello from a"
            c.close()

    run(scenario)


def test_websocket_is_tunnelled(backends: Backends) -> None:
    from websockets.asyncio.client import connect

    async def scenario() -> None:
        pool = make_pool({"ws": backends.ws})
        async with proxy(pool) as plane:
            async with connect(f"ws://127.0.0.1:{plane.port}/echo", max_size=None) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
                blob = pattern(3 * MB)
                await ws.send(blob)
                assert sha(await ws.recv()) == sha(blob)
            assert pool.get("ws").outstanding == 0  # type: ignore[union-attr]

    run(scenario)


def test_slow_reader_does_not_make_the_proxy_buffer_without_bound(backends: Backends) -> None:
    size = 48 * MB
    high_water = 64 * 1024

    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]}), high_water=high_water) as plane:
            c = await Client.open(plane.port)
            c.writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            await c.send(f"GET /big?n={size}&mode=cl HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            c.writer.transport.pause_reading()  # a client that stops reading

            def proxy_side() -> ClientConnection | None:
                conns = [x for x in plane.conns if x.cur is not None and x.cur.upstream is not None]
                return conns[0] if conns else None

            # the proxy stops reading from the server...
            conn = await eventually(lambda: (x := proxy_side()) and x.cur.upstream.read_paused and x,  # type: ignore[union-attr]
                                    "upstream reading paused")
            # ...and what it holds for the client stays near the high-water mark while it waits
            peak = 0
            for _ in range(25):
                peak = max(peak, conn.transport.get_write_buffer_size())
                await asyncio.sleep(0.02)
            assert conn.cur is not None and conn.cur.upstream.read_paused  # type: ignore[union-attr]
            assert peak <= high_water + 1 * MB < size // 10

            c.writer.transport.resume_reading()  # once the client reads, everything arrives intact
            r = await c.response()
            assert len(r.body) == size and sha(r.body) == sha(pattern(size))
            c.close()

    run(scenario)


def test_client_header_and_idle_timeouts(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]}), client_header_timeout=0.3,
                         client_idle_timeout=0.3) as plane:
            c = await Client.open(plane.port)
            await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
            r = await c.response()
            assert r.status == 408 and await c.closed_by_peer()

            c = await Client.open(plane.port)
            assert (await c.request("GET", "/hello")).status == 200
            assert await c.closed_by_peer()  # idle after its request: closed
            await eventually(lambda: not plane.conns, "idle connection dropped")

    run(scenario)


def test_upstream_read_timeout_gives_504(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]}), upstream_read_timeout=0.3) as plane:
            c = await Client.open(plane.port)
            r = await c.request("GET", "/slow?ms=5000")
            assert r.status == 504 and json.loads(r.body)["error"] == "trainer server timed out"
            await eventually(lambda: plane.pool.get("a").outstanding == 0, "released")  # type: ignore[union-attr]

    run(scenario)


def _blackhole() -> tuple[socket.socket, list[socket.socket]] | None:
    """A listener whose accept queue is full, so new connections hang in SYN-SENT."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    for _ in range(8):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(srv.getsockname())
        fillers.append(f)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(srv.getsockname())
    except OSError:
        return srv, fillers  # hangs (or fails) as wanted
    finally:
        probe.close()
    srv.close()
    for f in fillers:
        f.close()
    return None


def test_upstream_connect_timeout_fails_over(backends: Backends) -> None:
    hole = _blackhole()
    if hole is None:
        pytest.skip("this kernel completes connections to a full accept queue")
    srv, fillers = hole

    async def scenario() -> None:
        pool = make_pool({"hung": srv.getsockname()[1], "a": backends.http["a"]})
        async with proxy(pool, upstream_connect_timeout=0.3) as plane:
            c = await Client.open(plane.port)
            r = await c.request("GET", "/hello")
            assert r.status == 200 and r.headers["x-backend"] == "a"
            hung = pool.get("hung")
            assert hung is not None and hung.state == "down" and "timeout" in (hung.last_error or "")
            c.close()

    try:
        run(scenario)
    finally:
        srv.close()
        for f in fillers:
            f.close()


# ---------------------------------------------------------------------------------------------
# retry, redispatch, affinity, balancing, fixed routes (issue 3)


def _hung_listener() -> socket.socket:
    """A server that accepts connections (the kernel does) but never answers: a SIGSTOPped process."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    return srv


def test_retry_only_when_safe_after_the_server_got_the_request(backends: Backends, build: str) -> None:
    async def scenario() -> None:  # /flaky fails once per key, so each build gets its own keys
        pool = make_pool({"a": backends.http["a"]})
        async with proxy(pool) as plane:
            c = await Client.open(plane.port)
            # the server drops the connection without answering: with a key the POST goes again...
            key = f"k1-{build}"
            r = await c.request("POST", f"/flaky?key={key}", b"body", headers=(("Idempotency-Key", key),))
            assert r.status == 200 and r.headers["x-backend"] == "a"
            # ...without one, too (the proxy gives it a key); too big to replay, it may have been
            # acted on: 502, never sent twice
            pool.get("a").health = "up"  # type: ignore[union-attr]
            c = await Client.open(plane.port)
            r = await c.request("POST", f"/flaky?key=k2-{build}", b"body")
            assert r.status == 200
            pool.get("a").health = "up"  # type: ignore[union-attr]
            c = await Client.open(plane.port)
            r = await c.request("POST", f"/flaky?key=k5-{build}", b"b" * (plane.replay_max + 1))
            assert r.status == 502
            pool.get("a").health = "up"  # type: ignore[union-attr]
            c = await Client.open(plane.port)
            r = await c.request("GET", f"/flaky?key=k3-{build}")  # idempotent: retried
            assert r.status == 200
            # a head, then the server dies: the client saw nothing yet, so a safe request still goes again
            r = await c.request("GET", f"/flaky?key=k4-{build}&head=1")
            assert r.status == 200 and r.body == b"hello from a"
            counters = plane.counters()
            assert counters["errors_by_kind"]["unsafe_not_retried"] == 1
            assert counters["retries"] + counters["redispatches"] >= 2
            c.close()

    run(scenario)


def test_hung_server_safe_requests_move_on_and_server_leaves_rotation(backends: Backends) -> None:
    hung = _hung_listener()

    async def scenario() -> None:
        pool = make_pool({"hung": hung.getsockname()[1], "a": backends.http["a"]})
        async with proxy(pool, first_byte_timeout=0.3, probe_timeout=0.3) as plane:
            c = await Client.open(plane.port)
            # sticks to the hung server by cookie; its first byte never comes: probe, move on
            hung_cookie = pool.get("hung").cookie.decode()  # type: ignore[union-attr]
            r = await c.request("GET", "/api/sessions/s1", headers=(("Cookie", f"ctops_srv={hung_cookie}"),))
            assert r.status == 200 and r.headers["x-backend"] == "a"
            assert "ctops_srv=a." in r.headers["set-cookie"]  # the session now sticks to "a"
            assert pool.get("hung").state == "suspect"  # type: ignore[union-attr]
            r = await c.request("POST", "/echo", b"k", headers=(("Idempotency-Key", "x1"),))
            assert r.status == 200 and r.headers["x-backend"] == "a"
            assert plane.counters()["first_byte_timeouts"] >= 1
            c.close()

    try:
        run(scenario)
    finally:
        hung.close()


def test_all_servers_down_gives_503_with_retry_after_quickly(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool({"x": free_port(), "y": free_port(), "z": free_port()})
        async with proxy(pool, retry_max_tries=2) as plane:
            c = await Client.open(plane.port)
            r = await c.request("POST", "/x", b"{}", headers=(("Idempotency-Key", "k"),))
            assert r.status == 503 and r.headers["retry-after"] == "1"
            assert json.loads(r.body)["tries"] == 2  # bounded by retry_max_tries
            c.close()

    run(scenario)


def test_session_affinity_and_draining(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool(backends.http)
        async with proxy(pool) as plane:
            c = await Client.open(plane.port)
            # a new session gets a cookie naming the server that answered
            r = await c.request("POST", "/api/sessions", b"{}")
            home = r.headers["x-backend"]
            signed = affinity_cookie(r)
            assert signed.startswith(f"{home}.")
            cookie = (("Cookie", f"ctops_session=s1; ctops_srv={signed}"),)
            for _ in range(6):  # it sticks, and the cookie is not sent again
                r = await c.request("GET", "/api/sessions/s1", headers=cookie)
                assert r.headers["x-backend"] == home and "set-cookie" not in r.headers
            # draining: the session stays, new sessions and cookie-less requests go elsewhere
            pool.set_admin(pool.get(home), "draining")  # type: ignore[arg-type]
            r = await c.request("GET", "/api/sessions/s1", headers=cookie)
            assert r.headers["x-backend"] == home
            for _ in range(6):
                assert (await c.request("POST", "/api/sessions", b"{}")).headers["x-backend"] != home
                assert (await c.request("GET", "/hello")).headers["x-backend"] != home
            # the server goes down: the session moves, and the cookie says where
            pool.set_admin(pool.get(home), "enabled")  # type: ignore[arg-type]
            pool.set_health(pool.get(home), "down")  # type: ignore[arg-type]
            r = await c.request("GET", "/api/sessions/s1", headers=cookie)
            moved = r.headers["x-backend"]
            assert moved != home and affinity_cookie(r).startswith(f"{moved}.")
            # requests outside sessions get no cookie
            assert "set-cookie" not in (await c.request("GET", "/hello")).headers
            # none up, one suspect (it failed one check: slow rather than dead): it serves, no 503
            for b in pool:
                pool.set_health(b, "down")
            pool.set_health(pool.get("c"), "suspect")  # type: ignore[arg-type]
            r = await c.request("GET", "/api/sessions/s1", headers=cookie)
            assert r.status == 200 and r.headers["x-backend"] == "c"
            c.close()

    run(scenario)


def test_least_outstanding_weights_and_slow_start() -> None:
    pool = make_pool({"a": 1, "b": 2, "c": 3})
    a, b, c = (pool.get(n) for n in "abc")
    assert {pool.pick().name for _ in range(3)} == {"a", "b", "c"}  # type: ignore[union-attr]  # idle: rotation
    a.outstanding, b.outstanding = 5, 1  # type: ignore[union-attr]
    assert {pool.pick().name for _ in range(3)} == {"c"}  # type: ignore[union-attr]
    a.outstanding = b.outstanding = 0  # type: ignore[union-attr]
    b.weight = 3  # type: ignore[union-attr]
    c.outstanding = 2  # type: ignore[union-attr]
    assert pool.pick().name == "b"  # type: ignore[union-attr]  # 1/3 beats a's 1/1 and c's 3/1
    # a server back from down warms up: it takes work only when the others are busier
    pool.slow_start = 60.0
    pool.set_health(a, "down")  # type: ignore[arg-type]
    pool.set_health(a, "up")  # type: ignore[arg-type]
    assert 0 < pool.effective_weight(a) < 1  # type: ignore[arg-type]
    b.outstanding = c.outstanding = 0  # type: ignore[union-attr]
    b.weight = 1  # type: ignore[union-attr]
    assert {pool.pick().name for _ in range(6)} == {"b", "c"}  # type: ignore[union-attr]
    pool.slow_start = 1e-9
    assert pool.effective_weight(a) == 1  # type: ignore[arg-type]


def test_fixed_route_streams_and_ignores_pool_health(backends: Backends) -> None:
    from dispatcher.pool import Backend

    async def scenario() -> None:
        llm = Backend("llm-pool", "127.0.0.1", backends.http["c"])
        pool = make_pool({"a": backends.http["a"]}, health="down")
        plane = PLANE.DataPlane(pool, SETTINGS, routes={b"/llm/": llm})
        await plane.start("127.0.0.1", 0)
        try:
            c = await Client.open(plane.port)
            r = await c.request("GET", "/llm/hello")
            assert r.status == 200 and r.headers["x-backend"] == "c" and "set-cookie" not in r.headers
            assert (await c.request("GET", "/hello")).status == 503  # the pool is down
            # a stream passes through as it comes: the first event arrives before the second exists
            await c.send(b"GET /llm/drip HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await c.reader.readuntil(b"\r\n\r\n")
            assert b"text/event-stream" in head and b"chunked" in head.lower()
            assert await c.reader.readuntil(b"one\n\n\r\n")
            other = await Client.open(plane.port)
            await other.request("GET", "/llm/release")
            assert await c.reader.readuntil(b"0\r\n\r\n")
            c.close()
            other.close()
        finally:
            await plane.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------
# strict at the edge (issue 13): framing nginx/HAProxy refuse, internal routes, signed affinity


def test_a_request_needs_exactly_one_host(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            bad = [  # fast-path shapes (GET heads) and parser-path ones (a body, an odd header)
                b"GET /hello?tag=host-none-get HTTP/1.1\r\n\r\n",
                b"GET /hello?tag=host-two-get HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nhost: b\r\n\r\n",
                b"POST /echo?tag=host-none-post HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
                b"POST /echo?tag=host-two-post HTTP/1.1\r\nHost: a\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
                b"GET /hello?tag=host-two-10 HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            ]
            for raw in bad:
                r = await refused(plane.port, raw)
                assert r.status == 400, raw
                assert json.loads(r.body)["error"] == "a request needs exactly one Host header"
            assert await seen(backends, "tag=host-") == []
            # HTTP/1.0 may leave Host out; one Host anywhere among the headers is fine
            before = len(await seen(backends, "tag=ok-1"))
            c = await Client.open(plane.port)
            await c.send(b"GET /hello?tag=ok-10 HTTP/1.0\r\n\r\n")
            assert (await c.response()).status == 200
            c = await Client.open(plane.port)
            await c.send(b"GET /hello?tag=ok-11 HTTP/1.1\r\nAccept: */*\r\nHOST: t\r\nX-Z: 1\r\n\r\n")
            assert (await c.response()).status == 200
            c.close()
            assert len(await seen(backends, "tag=ok-1")) == before + 2

    run(scenario)


def test_unsupported_http_versions_get_505(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            for raw in (b"GET /hello?tag=v20 HTTP/2.0\r\nHost: t\r\n\r\n",
                        b"GET /hello?tag=v09a HTTP/0.9\r\nHost: t\r\n\r\n",
                        b"GET /hello?tag=v09b\r\n\r\n"):  # an HTTP/0.9 simple request
                r = await refused(plane.port, raw)
                assert r.status == 505, raw
                assert json.loads(r.body) == {"error": "unsupported HTTP version"}
            r = await refused(plane.port, b"GET /hello?tag=v12 HTTP/1.2\r\nHost: t\r\n\r\n")
            assert r.status == 400
            assert await seen(backends, "tag=v") == []

    run(scenario)


def test_ambiguous_transfer_encoding_never_reaches_a_server(backends: Backends) -> None:
    smuggled = b"0\r\n\r\nGET /hello?tag=te-smuggled HTTP/1.1\r\nHost: t\r\n\r\n"

    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            for te in (b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, chunked",
                       b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                       b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
                       b"Transfer-Encoding: identity", b"Transfer-Encoding: xchunked",
                       b"Transfer-Encoding: chunked\r\nContent-Length: 3"):
                for version in (b"1.1", b"1.0"):
                    raw = b"POST /echo?tag=te-bad HTTP/%b\r\nHost: t\r\n%b\r\n\r\n%b" % (version, te, smuggled)
                    assert (await refused(plane.port, raw)).status == 400, raw
            # HTTP/1.0 knows no chunks: even a plain "chunked" there is refused
            raw = b"POST /echo?tag=te-bad HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + smuggled
            assert (await refused(plane.port, raw)).status == 400
            assert await seen(backends, "tag=te-bad") == [] and await seen(backends, "te-smuggled") == []
            # "chunked" in any case, with spaces around it, is the one framing forwarded, as "chunked"
            before = len(await seen(backends, "tag=te-good"))
            c = await Client.open(plane.port)
            for te in (b"chunked", b"Chunked", b"chunked "):
                await c.send(b"POST /echo?tag=te-good HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: %b\r\n\r\n"
                             b"2\r\nhi\r\n0\r\n\r\n" % te)
                r = await c.response()
                assert r.status == 200 and r.body == b"hi"
            c.close()
            got = (await seen(backends, "tag=te-good"))[before:]
            assert [s["transfer_encoding"] for s in got] == [["chunked"]] * 3

    run(scenario)


def test_trainer_internal_routes_are_hidden_from_learners(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            c = await Client.open(plane.port)
            for path in ("/docs", "/redoc", "/openapi.json", "/healthz", "/readyz", "/healthz?tag=x", "/docs/",
                         "/docs/oauth2-redirect", "/%68ealthz", "/openapi%2Ejson", "http://t/healthz", "/_debug/raise"):
                for method in ("GET", "HEAD"):
                    r = await c.request(method, path)
                    assert r.status == 404, (method, path)
                    assert method == "HEAD" or json.loads(r.body) == {"error": "not found"}
                    assert "x-backend" not in r.headers
                # the connection goes on: learner routes still work on it
                assert (await c.request("GET", "/hello")).status == 200
            # pipelined: each answered in its turn
            await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"
                         b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            assert [(await c.response()).status for _ in range(3)] == [200, 404, 200]
            c.close()
            c = await Client.open(plane.port)
            assert (await c.request("POST", "/healthz", b"{}")).status == 404
            c.close()
            for tag in ("/docs", "/redoc", "/openapi", "/healthz", "ealthz", "/_debug"):
                assert await seen(backends, tag) == [], tag
            # the routes are the trainer's own, on its own port, for the dispatcher's health checks
            direct = await Client.open(backends.http["a"])
            assert (await direct.request("GET", "/healthz")).status == 200
            direct.close()

    run(scenario)


def test_forged_or_foreign_affinity_cookies_are_ignored(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool(backends.http)
        async with proxy(pool, affinity_key=b"deployment key") as plane:
            a = pool.get("a")
            assert a is not None
            pool.set_admin(a, "draining")  # reachable only through a cookie
            other = make_pool(backends.http)
            other.set_affinity_key(b"another deployment")
            forged = ["a", "a.", "a.AAAAAAAAAAAAAAAAAAAAAA", other.get("a").cookie.decode(),  # type: ignore[union-attr]
                      a.cookie.decode() + "x", a.cookie.decode().replace("a.", "b.")]
            c = await Client.open(plane.port)
            for value in forged:
                for _ in range(3):
                    r = await c.request("GET", "/api/sessions/s1", headers=(("Cookie", f"ctops_srv={value}"),))
                    assert r.status == 200 and r.headers["x-backend"] != "a", value
                    # the answer sets a cookie signed for the server that answered
                    assert affinity_cookie(r) == pool.get(r.headers["x-backend"]).cookie.decode()  # type: ignore[union-attr]
            # a valid cookie keeps its session on the draining server
            r = await c.request("GET", "/api/sessions/s1", headers=(("Cookie", f"ctops_srv={a.cookie.decode()}"),))
            assert r.headers["x-backend"] == "a" and "set-cookie" not in r.headers
            c.close()
        # another dispatcher with the same key honours the cookie; one with another key does not
        twin = make_pool(backends.http)
        async with proxy(twin, affinity_key=b"deployment key") as plane:
            c = await Client.open(plane.port)
            for _ in range(3):
                r = await c.request("GET", "/api/sessions/s1", headers=(("Cookie", f"ctops_srv={a.cookie.decode()}"),))
                assert r.headers["x-backend"] == "a" and "set-cookie" not in r.headers
            c.close()

    run(scenario)


def test_a_draining_server_takes_no_new_session_through_a_cookie(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool(backends.http)
        async with proxy(pool) as plane:
            a = pool.get("a")
            assert a is not None
            cookie = (("Cookie", f"ctops_session=s1; ctops_srv={a.cookie.decode()}"),)
            pool.set_admin(a, "draining")
            c = await Client.open(plane.port)
            for _ in range(4):
                # the session it has stays; a new one goes to a server taking new work
                assert (await c.request("GET", "/api/sessions/s1", headers=cookie)).headers["x-backend"] == "a"
                r = await c.request("POST", "/api/sessions", b"{}", headers=cookie)
                assert r.headers["x-backend"] != "a"
                assert affinity_cookie(r).startswith(r.headers["x-backend"] + ".")
                r = await c.request("POST", "/api/sessions?x=1", b"{}", headers=cookie)
                assert r.headers["x-backend"] != "a"
            pool.set_admin(a, "enabled")
            assert (await c.request("POST", "/api/sessions", b"{}", headers=cookie)).headers["x-backend"] == "a"
            c.close()

    run(scenario)


def test_affinity_key_comes_from_the_environment_variable_the_config_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctops import config

    dep = config.parse({"dispatchers": [{"name": "A", "data": "127.0.0.1:1", "ops": "127.0.0.1:2"}],
                        "proxy": {"affinity_key_env": "CTOPS_TEST_AFFINITY_KEY"}})
    monkeypatch.setenv("CTOPS_TEST_AFFINITY_KEY", "s3cret")
    settings = PLANE.ProxySettings.from_deployment(dep)
    assert settings.affinity_key == b"s3cret" and "s3cret" not in repr(settings)
    one, two = make_pool({"a": 1}), make_pool({"a": 1})
    PLANE.DataPlane(one, settings)
    PLANE.DataPlane(two, settings)
    assert one.get("a").cookie == two.get("a").cookie  # type: ignore[union-attr]
    monkeypatch.delenv("CTOPS_TEST_AFFINITY_KEY")
    PLANE.DataPlane(two, PLANE.ProxySettings.from_deployment(dep))  # unset: a random key, not ""
    assert one.get("a").cookie != two.get("a").cookie  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# every request safe to retry (issue 14)


def test_writes_without_a_key_get_one_kept_across_their_tries(backends: Backends, build: str) -> None:
    async def scenario() -> None:  # /flaky fails once per key, so each build gets its own tags
        async with proxy(make_pool({"a": backends.http["a"], "b": backends.http["b"]})) as plane:
            c = await Client.open(plane.port)
            tag = f"gen-{build}"
            r = await c.request("POST", f"/flaky?key={tag}", b"submission")
            assert r.status == 200  # dropped unanswered once, sent again
            keys = [s["idempotency_key"] for s in await seen(backends, tag)]
            assert len(keys) == 2 and keys[0] == keys[1], keys  # the same key on both tries
            assert keys[0].startswith("ctops-") and len(keys[0]) >= 32
            # each write gets a key of its own; a client's own key passes unchanged; reads get none
            await c.request("POST", f"/echo?t=gen2-{build}", b"x")
            await c.request("POST", f"/echo?t=own-{build}", b"x", headers=(("Idempotency-Key", "mine 1"),))
            await c.request("GET", f"/hello?t=read-{build}")
            other = [s["idempotency_key"] for s in await seen(backends, f"gen2-{build}")]
            assert len(other) == 1 and other[0].startswith("ctops-") and other[0] != keys[0]
            assert [s["idempotency_key"] for s in await seen(backends, f"own-{build}")] == ["mine 1"]
            assert [s["idempotency_key"] for s in await seen(backends, f"read-{build}")] == [None]
            c.close()

    run(scenario)


def test_connection_after_a_server_error_is_not_reused(backends: Backends) -> None:
    async def scenario() -> None:
        pool = make_pool({"a": backends.http["a"]})
        async with proxy(pool) as plane:
            c = await Client.open(plane.port)
            r = await c.request("POST", "/fail-once", b"x")  # the server then closes that connection
            assert r.status == 500 and r.body == b"failed"
            failed_conn = r.headers["x-conn-id"]
            c.close()
            for i in range(50):  # other learners' writes without keys
                other = await Client.open(plane.port)
                r = await other.request("POST", "/echo", b"learner %d" % i)
                assert r.status == 200 and r.body == b"learner %d" % i
                assert r.headers["x-conn-id"] != failed_conn
                other.close()
            counters = plane.counters()
            assert counters["retries"] + counters["redispatches"] == 0, counters  # never sent into it

    run(scenario)


_JSON = b'{"exercise_id": "fizzbuzz", "code": "' + b"x = 1\\n" * 300 + b'"}'
# (request bytes, whether they fit the fast path for writes, how many answers they get)
_WRITES = [
    (b"POST /headers HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
     % (len(_JSON), _JSON), True, 1),
    (b"POST /echo?mode=chunked HTTP/1.1\r\nContent-Length: %d\r\nHost: t\r\n\r\n%b" % (len(_JSON), _JSON), True, 1),
    (b"POST /headers HTTP/1.1\r\nHost: t\r\nIdempotency-Key: learner-key-1\r\nContent-Length: 2\r\n\r\n{}", True, 1),
    (b"PUT /headers HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}", True, 1),
    (b"POST /headers HTTP/1.1\r\nhost: t\r\ncookie: a=1\r\ncontent-length: 2\r\nCookie: ctops_session=s1\r\n\r\n{}",
     True, 1),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", True, 1),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nHost: u\r\nContent-Length: 2\r\n\r\n{}", False, 1),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", False, 1),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", False, 1),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}GET /hello HTTP/1.1\r\nHost: t\r\n\r\n", False, 2),
    (b"POST /headers HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 127.0.9.9\r\nContent-Length: 2\r\n\r\n{}", False, 1),
    (b"POST /_debug/raise HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}", False, 1),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", False, 1),
    (b"POST /echo HTTP/1.0\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}", False, 1),
]


def _normalized(r: Response) -> tuple:
    """An answer with what differs between two identical requests (connection ids, our random
    Idempotency-Key's value) replaced."""
    headers = [(k, "*" if k.lower() in ("x-conn-id", "x-conn-requests") else v) for k, v in r.raw_headers]
    body: Any = r.body
    if r.headers.get("content-type") == "application/json" and body.startswith(b'{"method"'):
        doc = json.loads(body)
        doc["headers"] = [[k, "generated" if k.lower() == "idempotency-key" and v.startswith("ctops-") else v]
                          for k, v in doc["headers"]]
        body = doc
    return r.status, headers, body


def test_fast_path_for_writes_gives_what_the_parser_gives(backends: Backends) -> None:
    async def scenario() -> None:
        async with proxy(make_pool({"a": backends.http["a"]})) as plane:
            for raw, fast, answers in _WRITES:
                assert (PLANE.fast_write_request(raw, SETTINGS.header_max_bytes) is not None) == fast, raw
                end = raw.index(b"\r\n\r\n") + 4
                got = []
                for parts in ([raw], [raw[:end], raw[end:]]):  # one read (fast path), else the parser's
                    c = await Client.open(plane.port)
                    for i, part in enumerate(parts):
                        if i:
                            await asyncio.sleep(0.05)  # a read of its own for the proxy
                        if part:
                            await c.send(part)
                    got.append([_normalized(await c.response(raw.split(b" ", 1)[0].decode()))
                                for _ in range(answers)])
                    c.close()
                assert got[0] == got[1], raw

    run(scenario)


def test_generated_keys_are_well_formed_and_never_repeat_across_blocks() -> None:
    # keys come in blocks (one getrandom per block): three blocks and a bit, each line whole and fresh
    lines = [PLANE.generated_key_line() for _ in range(3 * 256 + 5)]
    assert all(re.fullmatch(rb"Idempotency-Key: ctops-[0-9a-f]{32}\r\n", line) for line in lines), lines[:3]
    assert len(set(lines)) == len(lines)


def test_what_a_write_head_is_remembered_as() -> None:
    # (method, target, cookies, head, needs a key of ours, body length, opens a session)
    opening = b"POST /api/sessions HTTP/1.1\r\nHost: t\r\nCookie: ctops_session=s1\r\nContent-Length: 2\r\n\r\n{}"
    for _ in range(2):  # the first time judged, the second remembered: the same verdict
        hit = PLANE.fast_write_request(opening, SETTINGS.header_max_bytes)
        assert hit is not None and hit[4] is True and hit[5] == 2 and hit[6] is True
        assert hit[2] == b"ctops_session=s1" and hit[3] + b"\r\n{}" == opening
    keyed = b"POST /api/sessions/s1/submissions HTTP/1.1\r\nHost: t\r\nIdempotency-Key: k\r\nContent-Length: 0\r\n\r\n"
    hit = PLANE.fast_write_request(keyed, SETTINGS.header_max_bytes)
    assert hit is not None and hit[4] is False and hit[5] == 0 and hit[6] is False
    put = b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
    hit = PLANE.fast_write_request(put, SETTINGS.header_max_bytes)
    assert hit is not None and hit[4] is False  # idempotent: no key needed
    # a body cut short or longer than announced is not this head's write
    assert PLANE.fast_write_request(opening[:-1], SETTINGS.header_max_bytes) is None
    assert PLANE.fast_write_request(opening + b" ", SETTINGS.header_max_bytes) is None


@pytest.mark.parametrize("cookie, affinity", [
    (b"ctops_session=s1", b""),
    (b"a=1; ctops_srv=abc.def; b=2", b"abc.def"),
    (b"ctops_srv= v ;ctops_session=s1", b"v"),
    (b"xctops_srv=zz; ctops_session=s", b""),  # a longer name ending in ours is not ours
    (b"a=1; xctops_srv=zz", None),
    (b"a=1", None),
])
def test_affinity_from_cookies(cookie: bytes, affinity: bytes | None) -> None:
    for _ in range(2):  # judged, then remembered
        assert PLANE.cookie_affinity(cookie) == affinity


def test_write_without_a_key_to_a_hung_server_is_answered_by_another(backends: Backends) -> None:
    hung = _hung_listener()

    async def scenario() -> None:
        pool = make_pool({"hung": hung.getsockname()[1], "a": backends.http["a"]})
        # the read timeout is far beyond the test's own limit: only the first-byte deadline can answer
        async with proxy(pool, first_byte_timeout=0.3, probe_timeout=0.3, upstream_read_timeout=600) as plane:
            hung_cookie = pool.get("hung").cookie.decode()  # type: ignore[union-attr]
            c = await Client.open(plane.port)
            r = await c.request("POST", "/echo", b"submission", headers=(("Cookie", f"ctops_srv={hung_cookie}"),))
            assert r.status == 200 and r.headers["x-backend"] == "a" and r.body == b"submission"
            assert plane.counters()["redispatches"] >= 1
            c.close()

    try:
        run(scenario)
    finally:
        hung.close()

"""Answers through the data plane's fast path and through its full parser give the same result.

A scripted server (real sockets, in the test's own event loop) writes each answer of a corpus in
pieces of the test's choosing: in one write, so a plain answer takes the fast path; split inside its
head, so the parser takes it; and cut at many places inside its body (chunk-size lines cut short,
CRLFs split), so the fast path frames the body across reads. Every delivery must give the client
the same status, headers and body, leave the connection as usable (a second request on it must be
answered right), and a plain answer must reach the client byte for byte as the server sent it.
Both builds of the data plane (compiled and plain Python) run every case.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from dispatcher.pool import ServerPool
from tests.test_proxy import build, make_pool, proxy, run  # noqa: F401 - `build` runs each test on both builds

# ---------------------------------------------------------------------------------------------
# the corpus: (name, answer bytes, fast: whether the fast path passes it on as it came)

_JSON = b'{"submission_id": "s1", "verdict": "passed", "steps": [' + b'{"name": "run", "ok": true}, ' * 40 + b"{}]}"


def _chunked(*parts: bytes, last: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + last


_CT = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
CORPUS: list[tuple[str, bytes, bool]] = [
    ("length", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
     % (len(_JSON), _JSON), True),
    ("length-empty", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    ("chunked", _CT + _chunked(_JSON[:1], _JSON[1:11], _JSON[11:700], _JSON[700:]), True),
    ("chunked-empty", _CT + b"0\r\n\r\n", True),
    # a chunk whose data looks like the end of the answer, and like a size line
    ("chunked-lookalike", _CT + _chunked(b"\r\n0\r\n\r\n", b"5\r\nhello\r\n", b"x" * 17), True),
    ("chunked-spelling", b"HTTP/1.1 201 Created\r\ntransfer-encoding:   Chunked \r\nX-Empty:\r\nX-Tab: a\tb\r\n"
     b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n" + b"000A\r\n0123456789\r\n1f\r\n" + b"y" * 31 + b"\r\n00\r\n\r\n",
     True),
    ("chunked-404", b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
     + _chunked(b'{"error": "not_found"}'), True),
    # unusual: the parser re-chunks the answer (an extension dropped, trailers dropped)
    ("chunked-extension", _CT + b"3\r\nabc\r\n5;name=value\r\nhello\r\n4;x\r\nwxyz\r\n0\r\n\r\n", False),
    ("chunked-trailers", _CT + _chunked(b"abc", b"defgh", last=b"0\r\nX-Checksum: 1234\r\nX-Other: y\r\n\r\n"), False),
    ("chunked-last-extension", _CT + _chunked(b"abc", last=b"0;done\r\n\r\n"), False),
    ("chunked-announced-trailer", b"HTTP/1.1 200 OK\r\nTrailer: X-Checksum\r\nTransfer-Encoding: chunked\r\n\r\n"
     + _chunked(b"abc", last=b"0\r\nX-Checksum: 1\r\n\r\n"), False),
    ("no-content", b"HTTP/1.1 204 No Content\r\nX-Request: 1\r\n\r\n", False),
    ("not-modified", b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n", False),
    ("server-error", b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}", False),
    ("server-error-chunked", b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
     + _chunked(b"{}"), False),
    ("interim", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + _CT + _chunked(b"abc"), False),
    ("keep-alive-header", b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\n\r\nabc", False),
]
# answers that cannot be relayed whole: each way of relaying them must cut the client off
BROKEN: list[tuple[str, bytes]] = [
    ("chunk-overrun", _CT + b"3\r\nabcdef\r\n0\r\n\r\n"),  # more data than the size said
    ("chunk-bad-size", _CT + b"3\r\nabc\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ("length-and-chunked", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     + _chunked(b"abc")),
]
# answers to HEAD: a head alone, whatever length or coding it names
HEADS: list[tuple[str, bytes]] = [
    ("head-length", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
    ("head-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
]
ANSWERS = {name: raw for name, raw, _ in CORPUS} | dict(BROKEN) | dict(HEADS)
NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"
ANSWERS["next"] = NEXT


def _head_end(raw: bytes) -> int:
    """Where the final answer's head ends (after any interim answer)."""
    end = raw.index(b"\r\n\r\n") + 4
    if raw.startswith(b"HTTP/1.1 1"):
        end = raw.index(b"\r\n\r\n", end) + 4
    return end


def deliveries(raw: bytes, seed: int) -> dict[str, list[int]]:
    """Ways to cut `raw` into writes (the offsets of the cuts): the fast path's (whole heads), and the
    parser's (a head cut in two)."""
    end = _head_end(raw)
    rnd = random.Random(seed)
    out = {"whole": [], "head-cut": [5], "head-then-byte": [end + 1] if end < len(raw) else []}
    body = range(end + 1, len(raw))
    if len(body) > 0:
        # every byte of the start of the body (size lines and CRLFs cut at every place), then random cuts
        out["bytewise"] = list(range(end + 1, min(len(raw), end + 40)))
        for i in range(3):
            out[f"random-{i}"] = sorted(rnd.sample(body, min(len(body), 25)))
    return out


# ---------------------------------------------------------------------------------------------
# the scripted server and a client that keeps the raw bytes


class Script:
    """A server that answers `/a/NAME` with ANSWERS[NAME], written in the pieces `cuts[NAME]` says."""

    def __init__(self) -> None:
        self.cuts: dict[str, list[int]] = {}
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                name = head.split(b" ")[1].decode().removeprefix("/a/").removeprefix("/api/sessions/")
                raw = ANSWERS[name]
                last = 0
                for cut in [*self.cuts.get(name, []), len(raw)]:
                    writer.write(raw[last:cut])
                    await writer.drain()
                    last = cut
                    if cut < len(raw):
                        await asyncio.sleep(0.003)  # a read of its own for the proxy
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class Got:
    raw: bytes  # every byte of the answer as the client received it
    status: int
    headers: list[tuple[bytes, bytes]]  # (lower-case name, value), in the order received
    body: bytes

    def meaning(self) -> tuple:
        """What the answer says, whichever way it was framed: the order of differently named headers
        carries no meaning (RFC 9110 5.3), nor the coding that framed the body."""
        headers = sorted((n, v) for n, v in self.headers if n not in (b"transfer-encoding", b"content-length"))
        return self.status, headers, self.body


async def read_answer(reader: asyncio.StreamReader, method: str = "GET") -> Got:
    raw = bytearray()
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        raw += head
        status = int(head.split(b" ", 2)[1])
        if status >= 200:
            break
    headers = [(n.strip().lower(), v.strip()) for n, v in
               (line.split(b":", 1) for line in head.split(b"\r\n")[1:] if line)]
    names = dict(headers)
    body = bytearray()
    if method == "HEAD" or status in (204, 304):
        pass
    elif b"chunked" in names.get(b"transfer-encoding", b"").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    line = await reader.readuntil(b"\r\n")
                    raw += line
                    if line == b"\r\n":
                        break
                break
            data = await reader.readexactly(size + 2)
            assert data.endswith(b"\r\n"), data
            raw += data
            body += data[:-2]
    else:
        data = await reader.readexactly(int(names[b"content-length"]))
        raw += data
        body += data
    return Got(bytes(raw), status, headers, bytes(body))


async def _exchange(port: int, script: Script, name: str, cuts: list[int], method: str = "GET",
                    path: str = "/a/") -> tuple[Got | None, Got | None]:
    """Ask for answer `name` cut at `cuts`, then for another on the same connection; (None, None) if the
    proxy cut the client off (a broken answer)."""
    script.cuts[name] = cuts
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path}{name} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        try:
            first = await asyncio.wait_for(read_answer(reader, method), 10)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None, None
        writer.write(b"GET /a/next HTTP/1.1\r\nHost: t\r\n\r\n")
        second = await asyncio.wait_for(read_answer(reader), 10)
        return first, second
    finally:
        writer.close()


async def _with_script(scenario) -> None:  # noqa: ANN001 - an async callable (port, script, pool)
    script = Script()
    port = await script.start()
    try:
        pool: ServerPool = make_pool({"s": port})
        async with proxy(pool) as plane:
            await scenario(plane.port, script, pool)
    finally:
        script.close()


# ---------------------------------------------------------------------------------------------


def test_every_way_of_relaying_an_answer_gives_the_same_answer() -> None:
    async def scenario(port: int, script: Script, pool: ServerPool) -> None:
        for seed, (name, raw, fast) in enumerate(CORPUS):
            results: dict[str, tuple[Got | None, Got | None]] = {}
            for how, cuts in deliveries(raw, seed).items():
                results[how] = await _exchange(port, script, name, cuts)
            reference = results["head-cut"]  # the parser's path: the head came in two reads
            assert reference[0] is not None, name
            for how, (first, second) in results.items():
                assert first is not None and second is not None, (name, how)
                assert first.meaning() == reference[0].meaning(), (name, how)
                assert second.raw == NEXT, (name, how)  # nothing of the first answer was left over
                if fast and how != "head-cut":  # passed on byte for byte as the server wrote it
                    assert first.raw == raw, (name, how)

    run(lambda: _with_script(scenario))


def test_pipelined_answers_and_the_affinity_cookie() -> None:
    async def scenario(port: int, script: Script, pool: ServerPool) -> None:
        cookie = pool.get("s").set_cookie  # type: ignore[union-attr]
        for name, raw, fast in CORPUS:
            if raw.startswith(b"HTTP/1.1 5"):
                continue  # the connection is not kept after a server error: nothing to pipeline behind it
            # two requests in one write; the first answer opens a session, so the proxy adds its cookie
            script.cuts[name] = [_head_end(raw) + 1] if _head_end(raw) < len(raw) else []
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /api/sessions/{name} HTTP/1.1\r\nHost: t\r\n\r\nGET /a/next HTTP/1.1\r\nHost: t\r\n\r\n"
                         .encode())
            first = await asyncio.wait_for(read_answer(reader), 10)
            second = await asyncio.wait_for(read_answer(reader), 10)
            writer.close()
            assert (b"set-cookie", cookie.split(b":", 1)[1].strip()) in first.headers, name
            assert second.raw == NEXT, name
            if fast:
                end = raw.index(b"\r\n\r\n") + 2
                assert first.raw == raw[:end] + cookie + raw[end:], name
            else:
                plain = await _exchange(port, script, name, [5])
                assert plain[0] is not None
                assert sorted(first.headers) == sorted([*plain[0].headers, (b"set-cookie", cookie[12:-2])]), name
                assert first.body == plain[0].body, name

    run(lambda: _with_script(scenario))


def test_heads_and_broken_answers() -> None:
    async def scenario(port: int, script: Script, pool: ServerPool) -> None:
        for name, raw in HEADS:
            for cuts in ([], [5]):
                first, second = await _exchange(port, script, name, cuts, method="HEAD")
                assert first is not None and first.status == 200 and first.body == b"", name
                # the length a HEAD answer names is the GET's; a coding is the hop's own and is dropped
                assert first.raw == raw.replace(b"Transfer-Encoding: chunked\r\n", b""), name
                assert second is not None and second.raw == NEXT, name
        for seed, (name, raw) in enumerate(BROKEN):
            for how, cuts in deliveries(raw, seed).items():
                # whatever came before the damage, the client never gets a whole answer from it: it is
                # cut off, or told 502 when the damage came before anything was passed on
                first, _ = await _exchange(port, script, name, cuts)
                assert first is None or (first.status == 502 and b"invalid response" in first.body), (name, how)

    run(lambda: _with_script(scenario))

"""The dispatcher's data plane: an HTTP/1.1 reverse proxy from learners to trainer servers.

Callback-driven (asyncio.Protocol on uvloop, httptools parsers) with no task per request: bytes
read from one side are parsed only as far as needed to rewrite the head, then handed to the
other side's transport. Modelled on uvicorn's httptools protocol (flow control, keep-alive,
timeouts). It is benchmarked against HAProxy, so the per-request path avoids needless calls and
allocations; the rare paths (errors, retries, upgrades) favour clarity.

A client connection answers its requests strictly in order: a pipelined request waits, with
reading paused, until the one before it is answered. Timeouts are deadlines checked by one
sweeper task instead of a timer per request, which would cost more than the proxying itself.

Where a request goes is decided in `DataPlane.choose_backend`; whether a request that already
reached a server may be sent again is decided in `DataPlane.may_retry`. Both are the places to
extend for retry/redispatch policy and session affinity.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from functools import partial

import httptools

from ctops.config import Deployment
from dispatcher.pool import Backend, ServerPool
from dispatcher.upstream import UpstreamPool

log = logging.getLogger("ctops.dispatcher.proxy")

# hop-by-hop headers (RFC 9110 7.6.1); any proxy-* header is treated the same
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# Connection values that name no other header, so the common case skips token parsing
PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade",
                              b"keep-alive, Upgrade", b"Keep-Alive, Upgrade", b"keep-alive, upgrade"})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})
# request bytes kept so a request can be re-sent when a reused connection turns out dead
REPLAY_MAX = 64 * 1024

# why the client's reading is paused (bits)
_PIPELINE = 1  # a request waits for the one before it, or the connection is being wound up
_BACKPRESSURE = 2  # the upstream's write buffer (or the buffer in front of it) is full

# what a client connection's deadline stands for
_NONE, _HEADER, _IDLE, _UPSTREAM = 0, 1, 2, 3


@dataclass(frozen=True)
class ProxySettings:
    client_header_timeout: float
    client_idle_timeout: float
    upstream_connect_timeout: float
    upstream_read_timeout: float
    header_max_bytes: int
    high_water: int
    pool_size: int

    @classmethod
    def from_deployment(cls, dep: Deployment) -> ProxySettings:
        t, lim = dep.timings, dep.limits
        return cls(
            client_header_timeout=t.client_header_timeout_ms / 1000,
            client_idle_timeout=t.client_idle_timeout_ms / 1000,
            upstream_connect_timeout=t.upstream_connect_timeout_ms / 1000,
            upstream_read_timeout=t.upstream_read_timeout_ms / 1000,
            header_max_bytes=lim.proxy_header_max_bytes,
            high_water=lim.proxy_high_water_bytes,
            pool_size=lim.upstream_pool_size,
        )


# ---------------------------------------------------------------------------------------------
# small helpers


class _BadResponse(Exception):
    """Raised from a response parser callback: the server's answer cannot be relayed."""


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _status_line(code: int, reason: bytes) -> bytes:
    key = (code, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % key
        if len(_STATUS_LINES) < 512:  # reasons are free text: bound the cache
            _STATUS_LINES[key] = line
    return line


_REASONS = {400: b"Bad Request", 405: b"Method Not Allowed", 408: b"Request Timeout",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout"}


def error_response(status: int, message: str, *, keep_alive: bool, http11: bool = True,
                   retry_after: int | None = None, extra: dict | None = None) -> bytes:
    """A complete small JSON error response."""
    body = json.dumps({"error": message, **(extra or {})}).encode()
    head = [_status_line(status, _REASONS.get(status, b"Error")),
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)]
    if retry_after is not None:
        head.append(b"Retry-After: %d\r\n" % retry_after)
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    elif not http11:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


# how a header (by its name as sent) is handled; cached per spelling, so the common headers cost
# one dict lookup instead of lower() and several comparisons
_COPY, _CONNECTION, _TE, _UPGRADE, _HOP, _CLEN, _XFF, _XFP = range(8)
_KINDS: dict[bytes, int] = {}


def _kind(name: bytes) -> int:
    lname = name.lower()
    if lname == b"connection":
        kind = _CONNECTION
    elif lname == b"transfer-encoding":
        kind = _TE
    elif lname == b"upgrade":
        kind = _UPGRADE
    elif lname in HOP_BY_HOP or lname.startswith(b"proxy-"):
        kind = _HOP
    elif lname == b"content-length":
        kind = _CLEN
    elif lname == b"x-forwarded-for":
        kind = _XFF
    elif lname == b"x-forwarded-proto":
        kind = _XFP
    else:
        kind = _COPY
    if len(_KINDS) < 4096:  # names are client-chosen: bound the cache
        _KINDS[name] = kind
    return kind


def _copy_headers(hdrs: list[tuple[bytes, bytes]], out: list[bytes], request: bool,
                  drop: frozenset[bytes] | None = None,
                  ) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None]:
    """Append the end-to-end headers to `out`. Returns (transfer-encoding, upgrade, x-forwarded-for,
    content-length), which the caller rewrites itself. On requests X-Forwarded-* are the caller's."""
    mark = len(out)
    kinds = _KINDS
    conn = te = upgrade = xff = clen = None
    for name, value in hdrs:
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if kind == _COPY:
            if drop is None or name.lower() not in drop:
                out += (name, b": ", value, b"\r\n")
        elif kind == _CLEN:
            clen = value
            out += (name, b": ", value, b"\r\n")
        elif kind == _CONNECTION:
            conn = value if conn is None else conn + b", " + value
        elif kind == _TE:
            te = value if te is None else te + b", " + value
        elif kind == _UPGRADE:
            upgrade = value
        elif kind >= _XFF:
            if not request:
                out += (name, b": ", value, b"\r\n")
            elif kind == _XFF:
                xff = value if xff is None else xff + b", " + value
            # a client's X-Forwarded-Proto is replaced by ours
    if drop is None and conn is not None and conn not in PLAIN_CONNECTION:
        # the rare slow path: Connection names end-to-end-looking headers that are hop-by-hop here
        named = frozenset(t.strip().lower() for t in conn.split(b",")) - HOP_BY_HOP
        if named:
            del out[mark:]
            return _copy_headers(hdrs, out, request, named)
    return te, upgrade, xff, clen


# ---------------------------------------------------------------------------------------------


class Request:
    """One client request on its way through the proxy."""

    __slots__ = ("conn", "method", "ready", "keep_alive", "http11", "upgrade", "chunked", "has_body",
                 "complete", "answered", "aborted", "backend", "upstream", "tries", "unsent", "unsent_size",
                 "replay", "replay_size")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.method = b""
        self.ready = False  # head parsed and rewritten: can be dispatched
        self.keep_alive = True
        self.http11 = True
        self.upgrade: bytes | None = None
        self.chunked = False
        self.has_body = False
        self.complete = False  # the whole request has been read from the client
        self.answered = False  # the response is done (or being given by the proxy itself)
        self.aborted = False  # given up on (client gone, malformed, timed out)
        self.backend: Backend | None = None  # counted in backend.outstanding while set
        self.upstream: UpstreamConnection | None = None
        self.tries = 0
        self.unsent: list[bytes] | None = None  # bytes waiting for an upstream connection
        self.unsent_size = 0
        self.replay: list[bytes] | None = None  # every byte sent so far, while small and retry is possible
        self.replay_size = 0

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT


class ClientConnection(asyncio.Protocol):
    """A learner's connection: parses requests, hands them to upstreams, writes responses back."""

    __slots__ = ("plane", "parser", "transport", "client_ip", "cur", "queue", "parsing", "url", "hdrs",
                 "head_bytes", "block", "write_paused", "deadline", "dkind", "tunnel", "upgrading",
                 "error_after", "closed", "advancing", "read_eof", "read_len")

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.parser = httptools.HttpRequestParser(self)
        # answer the request before a "Connection: close" even if the client sent more after it
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client_ip = b"unknown"
        self.cur: Request | None = None  # the request being answered
        self.queue: deque[Request] = deque()  # pipelined requests behind it
        self.parsing: Request | None = None  # the request the parser is inside of
        self.url = b""
        self.hdrs: list[tuple[bytes, bytes]] | None = None  # not None while inside a request head
        self.head_bytes = 0
        self.block = 0
        self.write_paused = False
        self.deadline = 0.0
        self.dkind = _NONE
        self.tunnel: UpstreamConnection | None = None
        self.upgrading: Request | None = None
        self.error_after: bytes | None = None  # an error response owed once earlier requests are answered
        self.closed = False
        self.advancing = False
        self.read_eof = False
        self.read_len = 0  # size of the read being parsed

    # -- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        self.transport.set_write_buffer_limits(high=self.plane.settings.high_water)
        self.plane.conns.add(self)
        self.dkind = _HEADER
        self.deadline = self.plane.time() + self.plane.t_header

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.plane.conns.discard(self)
        if self.tunnel is not None:
            self.tunnel.transport.close()
            self.tunnel = None
        r = self.cur
        if r is not None:
            self.plane.cancel(r)
        self.cur = None
        self.queue.clear()

    def eof_received(self) -> bool:
        if self.tunnel is not None or (self.cur is None and not self.queue) or self.parsing is not None:
            return False  # nothing owed, or a request cut short that can never be answered: close
        self.read_eof = True  # answer what was asked, then close
        return True

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        if self.upgrading is not None:
            self.send(self.upgrading, data)
            return
        self.read_len = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0]:])
            return
        except httptools.HttpParserCallbackError:
            log.exception("data plane: internal error while handling a request")
            self.abort()
            return
        except httptools.HttpParserError:
            self._bad_request(400, "malformed request")
            return
        if self.hdrs is not None:  # still inside a head after this read: count it against the limit
            self.head_bytes += len(data)
            if self.head_bytes > self.plane.settings.header_max_bytes:
                self._bad_request(431, "request header too large")

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self._bound_upstream()
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.dkind == _UPSTREAM:  # the client is reading: progress
            self.deadline = self.plane.time() + self.plane.t_read
        up = self._bound_upstream()
        if up is not None:
            up.resume_reading()

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        r = Request(self)
        self.parsing = r
        self.url = b""
        self.hdrs = []
        self.head_bytes = 0
        if self.cur is None:
            self.cur = r
            self.dkind = _HEADER
            self.deadline = self.plane.time() + self.plane.t_header
        else:
            self.queue.append(r)
            self._pause(_PIPELINE)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        hdrs = self.hdrs
        if hdrs is not None:  # None: a chunked trailer, which is not forwarded
            hdrs.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.parsing
        assert r is not None
        p = self.parser
        hdrs = self.hdrs or []
        self.hdrs = None
        if self.head_bytes + self.read_len > self.plane.settings.header_max_bytes and self._head_too_big(hdrs):
            self._bad_request(431, "request header too large")
            return
        method = r.method = p.get_method()
        r.http11 = p.get_http_version() == "1.1"
        r.keep_alive = p.should_keep_alive()
        out = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        te, upgrade, xff, clen = _copy_headers(hdrs, out, True)
        if te is not None:  # the body is re-chunked as it is forwarded
            r.chunked = r.has_body = True
            out += (b"Transfer-Encoding: ", te, b"\r\n")
        elif clen is not None and clen != b"0":
            r.has_body = True
        if p.should_upgrade():
            if method == b"CONNECT" or upgrade is None:
                self._bad_request(405 if method == b"CONNECT" else 400, "unsupported upgrade or CONNECT")
                return
            r.upgrade = upgrade
            r.keep_alive = False  # after an upgrade the connection is no longer HTTP
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
        ip = self.client_ip
        out += (b"X-Forwarded-For: ", ip if xff is None else xff + b", " + ip,
                b"\r\nX-Forwarded-Proto: http\r\n\r\n")
        head = b"".join(out)
        r.unsent = [head]
        r.unsent_size = r.replay_size = len(head)
        r.replay = [head]
        r.ready = True
        if r is self.cur:
            self.dkind = _UPSTREAM
            self.deadline = self.plane.time() + self.plane.t_read
            self.plane.dispatch(r)

    def _head_too_big(self, hdrs: list[tuple[bytes, bytes]]) -> bool:
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in hdrs)
        return size > self.plane.settings.header_max_bytes

    def on_body(self, body: bytes) -> None:
        r = self.parsing
        if r is None or r.answered or r.aborted:
            return  # the rest of a body whose request was already answered is dropped
        if r.chunked:
            self.send(r, b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.send(r, body)
        if self.dkind == _UPSTREAM and r is self.cur:  # the client is sending: progress
            self.deadline = self.plane.time() + self.plane.t_read

    def on_message_complete(self) -> None:
        r = self.parsing
        self.parsing = None
        if r is None:
            return
        r.complete = True
        if r.chunked and not r.answered and not r.aborted:
            self.send(r, b"0\r\n\r\n")

    # -- forwarding ----------------------------------------------------------------------------

    def send(self, r: Request, data: bytes) -> None:
        """Pass request bytes on to r's upstream, or keep them until it has one."""
        if r.answered or r.aborted:
            return
        replay = r.replay
        if replay is not None:
            r.replay_size += len(data)
            if r.replay_size > REPLAY_MAX:
                r.replay = None
            else:
                replay.append(data)
        up = r.upstream
        if up is not None:
            up.transport.write(data)
            return
        if r.unsent is None:
            r.unsent = []
        r.unsent.append(data)
        r.unsent_size += len(data)
        if r.unsent_size > self.plane.settings.high_water:
            self._pause(_BACKPRESSURE)

    def _bound_upstream(self) -> UpstreamConnection | None:
        if self.tunnel is not None:
            return self.tunnel
        r = self.cur
        return r.upstream if r is not None else None

    def _pause(self, why: int) -> None:
        if not self.block and not self.closed:
            self.transport.pause_reading()
        self.block |= why

    def _resume(self, why: int) -> None:
        if self.block & why:
            self.block &= ~why
            if not self.block and not self.closed:
                self.transport.resume_reading()

    def response_done(self, r: Request) -> None:
        """The response to the current request has been handed to the transport."""
        r.answered = True
        self.plane.responses += 1
        if self.closed:
            return
        if not r.keep_alive or self.read_eof or (r.has_body and not r.complete):
            # an unread body cannot be told apart from the next request without reading it all
            self.close()
            return
        self.cur = None
        if self.block & _BACKPRESSURE:
            self._resume(_BACKPRESSURE)
        if self.queue or self.error_after is not None:
            self._advance()
        else:
            self.dkind = _IDLE
            self.deadline = self.plane.time() + self.plane.t_idle

    def _advance(self) -> None:
        """Start the next pipelined request, or wait for one."""
        if self.advancing:
            return  # a synchronous answer inside the loop below: the loop goes on
        self.advancing = True
        try:
            while self.cur is None and self.queue and not self.closed:
                r = self.cur = self.queue.popleft()
                if r.ready:
                    self.dkind = _UPSTREAM
                    self.deadline = self.plane.time() + self.plane.t_read
                    self.plane.dispatch(r)
                else:  # its head is still arriving
                    self.dkind = _HEADER
                    self.deadline = self.plane.time() + self.plane.t_header
            if self.closed:
                return
            if self.cur is None:
                if self.error_after is not None:
                    self.transport.write(self.error_after)
                    self.close()
                    return
                self.dkind = _IDLE
                self.deadline = self.plane.time() + self.plane.t_idle
            if not self.queue and self.error_after is None:
                self._resume(_PIPELINE)
        finally:
            self.advancing = False

    def _upgrade(self, rest: bytes) -> None:
        """The parser stopped at an upgrade: from here on the client's bytes are not HTTP."""
        r = self.cur if self.cur is not None and not self.queue else (self.queue[-1] if self.queue else None)
        if r is None or r.answered or r.upgrade is None:
            self.close()
            return
        self.upgrading = r
        if rest:
            self.send(r, rest)

    def start_tunnel(self, up: UpstreamConnection, rest: bytes) -> None:
        """The upstream accepted the upgrade (101): relay raw bytes both ways until either closes."""
        r = self.upgrading
        self.upgrading = None
        self.tunnel = up
        self.cur = None
        self.dkind = _NONE
        self.deadline = 0.0
        if r is not None:
            r.answered = True
            self.plane.release_backend(r)  # outstanding counts requests; a tunnel is no longer one
        if rest:
            self.transport.write(rest)

    # -- answers from the proxy itself ---------------------------------------------------------

    def respond_error(self, r: Request, status: int, message: str, retry_after: int | None = None,
                      extra: dict | None = None) -> None:
        """Answer the current request with a JSON error."""
        r.answered = True
        r.unsent = r.replay = None
        if r.has_body and not r.complete:
            r.keep_alive = False
        self.plane.errors[status] = self.plane.errors.get(status, 0) + 1
        if not self.closed:
            self.transport.write(error_response(status, message, keep_alive=r.keep_alive and not self.read_eof,
                                                http11=r.http11, retry_after=retry_after, extra=extra))
        self.response_done(r)

    def _bad_request(self, status: int, message: str) -> None:
        """Nothing after a malformed request can be trusted: answer what came before, then this, then close."""
        self._pause(_PIPELINE)
        self.hdrs = None
        r = self.parsing
        self.parsing = None
        self.plane.errors[status] = self.plane.errors.get(status, 0) + 1
        response = error_response(status, message, keep_alive=False)
        if r is not None and r is self.cur:
            up = r.upstream
            if up is not None and up.head_sent:
                self.plane.cancel(r)
                self.abort()  # a response is under way: the connection is all we can cut
                return
            self.plane.cancel(r)
            self.cur = None
        elif r is not None and r in self.queue:
            self.queue.remove(r)
        if self.cur is None:
            self.transport.write(response)
            self.close()
        else:
            self.error_after = response

    def on_timeout(self) -> None:
        kind = self.dkind
        self.deadline = 0.0
        self.dkind = _NONE
        if kind == _UPSTREAM and self.cur is not None:
            r = self.cur
            up = r.upstream
            started = up is not None and up.head_sent
            self.plane.cancel(r)
            if started:
                self.abort()
            else:
                r.keep_alive = False
                self.respond_error(r, 504, "trainer server timed out")
        elif kind == _HEADER and self.parsing is not None:
            self.transport.write(error_response(408, "request header timeout", keep_alive=False))
            self.close()
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """End a response that cannot be completed: what was written is flushed, then the connection closes."""
        self.close()


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to a trainer server, bound to one request at a time."""

    __slots__ = ("plane", "backend", "transport", "parser", "req", "client", "out", "reason", "hdrs",
                 "reused", "read_paused", "got_bytes", "head_sent", "tunnel", "until_close", "chunk_out",
                 "interim", "discard")

    def __init__(self, plane: DataPlane, backend: Backend) -> None:
        self.plane = plane
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.req: Request | None = None
        self.client: ClientConnection | None = None
        self.out: list[bytes] = []  # response bytes for the client, written once per read
        self.reason = b""
        self.hdrs: list[tuple[bytes, bytes]] | None = None
        self.reused = False  # has answered before: may have been closed by the server meanwhile
        self.read_paused = False
        self.got_bytes = False
        self.head_sent = False
        self.tunnel = False
        self.until_close = False  # the response body ends when the server closes
        self.chunk_out = False
        self.interim = False
        self.discard = False  # the parser expects a body that will not come (HEAD): replace it

    def bind(self, r: Request) -> None:
        self.req = r
        self.client = r.conn
        self.got_bytes = self.head_sent = self.until_close = self.chunk_out = False
        if r.conn.write_paused:
            self.pause_reading()

    def unbind(self) -> None:
        self.req = None
        self.client = None
        self.out.clear()
        if self.read_paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    # -- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=self.plane.settings.high_water)

    def connection_lost(self, exc: Exception | None) -> None:
        self.plane.upstreams.discard(self)
        client = self.client
        r = self.req
        self.req = self.client = None
        if client is None:
            return
        if self.tunnel:
            self._flush(client)
            client.close()
            return
        assert r is not None
        r.upstream = None
        if not self.head_sent:
            self.plane.upstream_lost(r, self, exc)
            return
        if self.until_close and not self.discard and exc is None:  # the close ends the body
            if self.chunk_out:
                self.out.append(b"0\r\n\r\n")
            self._flush(client)
            self.plane.release_backend(r)
            client.response_done(r)
            return
        self._flush(client)
        self.plane.release_backend(r)
        client.abort()  # the response cannot be completed: the client must see it cut short

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # a server talking out of turn cannot be trusted with another request
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.tunnel:
            client.transport.write(data)
            return
        r = self.req
        assert r is not None
        client.deadline = self.plane.time() + self.plane.t_read
        if not self.got_bytes:
            self.got_bytes = True
            r.replay = None  # the server has answered: never re-sent
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._flush(client)
            if self.tunnel:
                client.start_tunnel(self, data[exc.args[0]:])
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _BadResponse):
                self._broken(str(exc.__context__))
            else:
                log.exception("data plane: internal error while relaying a response")
                self._broken("internal error")
            return
        except httptools.HttpParserError:
            self._broken("invalid response from trainer server")
            return
        if self.discard:
            self.discard = False
            self.parser = httptools.HttpResponseParser(self)
        if self.out and self.client is not None:
            self._flush(self.client)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client._pause(_BACKPRESSURE)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client._resume(_BACKPRESSURE)

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.hdrs = []
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        hdrs = self.hdrs
        if hdrs is not None:
            hdrs.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.req
        if r is None or self.discard:
            return
        p = self.parser
        status = p.get_status_code()
        hdrs = self.hdrs or []
        self.hdrs = None
        if status < 200 and status != 101:  # interim (100 Continue, 103): pass on, the real one follows
            self.interim = True
            out = [_status_line(status, self.reason)]
            _copy_headers(hdrs, out, False)
            out.append(b"\r\n")
            self.out.append(b"".join(out))
            return
        out = [_status_line(status, self.reason)]
        te, upgrade, _, clen = _copy_headers(hdrs, out, False)
        if status == 101:
            if r.upgrade is None or upgrade is None:
                raise _BadResponse("101 without an upgrade")
            self.tunnel = True
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
        elif r.method == b"HEAD":
            self.discard = True  # no body follows, whatever the headers say
        elif status == 204 or status == 304:
            pass
        elif te is not None or clen is None:
            self.until_close = te is None
            if r.http11:
                self.chunk_out = True
                out += (b"Transfer-Encoding: ", te or b"chunked", b"\r\n")
            else:  # HTTP/1.0 knows no chunks: the body ends when we close
                r.keep_alive = False
        if not r.keep_alive or r.conn.read_eof:
            out.append(b"Connection: close\r\n\r\n")
        elif not r.http11:
            out.append(b"Connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        self.out.append(b"".join(out))
        self.head_sent = True
        if self.discard:
            self._complete(r, p.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.discard or self.interim:
            return
        if self.chunk_out:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        r = self.req
        if self.discard or self.tunnel or r is None:
            return
        if self.chunk_out:
            self.out.append(b"0\r\n\r\n")
        self._complete(r, self.parser.should_keep_alive())

    # -- helpers -------------------------------------------------------------------------------

    def _flush(self, client: ClientConnection) -> None:
        out = self.out
        if out:
            if not client.closed:
                if len(out) == 1:
                    client.transport.write(out[0])
                else:
                    client.transport.writelines(out)
            out.clear()

    def _complete(self, r: Request, reusable: bool) -> None:
        """The response is whole: hand it over, keep the connection if it can serve another request."""
        client = r.conn
        if self.out:
            self._flush(client)
        r.upstream = None
        self.req = self.client = None
        if self.read_paused:
            self.resume_reading()
        b = r.backend
        if b is not None:
            b.outstanding -= 1
            r.backend = None
        if reusable and r.complete and not self.until_close:
            self.reused = True
            if not self.plane.upstreams.release(self):
                self.transport.close()  # type: ignore[union-attr]
        else:
            self.transport.close()  # type: ignore[union-attr]
        client.response_done(r)

    def _broken(self, message: str) -> None:
        """The server sent something that is not HTTP: drop the connection, tell the client."""
        client, r = self.client, self.req
        if self.transport is not None:
            self.transport.close()
        if client is None or r is None:
            return
        self._flush(client)
        r.upstream = None
        self.unbind()
        self.plane.release_backend(r)
        if self.head_sent:
            client.abort()
        else:
            client.respond_error(r, 502, message)


# ---------------------------------------------------------------------------------------------


class DataPlane:
    """The proxy's shared state: the server pool, idle upstream connections, open client connections."""

    def __init__(self, pool: ServerPool, settings: ProxySettings) -> None:
        self.pool = pool
        self.settings = settings
        self.upstreams = UpstreamPool(settings.pool_size)
        self.conns: set[ClientConnection] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task] = set()
        self.responses = 0
        self.errors: dict[int, int] = {}  # status -> count of answers the proxy gave itself
        # flattened for the per-request path
        self.time = time.monotonic
        self.t_header = settings.client_header_timeout
        self.t_idle = settings.client_idle_timeout
        self.t_read = settings.upstream_read_timeout

    async def start(self, host: str, port: int) -> asyncio.AbstractServer:
        self.loop = asyncio.get_running_loop()
        self.time = self.loop.time
        self.server = await self.loop.create_server(lambda: ClientConnection(self), host, port,
                                                    backlog=2048, reuse_address=True)
        self._sweeper = self.loop.create_task(self._sweep())
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection (tests and shutdown)."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn.close()
        self.upstreams.close_all()
        for task in list(self._connecting):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)

    async def _sweep(self) -> None:
        s = self.settings
        tick = min(max(min(s.client_header_timeout, s.client_idle_timeout, s.upstream_read_timeout) / 4, 0.02), 0.5)
        while self.server is None or self.server.is_serving() or self.conns:
            await asyncio.sleep(tick)
            now = self.loop.time()
            for conn in [c for c in self.conns if 0.0 < c.deadline <= now]:
                try:
                    conn.on_timeout()
                except Exception:
                    log.exception("data plane: error while timing out a connection")
                    conn.close()

    # -- routing: the places to extend -----------------------------------------------------------

    def choose_backend(self, r: Request, failed: Backend | None) -> Backend | None:
        """Where a request goes. `failed` is the server it could not reach, if any."""
        return self.pool.pick(exclude=failed)

    def may_retry(self, r: Request, up: UpstreamConnection) -> bool:
        """Whether a request that reached a server (which then closed without a byte of answer) is
        sent again. Today only a reused keep-alive connection qualifies: the server may have closed
        it just before the request came, so it never saw the request."""
        return up.reused and not up.got_bytes and r.replay is not None and r.idempotent

    # -- forwarding --------------------------------------------------------------------------------

    def dispatch(self, r: Request, failed: Backend | None = None) -> None:
        b = self.choose_backend(r, failed)
        if b is None:
            r.conn.respond_error(r, 503, "no healthy trainer server", retry_after=1,
                                 extra={"retry_after_s": 1})
            return
        self._forward(r, b)

    def _forward(self, r: Request, b: Backend, fresh: bool = False) -> None:
        r.backend = b
        b.outstanding += 1
        if not fresh:
            up = self.upstreams.acquire(b)
            if up is not None:
                self._attach(r, up)  # type: ignore[arg-type]
                return
        task = self.loop.create_task(self._open(b))
        self._connecting.add(task)
        task.add_done_callback(partial(self._opened, r, b))

    async def _open(self, b: Backend) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        return await asyncio.wait_for(
            self.loop.create_connection(partial(UpstreamConnection, self, b), b.host, b.port),
            self.settings.upstream_connect_timeout)

    def _opened(self, r: Request, b: Backend, task: asyncio.Task) -> None:
        self._connecting.discard(task)
        if task.cancelled():
            return
        try:
            _, up = task.result()
        except TimeoutError:
            self._unreachable(r, b, "connect timeout")
            return
        except OSError as exc:
            self._unreachable(r, b, exc.strerror or type(exc).__name__)
            return
        assert isinstance(up, UpstreamConnection)
        if r.aborted or r.answered or r.conn.closed:
            self.upstream_idle(up)  # nobody waits for it, but it is a good connection
            return
        self._attach(r, up)

    def _attach(self, r: Request, up: UpstreamConnection) -> None:
        r.upstream = up
        up.bind(r)
        unsent = r.unsent
        r.unsent = None
        r.unsent_size = 0
        # before writing: the write may report a full buffer at once, which must stay reported
        if r.conn.block & _BACKPRESSURE:
            r.conn._resume(_BACKPRESSURE)
        if unsent:
            if len(unsent) == 1:
                up.transport.write(unsent[0])  # type: ignore[union-attr]
            else:
                up.transport.writelines(unsent)  # type: ignore[union-attr]

    def _unreachable(self, r: Request, b: Backend, reason: str) -> None:
        """Nothing reached `b`: take it out of rotation and try another server."""
        self.pool.report_failure(b, reason)
        self.release_backend(r)
        if r.aborted or r.answered or r.conn.closed:
            return
        r.tries += 1
        if r.tries >= len(self.pool.backends):
            r.conn.respond_error(r, 503, "no healthy trainer server", retry_after=1,
                                 extra={"retry_after_s": 1})
            return
        self.dispatch(r, failed=b)

    def upstream_lost(self, r: Request, up: UpstreamConnection, exc: Exception | None) -> None:
        """The connection closed after the request was (partly) sent, before any response head."""
        b = r.backend
        self.release_backend(r)
        if r.aborted or r.answered or r.conn.closed or b is None:
            return
        if self.may_retry(r, up):
            r.unsent = list(r.replay or ())
            r.unsent_size = r.replay_size
            self._forward(r, b, fresh=True)
            return
        if not up.reused and not up.got_bytes:  # a fresh connection dropped: the server is in trouble
            self.pool.report_failure(b, "connection reset" if exc is not None else "closed before responding")
        r.conn.respond_error(r, 502, "trainer server closed the connection before responding")

    def upstream_idle(self, up: UpstreamConnection) -> None:
        up.unbind()
        up.reused = True
        if up.transport is None or up.transport.is_closing() or not self.upstreams.release(up):
            if up.transport is not None:
                up.transport.close()

    def release_backend(self, r: Request) -> None:
        b = r.backend
        if b is not None:
            b.outstanding -= 1
            r.backend = None

    def cancel(self, r: Request) -> None:
        """Give up on a request: its upstream connection (holding a partial exchange) is closed."""
        r.aborted = True
        up = r.upstream
        if up is not None:
            r.upstream = None
            up.req = None
            up.client = None
            up.out.clear()
            if up.transport is not None:
                up.transport.close()
        self.release_backend(r)


async def start_data_plane(pool: ServerPool, host: str, port: int, settings: ProxySettings) -> asyncio.AbstractServer:
    """Listen on host:port and proxy every request to a server from `pool`."""
    plane = DataPlane(pool, settings)
    return await plane.start(host, port)

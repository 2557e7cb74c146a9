"""The dispatcher's data plane: an HTTP/1.1 reverse proxy from learners to trainer servers.

Callback-driven (asyncio.Protocol on uvloop, httptools parsers) with no task per request: bytes
read from one side are parsed only as far as needed to rewrite the head, then handed to the
other side's transport. Modelled on uvicorn's httptools protocol (flow control, keep-alive,
timeouts). It is benchmarked against HAProxy, so the per-request path avoids needless calls and
allocations; the rare paths (errors, retries, upgrades) favour clarity.

A client connection answers its requests strictly in order: a pipelined request waits, with
reading paused, until the one before it is answered. Timeouts are deadlines checked by one
sweeper task instead of a timer per request, which would cost more than the proxying itself.

Where a request goes is decided in `DataPlane.choose_backend` (session affinity by the `ctops_srv`
cookie, else the pool's least-outstanding pick) or by a fixed path-prefix route (the LLM pool).
A try that fails before any byte of an answer goes through `DataPlane._failed_try`: the same
server once more if it is still believed healthy, else another, within `retry_max_tries` and
`retry_total`; a request the server may have acted on only when safe (idempotent method or an
`Idempotency-Key`) and small enough to have been kept for replay. Every request is safe: a write
without a key gets one from the proxy (random, in the head every try replays), so the trainer runs it
at most once whichever servers it reaches. A safe request left without an answer's first byte for
`first_byte_timeout` gets its server probed; a failed probe (or the server leaving `up` by any other
means) moves every safe request waiting there to another server.

Built, this module is compiled by Cython (setup.py), with `proxy.pxd` giving the classes C fields and
the hot methods C calls; it stays plain Python and is imported as such where it was not built. For
that the connection classes are asyncio protocols by their methods only: a compiled class cannot
derive from `asyncio.Protocol`, and the event loops need only the methods.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from binascii import hexlify
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import unquote_to_bytes

import httptools

from ctops.config import Deployment
from dispatcher.health import check_once
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
# requests under this path take part in session affinity even before they carry a cookie
AFFINITY_PATH = b"/api/sessions"
AFFINITY_COOKIE = b"ctops_srv="
SESSION_COOKIE = b"ctops_session="
# the trainer's own routes (API docs, health details, test hooks): for the dispatcher's checks and for
# staff on the servers' own ports, not for learners. A path, as the trainer routes it (decoded, with
# trailing slashes it would redirect), that this matches at its start is answered 404 by the proxy
_HIDDEN = re.compile(rb"/(?:(?:docs(?:/oauth2-redirect)?|redoc|openapi\.json|healthz|readyz)/*|_debug(?=/))"
                     rb"(?:[?#/]|\Z)")
# the second byte of a path `_HIDDEN` could match (or of one percent-encoded): any other is let by at once
_HIDDEN_SECOND = frozenset({b"d", b"r", b"o", b"h", b"_", b"%"})
_OPENS_WITH_QUERY = AFFINITY_PATH + b"?"

# why the client's reading is paused (bits)
_PIPELINE = 1  # a request waits for the one before it, or the connection is being wound up
_BACKPRESSURE = 2  # the upstream's write buffer (or the buffer in front of it) is full

# what a client connection's deadline stands for
_NONE, _HEADER, _IDLE, _UPSTREAM, _FIRST_BYTE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ProxySettings:
    client_header_timeout: float
    client_idle_timeout: float
    upstream_connect_timeout: float
    upstream_read_timeout: float
    header_max_bytes: int
    high_water: int
    pool_size: int
    retry_max_tries: int = 4
    retry_total: float = 5.0
    first_byte_timeout: float = 0.5  # 0: off
    probe_timeout: float = 0.4
    slow_start: float = 3.0
    replay_max: int = 64 * 1024
    # signs the affinity cookie; empty: a random key per process (see DataPlane)
    affinity_key: bytes = field(default=b"", repr=False)

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
            retry_max_tries=lim.retry_max_tries,
            retry_total=t.retry_total_ms / 1000,
            first_byte_timeout=t.first_byte_timeout_ms / 1000,
            probe_timeout=t.health_timeout_ms / 1000,
            slow_start=t.slow_start_ms / 1000,
            replay_max=lim.replay_max_bytes,
            affinity_key=dep.proxy.affinity_key,
        )


# ---------------------------------------------------------------------------------------------
# small helpers


class _BadResponse(Exception):
    """Raised from a response parser callback: the server's answer cannot be relayed."""


class _Rejected(Exception):
    """Raised from a request parser callback once the request has been refused: it stops the parser, so
    nothing after a refused head (its body, a request hidden behind it) is ever read as a request."""


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _status_line(code: int, reason: bytes) -> bytes:
    key = (code, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % key
        if len(_STATUS_LINES) < 512:  # reasons are free text: bound the cache
            _STATUS_LINES[key] = line
    return line


_REASONS = {400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}


def error_response(status: int, message: str, *, keep_alive: bool, http11: bool = True,
                   retry_after: int | None = None, extra: dict | None = None, head_only: bool = False) -> bytes:
    """A complete small JSON error response (`head_only`: to a HEAD request, its head alone)."""
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
    if not head_only:
        head.append(body)
    return b"".join(head)


# how a header (by its name as sent) is handled; cached per spelling, so the common headers cost
# one dict lookup instead of lower() and several comparisons
_COPY, _CONNECTION, _TE, _UPGRADE, _HOP, _CLEN, _COOKIE, _IDEM, _HOST, _XFF, _XFP = range(11)
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
    elif lname == b"cookie":
        kind = _COOKIE
    elif lname == b"idempotency-key":
        kind = _IDEM
    elif lname == b"host":
        kind = _HOST
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
                  ) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None, bytes | None, bool, int]:
    """Append the end-to-end headers to `out`. Returns (transfer-encoding, upgrade, x-forwarded-for,
    content-length, cookie, has an idempotency key, how many Host headers); the first three the caller
    rewrites itself. On requests X-Forwarded-* are the caller's."""
    mark = len(out)
    kinds = _KINDS
    conn = te = upgrade = xff = clen = cookie = None
    idem = False
    hosts = 0
    for name, value in hdrs:
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if kind == _COPY:
            if drop is None or name.lower() not in drop:
                out += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            hosts += 1
            out += (name, b": ", value, b"\r\n")
        elif kind == _CLEN:
            clen = value
            out += (name, b": ", value, b"\r\n")
        elif kind == _COOKIE:
            cookie = value if cookie is None else cookie + b"; " + value
            out += (name, b": ", value, b"\r\n")
        elif kind == _IDEM:
            idem = True
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
    return te, upgrade, xff, clen, cookie, idem, hosts


def _cookie_value(cookie: bytes, name: bytes) -> bytes | None:
    """The value of cookie `name=` (given with its "=") in a Cookie header, or None."""
    i = cookie.find(name)
    while i > 0 and cookie[i - 1] not in b" ;":  # a longer name ending in ours
        i = cookie.find(name, i + 1)
    if i < 0:
        return None
    i += len(name)
    j = cookie.find(b";", i)
    return cookie[i:j if j >= 0 else len(cookie)].strip()


# The fast path. Most requests are a plain GET or HEAD head in one read, and most answers a head
# with one Content-Length, or one `Transfer-Encoding: chunked`, and no other hop-by-hop header: each is
# checked by one strict pattern and passed on nearly as it came, without a parser callback per header.
# Anything else (HTTP/1.0, an unusual character, a header the proxy must act on) does not match and
# goes to httptools.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"[\t -~\x80-\xff]*"  # no CR, LF or other control; one way only to match a line (no blow-up)
_HOP_NAMES = rb"connection|keep-alive|te|trailer|transfer-encoding|upgrade|proxy-" + _TOKEN


def _lines_without(names: bytes) -> bytes:
    """Header lines, none of them named (case-insensitively) in `names`."""
    return rb"(?:(?!(?i:" + names + rb"):)" + _TOKEN + rb":" + _VALUE + rb"\r\n)*"


# group 1 method, 2 target, 3 the header lines (exactly one of them Host); cookies are read from these
# on the fast path
_NOT_HOST = _lines_without(_HOP_NAMES + rb"|content-length|x-forwarded-for|x-forwarded-proto|host")
_FAST_REQUEST = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1\r\n("
                           + _NOT_HOST + rb"(?i:host):" + _VALUE + rb"\r\n" + _NOT_HOST + rb")\r\n")
_COOKIES = re.compile(rb"^(?i:cookie):[ \t]*([^\r]*?)[ \t]*\r", re.M)
# group 1 status, 2 content length; the body follows the match
_NOT_CL = _lines_without(_HOP_NAMES + rb"|content-length")
# (a 5xx takes the parser's path: the connection is not kept after it, see `UpstreamConnection.failed`)
_FAST_RESPONSE = re.compile(rb"HTTP/1\.1 (?!204|304)([2-4]\d\d) " + _VALUE + rb"\r\n" + _NOT_CL
                            + rb"(?i:content-length):[ \t]*(\d{1,15})[ \t]*\r\n" + _NOT_CL + rb"\r\n")
# the same with one chunked coding and no length (`_NOT_CL` keeps any other Transfer-Encoding out)
_FAST_CHUNKED = re.compile(rb"HTTP/1\.1 (?!204|304)[2-4]\d\d " + _VALUE + rb"\r\n" + _NOT_CL
                           + rb"(?i:transfer-encoding):[ \t]*(?i:chunked)[ \t]*\r\n" + _NOT_CL + rb"\r\n")
_CHUNKED_BODY = -2  # what `fast_response_length` says of such a head
# A chunk's size line with the CRLF before it (ending the chunk before, or the head): a bare size, no
# extension. A chunk of a fast-path answer is passed on as it came once its size line matched this
_CHUNK = re.compile(rb"\r\n([0-9A-Fa-f]{1,15})\r\n")
# what a read may end in before it has all of such a line: kept until the next read completes it
_CHUNK_CUT = re.compile(rb"\r(?:\n[0-9A-Fa-f]{0,15}\r?)?")
_CHUNK_CUT_MAX = 19
# fed to the parser ahead of the rest of a fast-path chunked answer that is unusual after all (a chunk
# extension, trailers): the parser takes over at the chunk-size line it stopped at (`UpstreamConnection.resume`)
_RESUME_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

# Heads checked lately, by their exact bytes: the same heads come again and again (a browser's
# requests, a server's answers within the second of their Date), and a lookup costs a fraction of
# the match. Bounded in entries and in the size of a head remembered.
_MEMO_ENTRIES = 4096
_MEMO_HEAD_MAX = 2048
_request_heads: dict[bytes, tuple[bytes, bytes, bytes | None, bytes]] = {}
_response_heads: dict[bytes, int] = {}
# what `fast_write_request` tells of a write (see there)
WriteHead = tuple[bytes, bytes, bytes | None, bytes, bool, int, bool]
_write_heads: dict[bytes, WriteHead | bool] = {}

_affinities: dict[bytes, tuple[bytes | None]] = {}


def cookie_affinity(cookie: bytes) -> bytes | None:
    """What a request's cookies say of its session affinity: the `ctops_srv` value, else b"" for a
    learner with a session but no server yet, else None; remembered per Cookie header (a learner's
    browser sends the same one again and again; on the fast path it is the very same object, hashed once)."""
    hit = _affinities.get(cookie)
    if hit is None:
        srv = _cookie_value(cookie, AFFINITY_COOKIE)
        hit = (srv if srv is not None else b"" if SESSION_COOKIE in cookie else None,)
        if len(cookie) <= _MEMO_HEAD_MAX:
            if len(_affinities) >= _MEMO_ENTRIES:
                _affinities.clear()
            _affinities[cookie] = hit
    return hit[0]


def fast_request_head(data: bytes) -> tuple[bytes, bytes, bytes | None, bytes] | None:
    """(method, target, cookies, the head without its final CRLF) when `data` is exactly one plain
    GET or HEAD head for a learner's route, else None; remembered. Callers look in `_request_heads` first."""
    m = _FAST_REQUEST.fullmatch(data)
    if m is None or hidden_path(m.group(2)):
        return None
    cookies = _COOKIES.findall(m.group(3))
    hit = (m.group(1), m.group(2), b"; ".join(cookies) if cookies else None, data[:-2])
    if len(data) <= _MEMO_HEAD_MAX:
        if len(_request_heads) >= _MEMO_ENTRIES:
            _request_heads.clear()
        _request_heads[data] = hit
    return hit


# A write (a learner's JSON submission) whose head and whole Content-Length body came in one read:
# group 1 method, 2 target, 3 the header lines; Host, Content-Length, Idempotency-Key and cookies are
# then counted among these (`_COUNTED`)
_NOT_FRAMING = _lines_without(_HOP_NAMES + rb"|x-forwarded-for|x-forwarded-proto")
_FAST_WRITE = re.compile(rb"(POST|PUT|PATCH|DELETE) (/[!-~]*) HTTP/1\.1\r\n(" + _NOT_FRAMING + rb")\r\n")
_COUNTED = re.compile(rb"^(?i:(host|content-length|idempotency-key|cookie)):[ \t]*([^\r]*?)[ \t]*\r", re.M)


def fast_write_request(data: bytes, header_max: int) -> WriteHead | None:
    """(method, target, cookies, the head without its final CRLF, needs a key of ours, body length, opens a
    session) when `data` is exactly one plain write for a learner's route: one Host, one Content-Length
    equal to the body that follows the head to the end of `data`, no other framing; else None (the
    parser decides). What a head is, is remembered per exact head (`_write_heads`)."""
    end = data.find(b"\r\n\r\n", 0, header_max) + 4
    if end == 3:
        return None
    head = data[:end]
    hit = _write_heads.get(head)
    if hit is None:
        hit = _write_head(head)
        if end <= _MEMO_HEAD_MAX:
            if len(_write_heads) >= _MEMO_ENTRIES:
                _write_heads.clear()
            _write_heads[head] = hit
    if hit is False or hit[5] != len(data) - end:
        return None
    return hit


def _write_head(head: bytes) -> WriteHead | bool:
    """`fast_write_request`'s verdict on a head (to its blank line): its parts, or False."""
    m = _FAST_WRITE.fullmatch(head)
    if m is None:
        return False
    hosts = lengths = 0
    length = b""
    key = False
    cookies = []
    for name, value in _COUNTED.findall(m.group(3)):
        lname = name.lower()
        if lname == b"host":
            hosts += 1
        elif lname == b"content-length":
            lengths += 1
            length = value
        elif lname == b"cookie":
            cookies.append(value)
        else:
            key = True
    if hosts != 1 or lengths != 1 or not length.isdigit() or len(length) > 15 or hidden_path(m.group(2)):
        return False
    method, target = m.group(1), m.group(2)
    return (method, target, b"; ".join(cookies) if cookies else None, head[:-2],
            not key and method not in IDEMPOTENT, int(length), opens_session(method, target))


def fast_response_length(head: bytes) -> int:
    """The Content-Length of a plain answer's `head` (up to its blank line), `_CHUNKED_BODY` for a plain
    chunked one, else -1; remembered. Callers look in `_response_heads` first."""
    m = _FAST_RESPONSE.fullmatch(head)
    if m is not None:
        clen = int(m.group(2))
    else:
        clen = _CHUNKED_BODY if _FAST_CHUNKED.fullmatch(head) is not None else -1
    if len(_response_heads) >= _MEMO_ENTRIES:
        _response_heads.clear()
    _response_heads[head] = clen
    return clen


# generated keys' header lines, made many at a time from one getrandom: `_KEY_LINES` keys' worth of
# random bytes, hex-encoded and framed by one join, so that a keyless write costs one slice
_KEY_LINES = 256
_KEY_START = b"Idempotency-Key: ctops-"
_KEY_BETWEEN = b"\r\n" + _KEY_START
_KEY_LINE = len(_KEY_START) + 32 + 2
_key_lines = b""
_key_at = 0


def generated_key_line() -> bytes:
    """The header line of a fresh key for a write that came without an Idempotency-Key:
    "Idempotency-Key: ctops-" and 32 random hex digits (trainer/idempotency.py knows these by their start)."""
    global _key_lines, _key_at
    i = _key_at
    if i >= len(_key_lines):
        hexed = hexlify(os.urandom(16 * _KEY_LINES))
        _key_lines = _KEY_START + _KEY_BETWEEN.join([hexed[j:j + 32] for j in range(0, len(hexed), 32)]) + b"\r\n"
        i = 0
    _key_at = i + _KEY_LINE
    return _key_lines[i:i + _KEY_LINE]


def hidden_path(target: bytes) -> bool:
    """Whether a request target names one of the trainer's internal routes (`_HIDDEN`), however
    spelled: absolute-form, percent-encoded, with a query or trailing slashes. Most targets are let
    by on their second byte, so the parser's path pays next to nothing for it."""
    path = target
    if path[:1] == b"/":
        if path[1:2] not in _HIDDEN_SECOND:
            return False
    else:  # absolute-form ("http://host/path"), or "*"
        try:
            path = httptools.parse_url(target).path or b"/"
        except httptools.HttpParserInvalidURLError:
            return False  # the trainer parses targets the same way: it cannot route this one either
    if b"%" in path:
        path = unquote_to_bytes(path.split(b"?", 1)[0])
    return _HIDDEN.match(path) is not None


def opens_session(method: bytes, target: bytes) -> bool:
    """A request creating a session (POST /api/sessions): a draining server takes no new one."""
    return method == b"POST" and (target == AFFINITY_PATH or target.startswith(_OPENS_WITH_QUERY))


# ---------------------------------------------------------------------------------------------


class Request:
    """One client request on its way through the proxy."""

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
        # may be sent again after a server got it: idempotent, or has an Idempotency-Key (the client's or,
        # for a write without one, ours): every request the proxy forwards is, once its head is built
        self.safe = False
        self.plain = False  # keep-alive HTTP/1.1, neither HEAD nor upgrade: its answer may take the fast path
        self.affinity: bytes | None = None  # the ctops_srv cookie (b"" if none) when affinity applies
        self.route: Backend | None = None  # a fixed backend by path prefix (no balancing, no health)
        self.started = 0.0  # first dispatched (loop time)
        self.tried: list[Backend] | None = None  # servers that failed this request
        self.retried_same = False
        self.hidden = False  # a trainer-internal route: answered 404 by the proxy, never forwarded
        self.opens = False  # creates a session (see `opens_session`)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT


class ClientConnection:  # an asyncio protocol by its methods (see the module's note)
    """A learner's connection: parses requests, hands them to upstreams, writes responses back."""

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
        self.forwarded = b""  # the X-Forwarded-* lines and the head's end, for heads without X-Forwarded-For

    # -- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        self.forwarded = b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: http\r\n\r\n" % self.client_ip
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
        if self.cur is None and self.parsing is None and not self.queue and len(data) <= self.plane.header_max:
            first = data[:1]
            if first == b"G" or first == b"H":
                # the fast path: a whole plain GET/HEAD head in one read, nothing before or after it,
                # forwarded as it came plus X-Forwarded-*. (Only for these: the memo's lookup hashes
                # all of `data`, a write's body too)
                head = _request_heads.get(data) or fast_request_head(data)
                if head is not None:
                    r = self.cur = Request(self)
                    r.method = method = head[0]
                    r.safe = r.complete = True
                    r.plain = method == b"GET"
                    self._head_ready(r, head[1], head[2], head[3] + self.forwarded)
                    return
            elif first == b"P" or first == b"D":
                write = fast_write_request(data, self.plane.header_max)
                if write is not None:
                    # head and body forwarded in one write, with our key when the client gave none
                    # (the same bytes the parser's path would build, see on_headers_complete)
                    r = self.cur = Request(self)
                    r.method = write[0]
                    r.safe = r.complete = r.plain = True
                    r.has_body = write[5] > 0
                    r.opens = write[6]
                    head = write[3]
                    body = data[len(head) + 2:]
                    if write[4]:
                        out = b"".join((head, generated_key_line(), self.forwarded, body))
                    else:
                        out = b"".join((head, self.forwarded, body))
                    self._head_ready(r, write[1], write[2], out)
                    return
        self.read_len = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0]:])
            return
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Rejected):  # a refusal was answered where it was raised
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
            self._reject(431, "request header too large")
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":  # 0.9 (a request line without a version) or 2.0
            self._reject(505, "unsupported HTTP version")
        method = r.method = p.get_method()
        r.http11 = version == "1.1"
        r.keep_alive = p.should_keep_alive()
        url = self.url
        out = [method, b" ", url, b" HTTP/1.1\r\n"]
        te, upgrade, xff, clen, cookie, idem, hosts = _copy_headers(hdrs, out, True)
        if hosts > 1 or (hosts == 0 and r.http11):
            self._reject(400, "a request needs exactly one Host header")
        r.safe = True
        if not idem and method not in IDEMPOTENT:
            # a write without the client's key gets one of ours, kept in the head that is replayed, so
            # every try of it carries the same key and the trainer executes it at most once
            # (trainer/idempotency.py): a write can then go again like a read. The trainer keeps outcomes under
            # our "ctops-" keys only as long as these tries may come (its GENERATED_PREFIX, generated_key_ttl_s)
            out.append(generated_key_line())
        if te is not None:
            # the one framing a server cannot read differently from us: a single "chunked" coding on
            # HTTP/1.1 without a length. Anything else (repeated, other codings, with Content-Length,
            # on HTTP/1.0) is how requests are smuggled past a proxy
            if te.strip().lower() != b"chunked" or clen is not None or not r.http11:
                self._reject(400, "unsupported Transfer-Encoding")
            r.chunked = r.has_body = True  # the body is re-chunked as it is forwarded
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif clen is not None and clen != b"0":
            r.has_body = True
        if p.should_upgrade():
            if method == b"CONNECT" or upgrade is None:
                self._reject(405 if method == b"CONNECT" else 400, "unsupported upgrade or CONNECT")
            r.upgrade = upgrade
            r.keep_alive = False  # after an upgrade the connection is no longer HTTP
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
        r.plain = r.keep_alive and r.http11 and r.upgrade is None and method != b"HEAD"
        if xff is None:
            out.append(self.forwarded)
        else:
            out += (b"X-Forwarded-For: ", xff, b", ", self.client_ip, b"\r\nX-Forwarded-Proto: http\r\n\r\n")
        if method == b"POST":
            r.opens = opens_session(method, url)
        r.hidden = hidden_path(url)
        self._head_ready(r, url, cookie, b"".join(out))

    def _head_ready(self, r: Request, url: bytes, cookie: bytes | None, head: bytes) -> None:
        """The upstream head of `r` is built: choose where it goes (fixed route, affinity) and send it
        if it is the request being answered."""
        plane = self.plane
        routes = plane.routes
        if routes is not None:
            for prefix, backend in routes:
                if url.startswith(prefix):
                    r.route = backend
                    break
        if r.route is None:
            if cookie is not None:
                r.affinity = cookie_affinity(cookie)
            if r.affinity is None and url.startswith(AFFINITY_PATH):
                r.affinity = b""
        r.unsent = [head]
        r.unsent_size = r.replay_size = len(head)
        r.replay = [head] if r.replay_size <= plane.replay_max else None
        r.ready = True
        plane.requests += 1
        if r is self.cur:
            plane.dispatch(r, plane.now)

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
            if r.replay_size > self.plane.settings.replay_max:
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
            self.deadline = self.plane.now + self.plane.t_idle

    def _advance(self) -> None:
        """Start the next pipelined request, or wait for one."""
        if self.advancing:
            return  # a synchronous answer inside the loop below: the loop goes on
        self.advancing = True
        try:
            while self.cur is None and self.queue and not self.closed:
                r = self.cur = self.queue.popleft()
                if r.ready:
                    self.plane.dispatch(r, self.plane.time())
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
                                                http11=r.http11, retry_after=retry_after, extra=extra,
                                                head_only=r.method == b"HEAD"))
        self.response_done(r)

    def _reject(self, status: int, message: str) -> None:
        """Refuse the request whose head is being parsed, from inside a parser callback."""
        self._bad_request(status, message)
        raise _Rejected

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
            if up is not None and up.flushed:
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
        if kind == _FIRST_BYTE and self.cur is not None:  # not given up: the plane decides
            self.dkind = _UPSTREAM
            self.deadline = self.plane.time() + max(self.plane.t_read - self.plane.t_first_byte, 0.01)
            self.plane.first_byte_late(self.cur)
            return
        self.deadline = 0.0
        self.dkind = _NONE
        if kind == _UPSTREAM and self.cur is not None:
            r = self.cur
            up = r.upstream
            started = up is not None and up.flushed
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


class UpstreamConnection:  # an asyncio protocol by its methods (see the module's note)
    """A keep-alive connection to a trainer server, bound to one request at a time."""

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
        self.head_sent = False  # the response head has been parsed (and queued for the client)
        self.flushed = False  # some of the response has been written to the client
        self.hold = False  # a head waits for its first body byte: if the server dies first, nothing is lost
        self.tunnel = False
        self.until_close = False  # the response body ends when the server closes
        self.chunk_out = False
        self.interim = False
        self.discard = False  # the parser expects a body that will not come (HEAD): replace it
        self.remaining = 0  # body bytes still to pass through after a fast-path head (of the chunk, if chunked)
        self.chunks = False  # a fast-path chunked answer is being passed through (`_pass_chunks`)
        self.cut = b""  # the start of a chunk-size line that the last read cut short (not yet passed on)
        self.resume = False  # the parser is being given `_RESUME_CHUNKED`: its head is not an answer's
        # the answer is a server error: the server may be closing this connection as it sent it (an
        # exception after the answer), so it is not reused whatever its headers say
        self.failed = False
        self.fd = -1  # the socket, to look for an EOF before the connection is reused (see UpstreamPool)
        self.idle_since = 0.0

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
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()

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
        if self.until_close and self.head_sent and not self.discard and exc is None:  # the close ends the body
            if self.chunk_out:
                self.out.append(b"0\r\n\r\n")
            self._flush(client)
            self.plane.release_backend(r)
            client.response_done(r)
            return
        if not self.flushed:  # the client has seen nothing: the request may still go elsewhere
            self.out.clear()
            self.plane.upstream_lost(r, self, exc)
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
        if not self.got_bytes:
            self.got_bytes = True  # the server is alive: no first-byte deadline; replay kept until flushed
            client.dkind = _UPSTREAM
            if r.plain and not client.read_eof and self._fast_response(client, r, data):
                return
        client.deadline = self.plane.time() + self.plane.t_read
        if self.chunks:
            cut = self.cut
            rest = self._pass_chunks(client, r, cut + data, 0, min(len(cut), 2)) if cut else \
                self._pass_chunks(client, r, data, 0, 0)
            if rest is None:
                return
            data = rest
        elif self.remaining:
            self._pass_body(client, r, data)
            return
        self._parse(client, data)

    def _parse(self, client: ClientConnection, data: bytes) -> None:
        """The parser's path: `data` goes through httptools, answer bytes reach the client once per read."""
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
        if self.out and not self.hold and self.client is not None:
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
        if self.resume:  # the fast path's head was passed on already: the chunks that follow are re-chunked
            self.resume = False
            self.hdrs = None
            self.chunk_out = True
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
        self.failed = status >= 500
        out = [_status_line(status, self.reason)]
        te, upgrade, _, clen, _, _, _ = _copy_headers(hdrs, out, False)
        aff = r.affinity
        if aff is not None and aff != self.backend.cookie:  # the session sticks to the server that answers
            out.append(self.backend.set_cookie)
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
            self._complete(r, p.should_keep_alive() and not self.failed)
        elif not self.tunnel:
            self.hold = True

    def on_body(self, body: bytes) -> None:
        if self.discard or self.interim:
            return
        self.hold = False
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
        self._complete(r, self.parser.should_keep_alive() and not self.failed)

    # -- the fast path ---------------------------------------------------------------------------

    def _fast_response(self, client: ClientConnection, r: Request, data: bytes) -> bool:
        """The first read of an answer to a `plain` request, holding a plain head with Content-Length (or
        chunked) and at least the start of its body (or all of an empty one): passed on as it came. False
        (nothing done) when it needs the parser's path."""
        end = data.find(b"\r\n\r\n", 0, _MEMO_HEAD_MAX) + 4
        if end == 3:
            return False
        head = data[:end]
        clen = _response_heads.get(head)
        if clen is None:
            clen = fast_response_length(head)
        body = len(data) - end
        if clen < 0:
            if clen != _CHUNKED_BODY or body == 0:
                return False  # a head alone waits in the parser's path until its body starts (see `hold`)
        elif body > clen or (body == 0 and clen):
            return False
        aff = r.affinity
        if aff is not None and aff != self.backend.cookie:
            cookie = self.backend.set_cookie
            data = b"".join((data[:end - 2], cookie, data[end - 2:]))
            end += len(cookie)
        self.flushed = self.head_sent = True
        if clen == _CHUNKED_BODY:
            self.chunks = True
            rest = self._pass_chunks(client, r, data, end - 2, 0)  # from the CRLF before the first size line
            if rest is not None:
                self._parse(client, rest)
            return True
        if not client.closed:
            client.transport.write(data)
        if body < clen:
            self.remaining = clen - body
            client.deadline = self.plane.time() + self.plane.t_read
        else:
            self._complete(r, True)
        return True

    def _pass_body(self, client: ClientConnection, r: Request, data: bytes) -> None:
        """More of a fast-path answer's body."""
        rem = self.remaining
        extra = len(data) > rem  # more than it announced: the rest cannot be trusted as a next answer
        if extra:
            data = data[:rem]
        if not client.closed:
            client.transport.write(data)
        self.remaining = rem - len(data)
        if not self.remaining:
            self._complete(r, not extra)

    def _pass_chunks(self, client: ClientConnection, r: Request, buf: bytes, pos: int, sent: int) -> bytes | None:
        """More of a fast-path chunked answer, `buf` from `pos` on (`buf`: a size line the read before cut
        short, its first `sent` bytes passed on already, then this read). Chunks whose size line is bare
        hex pass on as they came, up to the last one; None once all of `buf` is dealt with. Anything
        else is the parser's to judge from the size line it is found at: it gets `_RESUME_CHUNKED` and
        the rest, which are returned for it (a chunk extension, trailers: the parser re-chunks without
        them, as it does every answer it relays; a malformed line: a broken answer). The CRLF closing a
        chunk's data is the proxy's own to check: the parser, started after it, cannot."""
        n = len(buf)
        rem = self.remaining
        cut = False
        while True:
            if rem:
                if n - pos <= rem:
                    rem -= n - pos
                    pos = n
                    break
                pos += rem
                rem = 0
            m = _CHUNK.match(buf, pos)
            if m is None:
                if pos == n:
                    break
                if n - pos < _CHUNK_CUT_MAX and _CHUNK_CUT.fullmatch(buf, pos) is not None:
                    cut = True
                    break
                if buf.startswith(b"\r\n", pos):
                    return self._resume_parser(client, buf, pos + 2, sent)
                self.remaining = 0
                self.chunks = False
                if not client.closed and pos > sent:
                    client.transport.write(buf[sent:pos])
                self._broken("invalid response from trainer server")
                return None
            size = int(m.group(1), 16)
            if size:
                rem = size
                pos = m.end()
                continue
            end = m.end()  # the last chunk: the answer ends at the next CRLF unless trailers follow
            if buf.startswith(b"\r\n", end):
                self.chunks = False
                self.cut = b""
                self.remaining = 0
                if not client.closed:
                    client.transport.write(buf if end + 2 == n and not sent else buf[sent:end + 2])
                # more than the answer: the rest cannot be trusted as a next answer, the connection goes
                self._complete(r, end + 2 == n)
                return None
            if n - end < 2 and buf.startswith(b"\r"[:n - end], end):
                cut = True
                break
            return self._resume_parser(client, buf, pos + 2, sent)
        self.remaining = rem
        if cut:
            # kept from the CRLF before the size line; that CRLF, ending a chunk (or the head), goes on now
            # so that a stream's chunk reaches the client whole before the next one exists
            self.cut = buf[pos:]
            pos = min(pos + 2, n)
        else:
            if self.cut:
                self.cut = b""
            pos = n
        if pos > sent and not client.closed:
            client.transport.write(buf if pos == n and not sent else buf[sent:pos])
        return None

    def _resume_parser(self, client: ClientConnection, buf: bytes, line: int, sent: int) -> bytes:
        """Pass on `buf` up to the chunk-size line at `line`; the parser relays the rest."""
        self.chunks = False
        self.cut = b""
        self.remaining = 0
        self.resume = True
        if not client.closed and line > sent:
            client.transport.write(buf[sent:line])
        return _RESUME_CHUNKED + buf[line:]

    # -- helpers -------------------------------------------------------------------------------

    def _flush(self, client: ClientConnection) -> None:
        out = self.out
        if out:
            self.flushed = True
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
            if not self.plane.upstreams.release(self, self.plane.now):
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
        flushed = self.flushed
        if flushed:
            self._flush(client)
        r.upstream = None
        self.unbind()
        self.plane.release_backend(r)
        if flushed:
            client.abort()
        else:
            client.respond_error(r, 502, message)


# ---------------------------------------------------------------------------------------------


class DataPlane:
    """The proxy's shared state: the server pool, idle upstream connections, open client connections."""

    def __init__(self, pool: ServerPool, settings: ProxySettings,
                 routes: dict[bytes, Backend] | None = None) -> None:
        self.pool = pool
        self.settings = settings
        # path prefix -> fixed backend, longest prefix first
        self.routes = sorted(routes.items(), key=lambda kv: -len(kv[0])) if routes else None
        self.upstreams = UpstreamPool(settings.pool_size)
        self.conns: set[ClientConnection] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task] = set()
        self._probing: dict[Backend, asyncio.Task] = {}
        # counters (see `counters`)
        self.requests = 0
        self.responses = 0
        self.retries = 0  # tries sent again to the same server
        self.redispatches = 0  # tries moved to another server
        self.first_byte_timeouts = 0
        self.probes_failed = 0
        self.errors: dict[int, int] = {}  # status -> count of answers the proxy gave itself
        self.failures: dict[str, int] = {}  # why: no_server, retries_exhausted, unsafe_not_retried, ...
        # flattened for the per-request path
        self.time = time.monotonic
        # the time as of the last sweep: deadlines are only checked then, so the per-request path reads
        # this instead of the clock (a deadline may fall due up to one sweep early)
        self.now = 0.0
        self.t_header = settings.client_header_timeout
        self.t_idle = settings.client_idle_timeout
        self.t_read = settings.upstream_read_timeout
        self.t_first_byte = settings.first_byte_timeout
        self.replay_max = settings.replay_max
        self.header_max = settings.header_max_bytes
        pool.slow_start = settings.slow_start
        if settings.affinity_key:
            pool.set_affinity_key(settings.affinity_key)
        else:
            pool.set_affinity_key(os.urandom(32))
            log.warning("no affinity key configured ([proxy] affinity_key_env): a random one for this process, "
                        "so a session sticks to its server only while this dispatcher serves it")
        pool.listeners.append(self._on_state_change)

    def counters(self) -> dict:
        """Monotonic counters since start, for the ops API and `ctops status`."""
        return {"requests": self.requests, "responses": self.responses, "retries": self.retries,
                "redispatches": self.redispatches, "first_byte_timeouts": self.first_byte_timeouts,
                "probes_failed": self.probes_failed, "client_connections": len(self.conns),
                "errors_by_status": {str(k): v for k, v in sorted(self.errors.items())},
                "errors_by_kind": dict(self.failures)}

    async def start(self, host: str, port: int) -> asyncio.AbstractServer:
        self.loop = asyncio.get_running_loop()
        self.time = self.loop.time
        self.now = self.time()
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
        for task in [*self._connecting, *self._probing.values()]:
            task.cancel()
        if self._on_state_change in self.pool.listeners:
            self.pool.listeners.remove(self._on_state_change)
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)

    async def _sweep(self) -> None:
        s = self.settings
        shortest = min(s.client_header_timeout, s.client_idle_timeout, s.upstream_read_timeout)
        if s.first_byte_timeout:
            shortest = min(shortest, s.first_byte_timeout)
        tick = min(max(shortest / 5, 0.02), 0.5)
        while self.server is None or self.server.is_serving() or self.conns:
            await asyncio.sleep(tick)
            now = self.now = self.loop.time()
            for conn in [c for c in self.conns if 0.0 < c.deadline <= now]:
                try:
                    conn.on_timeout()
                except Exception:
                    log.exception("data plane: error while timing out a connection")
                    conn.close()

    # -- routing ---------------------------------------------------------------------------------

    def choose_backend(self, r: Request) -> Backend | None:
        """Where a request goes: the server its session sticks to while that one is `up` (even when
        draining, except for a request opening a new session), else the least loaded server taking new
        work; never one that failed it already. The cookie is found only when its signature is ours
        (`ServerPool.by_cookie`): a forged or unsigned one is no cookie at all."""
        tried = r.tried
        aff = r.affinity
        if aff:
            b = self.pool.by_cookie.get(aff)
            if (b is not None and b.health == "up" and b.weight > 0
                    and (b.admin == "enabled" or (b.admin == "draining" and not r.opens))
                    and (tried is None or b not in tried)):
                return b
        # none up: rather a server that failed one check (likely slow, not dead) than a 503
        return self.pool.pick(exclude=tried) or self.pool.pick(exclude=tried, suspect_ok=True)

    # -- forwarding --------------------------------------------------------------------------------

    def dispatch(self, r: Request, now: float) -> None:
        r.started = now
        if r.hidden:
            r.conn.respond_error(r, 404, "not found")
            return
        if r.route is not None:
            self._forward(r, r.route, False, now)
            return
        b = self.choose_backend(r) if r.affinity else (self.pool.pick() or self.choose_backend(r))
        if b is None:
            self._give_up(r, "no healthy trainer server", "no_server")
            return
        self._forward(r, b, False, now)

    def _give_up(self, r: Request, message: str, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        r.conn.respond_error(r, 503, message, retry_after=1, extra={"retry_after_s": 1, "tries": r.tries})

    def _forward(self, r: Request, b: Backend, fresh: bool = False, now: float = 0.0) -> None:
        """Send `r` to `b` on an idle connection, else a new one (`fresh`: a new one in any case). The
        client's deadline: the first byte of an answer for a safe request, else the whole upstream
        read timeout, set when the request is first dispatched."""
        r.backend = b
        b.outstanding += 1
        conn = r.conn
        if r is conn.cur:
            if self.t_first_byte and r.safe and r.route is None:
                conn.dkind = _FIRST_BYTE
                conn.deadline = (now or self.time()) + self.t_first_byte
            elif not fresh:
                conn.dkind = _UPSTREAM
                conn.deadline = now + self.t_read
        if not fresh:
            up = self.upstreams.acquire(b, now)
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
        if r.aborted or r.answered or r.conn.closed or r.backend is not b:
            self.upstream_idle(up)  # nobody waits for it (or the request moved on), but it is a good connection
            return
        self._attach(r, up)

    def _attach(self, r: Request, up: UpstreamConnection) -> None:
        """Bind `up` to `r` and send what `r` has for it."""
        r.upstream = up
        conn = up.client = r.conn
        up.req = r
        up.got_bytes = up.head_sent = up.until_close = up.chunk_out = up.flushed = up.hold = up.failed = False
        up.remaining = 0
        up.chunks = up.resume = False
        up.cut = b""
        if conn.write_paused:
            up.pause_reading()
        unsent = r.unsent
        r.unsent = None
        r.unsent_size = 0
        # before writing: the write may report a full buffer at once, which must stay reported
        if conn.block & _BACKPRESSURE:
            conn._resume(_BACKPRESSURE)
        if unsent:
            if len(unsent) == 1:
                up.transport.write(unsent[0])  # type: ignore[union-attr]
            else:
                up.transport.writelines(unsent)  # type: ignore[union-attr]

    def _unreachable(self, r: Request, b: Backend, reason: str) -> None:
        """Nothing reached `b` (refused, connect timeout): it leaves rotation, the request moves on."""
        if r.route is None:
            self.pool.report_failure(b, reason)
        if r.backend is not b:
            return  # the request had already moved on (evacuated) while this connect was pending
        self.release_backend(r)
        self._failed_try(r, b, reason, sent=False)

    def upstream_lost(self, r: Request, up: UpstreamConnection, exc: Exception | None) -> None:
        """The connection closed after the request was (partly) sent, before any response byte."""
        b = r.backend
        self.release_backend(r)
        if b is None:
            return
        if not up.reused and r.route is None and r.retried_same:
            # a fresh connection dropped again: the server is in trouble (once may be a restart's race)
            self.pool.report_failure(b, "connection reset" if exc is not None else "closed before responding")
        self._failed_try(r, b, "closed the connection before responding", sent=True)

    def _failed_try(self, r: Request, b: Backend, reason: str, sent: bool) -> None:
        """A try failed before any byte of an answer. Retry `b` once if it is still believed healthy,
        else (or when that fails too) another healthy server, within the tries and time allowed.
        A request `sent` may have been acted on: it goes again only when safe and kept for replay."""
        if r.aborted or r.answered or r.conn.closed:
            return
        r.tries += 1
        if sent:
            if not r.safe or r.replay is None:
                self.failures["unsafe_not_retried"] = self.failures.get("unsafe_not_retried", 0) + 1
                r.conn.respond_error(r, 502, f"trainer server {reason}")
                return
            r.unsent = list(r.replay)
            r.unsent_size = r.replay_size
        if r.tries >= self.settings.retry_max_tries or self.time() - r.started > self.settings.retry_total:
            self._give_up(r, f"trainer server {reason}; no more tries", "retries_exhausted")
            return
        if r.route is not None:
            target: Backend | None = r.route if not r.retried_same else None
            r.retried_same = True
        elif not r.retried_same and b.health == "up" and b.admin != "disabled":
            r.retried_same = True
            target = b
        else:
            if r.tried is None:
                r.tried = [b]
            elif b not in r.tried:
                r.tried.append(b)
            target = self.choose_backend(r)
        if target is None:
            self._give_up(r, f"trainer server {reason}; no other healthy server", "no_server")
            return
        if target is b:
            self.retries += 1
        else:
            self.redispatches += 1
        self._forward(r, target, fresh=True)

    # -- hung servers: first-byte deadline, probe, evacuation ---------------------------------------

    def first_byte_late(self, r: Request) -> None:
        """A safe request has waited `first_byte_timeout` for an answer. If its server is out of
        rotation meanwhile, the request moves on now; else the server is probed, and a failed probe
        moves every safe request waiting there."""
        b = r.backend
        if b is None or r.route is not None or r.answered or r.aborted:
            return
        up = r.upstream
        if up is not None and up.got_bytes:
            return
        self.first_byte_timeouts += 1
        if b.health != "up":
            self._evacuate(b, "stopped answering")
        else:
            self._probe(b)

    def _probe(self, b: Backend) -> None:
        if b in self._probing:
            return
        task = self.loop.create_task(check_once(b, self.settings.probe_timeout))
        self._probing[b] = task
        task.add_done_callback(partial(self._probed, b))

    def _probed(self, b: Backend, task: asyncio.Task) -> None:
        self._probing.pop(b, None)
        if task.cancelled():
            return
        res = task.exception() or task.result()
        if isinstance(res, BaseException) or not res.ok:
            self.probes_failed += 1
            self.pool.report_slow(b, getattr(res, "error", None) or "probe failed")
            self._evacuate(b, "stopped answering")

    def _on_state_change(self, b: Backend, old: str, new: str, reason: str) -> None:
        if b.health != "up" and self.conns:
            self._evacuate(b, f"is {b.health}")

    def _evacuate(self, b: Backend, reason: str) -> None:
        """Move the safe requests waiting on `b` for an answer's first byte to other servers."""
        for conn in list(self.conns):
            r = conn.cur
            if r is None or r.backend is not b or r.route is not None or r.answered or r.aborted:
                continue
            up = r.upstream
            if up is not None and up.got_bytes:
                continue
            if not r.complete or not r.safe or r.replay is None:
                continue  # may be acted on and cannot be replayed: it waits for its answer
            if self.pool.pick(exclude=[b, *(r.tried or ())], suspect_ok=True) is None:
                continue  # nowhere better to go: it keeps waiting here, in case the server answers
            if up is not None:
                r.upstream = None
                up.req = up.client = None
                up.out.clear()
                if up.transport is not None:
                    up.transport.close()
            self.release_backend(r)
            r.retried_same = True  # not `b` again
            conn.dkind = _UPSTREAM
            conn.deadline = self.time() + self.t_read
            self._failed_try(r, b, reason, sent=up is not None)

    def upstream_idle(self, up: UpstreamConnection) -> None:
        up.unbind()
        up.reused = True
        if up.transport is None or up.transport.is_closing() or not self.upstreams.release(up, self.now):
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


async def start_data_plane(pool: ServerPool, host: str, port: int, settings: ProxySettings,
                           routes: dict[bytes, Backend] | None = None) -> asyncio.AbstractServer:
    """Listen on host:port and proxy every request to a server from `pool`, or, when its path starts
    with a prefix in `routes`, to that fixed backend (for tools that need only the server; the
    dispatcher builds its `DataPlane` itself and keeps it)."""
    plane = DataPlane(pool, settings, routes)
    return await plane.start(host, port)

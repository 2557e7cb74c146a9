"""Heartbeat ingest: the agents' heartbeats, thousands a second, into Redis at a small cost each.

Two parts:
- `HeartbeatWriter` coalesces the heartbeats that arrive while a write is under way into one pipelined
  batch (one compare-and-set script per heartbeat, `dispatcher.store`), and answers each heartbeat only
  once its batch is written: an acknowledged heartbeat is stored. A host's process list is written
  when it changed (a process started, stopped, restarted, moved to another state) and otherwise at
  most every `PROCESS_REFRESH_MS`, for the per-process CPU and memory figures.
- `HeartbeatFront`, an ASGI middleware in front of the ops API's routes, takes the valid heartbeats
  (decoded with msgspec, a known agent token for the host named) without going through FastAPI's
  routing and dependency machinery, which cost more than the rest of a heartbeat together. Anything
  else (no or a wrong token, a body that does not decode, an unknown host) goes on to the FastAPI
  route, which refuses it in the API's error shape and counts it, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import xxhash
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from ctops.asgi_limits import replay_body, send_json
from ctops.auth import TokenBook
from ctops.clock import now_ms
from ctops.opsapi import error_body
from ctops.wire import FAST_ENCODER, HEARTBEAT_DECODER, AgentEvent, FastHeartbeat, FastProcessMetrics
from dispatcher.events import EventLog
from dispatcher.store import HeartbeatWrite, Store

log = logging.getLogger("ctops.dispatcher.ingest")

PATH = "/api/v1/heartbeat"
# a batch starts at most this often: under load each one carries more heartbeats, fewer round trips
BATCH_SPACING_S = 0.01
BATCH_MAX = 1000
# the per-process figures (CPU, memory, check latency) are rewritten at least this often
PROCESS_REFRESH_MS = 10_000


def process_key(processes: list[FastProcessMetrics]) -> str:
    """What makes a process list different to staff: names, states, pids, restarts, exits, spares;
    not the figures that move every second."""
    h = xxhash.xxh64()
    for p in processes:
        h.update(FAST_ENCODER.encode((p.name, p.state, p.pid, p.restarts, p.last_exit, p.spare)))
    return h.hexdigest()


@dataclass
class _Pending:
    write: HeartbeatWrite
    done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class HeartbeatWriter:
    """Batches heartbeat writes; `submit` returns once the heartbeat is in Redis (or raises)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # host -> (process key last written by this dispatcher, when)
        self._procs: dict[str, tuple[str, int]] = {}
        self.batches = 0
        self.written = 0

    def _write_of(self, hb: FastHeartbeat, received_ms: int) -> HeartbeatWrite:
        key = process_key(hb.processes)
        last = self._procs.get(hb.host)
        fresh = last is not None and last[0] == key and received_ms - last[1] < PROCESS_REFRESH_MS
        core = FAST_ENCODER.encode(msgspec.structs.replace(hb, processes=[], events=[]))
        return HeartbeatWrite(hb.host, core, received_ms, key, None if fresh else FAST_ENCODER.encode(hb.processes))

    async def submit(self, hb: FastHeartbeat) -> bool:
        """Store `hb`; False if a later heartbeat of its host is stored already (this one is kept out)."""
        received = now_ms()
        item = _Pending(self._write_of(hb, received))
        self._pending.append(item)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat-writer")
        result = await item.done
        return result != 0

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = time.monotonic()
            while self._pending:
                batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
                await self._write(batch)
            # the next batch gathers what arrives meanwhile
            await asyncio.sleep(max(0.0, BATCH_SPACING_S - (time.monotonic() - started)))

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            results = await self.store.save_heartbeats([p.write for p in batch])
        except BaseException as exc:
            # every waiting request gets an answer; a store error is a 503 to each, anything else a 500
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(exc if isinstance(exc, Exception) else RedisError("writer stopped"))
            if isinstance(exc, RedisError | OSError):
                return
            raise
        self.batches += 1
        self.written += len(batch)
        for p, r in zip(batch, results, strict=True):
            w = p.write
            if r == 1 and w.processes is not None:
                self._procs[w.host] = (w.process_key, w.received_ms)
            elif r == 2:
                # the stored list is another dispatcher's (the agent moved): the next beat writes ours
                self._procs.pop(w.host, None)
            if not p.done.done():
                p.done.set_result(r)


def agent_events(hb: FastHeartbeat) -> list[AgentEvent]:
    return [AgentEvent.model_construct(**msgspec.structs.asdict(e)) for e in hb.events]


class HeartbeatFront:
    """ASGI middleware: valid heartbeats from their host's agent are taken here; all else goes on."""

    def __init__(self, app: ASGIApp, *, tokens: TokenBook, known_hosts: frozenset[str], writer: HeartbeatWriter,
                 events: EventLog, ack: Callable[[], bytes]) -> None:
        self.app, self.tokens, self.known_hosts = app, tokens, known_hosts
        self.writer, self.events, self.ack = writer, events, ack
        self.taken = 0
        self.passed_on = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        hb = self._accepted(scope, body)
        if hb is None:
            self.passed_on += 1
            await self.app(scope, replay_body(body, receive), send)
            return
        self.taken += 1
        try:
            await self.writer.submit(hb)
            if hb.events:
                await self.events.ingest_agent_events(hb.host, agent_events(hb))
        except (RedisError, OSError) as exc:
            log.warning("Redis error while storing a heartbeat: %s", exc)
            await send_json(send, 503, FAST_ENCODER.encode(error_body("shared state (Redis) unavailable")),
                          [(b"retry-after", b"1")])
            return
        await send_json(send, 200, self.ack())

    def _accepted(self, scope: Scope, body: bytes) -> FastHeartbeat | None:
        """The heartbeat, if it is valid and its sender's token speaks for its host; else None."""
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, cred = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    token = cred.strip()
                break
        who = self.tokens.lookup(token) if token else None
        if who is None or not who.may("agent"):
            return None
        try:
            hb = HEARTBEAT_DECODER.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return None
        if not who.speaks_for_host(hb.host) or hb.host not in self.known_hosts:
            return None
        return hb

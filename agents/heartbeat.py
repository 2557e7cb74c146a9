"""Sends the host's heartbeat to the first dispatcher in the agent's list that answers.

Events (restarts, crash loops) ride on heartbeats and stay queued until a dispatcher acknowledges
the heartbeat that carried them; the dispatcher deduplicates them by id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Sequence

from agents.http import HttpClient, HttpError
from agents.metrics import ProcessSampler, host_metrics
from agents.supervisor import Supervisor
from ctops.clock import now_ms
from ctops.failover import Failover, TryNext, Unreachable
from ctops.wire import AgentEvent, Heartbeat, HeartbeatAck, ProcessMetrics

log = logging.getLogger("ctops.agent.heartbeat")
OUTBOX_MAX = 1000
EVENTS_PER_HEARTBEAT = 100
# when a dispatcher fails, the move to the next one waits up to this share of the interval: a leader's
# death is seen by every agent at nearly the same moment, and the new leader should not get them all at once
MOVE_JITTER = 0.25


class Backoff:
    """When to send the next heartbeat, and how long to wait before moving to another dispatcher.

    After rounds in which no dispatcher answered, the wait grows exponentially, but never past half of
    `lost_after` (the dispatchers' heartbeat timeout): a dispatcher that comes back must hear from the
    host well before it would call it lost. Each wait is jittered downwards only, so a bound is a bound.
    """

    def __init__(self, interval: float, lost_after: float, rng: random.Random | None = None) -> None:
        self.interval, self.lost_after = interval, lost_after
        self.rng = rng or random.Random()
        self.failures = 0  # rounds in a row in which no dispatcher answered

    @property
    def cap(self) -> float:
        return max(self.interval, self.lost_after / 2)

    def move_delay(self) -> float:
        return self.rng.uniform(0.0, MOVE_JITTER * self.interval)

    def next_wait(self, delivered: bool) -> float:
        """Seconds from the start of this round to the next one."""
        if delivered:
            self.failures = 0
            return self.interval
        self.failures += 1
        base = min(self.cap, self.interval * 2 ** min(self.failures - 1, 30))
        return base - self.rng.uniform(0.0, MOVE_JITTER * base)


class HeartbeatSender:
    def __init__(self, host: str, urls: Sequence[str], token: str, interval: float, disk_path: str = "/",
                 lost_after: float | None = None) -> None:
        self.host = host
        # a heartbeat is safe to send again (its events are deduplicated by id), so any failure moves on
        self.failover = Failover(urls)
        # the dispatchers' default heartbeat timeout is three intervals
        self.backoff = Backoff(interval, lost_after if lost_after is not None else 3 * interval)
        self.urls = self.failover.urls
        self.interval, self.disk_path = interval, disk_path
        self.supervisor: Supervisor | None = None
        self.seq = 0
        self.sampler = ProcessSampler()
        self.outbox: deque[AgentEvent] = deque()
        self.dropped_events = 0
        self.client = HttpClient(token, timeout=max(0.2, min(interval, 2.0)))
        self._last_ack = b""

    def add_event(self, event: AgentEvent) -> None:
        """Called from the watchdog's threads; deque appends are thread-safe."""
        if len(self.outbox) >= OUTBOX_MAX:
            self.outbox.popleft()
            self.dropped_events += 1
        self.outbox.append(event)

    def build(self) -> Heartbeat:
        procs: list[ProcessMetrics] = []
        watchdog = None
        if self.supervisor is not None:
            raw, watchdog = self.supervisor.snapshot()
            for p in raw:
                cpu, rss = self.sampler.sample(p["pid"])
                procs.append(ProcessMetrics(cpu_percent=cpu, rss_bytes=rss, **p))
            self.sampler.forget_others({p["pid"] for p in raw if p["pid"]})
        self.seq += 1
        return Heartbeat(host=self.host, seq=self.seq, sent_at_ms=now_ms(),
                         metrics=host_metrics(self.disk_path), processes=procs, watchdog=watchdog,
                         events=list(self.outbox)[:EVENTS_PER_HEARTBEAT])

    @property
    def current(self) -> int:
        """Index of the dispatcher that answered last (the command poller goes there too)."""
        return self.failover.current

    def encode(self, hb: Heartbeat) -> bytes:
        return hb.model_dump_json().encode()

    async def send(self, hb: Heartbeat) -> bool:
        body = self.encode(hb)

        tries = 0

        async def post(url: str) -> bytes:
            nonlocal tries
            tries += 1
            if tries > 1:
                await asyncio.sleep(self.backoff.move_delay())
            try:
                status, reply = await self.client.request("POST", f"{url}/api/v1/heartbeat", body)
            except HttpError as exc:
                log.debug("heartbeat to %s failed: %s", url, exc)
                raise TryNext(str(exc)) from None
            if status != 200:
                log.warning("heartbeat to %s refused: %s %s", url, status, reply[:200].decode(errors="replace"))
                raise TryNext(f"refused: {status}")
            return reply

        before = self.failover.current
        try:
            reply = await self.failover.call(post, safe=True)
        except Unreachable:
            return False
        if self.failover.current != before:
            log.info("heartbeats now go to %s", self.failover.current_url)
        self._follow_leader(reply)
        sent = {e.id for e in hb.events}
        while self.outbox and self.outbox[0].id in sent:
            self.outbox.popleft()
        return True

    def _follow_leader(self, reply: bytes) -> None:
        """Traffic follows the leader: the next heartbeat goes to the dispatcher that leads."""
        if reply == self._last_ack:
            return  # the same answer as last time (the usual case): nothing new to follow
        self._last_ack = reply
        try:
            leader_url = HeartbeatAck.model_validate_json(reply).leader_ops_url
        except ValueError:
            return
        if self.failover.follow(leader_url):
            log.info("following the leader to %s", leader_url)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if self.supervisor is not None:
                self.supervisor.loop_beat = time.monotonic()
            delivered = await self.send(self.build())
            if not delivered:
                log.warning("no dispatcher took heartbeat %d", self.seq)
            await asyncio.sleep(max(0.0, self.backoff.next_wait(delivered) - (loop.time() - started)))

    async def aclose(self) -> None:
        await self.client.aclose()

"""Mutual heartbeat between dispatchers over their ops ports.

The lease in Redis decides who leads; the direct heartbeat lets each dispatcher (and staff) see
its peers without Redis. A leader that hears a peer claim a newer epoch re-reads the lease at once
instead of waiting for its next renewal, and steps down only if the lease really moved on: a
heartbeat alone can never make a leader let go.

The heartbeat carries its own credential: a token with role "peer", read from the environment
variable each dispatcher names in `peer_token_env`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from ctops.config import DispatcherSpec
from ctops.wire import PeerHeartbeat

log = logging.getLogger("ctops.dispatcher.peers")


class Peers:
    def __init__(self, me: str, peers: list[DispatcherSpec], token: str | None, interval: float,
                 my_view: Callable[[], PeerHeartbeat], on_newer_leader: Callable[[str, int], None],
                 token_env: str = "CTOPS_PEER_TOKEN") -> None:
        self.me, self.peers, self.interval = me, [p for p in peers if p.name != me], interval
        self.my_view, self.on_newer_leader = my_view, on_newer_leader
        self.heard: dict[str, float] = {}  # peer name -> monotonic time it was last heard from
        self.views: dict[str, PeerHeartbeat] = {}
        self.token, self.token_env = token, token_env
        self._complained: dict[str, float] = {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(max(0.2, interval * 2)),
                                        headers={"Authorization": f"Bearer {token}"} if token else {})

    def received(self, hb: PeerHeartbeat) -> PeerHeartbeat:
        """A peer's heartbeat arrived on our ops port; the answer is ours."""
        self.heard[hb.name] = time.monotonic()
        self.views[hb.name] = hb
        mine = self.my_view()
        if hb.role == "leader" and mine.role == "leader" and hb.epoch > mine.epoch:
            self.on_newer_leader(hb.name, hb.epoch)
        return mine

    def age_ms(self) -> int | None:
        """How long since the most recent direct word from any peer."""
        if not self.heard:
            return None
        return int((time.monotonic() - max(self.heard.values())) * 1000)

    async def _beat(self, peer: DispatcherSpec) -> None:
        try:
            r = await self.client.post(f"{peer.ops_url}/api/v1/peer/heartbeat",
                                       content=self.my_view().model_dump_json(),
                                       headers={"Content-Type": "application/json"})
        except httpx.HTTPError:
            return
        if r.status_code == 200:
            self.received(PeerHeartbeat.model_validate_json(r.content))
        elif r.status_code in (401, 403):
            # at most once a minute: a wrong credential must not flood the log at the heartbeat rate
            now = time.monotonic()
            if now - self._complained.get(peer.name, -1e9) > 60:
                self._complained[peer.name] = now
                log.warning("peer %s refused our heartbeat: %s %s", peer.name, r.status_code, r.text[:200])

    async def run(self) -> None:
        if not self.peers:
            return
        if not self.token:
            log.warning("%s is not set (a token with role \"peer\"): no direct heartbeat with peers", self.token_env)
            return
        while True:
            await asyncio.gather(*(self._beat(p) for p in self.peers))
            await asyncio.sleep(self.interval)

    async def aclose(self) -> None:
        await self.client.aclose()

"""Sends the host's heartbeat to the first dispatcher in the agent's list that answers."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from agents.metrics import ProcessSampler, host_metrics
from agents.supervisor import Supervisor
from ctops.wire import Heartbeat, ProcessMetrics

log = logging.getLogger("ctops.agent.heartbeat")


class HeartbeatSender:
    def __init__(self, host: str, urls: list[str], token: str, supervisor: Supervisor,
                 interval: float, disk_path: str = "/") -> None:
        self.host, self.urls, self.supervisor = host, urls, supervisor
        self.interval, self.disk_path = interval, disk_path
        self.seq = 0
        self.current = 0  # index of the dispatcher that answered last
        self.sampler = ProcessSampler()
        self.client = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                        timeout=httpx.Timeout(max(0.2, min(interval, 2.0))))

    def build(self) -> Heartbeat:
        procs = []
        for item in self.supervisor.items:
            cpu, rss = self.sampler.sample(item.pid)
            procs.append(ProcessMetrics(name=item.spec.name, state=item.state, pid=item.pid,
                                        restarts=item.restarts, cpu_percent=cpu, rss_bytes=rss,
                                        last_exit=item.last_exit))
        self.sampler.forget_others({i.pid for i in self.supervisor.items if i.pid})
        self.seq += 1
        return Heartbeat(host=self.host, seq=self.seq, sent_at_ms=int(time.time() * 1000),
                         metrics=host_metrics(self.disk_path), processes=procs)

    async def send(self, hb: Heartbeat) -> bool:
        body = hb.model_dump_json()
        # start from the dispatcher that answered last, then try the others in order
        for i in range(len(self.urls)):
            idx = (self.current + i) % len(self.urls)
            url = self.urls[idx]
            try:
                r = await self.client.post(f"{url}/api/v1/heartbeat", content=body,
                                           headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                log.debug("heartbeat to %s failed: %s", url, exc)
                continue
            if r.status_code == 200:
                if idx != self.current:
                    log.info("heartbeats now go to %s", url)
                self.current = idx
                return True
            log.warning("heartbeat to %s refused: %s %s", url, r.status_code, r.text[:200])
        return False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            ok = await self.send(self.build())
            if not ok:
                log.warning("no dispatcher took heartbeat %d", self.seq)
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def aclose(self) -> None:
        await self.client.aclose()

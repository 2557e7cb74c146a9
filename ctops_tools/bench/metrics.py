"""`ctops bench metrics`: what `GET /metrics` costs at 200 servers and 2,000 hosts, and whether a
scrape every second shows in the data plane's latency.

One dispatcher in front of 200 servers (one real trainer, 199 names for a fast "hello" backend,
all health-checked), 2,000 simulated hosts whose heartbeats (three supervised processes each) went
through the real ingest route once, and the two fake LLM providers. Measured, side by side:

- a scrape: wall time at the client (p50/p99/max of back-to-back scrapes), the dispatcher's CPU per
  scrape, the body's size and its number of series (target: under 20 ms);
- the data plane under `wrk` (closed loop, keep-alive), in alternating rounds without scrapes and
  with one scrape a second: p50/p99 and throughput (target: no measurable difference).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ctops.auth import new_token
from ctops_tools.bench.heartbeats import SimAgent, cpu_seconds, pct, sim_hosts, sim_toml
from ctops_tools.bench.proxy import parse_wrk
from ctops_tools.localcluster import Cluster, wait_for
from ctops_tools.procs import spawn, stop_all
from ctops_tools.redis_embed import EmbeddedRedis, free_port

SERVERS = 200
HOSTS = 2000
SCRAPE_TARGET_MS = 20.0


def extra_toml(hosts: dict[str, str], hello_port: int, servers: int) -> str:
    """Servers 2..N (trainer-1 is the cluster's real one) on the hello backend, each on a host of its own."""
    names = list(hosts)
    out = []
    for i in range(2, servers + 1):
        out += ["[[servers]]", f'name = "srv-{i:03d}"', f'url = "http://127.0.0.1:{hello_port}"',
                f'host = "{names[i - 1]}"']
    return "\n".join(out) + "\n" + sim_toml(hosts)


async def post_heartbeats(url: str, hosts: dict[str, str]) -> int:
    """One heartbeat per simulated host through POST /api/v1/heartbeat, 32 at a time."""
    sem = asyncio.Semaphore(32)
    ok = 0
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int, host: str, token: str) -> None:
            nonlocal ok
            hb = SimAgent(i, host, token, [url], 1.0, []).build()
            async with sem:
                r = await client.post(url + "/api/v1/heartbeat", content=hb.model_dump_json(),
                                      headers={"Authorization": f"Bearer {token}",
                                               "Content-Type": "application/json"})
            ok += r.status_code == 200

        await asyncio.gather(*(one(i, h, t) for i, (h, t) in enumerate(hosts.items())))
    return ok


class Scraper:
    """GET /metrics once a second (or back to back), on its own thread, timing each."""

    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self.url = url + "/metrics"
        self.times_ms: list[float] = []
        self.size = 0
        self.series = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self) -> None:
        t0 = time.perf_counter()
        r = self.client.get(self.url)
        self.times_ms.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        self.size = len(r.content)
        self.series = sum(1 for ln in r.text.splitlines() if ln and not ln.startswith("#"))

    def every(self, period: float) -> None:
        def loop() -> None:
            while not self._stop.wait(period):
                self.once()

        self._stop.clear()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def wrk(url: str, duration: float, connections: int) -> dict[str, Any]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:.0f}s", "--latency", url],
                         capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    r = parse_wrk(out)
    return {"requests_per_s": r.requests_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors}


def measure(servers: int, hosts_n: int, duration: float, connections: int, rounds: int,
            scrapes: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("ctops bench metrics: needs `wrk` (Debian: apt-get install wrk)")
    root = Path(tempfile.mkdtemp(prefix="ctops-bench-metrics-"))
    redis = EmbeddedRedis(data_dir=str(root / "redis")).start()
    hosts = sim_hosts(hosts_n)
    hello_port = free_port()
    hello = spawn("hello", [sys.executable, "-m", "ctops_tools.bench.hello", "--port", str(hello_port)],
                  str(root / "hello.log"))
    # hosts are sent a heartbeat between measured rounds only, at the longest interval and timeout
    # there are: no ingest and no host_lost burst lands in a measured round
    c = Cluster(root, redis, "bench-metrics", trainers=1, extra_toml=extra_toml(hosts, hello_port, servers),
                tokens={r: new_token() for r in ("operator", "viewer", "scrape")},
                timings={"heartbeat_timeout_ms": 600_000, "heartbeat_interval_ms": 60_000,
                         "health_interval_ms": 1000, "health_timeout_ms": 1000})
    out: dict[str, Any] = {"servers": servers, "hosts": hosts_n, "wrk_connections": connections,
                           "round_s": duration}
    try:
        c.start_all()
        wait_for(f"{servers} servers up", lambda: sum(
            s["state"] == "up" for s in c.state()["servers"]) == servers, timeout=120, every=1)
        out["heartbeats_stored"] = asyncio.run(post_heartbeats(c.ops_url(), hosts))
        pid = c.children["A"].pid
        scraper = Scraper(c.ops_url(), c.tokens["scrape"])
        scraper.once()  # warm: the first builds the registry's caches
        scraper.times_ms.clear()
        cpu0 = cpu_seconds(pid)
        for _ in range(scrapes):
            scraper.once()
        cpu = cpu_seconds(pid) - cpu0
        t = scraper.times_ms
        out["scrape"] = {"scrapes": scrapes, "p50_ms": pct(t, 0.5), "p99_ms": pct(t, 0.99),
                         "max_ms": round(max(t), 2), "dispatcher_cpu_ms": round(cpu * 1000 / scrapes, 2),
                         "bytes": scraper.size, "series": scraper.series,
                         "under_target": (pct(t, 0.5) or 0) < SCRAPE_TARGET_MS}
        # the state view the console and `ctops status` poll reads the same: the part of a scrape that
        # is not Prometheus's
        viewer = httpx.Client(headers=c.auth("viewer"), timeout=30)
        cpu0 = cpu_seconds(pid)
        for _ in range(scrapes):
            viewer.get(c.ops_url() + "/api/v1/state").raise_for_status()
        out["scrape"]["state_view_cpu_ms"] = round((cpu_seconds(pid) - cpu0) * 1000 / scrapes, 2)
        viewer.close()
        url = c.data_url() + "/"
        plain: list[dict[str, Any]] = []
        scraped: list[dict[str, Any]] = []
        during: list[float] = []
        for _ in range(rounds):
            # the hosts' heartbeats again, between measured rounds: every host stays alive (a late
            # host adds a series, and the run outlasts twice the heartbeat interval)
            asyncio.run(post_heartbeats(c.ops_url(), hosts))
            # alternating, so a neighbour's load on the machine falls on both kinds of round alike
            plain.append(wrk(url, duration, connections))
            scraper.times_ms = []
            scraper.every(1.0)
            try:
                scraped.append(wrk(url, duration, connections))
            finally:
                scraper.stop()
            during += scraper.times_ms
        out["data_plane"] = {"without_scrapes": plain, "with_scrape_every_s": scraped,
                             "p99_ms_without": _median([r["p99_ms"] for r in plain]),
                             "p99_ms_with": _median([r["p99_ms"] for r in scraped]),
                             "rps_without": _median([r["requests_per_s"] for r in plain]),
                             "rps_with": _median([r["requests_per_s"] for r in scraped]),
                             "scrape_under_load_p50_ms": pct(during, 0.5),
                             "scrape_under_load_max_ms": round(max(during), 2) if during else None}
    finally:
        c.stop()
        stop_all([hello])
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def _median(values: list[float]) -> float:
    s = sorted(values)
    return round(s[len(s) // 2], 2)


def render(r: dict[str, Any]) -> str:
    s, d = r["scrape"], r["data_plane"]
    lines = [
        f"GET /metrics at {r['servers']} servers and {r['hosts']} hosts ({r['heartbeats_stored']} heartbeats "
        f"stored, 3 processes each)",
        f"  scrape wall time    p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  max {s['max_ms']} ms  "
        f"(target < {SCRAPE_TARGET_MS:.0f} ms: {'met' if s['under_target'] else 'NOT met'})",
        f"  dispatcher CPU      {s['dispatcher_cpu_ms']} ms a scrape; {s['series']} series, {s['bytes']} bytes",
        f"  for comparison      GET /api/v1/state (the same reads, JSON): {s['state_view_cpu_ms']} ms CPU",
        f"data plane, wrk -c{r['wrk_connections']}, {len(d['without_scrapes'])} x {r['round_s']:.0f} s rounds "
        "each (median of rounds)",
        f"  without scrapes     p99 {d['p99_ms_without']} ms  {d['rps_without']:.0f} req/s",
        f"  scrape every 1 s    p99 {d['p99_ms_with']} ms  {d['rps_with']:.0f} req/s  (scrapes meanwhile: p50 "
        f"{d['scrape_under_load_p50_ms']} ms, max {d['scrape_under_load_max_ms']} ms)",
        "note: 2 cores shared with every process here (dispatcher, Redis, wrk, backends) and with whatever "
        "else runs on the machine; compare rows of one run, not runs",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure(SERVERS, getattr(args, "sim_hosts", HOSTS), args.duration, min(args.connections, 16),
                     rounds=max(1, min(args.reps, 5)), scrapes=50)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0

"""`ctops bench heartbeats --hosts N`: N simulated agents at 1 Hz against a real two-dispatcher cluster.

Each simulated agent is the real `agents.heartbeat.HeartbeatSender` (its failover, leader following,
move jitter and backoff) with a made-up payload: three supervised processes, host metrics and now and
then an event, each host with its own host-bound token as the deployment file issues them. Agents run
many to an asyncio loop, in a few processes, on loopback. Measured: ingest achieved vs offered,
latency p50/p99, dispatcher CPU and Redis commands per heartbeat, then the herd: the leader is
SIGKILLed (and, in a second round, SIGSTOPped) with every agent running. Targets (issue 19):
≥ 5,000 heartbeats/s per dispatcher at p99 ≤ 20 ms; under a herd no `host_lost`, every agent on the
new leader within 2 s, its ingest p99 ≤ 100 ms. `--max-rate` raises the offered load until p99 > 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import httpx

from agents.heartbeat import HeartbeatSender
from agents.http import HttpClient
from ctops.auth import hash_token, new_token
from ctops.clock import now_ms
from ctops.wire import FAST_ENCODER, FastAgentEvent, FastHeartbeat, FastHostMetrics, FastProcessMetrics, Heartbeat
from ctops_tools.localcluster import Cluster, wait_for
from ctops_tools.redis_embed import EmbeddedRedis

T = TypeVar("T")
INGEST_P99_MS = 20.0
HERD_P99_MS = 100.0
HERD_MOVE_S = 2.0
TARGET_RATE = 5000
EVENT_EVERY = 100  # beats per host between events, on average

# one record per HTTP request: (monotonic end time, host index, dispatcher index or -1, latency ms, status)
Record = tuple[float, int, int, float, int]


def sim_hosts(n: int) -> dict[str, str]:
    """Host name -> its agent token."""
    return {f"sim-{i:05d}": new_token() for i in range(1, n + 1)}


def sim_toml(hosts: dict[str, str]) -> str:
    """[[agents]] and host-bound [[tokens]] for the simulated hosts (appended to the cluster's file)."""
    out: list[str] = []
    for h, tok in hosts.items():
        out += ["[[agents]]", f'name = "{h}"', 'token_env = "CTOPS_SIM_AGENT_TOKEN"',
                "[[tokens]]", f'name = "agent-{h}"', 'role = "agent"', f'host = "{h}"',
                f'sha256 = "{hash_token(tok)}"']
    return "\n".join(out) + "\n"


class TimedClient(HttpClient):
    """The agent's client, recording each request's latency and which dispatcher it went to."""

    def __init__(self, token: str, timeout: float, idx: int, urls: tuple[str, ...], sink: list[Record]) -> None:
        super().__init__(token, timeout)
        self.idx, self.urls, self.sink = idx, urls, sink

    async def request(self, method: str, url: str, body: bytes | None = None,
                      timeout: float | None = None) -> tuple[int, bytes]:
        which = next((i for i, u in enumerate(self.urls) if url.startswith(u)), -1)
        t = time.monotonic()
        status = 0
        try:
            status, reply = await super().request(method, url, body, timeout)
            return status, reply
        finally:
            end = time.monotonic()
            self.sink.append((end, self.idx, which, (end - t) * 1000, status))


class SimAgent(HeartbeatSender):
    def __init__(self, idx: int, host: str, token: str, urls: list[str], interval: float,
                 sink: list[Record]) -> None:
        super().__init__(host, urls, token, interval, lost_after=3 * interval)
        self.client = TimedClient(token, self.client.timeout, idx, self.failover.urls, sink)
        self.rng = random.Random(idx)
        self.pids = [10_000 + 3 * idx + k for k in range(3)]

    def build(self) -> Heartbeat:
        # msgspec Structs of the same shape, not pydantic models: thousands of simulated agents share
        # the machine with the dispatcher they measure, so each costs as little as it can
        r = self.rng
        procs = [FastProcessMetrics(name=f"trainer-{k}", state="running", pid=pid, restarts=0,
                                    cpu_percent=round(r.uniform(0, 40), 1), rss_bytes=r.randrange(50, 400) << 20,
                                    check_latency_ms=round(r.uniform(0.5, 5), 2)) for k, pid in enumerate(self.pids)]
        if r.randrange(EVENT_EVERY) == 0:
            self.add_event(FastAgentEvent(id=f"{self.host}-{self.seq}-{r.randrange(1 << 30)}",  # type: ignore[arg-type]
                                          kind="restart", process="trainer-0",
                                          message="trainer-0 exited (code 1); restarted", ts_ms=now_ms()))
        self.seq += 1
        return FastHeartbeat(host=self.host, seq=self.seq, sent_at_ms=now_ms(), processes=procs,  # type: ignore[return-value]
                             metrics=FastHostMetrics(cpu_percent=round(r.uniform(0, 100), 1), memory_percent=42.0,
                                                     memory_used_bytes=8 << 30, disk_percent=55.0,
                                                     load1=1.0, load5=0.9, load15=0.8),
                             events=list(self.outbox))  # type: ignore[arg-type]

    def encode(self, hb: Heartbeat) -> bytes:
        return FAST_ENCODER.encode(hb)


def _worker(first: int, hosts: list[tuple[str, str]], urls: list[str], interval: float, conn: Connection) -> None:
    """One process's agents, until the parent says stop; then their records go back over `conn`."""
    sink: list[Record] = []
    # thousands of agents would each log every failed round; the records count them instead
    logging.getLogger("ctops.agent").setLevel(logging.ERROR)

    async def main() -> None:
        agents = [SimAgent(first + i, h, tok, urls, interval, sink) for i, (h, tok) in enumerate(hosts)]

        async def one(i: int, a: SimAgent) -> None:
            await asyncio.sleep(interval * i / len(agents))  # spread the agents over the interval
            await a.run()

        tasks = [asyncio.create_task(one(i, a)) for i, a in enumerate(agents)]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # the stop word
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in agents:
            await a.aclose()

    asyncio.run(main())
    conn.send(sink)
    conn.close()


@dataclass
class Fleet:
    """Simulated agents in `procs` processes."""

    hosts: dict[str, str]
    urls: list[str]
    interval: float = 1.0
    procs: int = 4

    def start(self) -> Fleet:
        ctx = mp.get_context("spawn")
        items = list(self.hosts.items())
        per = -(-len(items) // self.procs)
        self._children: list[tuple[Any, Connection]] = []
        for k in range(0, len(items), per):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(k, items[k:k + per], self.urls, self.interval, child), daemon=True)
            p.start()
            self._children.append((p, parent))
        return self

    def stop(self) -> list[Record]:
        out: list[Record] = []
        for _, conn in self._children:
            conn.send("stop")
        for p, conn in self._children:
            if conn.poll(60):
                out += conn.recv()
            p.join(10)
            if p.is_alive():
                p.kill()
        return out


# --- measuring ----------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(redis: EmbeddedRedis) -> int:
    stats = redis.admin().info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def leader(c: Cluster, d: str) -> str | None:
    try:
        return c.state(d).get("leader")
    except (httpx.HTTPError, ValueError):
        return None


def last_event_id(c: Cluster, d: str) -> str:
    r = httpx.get(c.ops_url(d) + "/api/v1/events", params={"limit": 1}, headers=c.auth("viewer"), timeout=10)
    r.raise_for_status()
    return r.json()[-1]["id"] if r.json() else "0-0"


def events_after(c: Cluster, d: str, after: str) -> list[dict]:
    out: list[dict] = []
    while True:
        r = httpx.get(c.ops_url(d) + "/api/v1/events", params={"limit": 1000, "after": after},
                      headers=c.auth("viewer"), timeout=10)
        r.raise_for_status()
        page = r.json()
        out += page
        if len(page) < 1000:
            return out
        after = page[-1]["id"]


def alive_hosts(c: Cluster, d: str, names: set[str]) -> int:
    # a generous timeout: the state document of thousands of hosts, from a dispatcher taking their heartbeats
    r = httpx.get(f"{c.ops_url(d)}/api/v1/state", headers=c.auth("viewer"), timeout=30)
    r.raise_for_status()
    return sum(1 for h in r.json()["hosts"] if h["name"] in names and h["state"] == "alive")


def state_bytes(c: Cluster, d: str) -> dict[str, int]:
    """What a console polling every second moves: the full document, or the changes of one second."""
    url, h = f"{c.ops_url(d)}/api/v1/state", c.auth("viewer")
    full = len(httpx.get(url, headers=h, timeout=30).content)
    version = httpx.get(url + "/changes", headers=h, timeout=30).json()["version"]
    time.sleep(1.0)
    changes = len(httpx.get(url + "/changes", params={"since": version}, headers=h, timeout=30).content)
    return {"full": full, "changes_per_s": changes}


def measured(probe: Callable[[], T], default: T) -> T:
    """A figure read from a dispatcher that may be too busy to answer; `default` says it did not."""
    try:
        return probe()
    except (httpx.HTTPError, ValueError, KeyError):
        return default


def make_cluster(root: Path, redis: EmbeddedRedis, hosts: dict[str, str], prefix: str = "bench-hb") -> Cluster:
    """Two dispatchers at the production timings (1 s beats, lost after 3 s), one trainer, the sim hosts."""
    return Cluster(root, redis, prefix, trainers=1, dispatchers=("A", "B"), extra_toml=sim_toml(hosts),
                   timings={"heartbeat_interval_ms": 1000, "heartbeat_timeout_ms": 3000,
                            "health_interval_ms": 500, "health_timeout_ms": 400})


def ingest(records: list[Record], d: int, t0: float, t1: float) -> dict[str, Any]:
    lat = [r[3] for r in records if r[2] == d and t0 <= r[0] < t1 and r[4] == 200]
    return {"heartbeats": len(lat), "rate_per_s": round(len(lat) / (t1 - t0), 1),
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}


def herd(c: Cluster, fleet_urls: list[str], names: set[str], sig: signal.Signals, settle: float,
         marks: dict[str, float]) -> dict[str, Any]:
    """Signal the leader; the records are read after the fleet stops (see `herd_figures`)."""
    old = wait_for("a leader", lambda: leader(c, "A") or leader(c, "B"))
    new = "B" if old == "A" else "A"
    cursor = measured(lambda: last_event_id(c, new), "0-0")
    t0 = time.monotonic()
    c.signal(old, sig)
    wait_for(f"{new} to lead", lambda: leader(c, new) == new, timeout=30, every=0.02)
    promoted = time.monotonic() - t0
    time.sleep(settle)
    lost: list[dict] | None = measured(lambda: [e for e in events_after(c, new, cursor) if e["kind"] == "host_lost"],
                                       None)
    alive = measured(lambda: alive_hosts(c, new, names), -1)
    if sig == signal.SIGKILL:
        c.start(old)
    else:
        c.signal(old, signal.SIGCONT)
    wait_for(f"{old} back as standby", lambda: leader(c, old) == new, timeout=60)
    marks[sig.name] = t0
    return {"signal": sig.name, "from": old, "to": new, "to_idx": fleet_urls.index(c.ops_url(new)),
            "promoted_s": round(promoted, 3), "host_lost": None if lost is None else len(lost),
            "alive_after": alive, "t0": t0, "settle_s": settle}


def herd_figures(h: dict[str, Any], records: list[Record], hosts: int) -> dict[str, Any]:
    t0, to = h.pop("t0"), h.pop("to_idx")
    first: dict[int, float] = {}
    for end, idx, d, _, status in records:
        if d == to and status == 200 and end >= t0 and end - t0 < first.get(idx, float("inf")):
            first[idx] = end - t0
    during = [r[3] for r in records if r[2] == to and r[4] == 200 and t0 <= r[0] < t0 + h["settle_s"]]
    all_moved = max(first.values()) if len(first) == hosts else None
    return {**h, "agents_moved": len(first), "hosts": hosts,
            "all_moved_s": round(all_moved, 3) if all_moved is not None else None,
            # the target counts from the takeover (an agent that moved to the standby before it led is there)
            "all_moved_after_takeover_s": round(max(0.0, all_moved - h["promoted_s"]), 3)
            if all_moved is not None else None,
            "new_leader_p99_ms": pct(during, 0.99), "new_leader_p50_ms": pct(during, 0.5)}


def run_once(hosts_n: int, interval: float, procs: int, steady: float, with_herd: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ctops-bench-hb-"))
    redis = EmbeddedRedis(data_dir=str(root / "redis")).start()
    hosts = sim_hosts(hosts_n)
    names = set(hosts)
    c = make_cluster(root, redis, hosts)
    out: dict[str, Any] = {"hosts": hosts_n, "interval_s": interval, "offered_per_s": round(hosts_n / interval, 1),
                           "processes": procs}
    fleet: Fleet | None = None
    try:
        c.start_all()
        urls = [c.ops_url("A"), c.ops_url("B")]
        lead = wait_for("a leader", lambda: leader(c, "A") or leader(c, "B"))
        since_start = measured(lambda: last_event_id(c, lead), "0-0")
        fleet = Fleet(hosts, urls, interval, procs).start()
        try:
            wait_for("every simulated host alive", lambda: alive_hosts(c, lead, names) == hosts_n, timeout=120, every=1)
        except AssertionError:
            pass  # a dispatcher that cannot keep up is what this measures; the figures say how far it got
        out["alive_before"] = measured(lambda: alive_hosts(c, lead, names), -1)
        time.sleep(2 * interval)  # every agent has followed the leader
        # the leader of now: on a loaded machine the lease may have moved while the agents came up
        lead = wait_for("a leader", lambda: leader(c, "A") or leader(c, "B"))
        pid = c.children[lead].pid
        cpu0, calls0, t0 = cpu_seconds(pid), redis_calls(redis), time.monotonic()
        time.sleep(steady)
        cpu1, calls1, t1 = cpu_seconds(pid), redis_calls(redis), time.monotonic()
        # under heartbeat load alone the lease must never move (it once did, ingest starving its renewal)
        before_herd = measured(lambda: events_after(c, lead, since_start), None)
        kinds = [e["kind"] for e in before_herd] if before_herd is not None else None
        out["state_bytes"] = measured(lambda: state_bytes(c, lead), None)
        herds: list[dict[str, Any]] = []
        marks: dict[str, float] = {}
        if with_herd:
            for sig in (signal.SIGKILL, signal.SIGSTOP):
                herds.append(herd(c, urls, names, sig, settle=8.0, marks=marks))
                time.sleep(3)
        records = fleet.stop()
        fleet = None
        steady_fig = ingest(records, urls.index(c.ops_url(lead)), t0, t1)
        n = max(1, steady_fig["heartbeats"])
        out["steady"] = {**steady_fig, "seconds": round(t1 - t0, 1), "leader": lead,
                         "to_standby": ingest(records, 1 - urls.index(c.ops_url(lead)), t0, t1)["heartbeats"],
                         "cpu_ms_per_heartbeat": round((cpu1 - cpu0) * 1000 / n, 3),
                         "dispatcher_cpu_percent": round((cpu1 - cpu0) * 100 / (t1 - t0), 1),
                         "redis_cmds_per_heartbeat": round((calls1 - calls0) / n, 2),
                         "failed_requests": sum(1 for r in records if t0 <= r[0] < t1 and r[4] != 200),
                         "lease_changes": None if kinds is None else kinds.count("leader_changed"),
                         "host_lost": None if kinds is None else kinds.count("host_lost")}
        out["herd"] = [herd_figures(h, records, hosts_n) for h in herds]
    finally:
        if fleet is not None:
            fleet.stop()
        c.stop()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def max_rate(hosts_n: int, procs: int, steady: float) -> dict[str, Any]:
    """The same fleet at shorter intervals until the leader's p99 passes the target (or it falls behind)."""
    steps: list[dict[str, Any]] = []
    for interval in (1.0, 0.5, 0.25, 0.125, 0.0625):
        r = run_once(hosts_n, interval, procs, steady, with_herd=False)
        s = r["steady"]
        steps.append({"offered_per_s": r["offered_per_s"], "achieved_per_s": s["rate_per_s"],
                      "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "cpu_ms_per_heartbeat": s["cpu_ms_per_heartbeat"]})
        if s["p99_ms"] is None or s["p99_ms"] > INGEST_P99_MS or s["rate_per_s"] < 0.9 * r["offered_per_s"]:
            break
    ok = [s for s in steps if s["p99_ms"] is not None and s["p99_ms"] <= INGEST_P99_MS
          and s["achieved_per_s"] >= 0.9 * s["offered_per_s"]]
    return {"steps": steps, "ceiling_per_s": max((s["achieved_per_s"] for s in ok), default=0.0),
            "target_per_s": TARGET_RATE}


def run(args: argparse.Namespace) -> int:
    hosts_n, procs = args.hosts, args.procs
    steady = args.duration
    doc: dict[str, Any] = ({"max_rate": max_rate(hosts_n, procs, steady)} if args.max_rate
                           else run_once(hosts_n, 1.0, procs, steady, with_herd=not args.no_herd))
    doc["cpus"] = os.cpu_count()
    doc["loadavg"] = os.getloadavg()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if "max_rate" in doc:
        m = doc["max_rate"]
        print(f"max rate, {hosts_n} hosts (target ≥ {TARGET_RATE}/s at p99 ≤ {INGEST_P99_MS} ms)")
        for s in m["steps"]:
            print(f"  offered {s['offered_per_s']:>8}/s  achieved {s['achieved_per_s']:>8}/s  p50 {s['p50_ms']} ms  "
                  f"p99 {s['p99_ms']} ms  cpu {s['cpu_ms_per_heartbeat']} ms/hb")
        print(f"  ceiling: {m['ceiling_per_s']}/s")
        return 0
    s = doc["steady"]
    print(f"{hosts_n} simulated hosts at 1 Hz in {procs} processes ({doc['alive_before']} alive before the "
          f"measurement), leader {s['leader']} "
          f"(load average {doc['loadavg'][0]:.1f} on {doc['cpus']} CPUs)")
    print(f"  ingest: offered {doc['offered_per_s']}/s, achieved {s['rate_per_s']}/s over {s['seconds']} s; "
          f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms (target ≤ {INGEST_P99_MS}); failed {s['failed_requests']}, "
          f"{s['to_standby']} went to the standby")
    print(f"  dispatcher CPU {s['cpu_ms_per_heartbeat']} ms/heartbeat ({s['dispatcher_cpu_percent']}% of a core); "
          f"Redis {s['redis_cmds_per_heartbeat']} commands/heartbeat (commandstats: the heartbeat script's own "
          f"HMGET/HSET/ZADD counted)")
    if doc.get("state_bytes"):
        b = doc["state_bytes"]
        print(f"  state for a console: full document {b['full']} bytes; changes of one second "
              f"{b['changes_per_s']} bytes")
    print(f"  from the agents' start to the end of the measurement: {s['lease_changes']} lease changes, "
          f"{s['host_lost']} host_lost (both must be 0)")
    for h in doc["herd"]:
        print(f"  herd {h['signal']} {h['from']}→{h['to']}: promoted {h['promoted_s']} s; host_lost {h['host_lost']} "
              f"(must be 0); agents on new leader {h['agents_moved']}/{h['hosts']}, all by {h['all_moved_s']} s after "
              f"the signal, {h['all_moved_after_takeover_s']} s after the takeover (target ≤ {HERD_MOVE_S}); "
              f"new leader p50 {h['new_leader_p50_ms']} ms, p99 {h['new_leader_p99_ms']} ms "
              f"(target ≤ {HERD_P99_MS})")
    return 0

"""`ctops bench failover`: the dispatcher and HAProxy (defaults, tuned) in front of the same real
trainer servers, the same learners and the same faults, one after the other in one run.

Each target gets a fresh start (all trainers up and seen up by the proxy), then simulated learners
(open a session, read it, now and then submit code with an Idempotency-Key and poll for the
result) while the bench SIGKILLs trainer-1, later SIGSTOPs trainer-2 and SIGCONTs it. The learners
do not retry: every failure is one the proxy let through.

Measured per target:
- failed requests (an error or a non-2xx answer), overall and in the fault window;
- kill: how long after the SIGKILL learners still saw failures;
- freeze: how long after the SIGSTOP requests still reached the frozen server. Watched in the
  kernel (/proc/net/tcp): bytes queued on the frozen server's sockets, which its process cannot
  read; growth by more than a health check's size (HEALTH_BYTES) is a proxied request arriving;
- p50/p99 latency in the fault window (SIGKILL to SIGCONT + 1 s) and overall.

HAProxy checks each server with `option httpchk GET /healthz` (a plain TCP check never sees a
frozen process: the kernel still accepts its connections); (a) keeps every other default (inter 2 s,
fall 3, rise 2, retries 3, no redispatch), (b) is tuned as the issue asks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ctops_tools.bench.proxy import HAPROXY, _ensure_tool, _haproxy_version, _wait_port
from ctops_tools.load import SOLUTIONS, percentile
from ctops_tools.procs import sigterm_as_interrupt
from ctops_tools.redis_embed import free_port

HEALTH_BYTES = 150  # health checks are smaller than this; proxied learner requests larger
TARGETS = ("dispatcher", "haproxy-defaults", "haproxy-tuned")
KILLED, FROZEN = "trainer-1", "trainer-2"

HAPROXY_COMMON = """\
global
    maxconn 4096
    log stderr format raw local0 emerg
    stats socket {sock} level admin

defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
{extra_defaults}
frontend fe
    bind 127.0.0.1:{port}
    default_backend trainers

backend trainers
    balance roundrobin
    option httpchk GET /healthz
{extra_backend}{servers}
"""
HAPROXY_VARIANTS = {
    "haproxy-defaults": ("", "", "check"),
    "haproxy-tuned": ("    retries 3\n    option redispatch 1\n    retry-on conn-failure\n",
                      "    default-server inter 500 fall 2 rise 2\n", "check"),
}


@dataclass
class Sample:
    sent: float  # seconds since the run started
    latency: float
    ok: bool
    kind: str  # "ok", "http_503", "ReadTimeout", ...
    server: str | None = None  # the server that answered (session reads only)
    what: str = ""


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    t0: float = 0.0
    t_kill: float = 0.0
    t_freeze: float = 0.0
    t_thaw: float = 0.0
    last_arrival: float | None = None  # last proxied request queued at the frozen server


def _rx_queues(port: int) -> dict[str, int]:
    """Bytes received but not yet read, per TCP connection to 127.0.0.1:port (accepted or not)."""
    local = f"0100007F:{port:04X}"
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == local and parts[3] == "01":
                out[parts[2]] = int(parts[4].split(":")[1], 16)
    return out


async def _watch_frozen(run: Run, port: int, stop: asyncio.Event) -> None:
    seen: dict[str, int] = {}
    while not stop.is_set():
        now = time.monotonic() - run.t0
        for conn, queued in _rx_queues(port).items():
            if queued - seen.get(conn, 0) > HEALTH_BYTES:
                run.last_arrival = now
            seen[conn] = queued
        await asyncio.sleep(0.02)


async def _learner(url: str, run: Run, deadline: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0, connect=5.0)) as client:

        async def call(method: str, path: str, **kw: Any) -> httpx.Response | None:
            sent = time.monotonic()
            try:
                r = await client.request(method, path, **kw)
            except httpx.HTTPError as exc:
                run.samples.append(Sample(sent - run.t0, time.monotonic() - sent, False, type(exc).__name__,
                                          what=f"{method} {path}"))
                return None
            ok = r.status_code < 400
            detail = ""
            if not ok:
                try:
                    detail = f" ({r.json().get('error') or r.json().get('detail')})"
                except ValueError:
                    pass
            server = None
            if ok and method == "GET" and path.count("/") == 3:  # a session read names its server
                try:
                    server = r.json().get("server")
                except ValueError:
                    pass
            run.samples.append(Sample(sent - run.t0, time.monotonic() - sent, ok,
                                      "ok" if ok else f"http_{r.status_code}", server, f"{method} {path}{detail}"))
            return r if ok else None

        sid = None
        while sid is None and time.monotonic() < deadline:
            r = await call("POST", "/api/sessions", json={"learner": "bench"},
                           headers={"Idempotency-Key": uuid.uuid4().hex})
            sid = r.json()["session_id"] if r is not None else None
            if sid is None:
                await asyncio.sleep(0.2)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            await call("GET", f"/api/sessions/{sid}")
            if n % 8 == 0:
                ex = list(SOLUTIONS)[n % len(SOLUTIONS)]
                r = await call("POST", f"/api/sessions/{sid}/submissions",
                               json={"exercise_id": ex, "code": SOLUTIONS[ex]},
                               headers={"Idempotency-Key": uuid.uuid4().hex})
                if r is not None:
                    sub = r.json()
                    for _ in range(100):
                        if sub.get("status") == "done" or time.monotonic() > deadline + 10:
                            break
                        await asyncio.sleep(0.1)
                        r = await call("GET", f"/api/sessions/{sid}/submissions/{sub['submission_id']}")
                        if r is None:
                            break
                        sub = r.json()
            await asyncio.sleep(0.05)


async def _drive(url: str, pids: dict[str, int], frozen_port: int, learners: int, before: float,
                 kill_to_freeze: float, freeze: float, after: float) -> Run:
    run = Run()
    run.t0 = time.monotonic()
    total = before + kill_to_freeze + freeze + after
    tasks = [asyncio.create_task(_learner(url, run, run.t0 + total)) for _ in range(learners)]
    await asyncio.sleep(before)
    run.t_kill = time.monotonic() - run.t0
    os.kill(pids[KILLED], signal.SIGKILL)
    await asyncio.sleep(kill_to_freeze)
    run.t_freeze = time.monotonic() - run.t0
    os.kill(pids[FROZEN], signal.SIGSTOP)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_frozen(run, frozen_port, stop))
    try:
        await asyncio.sleep(freeze)
    finally:
        stop.set()
        await watcher
        run.t_thaw = time.monotonic() - run.t0
        os.kill(pids[FROZEN], signal.SIGCONT)
    await asyncio.gather(*tasks)
    return run


def _ms(x: float) -> float:
    return round(x * 1000, 1)


def summarize(run: Run) -> dict:
    s = run.samples
    window = [x for x in s if run.t_kill <= x.sent <= run.t_thaw + 1.0]
    kill_hit = [x for x in s if run.t_kill <= x.sent < run.t_freeze and not x.ok]
    failures: dict[str, int] = {}
    for x in s:
        if not x.ok:
            failures[x.kind] = failures.get(x.kind, 0) + 1
    lat = [x.latency for x in s if x.ok]
    wlat = [x.latency for x in window]
    return {
        "requests": len(s),
        "failed": sum(1 for x in s if not x.ok),
        "failures": failures,
        "failed_in_fault_window": sum(1 for x in window if not x.ok),
        "killed_server_errors_until_s": round(max((x.sent - run.t_kill for x in kill_hit), default=0.0), 2),
        "hung_server_out_of_rotation_s": round((run.last_arrival or run.t_freeze) - run.t_freeze, 2),
        "failed_requests": [{"at_s": round(x.sent, 2), "request": x.what, "kind": x.kind} for x in s if not x.ok][:20],
        "fault_window_latency_ms": {"p50": _ms(percentile(wlat, 50)), "p99": _ms(percentile(wlat, 99)),
                                    "max": _ms(max(wlat, default=0.0))},
        "latency_ms": {"p50": _ms(percentile(lat, 50)), "p99": _ms(percentile(lat, 99))},
    }


class HAProxy:
    def __init__(self, path: str, tmp: Path, variant: str, servers: dict[str, int]) -> None:
        self.port = free_port()
        self.sock = str(tmp / f"{variant}.sock")
        extra_defaults, extra_backend, check = HAPROXY_VARIANTS[variant]
        lines = "".join(f"    server {n} 127.0.0.1:{p} {check}\n" for n, p in servers.items())
        cfg = tmp / f"{variant}.cfg"
        cfg.write_text(HAPROXY_COMMON.format(sock=self.sock, port=self.port, extra_defaults=extra_defaults,
                                             extra_backend=extra_backend, servers=lines))
        self.log = open(tmp / f"{variant}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([path, "-db", "-f", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port, self.proc, variant)

    def states(self) -> dict[str, str]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(self.sock)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return {r[1]: r[17] for r in rows if r[0] == "trainers" and r[1] not in ("BACKEND", "FRONTEND")}

    def wait_all_up(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if all(v.startswith("UP") and "/" not in v for v in self.states().values()):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"HAProxy never saw every server up: {self.states()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def measure(learners: int, before: float, kill_to_freeze: float, freeze: float, after: float) -> dict:
    from ctops_tools.localcluster import Cluster, wait_for
    from ctops_tools.redis_embed import EmbeddedRedis

    haproxy_path = _ensure_tool(HAPROXY, "haproxy")
    tmp = Path(tempfile.mkdtemp(prefix="ctops-bench-failover-"))
    redis = EmbeddedRedis(data_dir=str(tmp / "redis")).start()
    # the dispatcher with its shipped defaults (checks every 500 ms, 400 ms timeout, fall 2, rise 2)
    timings = {"health_interval_ms": 500, "health_timeout_ms": 400, "fall": 2, "rise": 2}
    (tmp / "cluster").mkdir(parents=True, exist_ok=True)
    cluster = Cluster(tmp / "cluster", redis, f"bench{os.getpid()}", timings=timings)
    haproxies: dict[str, HAProxy] = {}
    results: dict[str, dict] = {}
    try:
        cluster.start_all()
        ports = {n: cluster.ports[n] for n in cluster.server_names}
        for variant in HAPROXY_VARIANTS:
            haproxies[variant] = HAProxy(haproxy_path, tmp, variant, ports)
        for target in TARGETS:
            # every target starts from the same place: all trainers running and seen up
            if cluster.children[KILLED].proc.poll() is not None:
                cluster.start(KILLED)
            for name in cluster.server_names:
                def healthy(n: str = name) -> bool:
                    return httpx.get(cluster.trainer_url(n) + "/healthz", timeout=2).status_code == 200

                wait_for(f"{name} healthy", healthy)
            cluster.wait_all_up()
            for h in haproxies.values():
                h.wait_all_up()
            url = cluster.data_url() if target == "dispatcher" else f"http://127.0.0.1:{haproxies[target].port}"
            pids = {n: cluster.children[n].pid for n in cluster.server_names}
            run = asyncio.run(_drive(url, pids, ports[FROZEN], learners, before, kill_to_freeze, freeze, after))
            results[target] = summarize(run)
            print(f"  {target}: {results[target]['requests']} requests, {results[target]['failed']} failed",
                  file=sys.stderr)
        version = _haproxy_version(haproxy_path)
    finally:
        for h in haproxies.values():
            h.stop()
        cluster.stop()
        redis.stop()
        if os.environ.get("CTOPS_BENCH_KEEP") is None:  # logs kept on request
            shutil.rmtree(tmp, ignore_errors=True)
    d = results["dispatcher"]
    return {
        "setup": {"trainers": 3, "learners": learners, "haproxy": version,
                  "faults": {"sigkill": KILLED, "at_s": before, "sigstop": FROZEN, "at_s_after_kill": kill_to_freeze,
                             "frozen_s": freeze, "after_s": after},
                  "health_check_bytes_below": HEALTH_BYTES},
        "results": results,
        "targets": {"failed": 0, "hung_out_of_rotation_s_max": 1.0, "fault_window_p99_ms_max": 1000},
        "met": d["failed"] == 0 and d["hung_server_out_of_rotation_s"] <= 1.0
        and d["fault_window_latency_ms"]["p99"] <= 1000,
    }


def render(result: dict) -> str:
    s = result["setup"]
    f = s["faults"]
    lines = [f"failover benchmark: 3 trainers, {s['learners']} learners; SIGKILL {f['sigkill']} at {f['at_s']:g}s, "
             f"SIGSTOP {f['sigstop']} {f['at_s_after_kill']:g}s later for {f['frozen_s']:g}s; HAProxy {s['haproxy']}",
             "",
             f"{'':<18}{'requests':>9}{'failed':>8}{'killed: errors s':>18}{'hung: in rotation s':>21}"
             f"{'window p99 ms':>15}{'p99 ms':>9}"]
    for name, r in result["results"].items():
        lines.append(f"{name:<18}{r['requests']:>9}{r['failed']:>8}{r['killed_server_errors_until_s']:>18.2f}"
                     f"{r['hung_server_out_of_rotation_s']:>21.2f}{r['fault_window_latency_ms']['p99']:>15.1f}"
                     f"{r['latency_ms']['p99']:>9.1f}")
    for name, r in result["results"].items():
        if r["failures"]:
            lines.append(f"  {name} failures: {r['failures']}; first: "
                         + ", ".join(f"{x['request']} at {x['at_s']}s: {x['kind']}" for x in r["failed_requests"][:3]))
    lines += ["", "targets (dispatcher): 0 failed, hung server out of rotation <= 1 s, fault-window p99 <= 1000 ms: "
              + ("met" if result["met"] else "NOT met")]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with sigterm_as_interrupt():
            result = measure(int(getattr(args, "learners", 8)), 3.0, 4.0, 4.0, 3.0)
    except RuntimeError as exc:
        print(f"ctops bench failover: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ctops_tools.bench.failover")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--learners", type=int, default=8)
    sys.exit(run(ap.parse_args()))


if __name__ == "__main__":
    main()

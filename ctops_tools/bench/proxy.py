"""`ctops bench proxy`: the dispatcher's data plane against HAProxy 2.6, side by side in one run.

Both proxies front the same two backends (separate processes): "hello" servers
(ctops_tools.bench.hello) for GETs, trainer-like ones (ctops_tools.bench.proxy_learners: JSON answers,
some chunked) for `--mix learners`; both
run one thread, and the same wrk load hits each in turn, alternating rounds so that drift in the
machine affects both alike. With two or more CPUs, the proxy under test gets a CPU of its own
and wrk and the backends share the others: the same for both proxies.

    python -m ctops_tools.bench.proxy --serve PORT --backends 127.0.0.1:P1,127.0.0.1:P2

runs the data plane standalone, as the benchmark starts it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ctops_tools.procs import sigterm_as_interrupt
from ctops_tools.redis_embed import free_port

HAPROXY = "/usr/sbin/haproxy"
WRK = "/usr/bin/wrk"
ROUNDS = 5  # measured runs per proxy, in pairs, alternating which goes first
WARMUP_S = 2.0
# per mix: dispatcher req/s >= this x HAProxy's, dispatcher p99 <= that x HAProxy's
TARGETS = {"get": (0.9, 1.2), "learners": (1.0, 1.1)}

# `--mix learners`: what a learner's browser sends the trainer, in proportion: a session opened, JSON
# submissions of about 1 and 4 KB (without Idempotency-Key, as most learners' clients), polls of a
# submission, the exercise list; all with the session cookie. The backends answer as the trainer does
# (ctops_tools.bench.proxy_learners): JSON with a length, the exercise list chunked
LEARNERS_LUA = """\
local hdrs = {["Content-Type"] = "application/json", ["Cookie"] = "ctops_session=s1"}
local function submission(lines)
  return '{"exercise_id": "fizzbuzz", "code": "' .. string.rep("print(i % 3 == 0)\\n", lines) .. '"}'
end
local reqs
-- built in init: only then has wrk set the Host header wrk.format copies (a request without Host is refused)
init = function(args)
reqs = {
  wrk.format("POST", "/api/sessions", hdrs, '{"learner": "bench"}'),
  wrk.format("POST", "/api/sessions/s1/submissions", hdrs, submission(50)),
  wrk.format("GET", "/api/sessions/s1/submissions/sub1", hdrs),
  wrk.format("GET", "/api/sessions/s1/submissions/sub1", hdrs),
  wrk.format("POST", "/api/sessions/s1/submissions", hdrs, submission(200)),
  wrk.format("GET", "/api/sessions/s1/submissions/sub2", hdrs),
  wrk.format("GET", "/api/sessions/s1/submissions/sub2", hdrs),
  wrk.format("GET", "/api/exercises", hdrs),
}
end
local i = 0
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
"""

# HAProxy's session affinity, for the learner mix
LEARNERS_AFFINITY = "    cookie ctops_srv insert indirect nocache httponly\n"

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 4096
    log stderr format raw local0 emerg

defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
    default_backend trainers

backend trainers
    balance roundrobin
{servers}
"""


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors plus non-2xx/3xx answers
    cpu_us_per_request: float = 0.0  # the proxy's own CPU time (user + system) per request


# ---------------------------------------------------------------------------------------------
# the data plane, standalone


def serve(port: int, backends: list[str]) -> None:

    import gc

    import uvloop

    from ctops.config import parse
    from dispatcher.pool import ServerPool
    from dispatcher.proxy import ProxySettings, start_data_plane

    dep = parse({"dispatchers": [{"name": "bench", "data": f"127.0.0.1:{port}", "ops": "127.0.0.1:1"}],
                 "servers": [{"name": f"s{i + 1}", "url": f"http://{b}"} for i, b in enumerate(backends)]})

    async def main() -> None:
        pool = ServerPool(dep.servers, initial_health="up")
        server = await start_data_plane(pool, "127.0.0.1", port, ProxySettings.from_deployment(dep))
        gc.freeze()  # as the dispatcher does once started (dispatcher/main.py)
        async with server:
            await server.serve_forever()

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------------------------
# the benchmark


def _wait_port(port: int, proc: subprocess.Popen, what: str, limit: float = 15.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {limit:.0f} s")


def _ensure_tool(path: str, package: str) -> str:
    if os.path.exists(path):
        return path
    found = shutil.which(os.path.basename(path))
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {package} ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which(os.path.basename(path))
        if found:
            return found
    raise RuntimeError(f"{path} not found; install the `{package}` package")


def _cpu_layout() -> tuple[list[str], list[str]]:
    """taskset prefixes (proxy under test, load and backends): a CPU of its own for the proxy."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return [], []
    rest = ",".join(str(c) for c in cpus[:-1])
    return ["taskset", "-c", str(cpus[-1])], ["taskset", "-c", rest]


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        raise RuntimeError(f"wrk output has no {pct}% latency:\n{text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    if not rps or not total:
        raise RuntimeError(f"cannot read wrk output:\n{text}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    return WrkResult(float(rps.group(1)), _latency_ms(text, "50"), _latency_ms(text, "99"),
                     int(total.group(1)), errors)


class Bench:
    def __init__(self, duration: float, connections: int, mix: str = "get") -> None:
        self.duration = duration
        self.mix = mix
        self.connections = connections
        self.procs: list[subprocess.Popen] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="ctops-bench-"))
        self.pin_proxy, self.pin_load = _cpu_layout()
        self.wrk = _ensure_tool(WRK, "wrk")
        self.haproxy = _ensure_tool(HAPROXY, "haproxy")

    def spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        # own session: a Ctrl+C reaches only us, and we stop the children in order
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> dict[str, tuple[int, subprocess.Popen]]:
        py = [sys.executable]
        ports: dict[str, tuple[int, subprocess.Popen]] = {}
        backends = []
        for i in (1, 2):
            port = free_port()
            module = "ctops_tools.bench.proxy_learners" if self.mix == "learners" else "ctops_tools.bench.hello"
            proc = self.spawn(self.pin_load + py + ["-m", module, "--port", str(port)], f"backend{i}")
            _wait_port(port, proc, f"backend {i}")
            backends.append(f"127.0.0.1:{port}")

        port = free_port()
        servers = "\n".join(f"    server s{i + 1} {b}" + (f" cookie s{i + 1}" if self.mix == "learners" else "")
                            for i, b in enumerate(backends))
        if self.mix == "learners":
            # the same function as the data plane's: a learner with a session but no server cookie is
            # given one on each answer (the wrk script, unlike a browser, never sends it back)
            servers = LEARNERS_AFFINITY + servers
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, servers=servers))
        proc = self.spawn(self.pin_proxy + [self.haproxy, "-db", "-f", str(cfg)], "haproxy")
        _wait_port(port, proc, "haproxy")
        ports["haproxy"] = (port, proc)

        port = free_port()
        proc = self.spawn(self.pin_proxy + py + ["-m", "ctops_tools.bench.proxy", "--serve", str(port),
                                                 "--backends", ",".join(backends)], "dispatcher")
        _wait_port(port, proc, "dispatcher")
        ports["dispatcher"] = (port, proc)
        return ports

    def load(self, port: int, proxy: subprocess.Popen | None = None, *, duration: float) -> WrkResult:
        cmd = self.pin_load + [self.wrk, "-t1", f"-c{self.connections}", f"-d{max(duration, 1):.0f}s",
                               "--latency", f"http://127.0.0.1:{port}/"]
        if self.mix == "learners":
            script = self.tmp / "learners.lua"
            if not script.exists():
                script.write_text(LEARNERS_LUA)
            cmd[-1:-1] = ["-s", str(script)]
        cpu_before = _cpu_seconds(proxy.pid) if proxy else 0.0
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.procs.append(proc)
        out, _ = proc.communicate()
        self.procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
        result = parse_wrk(out)
        if proxy and result.requests:
            result.cpu_us_per_request = round((_cpu_seconds(proxy.pid) - cpu_before) * 1e6 / result.requests, 1)
        return result

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mean(results: list[WrkResult]) -> WrkResult:
    n = len(results)
    return WrkResult(round(sum(r.requests_per_s for r in results) / n, 1),
                     round(sum(r.p50_ms for r in results) / n, 3),
                     round(sum(r.p99_ms for r in results) / n, 3),
                     sum(r.requests for r in results), sum(r.errors for r in results),
                     round(sum(r.cpu_us_per_request for r in results) / n, 1))


def measure(duration: float, connections: int, mix: str = "get") -> dict:
    """Pairs of runs, one per proxy back to back (the order alternating between pairs). The ratios are
    the medians of the pairs' ratios: a burst of noise from the machine spoils one pair, not the result."""
    bench = Bench(duration, connections, mix)
    try:
        ports = bench.start()
        for name in ("haproxy", "dispatcher"):
            bench.load(ports[name][0], duration=WARMUP_S)
        runs: dict[str, list[WrkResult]] = {"haproxy": [], "dispatcher": []}
        for i in range(ROUNDS):
            for name in ("haproxy", "dispatcher") if i % 2 == 0 else ("dispatcher", "haproxy"):
                runs[name].append(bench.load(*ports[name], duration=duration))
    finally:
        bench.stop()
    hap, disp = _mean(runs["haproxy"]), _mean(runs["dispatcher"])
    pairs = [(d.requests_per_s / h.requests_per_s if h.requests_per_s else 0.0,
              d.p99_ms / h.p99_ms if h.p99_ms else float("inf"))
             for h, d in zip(runs["haproxy"], runs["dispatcher"], strict=True)]
    throughput = statistics.median(t for t, _ in pairs)
    target_throughput, target_p99 = TARGETS[mix]
    p99 = statistics.median(p for _, p in pairs)
    return {
        "setup": {"duration_s": duration, "connections": connections, "rounds": ROUNDS, "wrk_threads": 1,
                  "mix": mix,
                  "pinning": {"proxy": " ".join(bench.pin_proxy) or "none", "load": " ".join(bench.pin_load) or "none"},
                  "haproxy": _haproxy_version(bench.haproxy), "data_plane": data_plane_build()},
        "haproxy": asdict(hap),
        "dispatcher": asdict(disp),
        "runs": {k: [asdict(r) for r in v] for k, v in runs.items()},
        "pair_ratios": [{"throughput": round(t, 3), "p99": round(p, 3) if p != float("inf") else None}
                        for t, p in pairs],
        "ratios": {"throughput": round(throughput, 3), "p99": round(p99, 3), "of": "median of the pairs' ratios"},
        "targets": {"throughput_min": target_throughput, "p99_max": target_p99},
        "met": throughput >= target_throughput and p99 <= target_p99 and disp.errors == 0,
    }


def data_plane_build() -> str:
    """Which build of the data plane runs here, a stale compiled one called out (dispatcher/planebuild.py)."""
    from dispatcher import planebuild

    return planebuild.describe(planebuild.data_plane_build())


def _haproxy_version(path: str) -> str:
    out = subprocess.run([path, "-v"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "unknown"


def render(result: dict) -> str:
    hap, disp, ratios = result["haproxy"], result["dispatcher"], result["ratios"]
    s = result["setup"]
    lines = [
        f"proxy benchmark ({s['mix']} mix): wrk -t1 -c{s['connections']} -d{s['duration_s']:g}s"
        f" x {s['rounds']} pairs, "
        f"2 {'trainer-like' if s['mix'] == 'learners' else 'hello'} backends, "
        f"HAProxy {s['haproxy']} (nbthread 1); pinning proxy={s['pinning']['proxy']}; "
        f"data plane {s['data_plane']}",
        "",
        f"{'mean':<12}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>9}{'CPU us/req':>12}",
        *(f"{name:<12}{r['requests_per_s']:>12,.0f}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}{r['errors']:>9}"
          f"{r['cpu_us_per_request']:>12.1f}" for name, r in (("haproxy", hap), ("dispatcher", disp))),
        "",
        "pair  haproxy req/s  dispatcher req/s  ratio   haproxy p99  dispatcher p99  ratio",
        *(f"{i + 1:>4}{h['requests_per_s']:>15,.0f}{d['requests_per_s']:>18,.0f}{pr['throughput']:>7.2f}"
          f"{h['p99_ms']:>11.2f} ms{d['p99_ms']:>13.2f} ms{pr['p99'] or 0:>7.2f}"
          for i, (h, d, pr) in enumerate(zip(result["runs"]["haproxy"], result["runs"]["dispatcher"],
                                             result["pair_ratios"], strict=True))),
        "",
        f"throughput ratio (dispatcher/haproxy, median of pairs) {ratios['throughput']:.2f}"
        f"   target >= {result['targets']['throughput_min']}",
        f"p99 ratio        (dispatcher/haproxy, median of pairs) {ratios['p99']:.2f}"
        f"   target <= {result['targets']['p99_max']}",
        f"targets met: {'yes' if result['met'] else 'NO'}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with sigterm_as_interrupt():
            result = measure(float(args.duration), int(args.connections), getattr(args, "mix", "get"))
    except RuntimeError as exc:
        print(f"ctops bench proxy: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ctops_tools.bench.proxy")
    ap.add_argument("--serve", type=int, metavar="PORT", help="run the data plane standalone on PORT")
    ap.add_argument("--backends", default="", help="host:port,host:port (with --serve)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--mix", choices=list(TARGETS), default="get")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, [b for b in args.backends.split(",") if b])
        return
    args.which = "proxy"
    sys.exit(run(args))


if __name__ == "__main__":
    main()

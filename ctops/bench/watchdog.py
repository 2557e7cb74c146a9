"""`ctops bench watchdog`: how fast a crashed (SIGKILL) or hung (SIGSTOP) supervised program is
answering its health check again, under the ctops agent and under supervisord (from PyPI)
supervising the same program, medians over several repetitions; and the agent's own CPU and RSS
at a 1 Hz heartbeat. Targets: crash ≤ 0.5 s, hang ≤ 2 s, agent ≤ 1 % of a core and ≤ 40 MB."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ctops.auth import hash_token, new_token
from ctops.procs import Child, ctops_argv, spawn, stop_all
from ctops.redis_embed import EmbeddedRedis, free_port

HANG_CAP_S = 10.0
LIVENESS = {"interval_ms": 250, "timeout_ms": 250, "failures": 2}


def program(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def answers(port: int, timeout: float = 0.05) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def wait_answer(port: int, cap: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < cap:
        if answers(port):
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


def find_child(parent: int, port: int) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for p in psutil.Process(parent).children(recursive=True):
            try:
                if "http.server" in " ".join(p.cmdline()) and str(port) in p.cmdline() and p.status() != "zombie":
                    if answers(port, 0.5):
                        return p.pid
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise RuntimeError(f"no supervised program answering on {port}")


def measure(parent: int, port: int, sig: signal.Signals, reps: int) -> list[float | None]:
    out: list[float | None] = []
    for _ in range(reps):
        pid = find_child(parent, port)
        os.kill(pid, sig)
        t = wait_answer(port, HANG_CAP_S)
        out.append(None if t is None else round(t, 3))
        if t is None:  # supervisord never replaces a hung program: set it free for the next round
            os.kill(pid, signal.SIGKILL)
            wait_answer(port, 10)
        time.sleep(0.3)
    return out


def med(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return round(statistics.median(real), 3) if len(real) == len(values) and real else None


def run_ctops(root: Path, reps: int) -> dict:
    redis = EmbeddedRedis(data_dir=str(root / "redis")).start()
    port, ops, data = free_port(), free_port(), free_port()
    agent_tok = new_token()
    cfg = root / "ctops.toml"
    cmd = ", ".join(json.dumps(a) for a in program(port))
    cfg.write_text(f"""cluster = "bench"
[redis]
url = "{redis.url}"
prefix = "bench-wd"
[timings]
heartbeat_interval_ms = 1000
[[dispatchers]]
name = "A"
data = "127.0.0.1:{data}"
ops = "127.0.0.1:{ops}"
[[agents]]
name = "host-1"
[[agents.processes]]
name = "web"
command = [{cmd}]
crashloop_restarts = 1000
[agents.processes.liveness]
kind = "http"
url = "http://127.0.0.1:{port}/"
interval_ms = {LIVENESS['interval_ms']}
timeout_ms = {LIVENESS['timeout_ms']}
failures = {LIVENESS['failures']}
[[tokens]]
name = "agent"
role = "agent"
host = "host-1"
sha256 = "{hash_token(agent_tok)}"
""")
    env = {"CTOPS_AGENT_TOKEN": agent_tok}
    kids: list[Child] = [spawn("A", ctops_argv("dispatcher", "--config", str(cfg), "--name", "A"),
                               str(root / "A.log"), env)]
    agent = spawn("host-1", ctops_argv("agent", "--config", str(cfg), "--name", "host-1"), str(root / "agent.log"), env)
    kids.append(agent)
    try:
        find_child(agent.pid, port)
        crash = measure(agent.pid, port, signal.SIGKILL, reps)
        hang = measure(agent.pid, port, signal.SIGSTOP, reps)
        # the agent's own footprint at a 1 Hz heartbeat, over a quiet window
        p = psutil.Process(agent.pid)
        c0, t0 = p.cpu_times(), time.monotonic()
        time.sleep(10)
        c1, t1 = p.cpu_times(), time.monotonic()
        cpu = ((c1.user + c1.system) - (c0.user + c0.system)) / (t1 - t0) * 100
        rss = p.memory_info().rss / 2**20
    finally:
        stop_all(kids)
        redis.stop()
    return {"crash_s": crash, "hang_s": hang, "crash_median_s": med(crash), "hang_median_s": med(hang),
            "agent_cpu_percent": round(cpu, 2), "agent_rss_mb": round(rss, 1), "liveness": LIVENESS}


def ensure_supervisord() -> str | None:
    exe = Path(sys.executable).parent / "supervisord"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "supervisor"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(exe) if exe.exists() else None


def run_supervisord(root: Path, reps: int) -> dict:
    exe = ensure_supervisord()
    if exe is None:
        return {"error": "supervisor could not be installed from PyPI"}
    port = free_port()
    conf = root / "supervisord.conf"
    conf.write_text(f"""[supervisord]
nodaemon=true
logfile={root}/supervisord.log
pidfile={root}/supervisord.pid
[program:web]
command={' '.join(program(port))}
autorestart=true
startsecs=0
startretries=100
""")
    sup = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        find_child(sup.pid, port)
        crash = measure(sup.pid, port, signal.SIGKILL, reps)
        hang = measure(sup.pid, port, signal.SIGSTOP, reps)
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(15)
        except subprocess.TimeoutExpired:
            sup.kill()
    return {"crash_s": crash, "hang_s": hang, "crash_median_s": med(crash), "hang_median_s": med(hang),
            "note": f"supervisord has no liveness check: a hung program is never replaced (cap {HANG_CAP_S:.0f} s)"}


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="ctops-bench-wd-"))
    reps = max(1, args.reps)
    try:
        ours = run_ctops(root, reps)
        theirs = run_supervisord(root, reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = None
    if ours["crash_median_s"] and theirs.get("crash_median_s"):
        ratio = round(ours["crash_median_s"] / theirs["crash_median_s"], 2)
    doc = {"ctops": ours, "supervisord": theirs, "crash_ratio_ctops_vs_supervisord": ratio,
           "targets": {"crash_s": 0.5, "hang_s": 2.0, "agent_cpu_percent": 1.0, "agent_rss_mb": 40}}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0

    def fmt(v: float | None) -> str:
        return "never" if v is None else f"{v:.3f}s"

    print(f"supervised program: python -m http.server; {reps} repetitions; ctops liveness {LIVENESS}")
    print(f"{'':<12} {'crash → answering':>18} {'hang → answering':>17}")
    print(f"{'ctops agent':<12} {fmt(ours['crash_median_s']):>18} {fmt(ours['hang_median_s']):>17}")
    print(f"{'supervisord':<12} {fmt(theirs.get('crash_median_s')):>18} {fmt(theirs.get('hang_median_s')):>17}")
    if ratio:
        print(f"crash recovery ratio ctops/supervisord: {ratio}×")
    print(f"agent footprint at 1 Hz: {ours['agent_cpu_percent']}% of a core, {ours['agent_rss_mb']} MB RSS")
    return 0

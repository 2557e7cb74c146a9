"""`ctops bench watchdog`: how fast a crashed (SIGKILL) or hung (SIGSTOP) supervised program is
answering again, and how many connections a client hammering its port had refused meanwhile, under
the ctops agent and under supervisord (from PyPI), in one run, for two programs: a toy server
(`python -m http.server`) and the demo's real trainer (`ctops trainer` with the demo's deployment
file and an embedded Redis; under the agent with `listen` + `warm_spare`, as the demo runs it).
Medians over several repetitions; and the agent's own CPU and RSS at a 1 Hz heartbeat.
Targets: crash ≤ 0.2 s, hang ≤ 1.2 s, 0 refused, agent ≤ 1 % of a core and ≤ 40 MB."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ctops.auth import hash_token, new_token
from ctops_tools.bench.hammer import Hammer, get, serving_pid
from ctops_tools.procs import Child, ctops_argv, spawn, stop_all
from ctops_tools.redis_embed import EmbeddedRedis, free_port, redis_toml

HANG_CAP_S = 10.0
# the demo's trainer liveness (ctops_tools/demo.py), for both programs
LIVENESS = {"interval_ms": 250, "timeout_ms": 400, "failures": 2}
TARGETS = {"crash_s": 0.2, "hang_s": 1.2, "refused": 0, "agent_cpu_percent": 1.0, "agent_rss_mb": 40}


@dataclass
class Program:
    """What is supervised: its argv, the port it answers on and the path that answers 200."""

    name: str
    argv: list[str]
    port: int
    path: str
    env: dict[str, str] = field(default_factory=dict)


def toy(port: int) -> Program:
    return Program("toy", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port, "/")


def wait_answer(prog: Program, cap: float) -> float | None:
    """Seconds until a request is answered. A connection waiting in a backlog is given time to be
    answered (not abandoned), so a server that takes over a shared socket is timed exactly."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < cap:
        if get(prog.port, prog.path, timeout=min(1.0, max(0.05, cap - (time.monotonic() - t0)))) == "ok":
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


def wait_serving(prog: Program, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = serving_pid(prog.port, prog.path, timeout=2)
        except OSError:
            pid = None
        if pid:
            return pid
        time.sleep(0.05)
    raise RuntimeError(f"nothing answering on {prog.port}")


def measure(prog: Program, sig: signal.Signals, reps: int, ready: Callable[[int], None]) -> dict:
    """`reps` times: signal the answering process while a client hammers the port; time until it
    answers again and count what the client saw."""
    times: list[float | None] = []
    seen: Counter[str] = Counter()
    for _ in range(reps):
        pid = wait_serving(prog)
        ready(pid)
        with Hammer(prog.port, prog.path, cap=HANG_CAP_S + 5) as hammer:
            time.sleep(0.05)
            os.kill(pid, sig)
            t = wait_answer(prog, HANG_CAP_S)
            time.sleep(0.05)
        seen += hammer.counts
        times.append(None if t is None else round(t, 3))
        if t is None:  # supervisord never replaces a hung program: set it free for the next round
            os.kill(pid, signal.SIGKILL)
            wait_answer(prog, 30)
        time.sleep(0.3)
    return {"s": times, "median_s": med(times), "refused": seen["refused"], "client": dict(seen)}


def med(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return round(statistics.median(real), 3) if len(real) == len(values) and real else None


def spare_ready(agent_pid: int, log: Path) -> Callable[[int], None]:
    """Waits until the agent's warm spare (its trainer child that is not answering) said it is ready."""

    def wait(active: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            spares = {p.pid for p in psutil.Process(agent_pid).children()} - {active}
            text = log.read_text(errors="replace") if log.exists() else ""
            ready = {int(m) for m in re.findall(r"warm spare ready \(pid (\d+)\)", text)}
            if spares & ready:
                return
            time.sleep(0.1)
        raise RuntimeError("no warm spare became ready")

    return wait


def agent_config(root: Path, prog: Program, listen: bool, redis_url: str) -> tuple[Path, str]:
    """A deployment with one dispatcher and one agent supervising `prog`."""
    port_ops, port_data = free_port(), free_port()
    agent_tok = new_token()
    cfg = root / f"agent-{prog.name}.toml"
    cmd = ", ".join(json.dumps(a) for a in prog.argv)
    extra = f'listen = "127.0.0.1:{prog.port}"\nwarm_spare = true\n' if listen else ""
    cfg.write_text(f"""cluster = "bench"
[redis]
url = "{redis_url}"
prefix = "bench-wd"
[timings]
heartbeat_interval_ms = 1000
[[dispatchers]]
name = "A"
data = "127.0.0.1:{port_data}"
ops = "127.0.0.1:{port_ops}"
[[agents]]
name = "host-1"
[[agents.processes]]
name = "{prog.name}"
command = [{cmd}]
crashloop_restarts = 1000
{extra}[agents.processes.liveness]
kind = "http"
url = "http://127.0.0.1:{prog.port}{prog.path}"
interval_ms = {LIVENESS['interval_ms']}
timeout_ms = {LIVENESS['timeout_ms']}
failures = {LIVENESS['failures']}
[[tokens]]
name = "agent"
role = "agent"
host = "host-1"
sha256 = "{hash_token(agent_tok)}"
""")
    return cfg, agent_tok


def run_ctops(root: Path, redis: EmbeddedRedis, prog: Program, reps: int, listen: bool, footprint: bool) -> dict:
    cfg, agent_tok = agent_config(root, prog, listen, redis.url)
    logs = root / f"logs-ctops-{prog.name}"
    env = {**prog.env, "CTOPS_AGENT_TOKEN": agent_tok, "CTOPS_LOG_DIR": str(logs)}
    kids: list[Child] = [spawn("A", ctops_argv("dispatcher", "--config", str(cfg), "--name", "A"),
                               str(logs / "A.log"), env)]
    agent = spawn("host-1", ctops_argv("agent", "--config", str(cfg), "--name", "host-1"), str(logs / "agent.log"), env)
    kids.append(agent)
    ready = spare_ready(agent.pid, logs / f"{prog.name}.log") if listen else (lambda _pid: None)
    out: dict = {"listen_and_warm_spare": listen}
    try:
        wait_serving(prog, 120)
        out["crash"] = measure(prog, signal.SIGKILL, reps, ready)
        out["hang"] = measure(prog, signal.SIGSTOP, reps, ready)
        if footprint:
            # the agent's own footprint at a 1 Hz heartbeat, over a quiet window
            p = psutil.Process(agent.pid)
            c0, t0 = p.cpu_times(), time.monotonic()
            time.sleep(10)
            c1, t1 = p.cpu_times(), time.monotonic()
            out["agent_cpu_percent"] = round(((c1.user + c1.system) - (c0.user + c0.system)) / (t1 - t0) * 100, 2)
            out["agent_rss_mb"] = round(p.memory_info().rss / 2**20, 1)
    finally:
        stop_all(kids)
    return out


def demo_trainer(root: Path, redis: EmbeddedRedis) -> Program:
    """The demo's trainer-1: the demo's own deployment file (ctops_tools/demo.py) against this Redis."""
    from ctops_tools.demo import PREFIX, Ports, agent_token_env, new_tokens, write_deployment

    cfg = root / "demo.toml"
    tokens = new_tokens()
    users = redis.add_service_users(PREFIX, "bench")
    layout = write_deployment(cfg, redis_toml(PREFIX, url=f"redis://{redis.address}/0", usernames=users), Ports(0),
                              tokens)
    t = layout["trainers"][0]
    env = {**redis.secrets.env(("trainer",)), agent_token_env(t["host"]): tokens["agents"][t["host"]],
           "CTOPS_DEMO_LLM_KEY": "bench", "CTOPS_LLM_CLIENT_KEY": new_token(), "PYTHONUNBUFFERED": "1"}
    return Program("trainer", ctops_argv("trainer", "--config", str(cfg), "--name", t["name"]), t["port"], "/healthz",
                   env)


def ensure_supervisord() -> str | None:
    exe = Path(sys.executable).parent / "supervisord"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "supervisor"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(exe) if exe.exists() else None


def run_supervisord(root: Path, prog: Program, reps: int) -> dict:
    exe = ensure_supervisord()
    if exe is None:
        return {"error": "supervisor could not be installed from PyPI"}
    conf = root / f"supervisord-{prog.name}.conf"
    conf.write_text(f"""[supervisord]
nodaemon=true
logfile={root}/supervisord-{prog.name}.log
pidfile={root}/supervisord-{prog.name}.pid
[program:{prog.name}]
command={' '.join(prog.argv)}
autorestart=true
startsecs=0
startretries=100
stdout_logfile={root}/supervisord-{prog.name}-out.log
redirect_stderr=true
""")
    # the program inherits supervisord's environment
    sup = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, **prog.env})
    out: dict = {"note": f"no liveness check: a hung program is never replaced (cap {HANG_CAP_S:.0f} s)"}
    try:
        wait_serving(prog, 120)
        out["crash"] = measure(prog, signal.SIGKILL, reps, lambda _pid: None)
        out["hang"] = measure(prog, signal.SIGSTOP, reps, lambda _pid: None)
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(15)
        except subprocess.TimeoutExpired:
            sup.kill()
    return out


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="ctops-bench-wd-"))
    reps = max(1, args.reps)
    rows: list[dict] = []
    redis = EmbeddedRedis(data_dir=str(root / "redis")).start()
    try:
        prog = toy(free_port())
        rows.append({"program": "toy", "supervisor": "ctops agent", **run_ctops(root, redis, prog, reps, False, True)})
        rows.append({"program": "toy", "supervisor": "supervisord", **run_supervisord(root, prog, reps)})
        trainer = demo_trainer(root, redis)
        rows.append({"program": "trainer", "supervisor": "ctops agent",
                     **run_ctops(root, redis, trainer, reps, True, False)})
        rows.append({"program": "trainer", "supervisor": "supervisord", **run_supervisord(root, trainer, reps)})
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)
    doc = {"rows": rows, "reps": reps, "liveness": LIVENESS, "targets": TARGETS}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0

    def fmt(part: dict | None) -> tuple[str, str]:
        if not part:
            return "-", "-"
        v = part["median_s"]
        return ("never" if v is None else f"{v:.3f}s"), str(part["refused"])

    print(f"{reps} repetitions of each fault; ctops liveness {LIVENESS}; the trainer under the agent with "
          "listen + warm_spare (as in the demo)")
    print(f"{'program':<8} {'supervisor':<12} {'crash → answering':>18} {'refused':>8} "
          f"{'hang → answering':>17} {'refused':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['program']:<8} {r['supervisor']:<12} {r['error']}")
            continue
        c, cr = fmt(r.get("crash"))
        h, hr = fmt(r.get("hang"))
        print(f"{r['program']:<8} {r['supervisor']:<12} {c:>18} {cr:>8} {h:>17} {hr:>8}")
    print("refused: connections a client hammering the port (connect + GET, back to back) had refused "
          "while the program restarted, summed over the repetitions")
    agent = rows[0]
    if "agent_cpu_percent" in agent:
        print(f"agent footprint at 1 Hz: {agent['agent_cpu_percent']}% of a core, {agent['agent_rss_mb']} MB RSS")
    print(f"targets: crash ≤ {TARGETS['crash_s']} s, hang ≤ {TARGETS['hang_s']} s, {TARGETS['refused']} refused")
    return 0

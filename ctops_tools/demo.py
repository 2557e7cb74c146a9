"""`ctops demo`: the whole cluster on one machine (embedded Redis, 3 hosts, 2 dispatchers, 2 fake
LLM providers) and the console in the foreground. Ctrl+C or SIGTERM stops everything it started."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ctops import statefile
from ctops.auth import hash_token, new_token
from ctops_tools.procs import Child, ctops_argv, sigterm_as_interrupt, spawn, stop_all
from ctops_tools.redis_embed import EmbeddedStore, StoreSecrets, free_port, port_free

HOSTS = 3
DISPATCHERS = ("A", "B")
PROVIDERS = ("primary", "secondary")


class Ports:
    """Either consecutive ports from --base-port or free ones, so two demos can run side by side;
    a restarted demo gets the ports of its previous run again when they are all free."""

    def __init__(self, base: int, previous: list[int] | None = None) -> None:
        self.next = base
        self.previous = list(previous or [])
        self.taken: list[int] = []

    def take(self) -> int:
        if self.previous:
            port = self.previous.pop(0)
        elif self.next:
            self.next += 1
            port = self.next - 1
        else:
            port = free_port()
        self.taken.append(port)
        return port


LAST_RUN = "demo-last.json"


def previous_run(work: Path, base_port: int) -> dict[str, Any]:
    """Tokens and ports of the last demo in this workdir, if its ports are all free again: staff
    keep their tokens, and the addresses in their notes stay right."""
    try:
        doc = json.loads((work / LAST_RUN).read_text())
        ports = [int(p) for p in doc["ports"]]
        tokens, keys = doc["tokens"], {k: str(doc["keys"][k]) for k in ("llm_client", "affinity")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    fresh = new_tokens()  # tokens of another shape (an older version wrote them) are not reused
    if not isinstance(tokens, dict) or set(tokens) != set(fresh) or set(tokens.get("agents") or {}) != set(
            fresh["agents"]):
        return {}
    if doc.get("base_port") != base_port or not all(port_free("127.0.0.1", p) for p in ports):
        return {}
    return {"ports": ports, "tokens": tokens, "keys": keys}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def agent_token_env(host: str) -> str:
    return "CTOPS_AGENT_TOKEN_" + host.upper().replace("-", "_")


PEER_TOKEN_ENV = "CTOPS_PEER_TOKEN"


def new_tokens() -> dict[str, Any]:
    """Staff tokens, one agent token per host and the dispatchers' peer credential. `agent` (host-1's)
    stays for scripts written before agent tokens were bound to hosts."""
    agents = {f"host-{i}": new_token() for i in range(1, HOSTS + 1)}
    return {"operator": new_token(), "viewer": new_token(), "agent": agents["host-1"], "agents": agents,
            "peer": new_token(), "scrape": new_token()}


def write_deployment(path: Path, redis_section: str, ports: Ports, tokens: dict[str, Any]) -> dict[str, Any]:
    """The deployment file the demo's processes read, and the addresses it chose."""
    disp = [{"name": n, "data": f"127.0.0.1:{ports.take()}", "ops": f"127.0.0.1:{ports.take()}"} for n in DISPATCHERS]
    trainers: list[dict[str, Any]] = [{"name": f"trainer-{i}", "port": ports.take(), "host": f"host-{i}"}
                                      for i in range(1, HOSTS + 1)]
    llm = [{"name": n, "port": ports.take()} for n in PROVIDERS]
    out = [
        "# written by `ctops demo`; see README for a deployment file of your own",
        'cluster = "demo"',
        "",
        redis_section,
        "[timings]",
        "heartbeat_interval_ms = 1000",
        "health_interval_ms = 500",
        "fall = 2",
        "rise = 2",
        "",
        "[trainer]",
        "# reviews go through the dispatchers' LLM pool, which fails over between the providers",
        'llm = "dispatcher"',
        "",
        "[llm]",
        "# the pool on the data port asks its clients (the trainers) for this key",
        'client_key_env = "CTOPS_LLM_CLIENT_KEY"',
        "",
        "[proxy]",
        "# signs the affinity cookie; both dispatchers share it, so a session keeps its server across a failover",
        'affinity_key_env = "CTOPS_AFFINITY_KEY"',
    ]
    for d in disp:
        out += ["", "[[dispatchers]]", f'name = "{d["name"]}"', f'data = "{d["data"]}"', f'ops = "{d["ops"]}"',
                f'peer_token_env = "{PEER_TOKEN_ENV}"']
    for t in trainers:
        out += ["", "[[servers]]", f'name = "{t["name"]}"', f'url = "http://127.0.0.1:{t["port"]}"',
                f'host = "{t["host"]}"']
    for t in trainers:
        cmd = ctops_argv("trainer", "--config", str(path.resolve()), "--name", t["name"])
        out += ["", "[[agents]]", f'name = "{t["host"]}"', f'token_env = "{agent_token_env(t["host"])}"', "",
                "[[agents.processes]]", f'name = "{t["name"]}"',
                f"command = {_toml_list(cmd)}",
                "# the agent holds the port (connections wait across a restart) and keeps a spare ready",
                f'listen = "127.0.0.1:{t["port"]}"', "warm_spare = true",
                "[agents.processes.liveness]", 'kind = "http"',
                f'url = "http://127.0.0.1:{t["port"]}/healthz"', "interval_ms = 250", "timeout_ms = 400",
                "failures = 2"]
    for prio, p in enumerate(llm, start=1):
        out += ["", "[[llm_providers]]", f'name = "{p["name"]}"', f'base_url = "http://127.0.0.1:{p["port"]}/v1"',
                'model = "gpt-4"', 'api_key_env = "CTOPS_DEMO_LLM_KEY"', f"priority = {prio}", "timeout_ms = 5000"]
    for role in ("operator", "viewer", "peer", "scrape"):
        out += ["", "[[tokens]]", f'name = "demo-{role}"', f'role = "{role}"', f'sha256 = "{hash_token(tokens[role])}"']
    for host, tok in tokens["agents"].items():
        out += ["", "[[tokens]]", f'name = "demo-agent-{host}"', 'role = "agent"', f'host = "{host}"',
                f'sha256 = "{hash_token(tok)}"']
    statefile.write_private(path, "\n".join(out) + "\n")  # it holds token hashes
    return {"dispatchers": disp, "trainers": trainers, "llm": llm}


async def _wait_ready(urls: list[str], token: str, servers: int, hosts: int, timeout: float) -> dict[str, Any]:
    """Until a dispatcher reports every server up and every host heartbeating."""
    import httpx  # keeps `ctops --help` fast

    deadline = time.monotonic() + timeout
    last: Any = None
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=2) as client:
        while time.monotonic() < deadline:
            for url in urls:
                try:
                    r = await client.get(f"{url}/api/v1/state")
                except httpx.HTTPError as exc:
                    last = exc
                    continue
                if r.status_code != 200:
                    last = r.text
                    continue
                st = r.json()
                up = [s for s in st["servers"] if s["state"] == "up"]
                alive = [h for h in st["hosts"] if h["state"] == "alive" and h["processes"]
                         and all(p.get("pid") for p in h["processes"])]
                if len(up) == servers and len(alive) == hosts:
                    return st
                last = {"up": [s["name"] for s in up], "alive": [h["name"] for h in alive]}
            await asyncio.sleep(0.2)
    raise TimeoutError(f"cluster not ready after {timeout:.0f}s: {last}")


PREFIX = "ctops:demo"


def start(args: argparse.Namespace) -> tuple[list[Child], EmbeddedStore, dict[str, Any]]:
    work = Path(args.workdir).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    previous = previous_run(work, args.base_port)
    ports = Ports(args.base_port, previous.get("ports"))
    # the duplicated store: a primary, two replicas and three Sentinels, locked with fresh passwords
    # (or, restarted on this workdir, with those of the last run: see EmbeddedStore)
    # a node whose AOF is damaged in the middle is resynced from a healthy one, said on stderr
    store = EmbeddedStore(work / "redis", secrets_=StoreSecrets.generate(), prefix=PREFIX,
                          ports=[ports.take() for _ in range(6)],
                          report=lambda m: print(f"ctops demo: redis: {m}", file=sys.stderr, flush=True)).start()
    children: list[Child] = []
    try:
        tokens = previous.get("tokens") or new_tokens()
        keys = previous.get("keys") or {"llm_client": new_token(), "affinity": new_token()}
        cfg = work / "demo.toml"
        layout = write_deployment(cfg, store.toml(PREFIX), ports, tokens)
        statefile.write_private(work / LAST_RUN, json.dumps({"base_port": args.base_port, "ports": ports.taken,
                                                             "tokens": tokens, "keys": keys}))
        from trainer.fake_llm import CONTROL_TOKEN_ENV  # keeps `ctops --help` fast

        env = {"CTOPS_DEMO_LLM_KEY": "demo-key",
               "CTOPS_LLM_CLIENT_KEY": keys["llm_client"],
               # signs the dispatchers' affinity cookies (both must share it: learners' cookies stay
               # good across a restart too); switches the fakes' modes
               "CTOPS_AFFINITY_KEY": keys["affinity"], CONTROL_TOKEN_ENV: new_token(),
               "CTOPS_LOG_DIR": str(logs), "PYTHONUNBUFFERED": "1"}
        # each process gets only its own role's Redis password (agents pass theirs on to the trainers)
        env_dispatcher = env | store.secrets.env(("dispatcher",))
        env_agent = env | store.secrets.env(("trainer",))
        for p in layout["llm"]:
            children.append(spawn(p["name"], ctops_argv("fake-llm", "--port", str(p["port"]), "--name", p["name"]),
                                  str(logs / f"llm-{p['name']}.log"), env))
        for d in layout["dispatchers"]:
            children.append(spawn(d["name"], ctops_argv("dispatcher", "--config", str(cfg), "--name", d["name"]),
                                  str(logs / f"dispatcher-{d['name']}.log"),
                                  {**env_dispatcher, PEER_TOKEN_ENV: tokens["peer"]}))
        for t in layout["trainers"]:
            # each agent (and the trainer it starts) holds only its own host's token
            children.append(spawn(t["host"], ctops_argv("agent", "--config", str(cfg), "--name", t["host"]),
                                  str(logs / f"agent-{t['host']}.log"),
                                  {**env_agent, agent_token_env(t["host"]): tokens["agents"][t["host"]]}))
        ops = [f"http://{d['ops']}" for d in layout["dispatchers"]]
        st = asyncio.run(_wait_ready(ops, tokens["viewer"], HOSTS, HOSTS, timeout=60))
    except BaseException:
        stop_all(children)
        store.stop()
        raise
    pids = {c.name: c.pid for c in children}
    proc_pids = {p["name"]: p["pid"] for h in st["hosts"] for p in h["processes"]}
    doc = {
        "cluster": "demo",
        "config": str(cfg),
        "workdir": str(work),
        "started_at_ms": int(time.time() * 1000),
        "demo_pid": os.getpid(),
        "dispatchers": [{"name": d["name"], "data_url": f"http://{d['data']}", "ops_url": f"http://{d['ops']}",
                         "pid": pids[d["name"]]} for d in layout["dispatchers"]],
        "trainers": [{"name": t["name"], "url": f"http://127.0.0.1:{t['port']}", "pid": proc_pids.get(t["name"]),
                      "host": t["host"]} for t in layout["trainers"]],
        "agents": [{"name": t["host"], "pid": pids[t["host"]]} for t in layout["trainers"]],
        "redis": redis_doc(store),
        "llm_providers": [{"name": p["name"], "url": f"http://127.0.0.1:{p['port']}/v1", "pid": pids[p["name"]]}
                          for p in layout["llm"]],
        # `llm`: the key the LLM pool on every data port (/llm/v1) asks its clients for, so a newcomer can
        # point the `openai` client at the demo (README); kept out of `tokens` in demo-last.json, which
        # holds it under `keys` with the other keys the demo made
        "tokens": {**tokens, "llm": keys["llm_client"]},
        "logs": str(logs),
    }
    return children, store, doc


def redis_doc(store: EmbeddedStore) -> dict[str, Any]:
    """The state file's `redis`: the primary now (`url` is an admin URL), every node, and what the CLI
    needs to reach the store as admin through the Sentinels (the file is 0600: it holds tokens too)."""
    primary = store.primary()
    return {"url": primary.url, "pid": primary.pid, "nodes": store.describe(), "prefix": PREFIX,
            "sentinels": store.sentinel_addresses, "service": store.service, "secrets": store.secrets.to_dict()}


def run(args: argparse.Namespace) -> int:
    # SIGTERM must run the same clean-up as Ctrl+C
    with sigterm_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    print("ctops demo: starting Redis (primary, 2 replicas, 3 Sentinels), 2 fake LLM providers, "
          "dispatchers A and B, 3 hosts…", file=sys.stderr)
    try:
        children, store, doc = start(args)
    except KeyboardInterrupt:
        return 130
    except (TimeoutError, OSError, RuntimeError) as exc:
        print(f"ctops demo: could not start the cluster: {exc}\nlogs: {Path(args.workdir) / 'logs'}",
              file=sys.stderr)
        return 1
    statefile.write(args.state_file, doc)
    print(f"ctops demo: up. state file {args.state_file}; logs in {doc['logs']}", file=sys.stderr)
    code = 0
    try:
        if args.headless:
            print("ctops demo: headless; Ctrl+C or SIGTERM stops it", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        else:
            from console.main import run as console_run  # only the foreground demo needs Textual

            code = console_run(argparse.Namespace(state_file=args.state_file, url=[], token=None))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not cut the clean-up short
        print("ctops demo: stopping…", file=sys.stderr)
        # agents first: they stop the trainers they supervise
        stop_all([c for c in children if c.name.startswith("host-")])
        stop_all([c for c in children if not c.name.startswith("host-")])
        store.stop()  # every node it started, whichever is primary now
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.state_file)
        print("ctops demo: stopped", file=sys.stderr)
    return code

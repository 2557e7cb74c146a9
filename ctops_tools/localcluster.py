"""A real cluster on loopback for tests and benchmarks: real Redis, real `ctops` processes.

`Cluster` writes a deployment file, starts the processes asked for and stops them all at the
end; callers talk to them over HTTP exactly as staff, agents and learners would.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ctops import statefile
from ctops.auth import hash_token, new_token
from ctops_tools.procs import Child, ctops_argv, kill_naming, spawn, stop_all
from ctops_tools.redis_embed import EmbeddedRedis, EmbeddedStore, free_port, redis_toml
from trainer.fake_llm import CONTROL_TOKEN_ENV, control_token

T = TypeVar("T")

# How `Cluster.start` starts a process: `procs.spawn` (exec, as in production) unless a caller (the
# test suite: ctops_tools.forkserver) hands in another function with its signature.
Spawner = Callable[[str, list[str], str, dict[str, str]], Child]
_spawner: Spawner = spawn


def use_spawner(fn: Spawner | None) -> None:
    """Start cluster processes with `fn` from now on; None: exec them again."""
    global _spawner
    _spawner = fn or spawn


def agent_token_env(host: str) -> str:
    """The variable an agent (and the trainers it starts) reads its host's token from."""
    return "CTOPS_AGENT_TOKEN_" + host.upper().replace("-", "_")


def peer_token_env(dispatcher: str) -> str:
    return "CTOPS_PEER_TOKEN_" + dispatcher.upper().replace("-", "_")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.1) -> T:
    """Poll until `probe` returns something truthy; fail with `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (httpx.HTTPError, OSError, KeyError, ValueError, StopIteration) as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# Frequent checks, so a test sees a change soon, with generous limits: on a busy 2-core machine a
# starved (not hung) trainer must not go suspect, nor a starved dispatcher think its loop blocked.
DEFAULT_TIMINGS = {"heartbeat_interval_ms": 300, "health_interval_ms": 200, "health_timeout_ms": 1500,
                   "fall": 3, "rise": 2, "heartbeat_timeout_ms": 6000, "loop_blocked_exit_ms": 10_000}
# For the tests that freeze or kill parts and wait for the cluster to notice: a frozen trainer is
# down within about a second, and a dispatcher frozen for longer than 2 s shows it does not take
# being frozen for a blocked loop and exit on thaw.
QUICK_TIMINGS = {"health_timeout_ms": 300, "fall": 2, "heartbeat_timeout_ms": 4000, "loop_blocked_exit_ms": 2000}


@dataclass
class Cluster:
    root: Path
    # one locked node (fast; the standard test cluster) or the duplicated store with Sentinels
    redis: EmbeddedRedis | EmbeddedStore
    prefix: str
    trainers: int = 3
    dispatchers: tuple[str, ...] = ("A",)
    hosts_with_agents: bool = False
    timings: dict[str, int] = field(default_factory=dict)
    # appended to the deployment file as is, e.g. a [trainer] or [sandbox] section
    extra_toml: str = ""
    # lines added to the [redis] section as is, e.g. "replica_acks = 0"
    redis_extra: str = ""
    # each agent serves GET /metrics on a port of its own (`metrics_listen`)
    agent_metrics: bool = False
    # staff tokens by role; "agent" is host-1's (see agent_tokens) and "peer" dispatcher A's (see peer_tokens)
    tokens: dict[str, str] = field(default_factory=lambda: {r: new_token() for r in ("operator", "viewer")})
    children: dict[str, Child] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {f"{d}.data": free_port() for d in self.dispatchers}
        self.ports |= {f"{d}.ops": free_port() for d in self.dispatchers}
        self.ports |= {f"trainer-{i}": free_port() for i in range(1, self.trainers + 1)}
        self.ports |= {p: free_port() for p in ("primary", "secondary")}
        if self.agent_metrics:
            self.ports |= {f"{h}.metrics": free_port() for h in self.host_names}
        # each agent its own token, bound to its host; each dispatcher its own peer credential
        self.agent_tokens = {h: new_token() for h in self.host_names}
        self.peer_tokens = {d: new_token() for d in self.dispatchers}
        self.tokens.setdefault("agent", self.agent_tokens["host-1"])
        self.tokens.setdefault("peer", self.peer_tokens[self.dispatchers[0]])
        # the cluster's own ACL users, limited to its key prefix (many clusters share the test Redis)
        tag = hashlib.sha1(self.prefix.encode()).hexdigest()[:10]
        self.redis_users = self.redis.add_service_users(self.prefix, tag)
        self.config = self.root / "ctops.toml"
        statefile.write_private(self.config, self._toml())
        self.env = {"CTOPS_DEMO_LLM_KEY": "k", "PYTHONUNBUFFERED": "1",
                    **self.redis.secrets.env(),
                    # the fakes' control token (callers send trainer.fake_llm.control_headers()) and the
                    # key the dispatchers share to sign affinity cookies
                    CONTROL_TOKEN_ENV: control_token(), "CTOPS_AFFINITY_KEY": new_token(),
                    **{agent_token_env(h): t for h, t in self.agent_tokens.items()},
                    **{peer_token_env(d): t for d, t in self.peer_tokens.items()}}

    # --- deployment file -----------------------------------------------------------------------
    @property
    def server_names(self) -> list[str]:
        return [f"trainer-{i}" for i in range(1, self.trainers + 1)]

    @property
    def host_names(self) -> list[str]:
        return [f"host-{i}" for i in range(1, self.trainers + 1)]

    def _toml(self) -> str:
        timings = {**DEFAULT_TIMINGS, **self.timings}
        out = ['cluster = "test"', self._redis_toml(), "[proxy]", 'affinity_key_env = "CTOPS_AFFINITY_KEY"',
               "[timings]"]
        out += [f"{k} = {v}" for k, v in timings.items()]
        for d in self.dispatchers:
            out += ["[[dispatchers]]", f'name = "{d}"', f'data = "127.0.0.1:{self.ports[d + ".data"]}"',
                    f'ops = "127.0.0.1:{self.ports[d + ".ops"]}"', f'peer_token_env = "{peer_token_env(d)}"']
        for i, name in enumerate(self.server_names, start=1):
            out += ["[[servers]]", f'name = "{name}"', f'url = "http://127.0.0.1:{self.ports[name]}"',
                    f'host = "host-{i}"']
        for i, name in enumerate(self.server_names, start=1):
            out += ["[[agents]]", f'name = "host-{i}"', f'token_env = "{agent_token_env(f"host-{i}")}"']
            if self.agent_metrics:
                out.append(f'metrics_listen = "127.0.0.1:{self.ports[f"host-{i}.metrics"]}"')
            if self.hosts_with_agents:
                cmd = ", ".join(f'"{a}"' for a in ctops_argv("trainer", "--config", str(self.config), "--name", name))
                out += ["[[agents.processes]]", f'name = "{name}"', f"command = [{cmd}]",
                        f'listen = "127.0.0.1:{self.ports[name]}"', "warm_spare = true",
                        "[agents.processes.liveness]", 'kind = "http"',
                        f'url = "http://127.0.0.1:{self.ports[name]}/healthz"', "interval_ms = 300",
                        # generous: on a busy 2-core test machine a starved (not hung) trainer must not be
                        # killed as hung; tests that freeze one still see it replaced, only later
                        "timeout_ms = 1500", "failures = 3"]
        for prio, p in enumerate(("primary", "secondary"), start=1):
            out += ["[[llm_providers]]", f'name = "{p}"', f'base_url = "http://127.0.0.1:{self.ports[p]}/v1"',
                    'api_key_env = "CTOPS_DEMO_LLM_KEY"', f"priority = {prio}", "timeout_ms = 3000"]
        for role in ("operator", "viewer", "scrape"):
            if role in self.tokens:
                out += ["[[tokens]]", f'name = "test-{role}"', f'role = "{role}"',
                        f'sha256 = "{hash_token(self.tokens[role])}"']
        for h, tok in self.agent_tokens.items():
            out += ["[[tokens]]", f'name = "test-agent-{h}"', 'role = "agent"', f'host = "{h}"',
                    f'sha256 = "{hash_token(tok)}"']
        for d, tok in self.peer_tokens.items():
            out += ["[[tokens]]", f'name = "test-peer-{d}"', 'role = "peer"', f'dispatcher = "{d}"',
                    f'sha256 = "{hash_token(tok)}"']
        return "\n".join(out) + "\n" + (self.extra_toml.strip() + "\n" if self.extra_toml else "")

    def _redis_toml(self) -> str:
        if isinstance(self.redis, EmbeddedStore):
            text = self.redis.toml(self.prefix, self.redis_users)
        else:
            text = redis_toml(self.prefix, url=f"redis://{self.redis.address}/0", usernames=self.redis_users)
        if not self.redis_extra:
            return text
        head, _, rest = text.partition("\n")  # right after the "[redis]" line, before its sub-tables
        return f"{head}\n{self.redis_extra.strip()}\n{rest}"

    # --- processes -----------------------------------------------------------------------------
    def start(self, name: str) -> Child:
        if name in self.dispatchers:
            argv = ctops_argv("dispatcher", "--config", str(self.config), "--name", name)
        elif name.startswith("trainer-"):
            argv = ctops_argv("trainer", "--config", str(self.config), "--name", name)
        elif name.startswith("host-"):
            argv = ctops_argv("agent", "--config", str(self.config), "--name", name)
        elif name in ("primary", "secondary"):
            argv = ctops_argv("fake-llm", "--port", str(self.ports[name]), "--name", name)
        else:
            raise ValueError(name)
        child = _spawner(name, argv, str(self.root / "logs" / f"{name}.log"), self.env)
        self.children[name] = child
        return child

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.children[name].pid, sig)

    def log(self, name: str) -> str:
        return Path(self.children[name].log_path).read_text(errors="replace")

    def stop(self) -> None:
        stop_all(list(self.children.values()))
        kill_naming(str(self.root) + "/")

    # --- addresses and API ---------------------------------------------------------------------
    def ops_url(self, d: str = "A") -> str:
        return f"http://127.0.0.1:{self.ports[d + '.ops']}"

    def data_url(self, d: str = "A") -> str:
        return f"http://127.0.0.1:{self.ports[d + '.data']}"

    def trainer_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def operator_token(self) -> str:
        return self.tokens["operator"]

    @property
    def viewer_token(self) -> str:
        return self.tokens["viewer"]

    def auth(self, role: str) -> dict[str, str]:
        """Bearer header for a role ("agent" is host-1's token, "peer" the first dispatcher's), or for
        one host's agent ("agent:host-2") or one dispatcher's peer credential ("peer:B")."""
        kind, _, which = role.partition(":")
        tok = (self.agent_tokens[which] if kind == "agent" else self.peer_tokens[which]) if which else self.tokens[role]
        return {"Authorization": f"Bearer {tok}"}

    def state(self, d: str = "A") -> dict[str, Any]:
        r = httpx.get(f"{self.ops_url(d)}/api/v1/state", headers=self.auth("viewer"), timeout=5)
        r.raise_for_status()
        return r.json()

    def server(self, name: str, d: str = "A") -> dict[str, Any]:
        return next(s for s in self.state(d)["servers"] if s["name"] == name)

    def wait_state(self, name: str, state: str, d: str = "A", timeout: float = 30.0) -> dict[str, Any]:
        return wait_for(f"{name} to be {state} on {d}",
                        lambda: (s := self.server(name, d))["state"] == state and s, timeout)

    def wait_all_up(self, d: str = "A", timeout: float = 60.0) -> None:
        wait_for(f"all servers up on {d}",
                 lambda: all(s["state"] == "up" for s in self.state(d)["servers"]), timeout)

    def start_all(self, agents: bool | None = None) -> None:
        """LLM fakes, trainers (directly, or through agents) and dispatchers; waits until all are up."""
        for p in ("primary", "secondary"):
            self.start(p)
        if self.hosts_with_agents if agents is None else agents:
            for i in range(1, self.trainers + 1):
                self.start(f"host-{i}")
        else:
            for n in self.server_names:
                self.start(n)
        for d in self.dispatchers:
            self.start(d)
        for d in self.dispatchers:
            self.wait_all_up(d)

"""One TOML file describes a deployment; a wrong or missing setting stops the program at start.

Errors name the setting (as a dotted path) and the file, so an operator can fix them without
reading code. Secrets never live in the file: tokens are stored as SHA-256 hashes and API keys
are read from the environment variables the file names.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ctops.opsapi import Role


class ConfigError(Exception):
    """A deployment file that cannot be used; the message names the setting and the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timings(_Strict):
    heartbeat_interval_ms: int = Field(1000, ge=50, le=60_000)
    # a host whose agent has been silent this long is shown as lost
    heartbeat_timeout_ms: int = Field(3000, ge=100, le=600_000)
    health_interval_ms: int = Field(500, ge=50, le=60_000)
    health_timeout_ms: int = Field(400, ge=20, le=60_000)
    fall: int = Field(2, ge=1, le=100)
    rise: int = Field(2, ge=1, le=100)
    # data-plane timeouts
    client_header_timeout_ms: int = Field(10_000, ge=100)
    client_idle_timeout_ms: int = Field(60_000, ge=100)
    upstream_connect_timeout_ms: int = Field(1_000, ge=20)
    upstream_read_timeout_ms: int = Field(60_000, ge=100)
    # retry and redispatch: a request gives up (503 + Retry-After) past this long since it arrived
    retry_total_ms: int = Field(5_000, ge=50, le=600_000)
    # a safe request (idempotent, or with an Idempotency-Key) waiting this long for a first byte
    # has its server probed; a failed probe moves it (and the others waiting there) on. 0: off
    first_byte_timeout_ms: int = Field(500, ge=0, le=600_000)
    # a server back from `down` ramps its weight from 10 % to 100 % over this long. 0: off
    slow_start_ms: int = Field(3_000, ge=0, le=3_600_000)
    # a dispatcher whose event loop is blocked this long exits so its supervisor restarts it
    loop_blocked_exit_ms: int = Field(10_000, ge=500, le=600_000)
    # leadership lease
    lease_ttl_ms: int = Field(1000, ge=200, le=60_000)
    lease_renew_ms: int = Field(250, ge=50, le=30_000)
    # the leader's background check of every stored record: a pass this often, at this many keys/s
    scrub_interval_ms: int = Field(600_000, ge=100, le=7 * 24 * 3600 * 1000)
    scrub_rate: int = Field(2_000, ge=1, le=1_000_000)


class Limits(_Strict):
    ops_body_max_bytes: int = Field(256 * 1024, ge=1024)
    proxy_header_max_bytes: int = Field(64 * 1024, ge=1024)
    # per-connection buffer above which the proxy pauses the sending side
    proxy_high_water_bytes: int = Field(256 * 1024, ge=4096)
    upstream_pool_size: int = Field(64, ge=1, le=10_000)
    # tries per request, the first included, across retries of one server and redispatches
    retry_max_tries: int = Field(4, ge=1, le=20)
    # request bytes kept to send again; a larger request is never retried once sent
    replay_max_bytes: int = Field(64 * 1024, ge=0, le=16 * 1024 * 1024)
    # exception ingest, per token: events per second sustained, and the burst a spool replay may use
    exceptions_per_s: float = Field(100.0, gt=0, le=1_000_000)
    exceptions_burst: int = Field(2_000, ge=1, le=10_000_000)
    # groups kept; past it the oldest resolved group goes first, then the oldest. With the stream,
    # this bounds the store's memory: about (max_groups x 10 + stream_max) x 16 KB at worst
    exceptions_max_groups: int = Field(2_000, ge=10, le=1_000_000)
    # a group (and its recent events) not seen for this long is forgotten
    exceptions_ttl_s: int = Field(30 * 86_400, ge=60, le=365 * 86_400)
    exceptions_stream_max: int = Field(10_000, ge=100, le=1_000_000)
    # failed authentications per client address per minute; past it, 429 until the minute is over
    auth_failures_per_minute: int = Field(10, ge=1, le=100_000)


class ProxyConfig(_Strict):
    """The data plane's own secrets (its limits are under [limits], its timeouts under [timings])."""

    # the environment variable holding the key that signs the affinity cookie; every dispatcher of a
    # deployment needs the same one, or a session's cookie means nothing to the others. Unset: a
    # random key per process (and a warning)
    affinity_key_env: str | None = None

    @property
    def affinity_key(self) -> bytes:
        return os.environ.get(self.affinity_key_env, "").encode() if self.affinity_key_env else b""


class Sandbox(_Strict):
    cpu_seconds: int = Field(2, ge=1, le=600)
    memory_mb: int = Field(256, ge=16, le=65_536)
    max_processes: int = Field(32, ge=1, le=4096)
    wall_seconds: float = Field(5.0, gt=0, le=600)
    output_max_bytes: int = Field(64 * 1024, ge=1024)
    # how learner code is kept off the network: its own network namespace, sockets refused by
    # seccomp, or not at all; "auto" takes the first of these that works on this machine
    network: Literal["auto", "namespace", "seccomp", "none"] = "auto"
    # one memory and process budget for the whole run (all its processes), or per process only
    budget: Literal["auto", "cgroup2", "cgroup1", "rlimit"] = "auto"
    # run learner code even when it cannot be kept off the network (a developer's machine)
    allow_unconfined: bool = False


class TrainerSettings(_Strict):
    """How trainer servers share work: leases on in-progress submissions, idempotency, reviews."""

    # where reviews come from: the [[llm_providers]] directly, or the dispatchers' LLM pool
    llm: Literal["direct", "dispatcher"] = "direct"
    # model asked of the dispatchers' pool; unset means the first of [llm] models
    llm_model: str | None = Field(None, min_length=1)
    llm_timeout_ms: int = Field(10_000, ge=50, description="per try, with llm = dispatcher")
    # past this, a submission is completed with its review pending (degraded mode)
    review_budget_ms: int = Field(8_000, ge=100, le=600_000)
    # a provider that failed is skipped for this long by live reviews (the retry loop still probes)
    provider_cooldown_ms: int = Field(5_000, ge=0, le=600_000)
    review_retry_initial_ms: int = Field(1_000, ge=50, le=600_000)
    review_retry_max_ms: int = Field(10_000, ge=50, le=3_600_000)
    # in-progress work holds a lease this long, renewed every third of it; a dead server's work
    # is taken over once its lease has expired
    lease_ttl_ms: int = Field(2_500, ge=300, le=600_000)
    scan_interval_ms: int = Field(500, ge=50, le=60_000)
    idempotency_ttl_s: int = Field(86_400, ge=60, le=30 * 86_400)
    # how long a repeat of a request still in progress waits for its outcome before a 409
    idempotency_wait_ms: int = Field(10_000, ge=0, le=600_000)


class RedisUser(_Strict):
    """An ACL user of the shared state; the password comes from the environment, never the file."""

    username: str = Field(min_length=1, max_length=128)
    password_env: str = Field(min_length=1, max_length=128)


class RedisUsers(_Strict):
    # one user per role, so a trainer (which runs learners' code nearby) can touch only its own keys
    # and no service can run admin commands; a role without a user uses the url's credentials, if any
    trainer: RedisUser | None = None
    dispatcher: RedisUser | None = None
    admin: RedisUser | None = None


class RedisSettings(_Strict):
    # one-node setups; ignored for routing when `sentinels` is set (Sentinel names the primary)
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "ctops"
    # Sentinel mode: every process asks these where the primary is now and follows it on failover
    sentinels: list[str] = Field(default_factory=list)
    service: str = Field("ctops", min_length=1, max_length=128, description="the Sentinel master name")
    db: int = Field(0, ge=0, le=15)
    users: RedisUsers = Field(default_factory=RedisUsers)
    # the Sentinels' own `requirepass`
    sentinel_password_env: str | None = Field(None, min_length=1)
    # address ("host:port") -> node name, for status and chaos; unnamed nodes show as host:port
    nodes: dict[str, str] = Field(default_factory=dict)
    # writes that must not be lost (e.g. a new leadership epoch) count only once this many replicas
    # have them (WAIT); unset: 1 with Sentinels (a duplicated store), 0 for one node
    replica_acks: int | None = Field(None, ge=0, le=10)
    replica_ack_timeout_ms: int = Field(500, ge=1, le=60_000)

    @property
    def acks_needed(self) -> int:
        return self.replica_acks if self.replica_acks is not None else (1 if self.sentinels else 0)

    @model_validator(mode="before")
    @classmethod
    def _sentinel_url(cls, data: object) -> object:
        """`redis+sentinel://h1:p1,h2:p2/SERVICE[/DB]` is the same as `sentinels`, `service` and `db`."""
        if not isinstance(data, dict) or not str(data.get("url", "")).startswith("redis+sentinel://"):
            return data
        parts = urlsplit(data["url"])
        path = [p for p in parts.path.split("/") if p]
        out = {k: v for k, v in data.items() if k != "url"}
        out.setdefault("sentinels", [hp if ":" in hp.rpartition("]")[2] else f"{hp}:26379"
                                     for hp in parts.netloc.rpartition("@")[2].split(",") if hp])
        if path:
            out.setdefault("service", path[0])
        if len(path) > 1 and path[1].isdigit():
            out.setdefault("db", int(path[1]))
        return out

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (or redis+sentinel://)")
        return v

    @field_validator("sentinels")
    @classmethod
    def _hostports(cls, v: list[str]) -> list[str]:
        for hp in v:
            split_hostport(hp)
        return v


class DispatcherSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    data: str = Field(description="host:port of the data port (reverse proxy)")
    ops: str = Field(description="host:port of the ops API")
    # run on becoming leader / on ceasing to lead, e.g. to move a floating address; see README
    on_promote: list[str] = Field(default_factory=list)
    on_demote: list[str] = Field(default_factory=list)
    # this dispatcher's credential for the mutual heartbeat (a [[tokens]] entry with role "peer")
    peer_token_env: str = "CTOPS_PEER_TOKEN"

    @field_validator("data", "ops")
    @classmethod
    def _hostport(cls, v: str) -> str:
        split_hostport(v)
        return v

    @property
    def data_url(self) -> str:
        return f"http://{self.data}"

    @property
    def ops_url(self) -> str:
        return f"http://{self.ops}"


class ServerSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    url: str
    host: str = Field("", description="the agent (host) that runs this server")
    weight: int = Field(1, ge=0, le=1000)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith("http://"):
            raise ValueError("must be an http:// URL")
        split_hostport(v.removeprefix("http://").rstrip("/"))
        return v.rstrip("/")

    @property
    def address(self) -> tuple[str, int]:
        return split_hostport(self.url.removeprefix("http://"))


class LivenessSpec(_Strict):
    """How the watchdog tells a supervised process is alive, beyond it not having exited."""

    kind: Literal["none", "http", "tcp", "file", "notify"] = "none"
    url: str | None = None  # http: a 2xx answer is alive
    port: int | None = Field(None, ge=1, le=65535)  # tcp: a completed connect is alive
    path: str | None = None  # file: the process touches it; older than timeout_ms is dead
    interval_ms: int = Field(500, ge=20, le=600_000)
    timeout_ms: int = Field(400, ge=10, le=600_000)
    failures: int = Field(2, ge=1, le=100)
    # a starting process is not judged until it first answers or this much time has passed
    start_grace_ms: int = Field(10_000, ge=0, le=600_000)

    @model_validator(mode="after")
    def _target(self) -> LivenessSpec:
        need = {"http": "url", "tcp": "port", "file": "path"}.get(self.kind)
        if need and getattr(self, need) is None:
            raise ValueError(f"kind {self.kind!r} needs {need}")
        return self


class ProcessSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    restart: Literal["always", "on-failure", "never"] = "always"
    liveness: LivenessSpec = Field(default_factory=LivenessSpec)
    stop_grace_ms: int = Field(3000, ge=0, le=600_000)
    backoff_initial_ms: int = Field(100, ge=0, le=600_000)
    backoff_max_ms: int = Field(5000, ge=0, le=3_600_000)
    # this many restarts within the window and the process is `fatal`: no more restarts
    crashloop_restarts: int = Field(5, ge=1, le=1000)
    crashloop_window_ms: int = Field(30_000, ge=100, le=86_400_000)
    # "host:port" the agent binds and hands to the process as fd 3 (LISTEN_FDS=1, as systemd's socket
    # activation), so connections wait in the backlog across a restart instead of being refused
    listen: str | None = None
    # keep a second process started, imported and waiting with the socket, told to take over at once
    # when the active one exits or is killed as hung (needs `listen` and a server that understands
    # CTOPS_HANDOVER_FD, as `ctops trainer` does)
    warm_spare: bool = False

    @field_validator("listen")
    @classmethod
    def _listen_hostport(cls, v: str | None) -> str | None:
        if v is not None:
            split_hostport(v)
        return v

    @model_validator(mode="after")
    def _spare_needs_listen(self) -> ProcessSpec:
        if self.warm_spare and self.listen is None:
            raise ValueError("warm_spare needs listen (the spare waits on the socket the agent holds)")
        return self


class AgentSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    processes: list[ProcessSpec] = Field(default_factory=list)
    # dispatchers' ops URLs in the order the agent tries them; empty means all dispatchers
    dispatchers: list[str] = Field(default_factory=list)
    token_env: str = "CTOPS_AGENT_TOKEN"
    disk_path: str = "/"
    # globs of log files whose Python tracebacks and ERROR lines become exception events
    log_files: list[str] = Field(default_factory=list)
    # host:port for Prometheus to scrape this agent's own view (GET /metrics, no token: keep it on
    # loopback or a monitoring network); unset, no port is opened
    metrics_listen: str | None = None

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_hostport(cls, v: str | None) -> str | None:
        if v is not None:
            split_hostport(v)
        return v


class LLMProviderSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    base_url: str
    model: str = "gpt-4"
    api_key_env: str | None = None
    priority: int = Field(1, ge=0)
    timeout_ms: int = Field(10_000, ge=50)

    @property
    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


class LLMSettings(_Strict):
    """How the dispatcher's LLM pool judges and fails over between providers (see dispatcher/llm)."""

    # model names clients may ask for; each maps to every provider's own `model`
    models: list[str] = Field(default_factory=lambda: ["gpt-4"], min_length=1)
    # a provider's breaker opens after this many consecutive failures ...
    failure_threshold: int = Field(3, ge=1, le=100)
    # ... or when this share of its last `failure_window` calls failed (once the window is full)
    failure_rate: float = Field(0.5, gt=0, le=1)
    failure_window: int = Field(20, ge=2, le=1000)
    # first wait before a half-open probe; doubles while probes keep failing, up to cooldown_max_ms
    cooldown_ms: int = Field(2000, ge=50, le=600_000)
    cooldown_max_ms: int = Field(30_000, ge=50, le=3_600_000)
    # tries per request (hedges included) and the whole request's time budget
    max_tries: int = Field(3, ge=1, le=10)
    total_timeout_ms: int = Field(30_000, ge=100, le=600_000)
    # a try still unanswered after max(stall_min_ms, stall_factor x the provider's recent p99) is
    # counted as a failure and hedged to the next provider; 0 turns this off
    stall_factor: float = Field(3.0, ge=0, le=100)
    stall_min_ms: int = Field(100, ge=10, le=600_000)
    health_interval_ms: int = Field(1000, ge=50, le=60_000)
    health_timeout_ms: int = Field(1000, ge=20, le=60_000)
    # consecutive failed health checks that open a provider's breaker
    health_fall: int = Field(2, ge=1, le=100)
    # 429 without Retry-After: skip the provider this long
    rate_limit_default_ms: int = Field(1000, ge=0, le=600_000)
    # staff pin/disable are read from Redis this often on every dispatcher
    control_poll_ms: int = Field(200, ge=20, le=250)
    body_max_bytes: int = Field(1024 * 1024, ge=1024)
    # if set, clients of the pool must send `Authorization: Bearer <this variable's value>`; without
    # it anyone who reaches the data port can spend the providers' quota
    client_key_env: str | None = None

    @property
    def client_key(self) -> str | None:
        return os.environ.get(self.client_key_env) or None if self.client_key_env else None


class WebhookSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    url: str
    min_severity: Literal["info", "warning", "critical"] = "info"
    # events of one kind about one target within this window go out as one message
    group_window_ms: int = Field(1000, ge=0, le=600_000)
    timeout_ms: int = Field(3000, ge=50, le=60_000)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v


class TokenSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, description="who holds the token, for the audit log")
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # role "agent": the one host (an [[agents]] name) this token may heartbeat and take commands for.
    # An agent token without a host may only send exceptions (a service's reporting key, e.g. a
    # Sentry DSN on a machine without an agent).
    host: str | None = Field(None, min_length=1, max_length=64)
    # role "peer": the one dispatcher this token may speak for in the mutual heartbeat; unset: any
    dispatcher: str | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _scope_fits_role(self) -> TokenSpec:
        if self.host is not None and self.role != "agent":
            raise ValueError(f"host is only for role \"agent\" tokens (this one is {self.role!r})")
        if self.dispatcher is not None and self.role != "peer":
            raise ValueError(f"dispatcher is only for role \"peer\" tokens (this one is {self.role!r})")
        return self


class Deployment(_Strict):
    cluster: str = Field("ctops", min_length=1, max_length=64)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    timings: Timings = Field(default_factory=Timings)
    limits: Limits = Field(default_factory=Limits)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    sandbox: Sandbox = Field(default_factory=Sandbox)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    dispatchers: list[DispatcherSpec] = Field(min_length=1)
    servers: list[ServerSpec] = Field(default_factory=list)
    agents: list[AgentSpec] = Field(default_factory=list)
    llm_providers: list[LLMProviderSpec] = Field(default_factory=list)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    tokens: list[TokenSpec] = Field(default_factory=list)
    webhooks: list[WebhookSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Deployment:
        for field in ("dispatchers", "servers", "agents", "llm_providers", "tokens", "webhooks"):
            seen: set[str] = set()
            for item in getattr(self, field):
                if item.name in seen:
                    raise ValueError(f"{field}: name {item.name!r} is used twice")
                seen.add(item.name)
        agents, dispatchers = {a.name for a in self.agents}, {d.name for d in self.dispatchers}
        for t in self.tokens:
            if t.host is not None and t.host not in agents:
                raise ValueError(f"tokens({t.name}).host: no [[agents]] entry named {t.host!r}; "
                                 f"known: {sorted(agents)}")
            if t.dispatcher is not None and t.dispatcher not in dispatchers:
                raise ValueError(f"tokens({t.name}).dispatcher: no [[dispatchers]] entry named {t.dispatcher!r}; "
                                 f"known: {sorted(dispatchers)}")
        return self

    def dispatcher(self, name: str) -> DispatcherSpec:
        for d in self.dispatchers:
            if d.name == name:
                return d
        raise ConfigError(f"no dispatcher named {name!r}; known: {[d.name for d in self.dispatchers]}")

    def server(self, name: str) -> ServerSpec:
        for s in self.servers:
            if s.name == name:
                return s
        raise ConfigError(f"no server named {name!r}; known: {[s.name for s in self.servers]}")

    def agent(self, name: str) -> AgentSpec:
        for a in self.agents:
            if a.name == name:
                return a
        raise ConfigError(f"no agent named {name!r}; known: {[a.name for a in self.agents]}")

    def host_token_env(self, host: str) -> str:
        """The variable holding the agent token of `host`; a trainer started by that agent inherits it
        and sends its exceptions with it."""
        return next((a.token_env for a in self.agents if a.name == host), AgentSpec.model_fields["token_env"].default)

    def providers_by_priority(self) -> list[LLMProviderSpec]:
        return sorted(self.llm_providers, key=lambda p: p.priority)


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


def _location(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """Turn pydantic's location into the dotted name an operator sees, e.g. servers[1].url."""
    out = ""
    node: object = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            item = node[part] if isinstance(node, list) and part < len(node) else None
            label = item.get("name") if isinstance(item, dict) else None
            if label:
                out += f"({label})"
        else:
            out += f".{part}" if out else str(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        else:
            node = None
    return out or "(top level)"


def parse(data: dict[str, Any], source: str = "<config>") -> Deployment:
    try:
        return Deployment.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid configuration"]
        for err in exc.errors():
            lines.append(f"  setting {_location(err['loc'], data)}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load(path: str | os.PathLike[str]) -> Deployment:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse(data, str(p))

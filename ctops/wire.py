"""Models that cross process boundaries: agent heartbeats and the cluster state the ops API serves."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# the action names and the error shape belong to the ops-API contract; `X as X` re-exports the two
# that callers have always imported from here
from ctops.opsapi import AdminState as AdminState
from ctops.opsapi import ErrorBody as ErrorBody
from ctops.opsapi import LeadershipAction, ProcessAction, ProviderAction

ServerState = Literal["up", "suspect", "down", "draining", "disabled"]
HostState = Literal["alive", "late", "lost"]
ProcessState = Literal["running", "starting", "backoff", "stopped", "fatal"]
# a supervised server's warm spare (`warm_spare = true`): none started; started, importing; waiting to be
# handed the socket; or the last one took over and no new one is started yet
SpareState = Literal["none", "warming", "ready", "handed_over"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProcessMetrics(_Wire):
    name: str = Field(min_length=1, max_length=64)
    state: ProcessState
    pid: int | None = Field(None, ge=1)
    restarts: int = Field(0, ge=0)
    cpu_percent: float = Field(0.0, ge=0)
    rss_bytes: int = Field(0, ge=0)
    last_exit: str | None = Field(None, max_length=500)
    check_latency_ms: float | None = Field(None, ge=0)
    spare: SpareView | None = None  # only for a process configured with a warm spare


class SpareView(_Wire):
    state: SpareState
    # the spare's pid; for `handed_over`, the process that took over (now serving)
    pid: int | None = Field(None, ge=1)
    handovers: int = Field(0, ge=0)  # times a spare took over since the agent started


class HostMetrics(_Wire):
    cpu_percent: float = Field(ge=0, le=100 * 1024)
    memory_percent: float = Field(ge=0, le=100)
    memory_used_bytes: int = Field(ge=0)
    disk_percent: float = Field(ge=0, le=100)
    load1: float = Field(ge=0)
    load5: float = Field(ge=0)
    load15: float = Field(ge=0)


Severity = Literal["info", "warning", "critical"]


class AgentEvent(_Wire):
    """Something the agent saw happen (a restart, a crash loop); sent until a heartbeat is acknowledged."""

    id: str = Field(min_length=1, max_length=64)
    kind: str = Field(min_length=1, max_length=64)
    process: str | None = Field(None, max_length=64)
    severity: Severity = "info"
    message: str = Field(max_length=2000)
    ts_ms: int = Field(ge=0)


class WatchdogStatus(_Wire):
    checker_alive: bool
    guard_alive: bool
    generation: int = Field(ge=0)
    thread_restarts: int = Field(0, ge=0)
    loop_restarts: int = Field(0, ge=0)


class Heartbeat(_Wire):
    host: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)
    sent_at_ms: int = Field(ge=0)
    metrics: HostMetrics
    processes: list[ProcessMetrics] = Field(default_factory=list, max_length=256)
    watchdog: WatchdogStatus | None = None
    events: list[AgentEvent] = Field(default_factory=list, max_length=200)


class HeartbeatAck(_Wire):
    ok: bool = True
    leader: str | None = None
    leader_ops_url: str | None = None  # agents move their heartbeats to the leader


class DispatcherView(_Wire):
    name: str
    role: Literal["leader", "standby", "unknown"]
    healthy: bool
    ops_url: str
    data_url: str
    epoch: int | None = None
    last_seen_ms: int | None = None
    # how long ago the leader last renewed its lease (leader only)
    lease_age_ms: int | None = None
    # how long ago this dispatcher last heard from its peer(s) directly (mutual heartbeat)
    peer_heartbeat_age_ms: int | None = None


# what the agent's heartbeat and the dispatcher's checks say together about a server
Diagnosis = Literal["ok", "software fault", "host or network down", "agent fault", "starting", "admin",
                    "shared state unavailable"]


class ServerView(_Wire):
    name: str
    url: str
    host: str
    state: ServerState
    admin: AdminState
    health: Literal["up", "suspect", "down"]
    active_sessions: int = 0
    weight: int = 1
    last_check_ms: int | None = None
    last_error: str | None = None
    since_ms: int | None = None
    heartbeat_age_ms: int | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    diagnosis: Diagnosis = "ok"
    diagnosis_detail: str | None = None


class HostView(_Wire):
    name: str
    state: HostState
    heartbeat_age_ms: int | None
    seq: int | None = None
    metrics: HostMetrics | None = None
    processes: list[ProcessMetrics] = Field(default_factory=list)
    watchdog: WatchdogStatus | None = None


StoreNodeState = Literal["up", "down", "syncing", "unknown"]


class StoreReplicaView(_Wire):
    name: str
    state: StoreNodeState
    lag_ms: int | None = None  # since the replica last acknowledged the primary's stream
    address: str | None = None


class StoreSentinelView(_Wire):
    name: str
    state: StoreNodeState
    address: str | None = None


class StoreView(_Wire):
    """The shared state (Redis) as the serving dispatcher sees it (dispatcher/storewatch.py).

    One-node setups: `primary` is the node and the lists are empty."""

    mode: Literal["single", "sentinel"] = "single"
    available: bool  # the primary answered this dispatcher's last probe
    primary: str | None  # None: no primary known (Sentinels disagree, or none answer)
    replicas: list[StoreReplicaView] = Field(default_factory=list)
    sentinels: list[StoreSentinelView] = Field(default_factory=list)
    last_failover_ms: int | None = None  # when this dispatcher last saw the primary change
    failover_in_progress: bool = False
    writes_unconfirmed: int = 0  # writes whose WAIT for a replica timed out (cluster-wide counter)
    corrupt_found: int = 0  # damaged records found (ctops/integrity.py), cluster-wide
    repaired: int = 0  # of which repaired (a checkpoint from an intact copy)
    last_scrub_ms: int | None = None  # how long the last full check of every record took
    unavailable_since_ms: int | None = None
    diagnosis: str | None = None  # for staff: "shared state unavailable: ..." while it is
    error: str | None = None
    checked_ms: int | None = None


class ClusterState(_Wire):
    cluster: str
    leader: str | None
    served_by: str
    now_ms: int
    dispatchers: list[DispatcherView]
    servers: list[ServerView]
    hosts: list[HostView]
    # the serving dispatcher's data-plane counters: requests, retries, redispatches, errors by kind
    proxy: dict[str, Any] | None = None
    store: StoreView | None = None
    # delivered data refused or skipped where it arrived, cluster-wide, by source (ctops.rejects)
    rejected: dict[str, int] = Field(default_factory=dict)
    # the data-plane build this dispatcher imported: kind (compiled | python), module, stale, hashes
    data_plane: dict[str, Any] | None = None


class StateChanges(_Wire):
    """The cluster state since a version the client holds (GET /api/v1/state/changes, ctops/statefeed.py)."""

    version: str  # name it in the next request
    # the whole document, when the version asked about is unknown here (another dispatcher's, or none)
    full: ClusterState | None = None
    fields: dict[str, Any] = Field(default_factory=dict)  # the document's own fields that changed (leader, store...)
    # per list (dispatchers, servers, hosts): each changed item's name and the fields of it that changed
    changed: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    removed: dict[str, list[str]] = Field(default_factory=dict)  # per list: names no longer in it
    order: dict[str, list[str]] = Field(default_factory=dict)  # per list: its names in order, when members changed


class ActionResult(_Wire):
    ok: bool
    server: str
    admin: AdminState
    state: ServerState
    by: str


class Event(_Wire):
    """One entry of the cluster's event stream, as the console and webhooks receive it."""

    id: str  # the stream id: ordered, usable as a cursor
    event_id: str
    ts_ms: int
    kind: str
    severity: Severity
    source: str
    target: str | None = None
    message: str


class CommandRequest(_Wire):
    id: str
    action: ProcessAction
    process: str
    by: str
    ts_ms: int


class CommandReply(_Wire):
    ok: bool
    message: str = Field(max_length=2000)


class CommandResult(_Wire):
    ok: bool
    host: str
    process: str
    action: str
    message: str
    by: str


class LeadershipResult(_Wire):
    ok: bool
    action: LeadershipAction
    leader_before: str | None
    leader_after: str | None
    epoch: int
    by: str


LLMProviderState = Literal["up", "degraded", "rate_limited", "down", "disabled"]
BreakerState = Literal["closed", "open", "half_open"]


class LLMProviderView(_Wire):
    """One LLM provider as one dispatcher's pool sees it (each dispatcher judges providers itself)."""

    name: str
    base_url: str
    model: str
    priority: int
    state: LLMProviderState
    breaker: BreakerState
    pinned: bool = False
    disabled: bool = False
    disabled_by: str | None = None
    requests: int = 0  # tries sent, hedges and probes excluded
    failures: int = 0
    rate_limited: int = 0  # 429 answers
    inflight: int = 0
    error_rate: float = 0.0  # share of failures among the breaker's recent calls
    p50_ms: float | None = None
    p99_ms: float | None = None
    health_ok: bool | None = None
    health_latency_ms: float | None = None
    retry_after_ms: int | None = None  # still skipped this long because of a 429
    reopen_in_ms: int | None = None  # an open breaker's time to its next probe
    last_error: str | None = None
    since_ms: int | None = None  # when the breaker last changed state


class LLMPoolView(_Wire):
    served_by: str | None = None
    pinned: str | None = None
    models: list[str]
    providers: list[LLMProviderView]


class LLMActionResult(_Wire):
    ok: bool
    provider: str
    action: ProviderAction
    by: str
    pinned: str | None
    provider_state: LLMProviderView


class StoreFailoverResult(_Wire):
    ok: bool
    primary_before: str | None
    primary_after: str | None
    by: str


class PeerHeartbeat(_Wire):
    """What dispatchers tell each other directly, every few hundred milliseconds."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["leader", "standby"]
    epoch: int = Field(ge=0)
    sent_at_ms: int = Field(ge=0)


class QuarantinedRecord(BaseModel):
    """A damaged record set aside (ctops/integrity.py), as `GET /api/v1/store/integrity` lists it.
    Read leniently (extra fields ignored): the log entry may gain fields before every reader knows them."""

    model_config = ConfigDict(extra="ignore")
    qid: str
    key: str
    kind: str
    reason: str
    detail: str = ""
    session: str = ""
    reader: str = ""
    at_ms: int = 0
    outcome: str = ""


class StoreIntegrityView(BaseModel):
    model_config = ConfigDict(extra="ignore")
    corrupt_found: int = 0
    repaired: int = 0
    last_scrub_ms: int | None = None
    quarantined: list[QuarantinedRecord] = Field(default_factory=list)


class QuarantineResult(BaseModel):
    model_config = ConfigDict(extra="ignore")
    qid: str
    key: str
    action: Literal["discard", "restore"]


# --- the heartbeat, decoded fast ------------------------------------------------------------------
# The ingest path (dispatcher/ops/ingest.py) decodes heartbeats with msgspec, ~10x cheaper than pydantic.
# These Structs mirror the pydantic models above field for field, with the same bounds; a body they
# refuse is handed to the pydantic route, which answers the error in the API's shape (so a lenient
# pydantic coercion, e.g. "5" for an int, is still accepted there). tests/test_ingest.py holds them equal.
import msgspec  # noqa: E402 - kept with the Structs it serves

_Name64 = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_NonNegF = Annotated[float, msgspec.Meta(ge=0)]


class _Fast(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    pass


class FastSpareView(_Fast):
    state: SpareState
    pid: Annotated[int, msgspec.Meta(ge=1)] | None = None
    handovers: _NonNeg = 0


class FastProcessMetrics(_Fast):
    name: _Name64
    state: ProcessState
    pid: Annotated[int, msgspec.Meta(ge=1)] | None = None
    restarts: _NonNeg = 0
    cpu_percent: _NonNegF = 0.0
    rss_bytes: _NonNeg = 0
    last_exit: Annotated[str, msgspec.Meta(max_length=500)] | None = None
    check_latency_ms: _NonNegF | None = None
    spare: FastSpareView | None = None


class FastHostMetrics(_Fast):
    cpu_percent: Annotated[float, msgspec.Meta(ge=0, le=100 * 1024)]
    memory_percent: Annotated[float, msgspec.Meta(ge=0, le=100)]
    memory_used_bytes: _NonNeg
    disk_percent: Annotated[float, msgspec.Meta(ge=0, le=100)]
    load1: _NonNegF
    load5: _NonNegF
    load15: _NonNegF


class FastAgentEvent(_Fast):
    id: _Name64
    kind: _Name64
    message: Annotated[str, msgspec.Meta(max_length=2000)]
    ts_ms: _NonNeg
    process: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    severity: Severity = "info"


class FastWatchdogStatus(_Fast):
    checker_alive: bool
    guard_alive: bool
    generation: _NonNeg
    thread_restarts: _NonNeg = 0
    loop_restarts: _NonNeg = 0


class FastHeartbeat(_Fast):
    host: _Name64
    seq: _NonNeg
    sent_at_ms: _NonNeg
    metrics: FastHostMetrics
    processes: Annotated[list[FastProcessMetrics], msgspec.Meta(max_length=256)] = msgspec.field(default_factory=list)
    watchdog: FastWatchdogStatus | None = None
    events: Annotated[list[FastAgentEvent], msgspec.Meta(max_length=200)] = msgspec.field(default_factory=list)


HEARTBEAT_DECODER = msgspec.json.Decoder(FastHeartbeat)
FAST_ENCODER = msgspec.json.Encoder()

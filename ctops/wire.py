"""Models that cross process boundaries: agent heartbeats and the cluster state the ops API serves."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ServerState = Literal["up", "suspect", "down", "draining", "disabled"]
HostState = Literal["alive", "late", "lost"]
AdminState = Literal["enabled", "draining", "disabled"]
ProcessState = Literal["running", "starting", "backoff", "stopped", "fatal"]


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


class HostMetrics(_Wire):
    cpu_percent: float = Field(ge=0, le=100 * 1024)
    memory_percent: float = Field(ge=0, le=100)
    memory_used_bytes: int = Field(ge=0)
    disk_percent: float = Field(ge=0, le=100)
    load1: float = Field(ge=0)
    load5: float = Field(ge=0)
    load15: float = Field(ge=0)


class Heartbeat(_Wire):
    host: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)
    sent_at_ms: int = Field(ge=0)
    metrics: HostMetrics
    processes: list[ProcessMetrics] = Field(default_factory=list, max_length=256)


class HeartbeatAck(_Wire):
    ok: bool = True
    leader: str | None = None


class DispatcherView(_Wire):
    name: str
    role: Literal["leader", "standby", "unknown"]
    healthy: bool
    ops_url: str
    data_url: str
    epoch: int | None = None
    last_seen_ms: int | None = None


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


class HostView(_Wire):
    name: str
    state: HostState
    heartbeat_age_ms: int | None
    seq: int | None = None
    metrics: HostMetrics | None = None
    processes: list[ProcessMetrics] = Field(default_factory=list)


class ClusterState(_Wire):
    cluster: str
    leader: str | None
    served_by: str
    now_ms: int
    dispatchers: list[DispatcherView]
    servers: list[ServerView]
    hosts: list[HostView]


class ActionResult(_Wire):
    ok: bool
    server: str
    admin: AdminState
    state: ServerState
    by: str


class ErrorBody(_Wire):
    error: str
    detail: object | None = None

"""The dispatcher's in-memory view of the trainer servers, read on every proxied request.

Health checks, passive failures seen by the proxy and staff actions (via Redis) update it; the
data plane only asks it for the next server. Kept free of I/O so the hot path stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ctops.config import ServerSpec
from ctops.wire import AdminState, ServerState

Health = str  # "up" | "suspect" | "down"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True, eq=False)
class Backend:
    name: str
    host: str
    port: int
    weight: int = 1
    server_host: str = ""  # the agent/host this server runs on
    health: Health = "up"
    admin: AdminState = "enabled"
    since_ms: int = field(default_factory=now_ms)
    last_check_ms: int | None = None
    last_error: str | None = None
    active_sessions: int = 0
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    outstanding: int = 0  # requests in flight through this dispatcher

    @property
    def state(self) -> ServerState:
        if self.admin == "disabled":
            return "disabled"
        if self.admin == "draining":
            return "draining"
        return self.health  # type: ignore[return-value]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


# called with (backend, old_state, new_state, reason) whenever a server's effective state changes
StateListener = Callable[[Backend, ServerState, ServerState, str], None]


class ServerPool:
    def __init__(self, specs: list[ServerSpec], initial_health: Health = "down") -> None:
        self.backends: dict[str, Backend] = {}
        for spec in specs:
            host, port = spec.address
            self.backends[spec.name] = Backend(spec.name, host, port, spec.weight, spec.host,
                                               health=initial_health)
        self._order = list(self.backends.values())
        self._rr = 0
        self.listeners: list[StateListener] = []

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def __iter__(self):
        return iter(self._order)

    def pick(self, exclude: Backend | None = None) -> Backend | None:
        """Round-robin over servers in state `up`; None when there is none."""
        order = self._order
        n = len(order)
        for i in range(n):
            b = order[(self._rr + i) % n]
            if b.health == "up" and b.admin == "enabled" and b.weight > 0 and b is not exclude:
                self._rr = (self._rr + i + 1) % n
                return b
        return None

    def _set(self, b: Backend, *, health: Health | None = None, admin: AdminState | None = None,
             reason: str = "") -> None:
        old = b.state
        if health is not None and health != b.health:
            b.health = health
        if admin is not None and admin != b.admin:
            b.admin = admin
        new = b.state
        if new != old:
            b.since_ms = now_ms()
            for listener in self.listeners:
                listener(b, old, new, reason)

    def set_health(self, b: Backend, health: Health, reason: str = "") -> None:
        if health != "up":
            b.last_error = reason or b.last_error
        self._set(b, health=health, reason=reason)

    def set_admin(self, b: Backend, admin: AdminState, reason: str = "") -> None:
        self._set(b, admin=admin, reason=reason)

    def report_failure(self, b: Backend, reason: str) -> None:
        """Passive health: the proxy saw a refused or reset connection; out of rotation at once."""
        b.consecutive_ok = 0
        b.consecutive_fail += 1
        self.set_health(b, "down", f"passive: {reason}")

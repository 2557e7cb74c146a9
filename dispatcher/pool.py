"""The dispatcher's in-memory view of the trainer servers, read on every proxied request.

Health checks, passive failures seen by the proxy and staff actions (via Redis) update it; the
data plane only asks it for the next server. Kept free of I/O so the hot path stays cheap.

Balancing: the server with the fewest outstanding requests per unit of weight, ties broken in
rotation (so at low load it is round-robin). Only servers `up` and `enabled` take new work; a
`draining` one still serves the sessions stuck to it (see the data plane's affinity). A server
coming back after being down warms up: its weight ramps from 10 % to 100 % over `slow_start` s.

Affinity cookies are `ctops_srv=<server>.<HMAC-SHA256 of the name, truncated>`, signed with a key
every dispatcher of a deployment shares, so a learner cannot choose a server by writing its name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from time import monotonic

from ctops.clock import now_ms
from ctops.config import ServerSpec
from ctops.wire import AdminState, ServerState

Health = str  # "up" | "suspect" | "down"



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
    warm_since: float = 0.0  # monotonic time it came back up; 0 when not warming up
    been_up: bool = False  # a first "up" (dispatcher start) does not warm up, a comeback does
    # the data plane's signed affinity cookie naming this server, as matched and as sent (see `sign`)
    name_b: bytes = field(init=False, repr=False)
    cookie: bytes = field(init=False, repr=False)
    set_cookie: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.name_b = self.name.encode()
        self.been_up = self.been_up or self.health == "up"
        self.sign(os.urandom(32))

    def sign(self, key: bytes) -> None:
        mac = hmac.new(key, b"ctops_srv:" + self.name_b, hashlib.sha256).digest()[:16]
        self.cookie = self.name_b + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")
        self.set_cookie = b"Set-Cookie: ctops_srv=%b; Path=/; HttpOnly; SameSite=Lax\r\n" % self.cookie

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
        # the servers in each rotation, from each start: picking walks one without building it
        self._rotations = [self._order[i:] + self._order[:i] for i in range(len(self._order))]
        self.by_cookie: dict[bytes, Backend] = {}
        self.set_affinity_key(os.urandom(32))
        self._rr = 0
        self.listeners: list[StateListener] = []
        self.slow_start = 0.0  # seconds over which a returning server's weight ramps up

    def set_affinity_key(self, key: bytes) -> None:
        """Sign the servers' affinity cookies with `key`; a cookie signed otherwise matches none."""
        for b in self._order:
            b.sign(key)
        self.by_cookie = {b.cookie: b for b in self._order}

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def __iter__(self):
        return iter(self._order)

    def pick(self, exclude: Backend | Collection[Backend] | None = None, suspect_ok: bool = False) -> Backend | None:
        """A server `up` and `enabled` for new work: least outstanding requests per weight (with slow
        start), ties in rotation; None when there is none. `exclude`: servers already tried.
        `suspect_ok`: a `suspect` server (one failed check) will do too, the fallback when none is up."""
        order = self._order
        n = len(order)
        if not n:
            return None
        if isinstance(exclude, Backend):
            exclude = (exclude,)
        start = self._rr
        self._rr = start + 1 if start + 1 < n else 0
        best = None
        best_score = 0.0
        # read on every proxied request: kept to few steps per server
        for b in self._rotations[start]:
            if (b.health == "up" or (suspect_ok and b.health == "suspect")) and b.admin == "enabled" \
                    and b.weight > 0 and not (exclude and b in exclude):
                score = (b.outstanding + 1) / (self._warm_weight(b) if b.warm_since else b.weight)
                if best is None or score < best_score:
                    best, best_score = b, score
        return best

    def _warm_weight(self, b: Backend) -> float:
        ramp = (monotonic() - b.warm_since) / self.slow_start if self.slow_start > 0 else 1.0
        if ramp >= 1.0:
            b.warm_since = 0.0
            return b.weight
        return b.weight * max(0.1, ramp)

    def effective_weight(self, b: Backend) -> float:
        return self._warm_weight(b) if b.warm_since else float(b.weight)

    def _set(self, b: Backend, *, health: Health | None = None, admin: AdminState | None = None,
             reason: str = "") -> None:
        old = b.state
        if health is not None and health != b.health:
            if health == "up":
                if b.been_up and b.health == "down" and self.slow_start > 0:
                    b.warm_since = monotonic()
                b.been_up = True
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

    def report_slow(self, b: Backend, reason: str) -> None:
        """Passive health: a request got no answer in time and a probe failed too. Out of rotation
        until the active checks decide (a passing check brings it back, failing ones take it down)."""
        if b.health == "up":
            self.set_health(b, "suspect", f"passive: {reason}")

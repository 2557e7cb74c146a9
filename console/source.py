"""What the app reads from: the ops API in production, a fixed in-memory cluster in tests and snapshots."""

from __future__ import annotations

from typing import Protocol

from console.client import Action, OpsError, Unreachable, Whoami
from ctops.wire import ActionResult, ClusterState

ADMIN_FOR: dict[str, str] = {"drain": "draining", "disable": "disabled", "enable": "enabled"}


class Source(Protocol):
    def describe(self) -> str: ...
    async def whoami(self) -> Whoami: ...
    async def state(self) -> ClusterState: ...
    async def act(self, server: str, action: Action) -> ActionResult: ...
    async def aclose(self) -> None: ...


class FixedSource:
    """A deterministic cluster with no network, so screens render the same on every run.

    Actions change the admin state as the dispatcher would; `reachable = False` simulates an outage.
    """

    def __init__(self, state: ClusterState, *, role: str = "operator", name: str = "test") -> None:
        self.current = state
        self.who = Whoami(name=name, role=role)
        self.reachable = True

    def describe(self) -> str:
        return "fixed://" + self.current.cluster

    async def whoami(self) -> Whoami:
        self._check()
        return self.who

    async def state(self) -> ClusterState:
        self._check()
        return self.current

    async def act(self, server: str, action: Action) -> ActionResult:
        self._check()
        if self.who.role != "operator":
            raise OpsError(403, "forbidden", f"role {self.who.role} may not {action}")
        servers = {s.name: s for s in self.current.servers}
        if server not in servers:
            raise OpsError(404, "unknown server", server)
        admin = ADMIN_FOR[action]
        old = servers[server]
        new = old.model_copy(update={"admin": admin, "state": old.health if admin == "enabled" else admin})
        self.current = self.current.model_copy(
            update={"servers": [new if s.name == server else s for s in self.current.servers]}
        )
        return ActionResult(ok=True, server=server, admin=new.admin, state=new.state, by=self.who.name)

    async def aclose(self) -> None:
        return None

    def _check(self) -> None:
        if not self.reachable:
            raise Unreachable([(self.describe(), "connection refused")])

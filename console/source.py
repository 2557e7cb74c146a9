"""What the app reads from: the ops API in production, a fixed in-memory cluster in tests and snapshots.

Every screen reads the same Source, the exceptions screen included, so each one renders from fixed
data in snapshot tests and needs no cluster.
"""

from __future__ import annotations

from typing import Protocol

from console.client import AuditEntry, OpsError, Unreachable, Whoami
from ctops.capture.wire import (
    ExceptionStats,
    GroupActionResult,
    GroupDetail,
    GroupList,
    GroupView,
    Occurrence,
    TailPage,
)
from ctops.opsapi import (
    ACTION_GRANT,
    ADMIN_FOR,
    GroupAction,
    LeadershipAction,
    ProcessAction,
    ProviderAction,
    QuarantineAction,
    role_may,
)
from ctops.opsapi import ServerAction as Action
from ctops.wire import (
    ActionResult,
    ClusterState,
    CommandResult,
    Event,
    LeadershipResult,
    LLMActionResult,
    LLMProviderView,
    QuarantinedRecord,
    QuarantineResult,
    StoreFailoverResult,
    StoreIntegrityView,
)


class Source(Protocol):
    def describe(self) -> str: ...
    async def whoami(self) -> Whoami: ...
    async def state(self) -> ClusterState: ...
    async def events(self, after: str | None, limit: int = 200) -> list[Event]: ...
    async def providers(self) -> list[LLMProviderView]: ...
    async def act(self, server: str, action: Action) -> ActionResult: ...
    async def process_action(self, host: str, process: str, action: ProcessAction) -> CommandResult: ...
    async def leadership(self, name: str, action: LeadershipAction) -> LeadershipResult: ...
    async def provider_action(self, name: str, action: ProviderAction) -> LLMActionResult: ...
    async def store_failover(self) -> StoreFailoverResult: ...
    async def integrity(self) -> StoreIntegrityView: ...
    async def quarantine_action(self, qid: str, action: QuarantineAction) -> QuarantineResult: ...
    async def exception_groups(self, sort: str, limit: int) -> GroupList: ...
    async def exception_group(self, gid: str) -> GroupDetail: ...
    async def exception_tail(self, after: str | None, limit: int) -> TailPage: ...
    async def exception_act(self, gid: str, action: GroupAction, *, minutes: int | None = None,
                            assignee: str | None = None) -> GroupActionResult: ...
    async def audit_log(self, limit: int = 200) -> list[AuditEntry]: ...
    async def aclose(self) -> None: ...


class FixedSource:
    """A deterministic cluster with no network, so screens render the same on every run.

    Actions change the state as the dispatcher would; `reachable = False` simulates an outage;
    `providers_list = None` answers 404 like a dispatcher without an LLM pool.
    """

    def __init__(self, state: ClusterState, *, role: str = "operator", name: str = "test",
                 events: list[Event] | None = None, providers: list[LLMProviderView] | None = None,
                 quarantined: list[QuarantinedRecord] | None = None,
                 exceptions: list[tuple[GroupView, GroupDetail]] | None = None,
                 tail: list[Occurrence] | None = None) -> None:
        self.current = state
        self.who = Whoami(name=name, role=role)
        self.reachable = True
        self.event_log: list[Event] = list(events or [])
        self.providers_list = providers
        self.quarantined: list[QuarantinedRecord] = list(quarantined or [])
        self.groups: dict[str, GroupDetail] = {g.id: d for g, d in exceptions or []}
        self.tail_items: list[Occurrence] = list(tail or [])
        self.audit: list[tuple[str, str, str]] = []  # (who, action, target), as the ops API audits
        self.calls: list[tuple[str, ...]] = []

    def describe(self) -> str:
        return "fixed://" + self.current.cluster

    async def whoami(self) -> Whoami:
        self._check()
        return self.who

    async def state(self) -> ClusterState:
        self._check()
        return self.current

    async def events(self, after: str | None, limit: int = 200) -> list[Event]:
        self._check()
        if after is None:
            return self.event_log[-limit:]
        return [e for e in self.event_log if _stream_key(e.id) > _stream_key(after)][:limit]

    async def providers(self) -> list[LLMProviderView]:
        self._check()
        if self.providers_list is None:
            raise OpsError(404, "Not Found")
        return list(self.providers_list)

    async def act(self, server: str, action: Action) -> ActionResult:
        self._operator(action)
        servers = {s.name: s for s in self.current.servers}
        if server not in servers:
            raise OpsError(404, "unknown server", server)
        admin = ADMIN_FOR[action]
        old = servers[server]
        new = old.model_copy(update={"admin": admin, "state": old.health if admin == "enabled" else admin})
        self.current = self.current.model_copy(
            update={"servers": [new if s.name == server else s for s in self.current.servers]}
        )
        self.audit.append((self.who.name, action, server))
        return ActionResult(ok=True, server=server, admin=new.admin, state=new.state, by=self.who.name)

    async def process_action(self, host: str, process: str, action: ProcessAction) -> CommandResult:
        self._operator(action)
        self.calls.append(("process", host, process, action))
        return CommandResult(ok=True, host=host, process=process, action=action, message=f"{action}ed",
                             by=self.who.name)

    async def leadership(self, name: str, action: LeadershipAction) -> LeadershipResult:
        self._operator(action)
        before = self.current.leader
        if action == "promote" and name == before:
            raise OpsError(409, f"{name} already leads")
        if action == "step-down" and name != before:
            raise OpsError(409, f"{name} does not lead ({before} does)")
        others = [d.name for d in self.current.dispatchers if d.name != before]
        after = name if action == "promote" else (others[0] if others else None)
        dispatchers = [d.model_copy(update={"role": "leader" if d.name == after else "standby"})
                       for d in self.current.dispatchers]
        self.current = self.current.model_copy(update={"leader": after, "dispatchers": dispatchers})
        self.calls.append(("leadership", name, action))
        return LeadershipResult(ok=True, action=action, leader_before=before, leader_after=after, epoch=2,
                                by=self.who.name)

    async def provider_action(self, name: str, action: ProviderAction) -> LLMActionResult:
        self._operator(action)
        if not self.providers_list or name not in {p.name for p in self.providers_list}:
            raise OpsError(404, f"unknown provider {name!r}")
        out = []
        for p in self.providers_list:
            upd: dict[str, object] = {}
            if action in ("pin", "unpin"):
                upd["pinned"] = (p.name == name) if action == "pin" else (p.pinned and p.name != name)
            elif p.name == name:
                upd = {"disabled": action == "disable", "state": "disabled" if action == "disable" else "up"}
            out.append(p.model_copy(update=upd))
        self.providers_list = out
        self.calls.append(("provider", name, action))
        pinned = next((p.name for p in out if p.pinned), None)
        mine = next(p for p in out if p.name == name)
        return LLMActionResult(ok=True, provider=name, action=action, by=self.who.name, pinned=pinned,
                               provider_state=mine)

    async def store_failover(self) -> StoreFailoverResult:
        """As the Sentinels would: the first replica that is up becomes primary, the old one a replica."""
        self._operator("fail over the store")
        store = self.current.store
        if store is None or not store.sentinels:
            raise OpsError(409, "this store is one node without Sentinels: there is nothing to fail over to")
        new = next((r for r in store.replicas if r.state == "up"), None)
        if new is None:
            raise OpsError(504, "no replica is up to take over")
        old = store.primary
        replicas = [r for r in store.replicas if r.name != new.name]
        if old is not None:
            replicas.insert(0, new.model_copy(update={"name": old, "lag_ms": 0, "address": None}))
        self.current = self.current.model_copy(update={"store": store.model_copy(
            update={"primary": new.name, "replicas": replicas, "last_failover_ms": self.current.now_ms})})
        self.calls.append(("store_failover",))
        return StoreFailoverResult(ok=True, primary_before=old, primary_after=new.name, by=self.who.name)

    async def integrity(self) -> StoreIntegrityView:
        self._check()
        store = self.current.store
        return StoreIntegrityView(corrupt_found=store.corrupt_found if store else 0,
                                  repaired=store.repaired if store else 0,
                                  last_scrub_ms=store.last_scrub_ms if store else None,
                                  quarantined=list(self.quarantined))

    async def quarantine_action(self, qid: str, action: QuarantineAction) -> QuarantineResult:
        self._operator(f"{action} quarantined records")
        item = next((q for q in self.quarantined if q.qid == qid), None)
        if item is None:
            raise OpsError(404, f"nothing quarantined as {qid!r}")
        self.quarantined.remove(item)
        self.calls.append(("quarantine", qid, action))
        self.audit.append((self.who.name, f"quarantine-{action}", item.key))
        return QuarantineResult(qid=qid, key=item.key, action=action)

    async def exception_groups(self, sort: str, limit: int) -> GroupList:
        self._check()
        groups = [d.group for d in self.groups.values()]
        groups.sort(key=(lambda g: (-g.count, -g.last_seen_ms)) if sort == "count" else (lambda g: -g.last_seen_ms))
        stats = ExceptionStats(groups=len(groups), events=sum(g.count for g in groups), dropped=0, corrupt=0,
                               rejected=0)
        return GroupList(groups=groups[:limit], total=len(groups), stats=stats)

    async def exception_group(self, gid: str) -> GroupDetail:
        self._check()
        if gid not in self.groups:
            raise OpsError(404, f"no exception group {gid!r}")
        return self.groups[gid]

    async def exception_tail(self, after: str | None, limit: int) -> TailPage:
        self._check()
        items = [o for o in self.tail_items if after is None or _stream_key(o.id) > _stream_key(after)][:limit]
        cursor = items[-1].id if items else after
        return TailPage(items=items, cursor=cursor)

    async def exception_act(self, gid: str, action: GroupAction, *, minutes: int | None = None,
                            assignee: str | None = None) -> GroupActionResult:
        self._operator(f"{action} exception groups")
        detail = await self.exception_group(gid)
        status = {"acknowledge": "acknowledged", "resolve": "resolved", "unresolve": "unresolved",
                  "mute": "muted"}.get(action, detail.group.status)
        upd: dict[str, object] = {"status": status}
        if action == "mute" and minutes:
            upd["mute_until_ms"] = self.current.now_ms + minutes * 60_000
        if action == "assign":
            upd["assignee"] = assignee or None
        group = detail.group.model_copy(update=upd)
        self.groups[gid] = detail.model_copy(update={"group": group})
        self.calls.append(("exception", gid, action))
        self.audit.append((self.who.name, f"exception_{action}", gid))
        return GroupActionResult(ok=True, group=group, by=self.who.name)

    async def audit_log(self, limit: int = 200) -> list[AuditEntry]:
        """Newest first, as the ops API lists them; entries are a second apart from the state's clock."""
        self._check()
        now = self.current.now_ms
        entries = [AuditEntry(now - (len(self.audit) - i) * 1000, who, self.who.role, action, target, "ok", "fixed")
                   for i, (who, action, target) in enumerate(self.audit)]
        return entries[::-1][:limit]

    async def aclose(self) -> None:
        return None

    def _operator(self, action: str) -> None:
        self._check()
        if not role_may(self.who.role, ACTION_GRANT):
            raise OpsError(403, "forbidden", f"role {self.who.role} may not {action}")

    def _check(self) -> None:
        if not self.reachable:
            raise Unreachable([(self.describe(), "connection refused")])


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)

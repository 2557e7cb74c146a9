"""The console's ops client: the one client (ctops.opsclient), reading from the leader, parsing off the loop.

Big answers (the cluster state) are parsed and validated in a worker thread, so the event loop
keeps drawing and reading keys meanwhile. No Textual here; the app's workers call it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pydantic_core
from pydantic import TypeAdapter, ValidationError

from ctops.capture.client import ExceptionsClient
from ctops.capture.wire import GroupActionResult, GroupDetail, GroupList, TailPage
from ctops.opsapi import GroupAction, QuarantineAction
from ctops.opsclient import Action, OpsClient, OpsError, Unreachable, Whoami
from ctops.wire import ClusterState, HostView, QuarantineResult, ServerView, StoreIntegrityView

__all__ = ["Action", "AuditEntry", "ConsoleClient", "OpsError", "Unreachable", "Whoami", "parse_state"]

_AUDIT = TypeAdapter(list[dict[str, str | int]])


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit log (GET /api/v1/audit), newest first as the API lists them."""

    ts_ms: int
    who: str
    role: str
    action: str
    target: str
    result: str
    via: str

    @classmethod
    def parse(cls, d: dict[str, str | int]) -> AuditEntry:
        def text(k: str) -> str:
            return str(d.get(k, ""))

        try:
            ts = int(d.get("ts_ms", 0))
        except (TypeError, ValueError):
            ts = 0
        return cls(ts, text("who"), text("role"), text("action"), text("target"), text("result"), text("via"))


_SERVERS = TypeAdapter(list[ServerView])
_HOSTS = TypeAdapter(list[HostView])
_BATCH = 50  # well under a millisecond of validation each


def parse_state(content: bytes) -> ClusterState:
    """JSON -> ClusterState, meant to run in a worker thread.

    A thread alone does not free the event loop: pydantic-core holds the GIL for a whole
    validate_json call (~45 ms for 2,000 servers and hosts). So the JSON is parsed in one short
    call (~12 ms) and the servers and hosts are validated in batches; between batches the GIL
    goes back to the event loop, which keeps drawing and reading keys.
    """
    try:
        raw = pydantic_core.from_json(content)
        if not isinstance(raw, dict):
            raise OpsError(200, "unexpected response", "the state is not a JSON object")
        servers = _batches(_SERVERS, raw.pop("servers", None))
        hosts = _batches(_HOSTS, raw.pop("hosts", None))
        head = ClusterState.model_validate({**raw, "servers": [], "hosts": []})
    except ValidationError as exc:
        raise OpsError(200, "unexpected response", str(exc).splitlines()[0]) from exc
    except ValueError as exc:
        raise OpsError(200, "unexpected response", f"not JSON: {exc}") from exc
    # servers and hosts were validated above, as the full model would have
    return head.model_copy(update={"servers": servers, "hosts": hosts})


def _batches(adapter: TypeAdapter[list[Any]], items: object) -> list[Any]:
    if not isinstance(items, list):
        return adapter.validate_python(items)  # raises the usual "missing"/"not a list" error
    out: list[Any] = []
    for i in range(0, len(items), _BATCH):
        out += adapter.validate_python(items[i:i + _BATCH])
    return out


class ConsoleClient(OpsClient):
    async def state(self, prefer_leader: bool = True) -> ClusterState:
        # staff should act on what the leader sees
        return await super().state(prefer_leader=prefer_leader)

    async def parse_state(self, resp: httpx.Response) -> ClusterState:
        # a 2,000-host state takes tens of ms to parse: off the event loop that draws the screen
        return await asyncio.to_thread(parse_state, resp.content)

    async def integrity(self) -> StoreIntegrityView:
        return await self.get(StoreIntegrityView, "/store/integrity")

    async def audit_log(self, limit: int = 200) -> list[AuditEntry]:
        resp = await self.request("GET", f"/audit?limit={limit}")
        try:
            raw = _AUDIT.validate_json(resp.content)
        except ValidationError as exc:
            raise OpsError(200, "unexpected response", str(exc).splitlines()[0]) from exc
        return [AuditEntry.parse(d) for d in raw]

    async def quarantine_action(self, qid: str, action: QuarantineAction) -> QuarantineResult:
        # the route wants the id named again in the body: the console's confirm dialog is that second naming
        return await self.post(QuarantineResult, f"/store/quarantine/{quote(qid, safe='')}/{action}",
                               json={"confirm": qid})

    # exception groups: the same calls as `ctops exceptions`, so the exceptions screen reads a Source too
    async def exception_groups(self, sort: str, limit: int) -> GroupList:
        return await ExceptionsClient(self).groups(sort=sort, limit=limit)

    async def exception_group(self, gid: str) -> GroupDetail:
        return await ExceptionsClient(self).group(gid)

    async def exception_tail(self, after: str | None, limit: int) -> TailPage:
        return await ExceptionsClient(self).tail(after, limit)

    async def exception_act(self, gid: str, action: GroupAction, *, minutes: int | None = None,
                            assignee: str | None = None) -> GroupActionResult:
        return await ExceptionsClient(self).act(gid, action, minutes=minutes, assignee=assignee)

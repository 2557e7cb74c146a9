"""The console's ops-API client: the shared httpx client (ctops.opsclient), reading from the leader.

Big answers (the cluster state) are parsed and validated in a worker thread, so the event loop
keeps drawing and reading keys meanwhile. No Textual here; the app's workers call it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import pydantic_core
from pydantic import BaseModel, TypeAdapter, ValidationError

from ctops.capture.client import ExceptionsClient
from ctops.capture.wire import GroupActionResult, GroupDetail, GroupList, TailPage
from ctops.opsclient import Action, OpsClient, OpsError, Unreachable, Whoami
from ctops.wire import (
    ClusterState,
    CommandResult,
    Event,
    HostView,
    LeadershipResult,
    LLMActionResult,
    LLMPoolView,
    LLMProviderView,
    QuarantineResult,
    ServerView,
    StoreFailoverResult,
    StoreIntegrityView,
)

__all__ = ["Action", "ConsoleClient", "OpsError", "Unreachable", "Whoami", "parse"]

ProcessAction = Literal["restart", "stop", "start"]
LeadershipAction = Literal["promote", "step-down"]
ProviderAction = Literal["pin", "unpin", "disable", "enable"]
QuarantineAction = Literal["discard", "restore"]

M = TypeVar("M", bound=BaseModel)
_EVENTS = TypeAdapter(list[Event])
_SERVERS = TypeAdapter(list[ServerView])
_HOSTS = TypeAdapter(list[HostView])
_BATCH = 50  # well under a millisecond of validation each
_PROVIDERS = TypeAdapter(list[LLMProviderView])

# the agent long-polls for commands; the dispatcher waits up to 15 s for its answer
PROCESS_TIMEOUT_S = 25.0
LEADERSHIP_TIMEOUT_S = 15.0
# the dispatcher waits up to 15 s for the Sentinels to promote a replica
STORE_FAILOVER_TIMEOUT_S = 25.0


def parse(model: type[M], resp: httpx.Response) -> M:
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        raise OpsError(resp.status_code, "unexpected response", str(exc).splitlines()[0]) from exc


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

    async def events(self, after: str | None, limit: int = 200) -> list[Event]:
        query = f"?limit={limit}" + (f"&after={quote(after)}" if after else "")
        resp = await self._request("GET", "/events" + query)
        try:
            return _EVENTS.validate_json(resp.content)
        except ValidationError as exc:
            raise OpsError(resp.status_code, "unexpected response", str(exc).splitlines()[0]) from exc

    async def providers(self) -> list[LLMProviderView]:
        resp = await self._request("GET", "/llm/providers")
        try:
            body = resp.json()
        except ValueError as exc:
            raise OpsError(resp.status_code, "unexpected response", "not JSON") from exc
        try:  # the pool view ({providers: [...]}) or a bare list
            if isinstance(body, dict):
                return LLMPoolView.model_validate(body).providers
            return _PROVIDERS.validate_python(body)
        except ValidationError as exc:
            raise OpsError(resp.status_code, "unexpected response", str(exc).splitlines()[0]) from exc

    async def process_action(self, host: str, process: str, action: ProcessAction) -> CommandResult:
        path = f"/hosts/{quote(host, safe='')}/processes/{quote(process, safe='')}/{action}"
        return parse(CommandResult, await self._act(path, PROCESS_TIMEOUT_S))

    async def leadership(self, name: str, action: LeadershipAction) -> LeadershipResult:
        return parse(LeadershipResult, await self._act(f"/dispatchers/{quote(name, safe='')}/{action}",
                                                       LEADERSHIP_TIMEOUT_S))

    async def provider_action(self, name: str, action: ProviderAction) -> LLMActionResult:
        return parse(LLMActionResult, await self._act(f"/llm/providers/{quote(name, safe='')}/{action}", 10.0))

    async def store_failover(self) -> StoreFailoverResult:
        return parse(StoreFailoverResult, await self._act("/store/failover", STORE_FAILOVER_TIMEOUT_S))

    async def integrity(self) -> StoreIntegrityView:
        return parse(StoreIntegrityView, await self._request("GET", "/store/integrity"))

    async def quarantine_action(self, qid: str, action: QuarantineAction) -> QuarantineResult:
        # the route wants the id named again in the body: the console's confirm dialog is that second naming
        resp = await self._request("POST", f"/store/quarantine/{quote(qid, safe='')}/{action}", json={"confirm": qid})
        return parse(QuarantineResult, resp)

    # exception groups: the same calls as `ctops exceptions`, so the exceptions screen reads a Source too
    async def exception_groups(self, sort: str, limit: int) -> GroupList:
        return await ExceptionsClient(self).groups(sort=sort, limit=limit)

    async def exception_group(self, gid: str) -> GroupDetail:
        return await ExceptionsClient(self).group(gid)

    async def exception_tail(self, after: str | None, limit: int) -> TailPage:
        return await ExceptionsClient(self).tail(after, limit)

    async def exception_act(self, gid: str, action: str, *, minutes: int | None = None,
                            assignee: str | None = None) -> GroupActionResult:
        return await ExceptionsClient(self).act(gid, action, minutes=minutes, assignee=assignee)

    async def _act(self, path: str, timeout: float) -> httpx.Response:
        return await self._request("POST", path, timeout=timeout)

"""The one client of the ops API (httpx), for the console, the CLI and any tool. No Textual here.

It speaks the contract in `ctops.opsapi` (actions, error shape, timeouts) and tries the dispatchers'
URLs by the one policy in `ctops.failover`, reading from the leader when asked. Every call a caller
needs is a public method; an area with many routes (exception groups) builds on `get`/`post`.
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from ctops.failover import Failover, TryNext, Unreachable
from ctops.opsapi import (
    API,
    LEADERSHIP_S,
    PROCESS_ACTION_S,
    PROVIDER_ACTION_S,
    STORE_FAILOVER_S,
    LeadershipAction,
    ProcessAction,
    ProviderAction,
    ServerAction,
)
from ctops.wire import (
    ActionResult,
    ClusterState,
    CommandResult,
    Event,
    LeadershipResult,
    LLMActionResult,
    LLMPoolView,
    LLMProviderView,
    StateChanges,
    StoreFailoverResult,
)

# the names callers have always imported from here
Action = ServerAction
__all__ = ["Action", "OpsClient", "OpsError", "Unreachable", "Whoami"]

M = TypeVar("M", bound=BaseModel)
_EVENTS = TypeAdapter(list[Event])
_PROVIDERS = TypeAdapter(list[LLMProviderView])


class Whoami(BaseModel):
    name: str
    role: str


class OpsError(Exception):
    """The ops API answered, but with an error (401, 403, 404, 422, 5xx) in the contract's shape."""

    def __init__(self, status: int, error: str, detail: object | None = None) -> None:
        super().__init__(f"{status} {error}" + (f": {detail}" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail


class OpsClient:
    def __init__(
        self,
        urls: tuple[str, ...] | list[str],
        token: str | None,
        *,
        timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
        race_first: bool = False,
    ) -> None:
        """`race_first`: the first read goes to every URL at once (Failover.race), for one-shot
        commands that must tell quickly that no dispatcher answers; later ones start from the URL that answered."""
        self.failover = Failover(urls)
        self.race_first = race_first
        self.urls = self.failover.urls
        # connect fails fast so a dead dispatcher costs little before the next URL is tried;
        # the read timeout bounds a frozen (SIGSTOPped) one that accepts but never answers
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0)), transport=transport
        )

    @property
    def current_url(self) -> str | None:
        return self.failover.current_url

    def describe(self) -> str:
        return ", ".join(self.urls)

    # --- reading ---------------------------------------------------------------------------------
    async def whoami(self) -> Whoami:
        return await self.get(Whoami, "/whoami")

    async def state(self, prefer_leader: bool = False) -> ClusterState:
        st = await self.parse_state(await self.request("GET", "/state"))
        if prefer_leader and st.leader and st.leader != st.served_by:
            # ask the leader itself: a standby's view of health may lag the leader's
            leader_url = next((d.ops_url for d in st.dispatchers if d.name == st.leader), None)
            if self.failover.follow(leader_url):
                try:
                    return await self.parse_state(await self.request("GET", "/state"))
                except Unreachable:
                    pass
        return st

    async def state_changes(self, since: str | None = None) -> StateChanges:
        """The state's changes since `since` (a version an earlier answer gave), or the full document
        when `since` is None or unknown to the dispatcher answering; `ctops.statefeed.apply_changes`
        applies them. After a failover the new dispatcher does not know the version: it sends it all."""
        query = f"?since={quote(since)}" if since else ""
        return parse(StateChanges, await self.request("GET", "/state/changes" + query))

    async def parse_state(self, resp: httpx.Response) -> ClusterState:
        """Where a client that must not block (the console) moves the parsing elsewhere."""
        return parse(ClusterState, resp)

    async def events(self, after: str | None, limit: int = 200) -> list[Event]:
        query = f"?limit={limit}" + (f"&after={quote(after)}" if after else "")
        resp = await self.request("GET", "/events" + query)
        try:
            return _EVENTS.validate_json(resp.content)
        except ValidationError as exc:
            raise _unexpected(resp, exc) from exc

    async def providers(self) -> list[LLMProviderView]:
        resp = await self.request("GET", "/llm/providers")
        try:
            body = resp.json()
        except ValueError as exc:
            raise OpsError(resp.status_code, "unexpected response", "not JSON") from exc
        try:  # the pool view ({providers: [...]}) or a bare list
            if isinstance(body, dict):
                return LLMPoolView.model_validate(body).providers
            return _PROVIDERS.validate_python(body)
        except ValidationError as exc:
            raise _unexpected(resp, exc) from exc

    # --- acting (each waits as long as the contract's timeouts chain says) -----------------------
    async def act(self, server: str, action: ServerAction) -> ActionResult:
        return await self.post(ActionResult, f"/servers/{quote(server, safe='')}/{action}")

    async def process_action(self, host: str, process: str, action: ProcessAction) -> CommandResult:
        path = f"/hosts/{quote(host, safe='')}/processes/{quote(process, safe='')}/{action}"
        return await self.post(CommandResult, path, timeout=PROCESS_ACTION_S)

    async def leadership(self, name: str, action: LeadershipAction) -> LeadershipResult:
        return await self.post(LeadershipResult, f"/dispatchers/{quote(name, safe='')}/{action}",
                               timeout=LEADERSHIP_S)

    async def provider_action(self, name: str, action: ProviderAction) -> LLMActionResult:
        return await self.post(LLMActionResult, f"/llm/providers/{quote(name, safe='')}/{action}",
                               timeout=PROVIDER_ACTION_S)

    async def store_failover(self) -> StoreFailoverResult:
        return await self.post(StoreFailoverResult, "/store/failover", timeout=STORE_FAILOVER_S)

    # --- any route -------------------------------------------------------------------------------
    async def get(self, model: type[M], path: str) -> M:
        """GET `path` (under /api/v1) and validate the answer as `model`."""
        return parse(model, await self.request("GET", path))

    async def post(self, model: type[M], path: str, timeout: float | None = None,
                   json: object | None = None) -> M:
        """POST an action to `path` (under /api/v1) and validate the answer as `model`."""
        return parse(model, await self.request("POST", path, timeout=timeout, json=json))

    async def request(self, method: str, path: str, timeout: float | None = None,
                      json: object | None = None) -> httpx.Response:
        """One request to whichever dispatcher answers (see ctops.failover). An HTTP error is the
        cluster's answer, not an outage: it raises OpsError and is not tried elsewhere. A GET moves on
        after any transport failure; an action only when it could not connect."""
        kw: dict[str, Any] = {"timeout": httpx.Timeout(timeout, connect=1.0)} if timeout is not None else {}
        if json is not None:
            kw["json"] = json

        async def send(url: str) -> httpx.Response:
            try:
                return await self._http.request(method, f"{url}{API}{path}", **kw)
            except httpx.TransportError as exc:
                raise TryNext(_reason(exc), reached=not isinstance(exc, httpx.ConnectError)) from exc

        if method == "GET" and self.race_first:
            self.race_first = False
            resp = await self.failover.race(send)
        else:
            resp = await self.failover.call(send, safe=method == "GET")
        if resp.status_code >= 400:
            raise _ops_error(resp)
        return resp

    async def aclose(self) -> None:
        await self._http.aclose()


def parse(model: type[M], resp: httpx.Response) -> M:
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        raise _unexpected(resp, exc) from exc


def _unexpected(resp: httpx.Response, exc: ValidationError) -> OpsError:
    return OpsError(resp.status_code, "unexpected response", str(exc).splitlines()[0])


def _ops_error(resp: httpx.Response) -> OpsError:
    try:
        body = resp.json()
        return OpsError(resp.status_code, str(body.get("error") or resp.reason_phrase), body.get("detail"))
    except (ValueError, AttributeError):
        return OpsError(resp.status_code, resp.reason_phrase or "error", resp.text[:200] or None)


def _reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else f"cannot connect ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

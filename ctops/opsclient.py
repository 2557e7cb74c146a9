"""httpx client for the ops API, used by the console, `ctops status` and `ctops chaos`. No Textual here."""

from __future__ import annotations

from typing import Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from ctops.wire import ActionResult, ClusterState

Action = Literal["drain", "disable", "enable"]
API = "/api/v1"
M = TypeVar("M", bound=BaseModel)


class Whoami(BaseModel):
    name: str
    role: str


class OpsError(Exception):
    """The ops API answered, but with an error (401, 403, 404, 422, 5xx)."""

    def __init__(self, status: int, error: str, detail: object | None = None) -> None:
        super().__init__(f"{status} {error}" + (f": {detail}" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail


class Unreachable(Exception):
    """No ops URL answered. `tried` keeps each URL's reason for the banner."""

    def __init__(self, tried: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{url}: {why}" for url, why in tried) or "no ops URL configured")
        self.tried = tried


class OpsClient:
    def __init__(
        self,
        urls: tuple[str, ...] | list[str],
        token: str | None,
        *,
        timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.urls = tuple(urls)
        # connect fails fast so a dead dispatcher costs little before the next URL is tried;
        # the read timeout bounds a frozen (SIGSTOPped) one that accepts but never answers
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0)), transport=transport
        )
        self._current = 0

    @property
    def current_url(self) -> str | None:
        return self.urls[self._current] if self.urls else None

    def describe(self) -> str:
        return ", ".join(self.urls)

    async def whoami(self) -> Whoami:
        return self._parse(Whoami, await self._request("GET", "/whoami"))

    async def state(self, prefer_leader: bool = False) -> ClusterState:
        st = await self.parse_state(await self._request("GET", "/state"))
        if prefer_leader and st.leader and st.leader != st.served_by:
            # ask the leader itself: a standby's view of health may lag the leader's
            for d in st.dispatchers:
                if d.name == st.leader and d.ops_url in self.urls:
                    previous = self._current
                    self._current = self.urls.index(d.ops_url)
                    try:
                        return await self.parse_state(await self._request("GET", "/state"))
                    except Unreachable:
                        self._current = previous
        return st

    async def parse_state(self, resp: httpx.Response) -> ClusterState:
        """Where a client that must not block (the console) moves the parsing elsewhere."""
        return self._parse(ClusterState, resp)

    async def act(self, server: str, action: Action) -> ActionResult:
        return self._parse(ActionResult, await self._request("POST", f"/servers/{server}/{action}"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, timeout: float | None = None,
                       json: object | None = None) -> httpx.Response:
        """Try the URL that last answered first, then the others in order; stick with whichever answers.

        Only transport failures move on: an HTTP error is the cluster's answer, not an outage. A GET
        moves on after any of them; an action only when it could not connect, since once it may have
        reached a dispatcher (read timeout, reset) sending it elsewhere could act twice.
        """
        tried: list[tuple[str, str]] = []
        n = len(self.urls)
        kw: dict[str, object] = {"timeout": httpx.Timeout(timeout, connect=1.0)} if timeout is not None else {}
        if json is not None:
            kw["json"] = json
        for step in range(n):
            i = (self._current + step) % n
            url = self.urls[i]
            try:
                resp = await self._http.request(method, f"{url}{API}{path}", **kw)  # type: ignore[arg-type]
            except httpx.ConnectError as exc:
                tried.append((url, _reason(exc)))
                continue
            except httpx.TransportError as exc:
                if method != "GET":
                    raise Unreachable([(url, _reason(exc) + "; the action may or may not have happened")]) from exc
                tried.append((url, _reason(exc)))
                continue
            self._current = i
            if resp.status_code >= 400:
                raise _ops_error(resp)
            return resp
        raise Unreachable(tried)

    @staticmethod
    def _parse(model: type[M], resp: httpx.Response) -> M:
        try:
            return model.model_validate_json(resp.content)
        except ValidationError as exc:
            raise OpsError(resp.status_code, "unexpected response", str(exc).splitlines()[0]) from exc


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

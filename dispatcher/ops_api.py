"""The ops API (control plane), versioned under /api/v1, with bearer tokens and roles.

Errors always have the same JSON shape, {"error": ..., "detail": ...}, so the console and scripts
can show them without guessing.
"""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import asyncio
import logging
import re
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from ctops.asgi_limits import BodyLimit
from ctops.auth import Principal
from ctops.clock import now_ms
from ctops.rejects import COMMAND_RESULT, REJECTS, UNPARSABLE, source_of
from ctops.wire import (
    ActionResult,
    ClusterState,
    CommandReply,
    CommandRequest,
    CommandResult,
    ErrorBody,
    Event,
    Heartbeat,
    HeartbeatAck,
    LeadershipResult,
    PeerHeartbeat,
)
from dispatcher.integrity_routes import integrity_router
from dispatcher.llm.routes import llm_router
from dispatcher.ratelimit import FailureWindow, retry_after_header
from dispatcher.runtime import Runtime
from dispatcher.store_routes import store_router

log = logging.getLogger("ctops.dispatcher.ops")

COMMAND_WAIT_S = 15.0
COMMAND_POLL_MAX_MS = 30_000
AUTH_AUDIT_MAX_PER_MINUTE = 200
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_CMD_ID = re.compile(r"^[0-9a-f]{32}$")

ACTIONS: dict[str, Literal["enabled", "draining", "disabled"]] = {
    "drain": "draining", "disable": "disabled", "enable": "enabled",
}

# what any route may answer besides its own result; each route adds the ones only it can give
_ERR = {"model": ErrorBody}
COMMON_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {**_ERR, "description": "body is not JSON, or too deeply nested"},
    401: {**_ERR, "description": "missing or unknown token"},
    403: {**_ERR, "description": "the token's role or scope does not allow this"},
    413: {**_ERR, "description": "request body over the limit"},
    422: {**_ERR, "description": "invalid request; detail names the fields"},
    429: {**_ERR, "description": "too many requests (see Retry-After)"},
    503: {**_ERR, "description": "shared state (Redis) unavailable; retry after Retry-After"},
}
_404 = {404: {**_ERR, "description": "no such item"}}
_409 = {409: {**_ERR, "description": "the action does not apply in the current state"}}
_504 = {504: {**_ERR, "description": "the action did not complete in time"}}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: object | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def create_ops_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="ctops ops API", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None, responses=COMMON_RESPONSES)
    bearer = HTTPBearer(auto_error=False, description="a token from the deployment's [[tokens]]")
    auth_failures = FailureWindow(60.0)
    scope_refusals = FailureWindow(60.0)
    auth_limit = rt.dep.limits.auth_failures_per_minute

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(ErrorBody(error=exc.error, detail=exc.detail).model_dump(), exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            REJECTS.note(source_of(request.url.path), f"{request.url.path}: body is not valid JSON")
            return JSONResponse(ErrorBody(error="request body is not valid JSON").model_dump(), 400)
        detail = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in errors]
        fields = ", ".join(d["field"] for d in detail)
        REJECTS.note(source_of(request.url.path), f"{request.url.path}: invalid {fields}")
        return JSONResponse(ErrorBody(error=f"invalid request: {fields}", detail=detail).model_dump(), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == UNPARSABLE:
            # FastAPI's words for a body it could not decode (e.g. not UTF-8): said plainly, and counted
            REJECTS.note(source_of(request.url.path), f"{request.url.path}: body is not JSON in UTF-8")
            return JSONResponse(ErrorBody(error="request body is not valid JSON in UTF-8").model_dump(), 400)
        # keeps the router's headers, e.g. Allow on a 405
        return JSONResponse(ErrorBody(error=str(exc.detail)).model_dump(), exc.status_code, headers=exc.headers)

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # only a body nested deeper than the interpreter's stack gets here
        return JSONResponse(ErrorBody(error="request body is nested too deeply").model_dump(), 400)

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis error while serving the ops API: %s", exc)
        return JSONResponse(ErrorBody(error="shared state (Redis) unavailable").model_dump(), 503,
                            headers={"Retry-After": "1"})

    async def refused(request: Request, why: str) -> ApiError:
        """A failed authentication: counted per client address and audited (never the token).
        Past the limit the address gets 429 until its minute is over, and is audited once more."""
        addr = request.client.host if request.client else "unknown"
        n, left = auth_failures.fail(addr)
        # many addresses at once must not flush the audit log either: past a total, only the log line
        total, _ = auth_failures.fail("*")
        if n <= auth_limit + 1 and total <= AUTH_AUDIT_MAX_PER_MINUTE:
            blocked = n > auth_limit
            log.warning("failed authentication from %s on %s %s: %s%s", addr, request.method, request.url.path,
                        why, " (limit reached)" if blocked else "")
            try:
                await rt.store.audit("-", "-", "auth_blocked" if blocked else "auth_failed", f"address {addr}",
                                     f"{why} on {request.method} {request.url.path}"
                                     + (f"; {n - 1} failures this minute, refused for {left:.0f}s" if blocked else ""),
                                     rt.spec.name)
            except (RedisError, OSError) as exc:
                log.warning("cannot audit a failed authentication: %s", exc)
        if n > auth_limit:
            return ApiError(429, "too many failed authentications from this address",
                            detail={"retry_after_s": int(retry_after_header(left))},
                            headers={"Retry-After": retry_after_header(left)})
        return ApiError(401, why, headers={"WWW-Authenticate": "Bearer"})

    async def authenticate(request: Request, token: str | None, why_missing: str) -> Principal:
        # a valid token always passes, even from an address over the limit: tokens are 192-bit
        # random, so the limit is about noise, and a shared (NAT) address must not lock out agents
        who = rt.tokens.lookup(token) if token else None
        if who is None:
            raise await refused(request, "invalid token" if token else why_missing)
        return who

    async def principal(request: Request,
                        cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Principal:
        token = cred.credentials.strip() if cred is not None and cred.scheme.lower() == "bearer" else ""
        return await authenticate(request, token, "missing bearer token")

    def require(grant: str):
        def dep(who: Annotated[Principal, Depends(principal)]) -> Principal:
            if not who.may(grant):
                raise ApiError(403, who.refusal(grant), detail={"needs": grant})
            return who
        return dep

    async def for_host(request: Request, who: Principal, host: str) -> None:
        if who.speaks_for_host(host):
            return
        # a host's token used for another host is a compromised or misconfigured agent: audited, once
        # a minute per token and host (an agent retries every second)
        n, _ = scope_refusals.fail(f"{who.name}>{host}")
        if n == 1:
            addr = request.client.host if request.client else "unknown"
            log.warning("agent token %s (host %s) refused for host %s from %s", who.name, who.host, host, addr)
            try:
                await rt.store.audit(who.name, who.role, "scope_refused", f"host {host}",
                                     f"token is for host {who.host}; {request.method} {request.url.path} from {addr}",
                                     rt.spec.name)
            except (RedisError, OSError) as exc:
                log.warning("cannot audit a refused scope: %s", exc)
        raise ApiError(403, f"agent token {who.name!r} is for host {who.host!r}, not {host!r}",
                       detail={"token_host": who.host, "host": host})

    @app.get("/api/v1/whoami")
    async def whoami(who: Annotated[Principal, Depends(principal)]) -> dict[str, str]:
        return {"name": who.name, "role": who.role}

    @app.post("/api/v1/heartbeat", response_model=HeartbeatAck, responses=_404)
    async def heartbeat(hb: Heartbeat, request: Request,
                        who: Annotated[Principal, Depends(require("agent"))]) -> HeartbeatAck:
        await for_host(request, who, hb.host)
        if hb.host not in rt.known_hosts:
            raise ApiError(404, f"unknown host {hb.host!r}", detail={"known": sorted(rt.known_hosts)})
        await rt.store.save_heartbeat(hb, now_ms())
        if hb.events:
            await rt.events.ingest_agent_events(hb.host, hb.events)
        leader = rt.lease.leader_name
        url = next((d.ops_url for d in rt.dep.dispatchers if d.name == leader), None)
        return HeartbeatAck(ok=True, leader=leader, leader_ops_url=url)

    @app.get("/api/v1/state", response_model=ClusterState)
    async def state(_: Annotated[Principal, Depends(require("read"))]) -> ClusterState:
        return await rt.cluster_state()

    @app.get("/api/v1/audit")
    async def audit(_: Annotated[Principal, Depends(require("read"))],
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, str]]:
        return await rt.store.read_audit(limit, reader=f"dispatcher:{rt.spec.name}")

    @app.post("/api/v1/servers/{name}/{action}", response_model=ActionResult, responses=_404)
    async def server_action(name: str, action: Literal["drain", "disable", "enable"],
                            who: Annotated[Principal, Depends(require("act"))]) -> ActionResult:
        b = rt.pool.get(name)
        if b is None:
            await rt.store.audit(who.name, who.role, action, name, "unknown server", rt.spec.name)
            raise ApiError(404, f"unknown server {name!r}", detail={"known": sorted(rt.pool.backends)})
        admin = ACTIONS[action]
        await rt.store.set_admin(name, admin)
        rt.pool.set_admin(b, admin, f"{action} by {who.name}")
        await rt.store.audit(who.name, who.role, action, name, f"ok: now {b.state}", rt.spec.name)
        return ActionResult(ok=True, server=name, admin=admin, state=b.state, by=who.name)

    @app.post("/api/v1/peer/heartbeat", response_model=PeerHeartbeat, responses=_404)
    async def peer_heartbeat(hb: PeerHeartbeat, who: Annotated[Principal, Depends(require("peer"))]) -> PeerHeartbeat:
        if not who.speaks_for_dispatcher(hb.name):
            raise ApiError(403, f"peer token {who.name!r} is for dispatcher {who.dispatcher!r}, not {hb.name!r}")
        if hb.name not in {d.name for d in rt.dep.dispatchers}:
            raise ApiError(404, f"unknown dispatcher {hb.name!r}")
        return rt.peers.received(hb)

    @app.post("/api/v1/dispatchers/{name}/{action}", response_model=LeadershipResult,
              responses={**_404, **_409, **_504})
    async def leadership(name: str, action: Literal["promote", "step-down"],
                         who: Annotated[Principal, Depends(require("act"))]) -> LeadershipResult:
        target = f"dispatcher {name}"
        if name not in {d.name for d in rt.dep.dispatchers}:
            await rt.store.audit(who.name, who.role, action, target, "unknown dispatcher", rt.spec.name)
            raise ApiError(404, f"unknown dispatcher {name!r}")
        before = await rt.store.current_leader()
        if before is None:
            raise ApiError(409, "no dispatcher leads right now; wait for the lease to be taken")
        if action == "promote" and name == before:
            await rt.store.audit(who.name, who.role, action, target, f"refused: {name} already leads", rt.spec.name)
            raise ApiError(409, f"{name} already leads")
        if action == "step-down" and name != before:
            await rt.store.audit(who.name, who.role, action, target, f"refused: {name} does not lead", rt.spec.name)
            raise ApiError(409, f"{name} does not lead ({before} does)")
        await rt.lease.request_handover(before, name if action == "promote" else None)
        after = before
        deadline = asyncio.get_running_loop().time() + rt.dep.timings.lease_ttl_ms * 3 / 1000
        while asyncio.get_running_loop().time() < deadline:
            after = await rt.store.current_leader()
            if after not in (None, before):
                break
            await asyncio.sleep(0.05)
        moved = after not in (None, before) and (action == "step-down" or after == name)
        epoch = await rt.store.current_epoch()
        await rt.store.audit(who.name, who.role, action, target,
                             f"ok: {before} -> {after} (epoch {epoch})" if moved else f"failed: leader still {after}",
                             rt.spec.name)
        if not moved:
            raise ApiError(504, f"leadership did not move in time; leader is {after}")
        return LeadershipResult(ok=True, action=action, leader_before=before, leader_after=after, epoch=epoch,
                                by=who.name)

    @app.get("/api/v1/events", response_model=list[Event])
    async def events(_: Annotated[Principal, Depends(require("read"))], after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Event]:
        if after is not None and not _STREAM_ID.match(after):
            raise ApiError(422, "invalid request: after", detail=[{"field": "query.after",
                                                                   "message": "a stream id such as 1700000000000-0"}])
        return await rt.events.read(after, limit)

    @app.post("/api/v1/hosts/{host}/processes/{process}/{action}", response_model=CommandResult,
              responses={**_404, **_504})
    async def process_action(host: str, process: str, action: Literal["restart", "stop", "start"],
                             who: Annotated[Principal, Depends(require("act"))]) -> CommandResult:
        target = f"{host}/{process}"
        agent = next((a for a in rt.dep.agents if a.name == host), None)
        if agent is None or process not in {p.name for p in agent.processes}:
            await rt.store.audit(who.name, who.role, action, target, "unknown host or process", rt.spec.name)
            raise ApiError(404, f"unknown host or process {target!r}")
        reply = await rt.commands.send(host, process, action, who.name, COMMAND_WAIT_S)
        if reply is None:
            await rt.store.audit(who.name, who.role, action, target, "timeout: agent did not answer", rt.spec.name)
            raise ApiError(504, f"agent {host} did not answer within {COMMAND_WAIT_S:.0f}s; the command was withdrawn")
        await rt.store.audit(who.name, who.role, action, target,
                             ("ok: " if reply.ok else "failed: ") + reply.message, rt.spec.name)
        return CommandResult(ok=reply.ok, host=host, process=process, action=action, message=reply.message,
                             by=who.name)

    @app.get("/api/v1/agents/{host}/commands", response_model=list[CommandRequest], responses=_404)
    async def agent_commands(host: str, request: Request, who: Annotated[Principal, Depends(require("agent"))],
                             wait_ms: Annotated[int, Query(ge=0, le=COMMAND_POLL_MAX_MS)] = 20_000
                             ) -> list[CommandRequest]:
        await for_host(request, who, host)
        if host not in rt.known_hosts:
            raise ApiError(404, f"unknown host {host!r}")
        cmd = await rt.commands.next_for(host, wait_ms / 1000)
        return [cmd] if cmd else []

    @app.post("/api/v1/agents/{host}/commands/{cmd_id}/result", responses=_404)
    async def agent_command_result(host: str, cmd_id: str, reply: CommandReply, request: Request,
                                   who: Annotated[Principal, Depends(require("agent"))]) -> dict[str, bool]:
        await for_host(request, who, host)
        if host not in rt.known_hosts:
            raise ApiError(404, f"unknown host {host!r}")
        if not _CMD_ID.match(cmd_id):
            REJECTS.note(COMMAND_RESULT, f"a result for the malformed command id {cmd_id[:80]!r}")
            raise ApiError(422, "invalid request: cmd_id")
        await rt.commands.reply(cmd_id, reply)
        return {"ok": True}

    from dispatcher.exceptions import exceptions_router  # noqa: PLC0415 - it imports ApiError from here
    app.include_router(exceptions_router(rt, require, authenticate))
    app.include_router(integrity_router(rt.redis, rt.keys, require, rt.spec.name))
    if rt.llm is not None:
        app.include_router(llm_router(rt.llm, require, rt.store.audit, rt.spec.name))
    app.include_router(store_router(rt.storewatch, require, rt.store.audit, rt.spec.name))
    # built once now, before the loop guard runs: built on the first request, it stalls the event
    # loop for ~0.1 s (seconds on a loaded machine), long enough to stall health checks and the lease
    app.openapi()
    return app


def wrap(app: FastAPI, max_body: int) -> ASGIApp:
    return BodyLimit(app, max_body, on_reject=lambda path, _status, why: REJECTS.note(source_of(path), why))

"""The ops API (control plane), versioned under /api/v1, with bearer tokens and roles.

Errors always have the same JSON shape, {"error": ..., "detail": ...}, so the console and scripts
can show them without guessing.
"""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import asyncio
import logging
import re
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctops.auth import Principal
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
from dispatcher.llm.routes import llm_router
from dispatcher.pool import now_ms
from dispatcher.runtime import Runtime
from dispatcher.store_routes import store_router

log = logging.getLogger("ctops.dispatcher.ops")

COMMAND_WAIT_S = 15.0
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_CMD_ID = re.compile(r"^[0-9a-f]{32}$")

ACTIONS: dict[str, Literal["enabled", "draining", "disabled"]] = {
    "drain": "draining", "disable": "disabled", "enable": "enabled",
}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: object | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


class BodyLimit:
    """Refuse bodies over the limit with 413 before the app sees them, whether or not a
    Content-Length was sent (a chunked body is counted as it arrives)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await _error(send, 400, "invalid Content-Length")
                    return
                if int(value) > self.max_bytes:
                    await _error(send, 413, f"request body over {self.max_bytes} bytes")
                    return
        # read the whole body here (ops bodies are small) so an oversized one never reaches the app,
        # whose body parsing would turn any error into a generic 400
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                await _error(send, 413, f"request body over {self.max_bytes} bytes")
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _error(send: Send, status: int, error: str) -> None:
    body = ErrorBody(error=error).model_dump_json().encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_ops_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="ctops ops API", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(ErrorBody(error=exc.error, detail=exc.detail).model_dump(), exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(ErrorBody(error="request body is not valid JSON").model_dump(), 400)
        detail = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in errors]
        fields = ", ".join(d["field"] for d in detail)
        return JSONResponse(ErrorBody(error=f"invalid request: {fields}", detail=detail).model_dump(), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ErrorBody(error=str(exc.detail)).model_dump(), exc.status_code)

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis error while serving the ops API: %s", exc)
        return JSONResponse(ErrorBody(error="shared state (Redis) unavailable").model_dump(), 503,
                            headers={"Retry-After": "1"})

    def principal(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        who = rt.tokens.lookup(token.strip())
        if who is None:
            raise ApiError(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return who

    def require(grant: str):
        def dep(who: Annotated[Principal, Depends(principal)]) -> Principal:
            if not who.may(grant):
                raise ApiError(403, f"role {who.role!r} may not do this", detail={"needs": grant})
            return who
        return dep

    responses = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 422: {"model": ErrorBody}}

    @app.get("/api/v1/whoami", responses=responses)
    async def whoami(who: Annotated[Principal, Depends(principal)]) -> dict[str, str]:
        return {"name": who.name, "role": who.role}

    @app.post("/api/v1/heartbeat", response_model=HeartbeatAck, responses={**responses, 404: {"model": ErrorBody}})
    async def heartbeat(hb: Heartbeat, _: Annotated[Principal, Depends(require("agent"))]) -> HeartbeatAck:
        if hb.host not in rt.known_hosts:
            raise ApiError(404, f"unknown host {hb.host!r}", detail={"known": sorted(rt.known_hosts)})
        await rt.store.save_heartbeat(hb, now_ms())
        if hb.events:
            await rt.events.ingest_agent_events(hb.host, hb.events)
        leader = rt.lease.leader_name
        url = next((d.ops_url for d in rt.dep.dispatchers if d.name == leader), None)
        return HeartbeatAck(ok=True, leader=leader, leader_ops_url=url)

    @app.get("/api/v1/state", response_model=ClusterState, responses=responses)
    async def state(_: Annotated[Principal, Depends(require("read"))]) -> ClusterState:
        return await rt.cluster_state()

    @app.get("/api/v1/audit", responses=responses)
    async def audit(_: Annotated[Principal, Depends(require("read"))], limit: int = 100) -> list[dict[str, str]]:
        if not 1 <= limit <= 1000:
            raise ApiError(422, "invalid request: limit", detail=[{"field": "query.limit",
                                                                    "message": "must be 1..1000"}])
        return await rt.store.read_audit(limit)

    @app.post("/api/v1/servers/{name}/{action}", response_model=ActionResult,
              responses={**responses, 404: {"model": ErrorBody}})
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

    @app.post("/api/v1/peer/heartbeat", response_model=PeerHeartbeat, responses=responses)
    async def peer_heartbeat(hb: PeerHeartbeat, _: Annotated[Principal, Depends(require("agent"))]) -> PeerHeartbeat:
        if hb.name not in {d.name for d in rt.dep.dispatchers}:
            raise ApiError(404, f"unknown dispatcher {hb.name!r}")
        return rt.peers.received(hb)

    @app.post("/api/v1/dispatchers/{name}/{action}", response_model=LeadershipResult,
              responses={**responses, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
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

    @app.get("/api/v1/events", response_model=list[Event], responses=responses)
    async def events(_: Annotated[Principal, Depends(require("read"))], after: str | None = None,
                     limit: int = 100) -> list[Event]:
        if not 1 <= limit <= 1000:
            raise ApiError(422, "invalid request: limit", detail=[{"field": "query.limit", "message": "1..1000"}])
        if after is not None and not _STREAM_ID.match(after):
            raise ApiError(422, "invalid request: after", detail=[{"field": "query.after",
                                                                   "message": "a stream id such as 1700000000000-0"}])
        return await rt.events.read(after, limit)

    @app.post("/api/v1/hosts/{host}/processes/{process}/{action}", response_model=CommandResult,
              responses={**responses, 404: {"model": ErrorBody}, 504: {"model": ErrorBody}})
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

    @app.get("/api/v1/agents/{host}/commands", response_model=list[CommandRequest], responses=responses)
    async def agent_commands(host: str, _: Annotated[Principal, Depends(require("agent"))],
                             wait_ms: int = 20_000) -> list[CommandRequest]:
        if host not in rt.known_hosts:
            raise ApiError(404, f"unknown host {host!r}")
        cmd = await rt.commands.next_for(host, max(0.0, min(wait_ms, 30_000)) / 1000)
        return [cmd] if cmd else []

    @app.post("/api/v1/agents/{host}/commands/{cmd_id}/result", responses=responses)
    async def agent_command_result(host: str, cmd_id: str, reply: CommandReply,
                                   _: Annotated[Principal, Depends(require("agent"))]) -> dict[str, bool]:
        if host not in rt.known_hosts:
            raise ApiError(404, f"unknown host {host!r}")
        if not _CMD_ID.match(cmd_id):
            raise ApiError(422, "invalid request: cmd_id")
        await rt.commands.reply(cmd_id, reply)
        return {"ok": True}

    from dispatcher.exceptions import exceptions_router  # noqa: PLC0415 - it imports ApiError from here
    app.include_router(exceptions_router(rt, require))
    if rt.llm is not None:
        app.include_router(llm_router(rt.llm, require, rt.store.audit, rt.spec.name))
    app.include_router(store_router(rt.storewatch, require, rt.store.audit, rt.spec.name))
    return app


def wrap(app: FastAPI, max_body: int) -> ASGIApp:
    return BodyLimit(app, max_body)

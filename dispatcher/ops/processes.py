"""Staff commands to supervised processes (restart, stop, start) and the agents' side of them:
polling for the next command and posting its result."""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from ctops.auth import Principal
from ctops.config import AgentSpec
from ctops.opsapi import COMMAND_POLL_MAX_MS, COMMAND_POLL_MS, COMMAND_WAIT_S, ProcessAction
from ctops.rejects import COMMAND_RESULT, REJECTS
from ctops.wire import CommandReply, CommandRequest, CommandResult
from dispatcher.commands import CommandRelay
from dispatcher.ops.auth import Auth
from dispatcher.ops.errors import R404, R504, ApiError
from dispatcher.store import Store

_CMD_ID = re.compile(r"^[0-9a-f]{32}$")


def processes_router(auth: Auth, store: Store, commands: CommandRelay, agents: list[AgentSpec],
                     via: str) -> APIRouter:
    router = APIRouter()
    known_hosts = frozenset(a.name for a in agents)

    @router.post("/api/v1/hosts/{host}/processes/{process}/{action}", response_model=CommandResult,
                 responses={**R404, **R504})
    async def process_action(host: str, process: str, action: ProcessAction,
                             who: Annotated[Principal, Depends(auth.require("act"))]) -> CommandResult:
        target = f"{host}/{process}"
        agent = next((a for a in agents if a.name == host), None)
        if agent is None or process not in {p.name for p in agent.processes}:
            await store.audit(who.name, who.role, action, target, "unknown host or process", via)
            raise ApiError(404, f"unknown host or process {target!r}")
        reply = await commands.send(host, process, action, who.name, COMMAND_WAIT_S)
        if reply is None:
            await store.audit(who.name, who.role, action, target, "timeout: agent did not answer", via)
            raise ApiError(504, f"agent {host} did not answer within {COMMAND_WAIT_S:.0f}s; the command was withdrawn")
        await store.audit(who.name, who.role, action, target, ("ok: " if reply.ok else "failed: ") + reply.message, via)
        return CommandResult(ok=reply.ok, host=host, process=process, action=action, message=reply.message,
                             by=who.name)

    @router.get("/api/v1/agents/{host}/commands", response_model=list[CommandRequest], responses=R404)
    async def agent_commands(host: str, request: Request, who: Annotated[Principal, Depends(auth.require("agent"))],
                             wait_ms: Annotated[int, Query(ge=0, le=COMMAND_POLL_MAX_MS)] = COMMAND_POLL_MS
                             ) -> list[CommandRequest]:
        await auth.for_host(request, who, host)
        if host not in known_hosts:
            raise ApiError(404, f"unknown host {host!r}")
        cmd = await commands.next_for(host, wait_ms / 1000)
        return [cmd] if cmd else []

    @router.post("/api/v1/agents/{host}/commands/{cmd_id}/result", responses=R404)
    async def agent_command_result(host: str, cmd_id: str, reply: CommandReply, request: Request,
                                   who: Annotated[Principal, Depends(auth.require("agent"))]) -> dict[str, bool]:
        await auth.for_host(request, who, host)
        if host not in known_hosts:
            raise ApiError(404, f"unknown host {host!r}")
        if not _CMD_ID.match(cmd_id):
            REJECTS.note(COMMAND_RESULT, f"a result for the malformed command id {cmd_id[:80]!r}")
            raise ApiError(422, "invalid request: cmd_id")
        await commands.reply(cmd_id, reply)
        return {"ok": True}

    return router

"""Staff actions on trainer servers: drain, disable, enable (stored, applied here at once, audited)."""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from ctops.auth import Principal
from ctops.opsapi import ADMIN_FOR, ServerAction
from ctops.wire import ActionResult
from dispatcher.ops.auth import Auth
from dispatcher.ops.errors import R404, ApiError
from dispatcher.pool import ServerPool
from dispatcher.store import Store


def servers_router(auth: Auth, store: Store, pool: ServerPool, via: str) -> APIRouter:
    router = APIRouter()

    @router.post("/api/v1/servers/{name}/{action}", response_model=ActionResult, responses=R404)
    async def server_action(name: str, action: ServerAction,
                            who: Annotated[Principal, Depends(auth.require("act"))]) -> ActionResult:
        b = pool.get(name)
        if b is None:
            await store.audit(who.name, who.role, action, name, "unknown server", via)
            raise ApiError(404, f"unknown server {name!r}", detail={"known": sorted(pool.backends)})
        admin = ADMIN_FOR[action]
        await store.set_admin(name, admin)
        pool.set_admin(b, admin, f"{action} by {who.name}")
        await store.audit(who.name, who.role, action, name, f"ok: now {b.state}", via)
        return ActionResult(ok=True, server=name, admin=admin, state=b.state, by=who.name)

    return router

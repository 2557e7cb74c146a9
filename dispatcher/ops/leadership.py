"""Staff moving leadership: promote a standby or make the leader step down, waiting (bounded) for
the lease to move; refused when it does not apply, audited either way."""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from ctops.auth import Principal
from ctops.config import DispatcherSpec
from ctops.opsapi import LEASE_TTLS_TO_MOVE, LeadershipAction
from ctops.wire import LeadershipResult
from dispatcher.lease import Lease
from dispatcher.ops.auth import Auth
from dispatcher.ops.errors import R404, R409, R504, ApiError
from dispatcher.store import Store


def leadership_router(auth: Auth, store: Store, lease: Lease, dispatchers: list[DispatcherSpec],
                      lease_ttl_ms: int, via: str) -> APIRouter:
    router = APIRouter()
    dispatcher_names = {d.name for d in dispatchers}

    @router.post("/api/v1/dispatchers/{name}/{action}", response_model=LeadershipResult,
                 responses={**R404, **R409, **R504})
    async def leadership(name: str, action: LeadershipAction,
                         who: Annotated[Principal, Depends(auth.require("act"))]) -> LeadershipResult:
        target = f"dispatcher {name}"
        if name not in dispatcher_names:
            await store.audit(who.name, who.role, action, target, "unknown dispatcher", via)
            raise ApiError(404, f"unknown dispatcher {name!r}")
        before = await store.current_leader()
        if before is None:
            raise ApiError(409, "no dispatcher leads right now; wait for the lease to be taken")
        if action == "promote" and name == before:
            await store.audit(who.name, who.role, action, target, f"refused: {name} already leads", via)
            raise ApiError(409, f"{name} already leads")
        if action == "step-down" and name != before:
            await store.audit(who.name, who.role, action, target, f"refused: {name} does not lead", via)
            raise ApiError(409, f"{name} does not lead ({before} does)")
        await lease.request_handover(before, name if action == "promote" else None)
        after: str | None = before
        deadline = asyncio.get_running_loop().time() + lease_ttl_ms * LEASE_TTLS_TO_MOVE / 1000
        while asyncio.get_running_loop().time() < deadline:
            after = await store.current_leader()
            if after not in (None, before):
                break
            await asyncio.sleep(0.05)
        moved = after not in (None, before) and (action == "step-down" or after == name)
        epoch = await store.current_epoch()
        await store.audit(who.name, who.role, action, target,
                          f"ok: {before} -> {after} (epoch {epoch})" if moved else f"failed: leader still {after}",
                          via)
        if not moved:
            raise ApiError(504, f"leadership did not move in time; leader is {after}")
        return LeadershipResult(ok=True, action=action, leader_before=before, leader_after=after, epoch=epoch,
                                by=who.name)

    return router

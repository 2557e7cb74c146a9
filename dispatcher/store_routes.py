"""The shared store on the ops API: its topology (also in GET /api/v1/state) and a staff failover.

`POST /api/v1/store/failover` asks the Sentinels to promote a replica now (SENTINEL FAILOVER),
waits for the primary to change and is audited like every staff action.
"""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from redis.exceptions import RedisError

from ctops.auth import Principal
from ctops.wire import ErrorBody, StoreFailoverResult, StoreView
from dispatcher.ops.auth import Audit, Require
from dispatcher.storewatch import StoreWatch

log = logging.getLogger("ctops.dispatcher.store")

# right after a failover the store may refuse writes for a moment; the audit entry must still land
AUDIT_TRIES = 20
AUDIT_PAUSE_S = 0.25


def store_router(watch: StoreWatch, require: Require, audit: Audit,
                 via: str = "") -> APIRouter:
    router = APIRouter(prefix="/api/v1/store", tags=["store"])
    responses: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}

    async def audited(who: Principal, result: str) -> None:
        for attempt in range(AUDIT_TRIES):
            try:
                await audit(who.name, who.role, "store_failover", f"store:{watch.service}", result, via)
                return
            except (RedisError, OSError):
                if attempt == AUDIT_TRIES - 1:
                    raise
                await asyncio.sleep(AUDIT_PAUSE_S)

    @router.get("", response_model=StoreView, responses=responses)
    async def store(_: Annotated[Principal, Depends(require("read"))]) -> StoreView:
        return watch.view()

    @router.post("/failover", response_model=StoreFailoverResult,
                 responses={**responses, 409: {"model": ErrorBody}, 502: {"model": ErrorBody},
                            504: {"model": ErrorBody}})
    async def failover(who: Annotated[Principal, Depends(require("act"))]) -> StoreFailoverResult:
        try:
            before, after = await watch.failover()
        except LookupError as exc:
            await audited(who, f"refused: {exc}")
            raise HTTPException(409, str(exc)) from exc
        except RuntimeError as exc:
            await audited(who, f"failed: no Sentinel accepted it ({exc})")
            raise HTTPException(502, f"no Sentinel accepted the failover: {exc}") from exc
        moved = after not in (None, before)
        await audited(who, f"ok: primary {before} -> {after}" if moved else f"failed: primary still {after}")
        if not moved:
            raise HTTPException(504, f"the primary did not change in time; it is still {after}")
        log.warning("store failover by %s: %s -> %s", who.name, before, after)
        return StoreFailoverResult(ok=True, primary_before=before, primary_after=after, by=who.name)

    return router

"""Staff control of the LLM pool on the ops API: see each provider, pin, disable, re-enable.

Actions are stored in Redis, which every dispatcher's pool polls, and applied to this one at once.
"""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException

from ctops.auth import Principal
from ctops.opsapi import ProviderAction
from ctops.wire import ErrorBody, LLMActionResult, LLMPoolView
from dispatcher.llm.pool import LLMPool
from dispatcher.ops.auth import Audit, Require


def llm_router(pool: LLMPool, require: Require, audit: Audit,
               via: str = "") -> APIRouter:
    router = APIRouter(prefix="/api/v1/llm", tags=["llm"])
    responses: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}

    @router.get("/providers", response_model=LLMPoolView, responses=responses)
    async def providers(_: Annotated[Principal, Depends(require("read"))]) -> LLMPoolView:
        return pool.view()

    @router.post("/providers/{name}/{action}", response_model=LLMActionResult,
                 responses={**responses, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def act(name: str, action: ProviderAction,
                  who: Annotated[Principal, Depends(require("act"))]) -> LLMActionResult:
        target = f"llm:{name}"
        p = pool.by_name.get(name)
        if p is None:
            await audit(who.name, who.role, f"llm_{action}", target, "unknown provider", via)
            raise HTTPException(404, f"unknown LLM provider {name!r}; known: {sorted(pool.by_name)}")
        if action == "pin" and p.disabled_by is not None:
            await audit(who.name, who.role, f"llm_{action}", target, "refused: provider is disabled", via)
            raise HTTPException(409, f"LLM provider {name!r} is disabled; enable it before pinning it")
        await pool.control(action, name, who.name)
        view = p.view()
        await audit(who.name, who.role, f"llm_{action}", target,
                    f"ok: now {view.state}" + (f", pinned {pool.pinned}" if pool.pinned else ", none pinned"), via)
        return LLMActionResult(ok=True, provider=name, action=action, by=who.name, pinned=pool.pinned,
                               provider_state=view)

    return router

"""The store's integrity on the ops API (for the console's Store tab and scripts): the counters,
the quarantined records, and discarding or restoring one: an action staff must confirm by naming
the quarantine id again in the body, audited like every staff action."""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from ctops import integrity
from ctops.auth import Principal
from ctops.keys import Keys
from ctops.opsapi import QuarantineAction
from ctops.wire import ErrorBody
from dispatcher.ops.auth import Require


class Confirm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confirm: str = Field(max_length=100, description="the quarantine id again, to confirm")


class IntegrityView(BaseModel):
    corrupt_found: int
    repaired: int
    last_scrub_ms: int | None
    quarantined: list[dict[str, str]]


class QuarantineActionResult(BaseModel):
    qid: str
    key: str
    action: QuarantineAction


def integrity_router(redis: Redis, keys: Keys, require: Require,
                     via: str) -> APIRouter:
    router = APIRouter(prefix="/api/v1/store", tags=["store"])

    @router.get("/integrity", response_model=IntegrityView)
    async def status(_: Annotated[Principal, Depends(require("read"))]) -> IntegrityView:
        return IntegrityView(**await integrity.summary(redis, keys),
                             quarantined=await integrity.quarantine_items(redis, keys))

    @router.post("/quarantine/{qid}/{action}", response_model=QuarantineActionResult,
                 responses={404: {"model": ErrorBody, "description": "nothing quarantined by that id"},
                            409: {"model": ErrorBody, "description": "not confirmed: send {\"confirm\": QID}"}})
    async def act(qid: str, action: QuarantineAction, body: Confirm,
                  who: Annotated[Principal, Depends(require("act"))]) -> JSONResponse:
        if body.confirm != qid:
            return JSONResponse({"error": "not confirmed", "detail": f"send {{\"confirm\": \"{qid}\"}} to {action} "
                                 "this quarantined record"}, 409)
        try:
            done = await integrity.release(redis, keys, qid, restore=action == "restore", actor=who.name,
                                           role=who.role, via=via)
        except integrity.NotQuarantined as exc:
            return JSONResponse({"error": str(exc), "detail": None}, 404)
        return JSONResponse(done)

    return router

"""The event stream and the audit log, for staff to read."""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from ctops.auth import Principal
from ctops.wire import Event
from dispatcher.events import EventLog
from dispatcher.ops.auth import Auth
from dispatcher.ops.errors import ApiError
from dispatcher.store import Store

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def events_router(auth: Auth, store: Store, event_log: EventLog, via: str) -> APIRouter:
    router = APIRouter()

    @router.get("/api/v1/audit")
    async def audit(_: Annotated[Principal, Depends(auth.require("read"))],
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, str]]:
        return await store.read_audit(limit, reader=f"dispatcher:{via}")

    @router.get("/api/v1/events", response_model=list[Event])
    async def events(_: Annotated[Principal, Depends(auth.require("read"))], after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Event]:
        if after is not None and not STREAM_ID.match(after):
            raise ApiError(422, "invalid request: after", detail=[{"field": "query.after",
                                                                   "message": "a stream id such as 1700000000000-0"}])
        return await event_log.read(after, limit, reader=f"dispatcher:{via}")

    return router

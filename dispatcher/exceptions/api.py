"""Routes for exceptions: ingest (agent role, and Sentry envelopes), read (viewer), triage (operator).

Regressions are written to the event stream by whichever dispatcher ingested the event, not only by
the leader: services post to the first dispatcher that answers, which may be a standby, and the
resolved -> regressed transition happens exactly once (atomically, in Redis), so the event is
neither lost nor doubled. Its id is derived from the stream entry, so a retry stores it once.
"""

# no `from __future__ import annotations`: FastAPI must resolve the closures in the annotations

import logging
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from redis.exceptions import RedisError

from ctops.auth import Principal
from ctops.capture.wire import (
    ExceptionBatch,
    ExceptionEvent,
    ExceptionStats,
    GroupActionResult,
    GroupDetail,
    GroupList,
    GroupStatus,
    GroupView,
    IngestResult,
    TailPage,
)
from ctops.config import Limits
from ctops.opsapi import GroupAction
from ctops.rejects import EXCEPTIONS, REJECTS
from ctops.wire import ErrorBody
from dispatcher.events import EventLog
from dispatcher.exceptions import shortid
from dispatcher.exceptions.sentry import EnvelopeError, inflate, load_json, parse_envelope, sentry_key, to_event
from dispatcher.exceptions.store import ExceptionStore, Ingested
from dispatcher.ops.auth import Audit, Authenticate, Require
from dispatcher.ops.errors import ApiError
from dispatcher.ratelimit import TokenBuckets, retry_after_header

log = logging.getLogger("ctops.dispatcher.exceptions")

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
# the ops app declares the errors every route may give; these are the ones only some routes give
_404: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "no such item"},
    409: {"model": ErrorBody, "description": "a short id that starts several groups' ids; detail lists them"}}
_SENTRY_RESPONSES: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "project id is not a Sentry project id"},
    415: {"model": ErrorBody, "description": "unsupported Content-Encoding"}}
Status = GroupStatus


def matches(q: str, *fields: str | list[str] | None) -> bool:
    """Every word of the filter appears in one of the fields (case-insensitive)."""
    hay = " ".join(" ".join(f) if isinstance(f, list) else (f or "") for f in fields).lower()
    return all(w in hay for w in q.lower().split())


def event_matches(q: str, e: ExceptionEvent) -> bool:
    return matches(q, e.type, e.message, e.service, e.host)


def exceptions_router(store: ExceptionStore, event_log: EventLog, audit: Audit, lim: Limits, via: str,
                      require: Require, authenticate: Authenticate) -> APIRouter:
    router = APIRouter(tags=["exceptions"])
    # per token: a Sentry DSN's key is a token too, so varying the project buys no extra rate
    buckets = TokenBuckets(lim.exceptions_per_s, lim.exceptions_burst)

    def admit(who: Principal, events: int, sentry: bool = False) -> None:
        wait = buckets.take(who.name, max(1, events))
        if not wait:
            return
        retry = retry_after_header(wait)
        headers = {"Retry-After": retry}
        if sentry:
            # Sentry's SDKs read this and stop sending error events for that long (scope: this key)
            headers["X-Sentry-Rate-Limits"] = f"{retry}:error;default:key"
        raise ApiError(429, f"exception rate limit of token {who.name!r} reached "
                            f"({lim.exceptions_per_s:g}/s, burst {lim.exceptions_burst}); retry in {retry}s",
                       detail={"retry_after_s": int(retry)}, headers=headers)

    async def take(events: list[ExceptionEvent], batch: ExceptionBatch | None) -> Ingested:
        done = await store.ingest(events, batch.counters if batch else None)
        for gid, sid, e in done.regressed:
            msg = f"{e.type} regressed on {e.host} ({e.service}): {e.message[:200]}"
            try:
                await event_log.emit("exception_regressed", "warning", msg, f"dispatcher:{via}", gid,
                                     event_id=f"exc-regressed:{gid}:{sid}")
            except (RedisError, OSError) as exc:
                log.warning("cannot record the regression of %s: %s", gid, exc)
        return done

    @router.post("/api/v1/exceptions", response_model=IngestResult)
    async def ingest(batch: ExceptionBatch, who: Annotated[Principal, Depends(require("ingest"))]) -> IngestResult:
        admit(who, len(batch.events))
        done = await take(batch.events, batch)
        return IngestResult(accepted=done.accepted, duplicates=done.duplicates)

    @router.get("/api/v1/exceptions/groups", response_model=GroupList)
    async def groups(_: Annotated[Principal, Depends(require("read"))],
                     sort: Literal["last", "count"] = "last", status: Status | None = None,
                     q: Annotated[str, Query(max_length=200)] = "",
                     limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> GroupList:
        found = [g for g in await store.groups(sort)
                 if (status is None or g.status == status)
                 and (not q or matches(q, g.type, g.message, g.culprit, g.services, g.hosts, g.assignee))]
        return GroupList(groups=found[:limit], total=len(found), stats=await store.stats())

    @router.get("/api/v1/exceptions/stats", response_model=ExceptionStats)
    async def stats(_: Annotated[Principal, Depends(require("read"))]) -> ExceptionStats:
        return await store.stats()

    @router.get("/api/v1/exceptions/groups/{gid}", response_model=GroupDetail,
                responses=_404)
    async def group(gid: str, _: Annotated[Principal, Depends(require("read"))],
                    recent: Annotated[int, Query(ge=0, le=20)] = 20) -> GroupDetail:
        g = await _group_or_404(gid)
        events = await store.recent(g.id)
        # the newest by time (a replayed backlog arrives after newer events)
        latest = max(events, key=lambda e: e.ts_ms, default=None)
        return GroupDetail(group=g, latest=latest, recent=events[:recent])

    @router.get("/api/v1/exceptions/tail", response_model=TailPage)
    async def tail(_: Annotated[Principal, Depends(require("read"))], after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                   q: Annotated[str, Query(max_length=200)] = "") -> TailPage:
        if after is not None and not _STREAM_ID.match(after):
            raise ApiError(422, "invalid request: after",
                           detail=[{"field": "query.after", "message": "a stream id such as 1700000000000-0"}])
        items, cursor = await store.tail(after, limit)
        if q:
            items = [o for o in items if event_matches(q, o.event)]
        return TailPage(items=items, cursor=cursor)

    @router.post("/api/v1/exceptions/groups/{gid}/{action}", response_model=GroupActionResult,
                 responses=_404)
    async def act(gid: str, action: GroupAction,
                  who: Annotated[Principal, Depends(require("act"))],
                  minutes: Annotated[int | None, Query(ge=1, le=7 * 24 * 60)] = None,
                  assignee: Annotated[str | None, Query(max_length=64)] = None) -> GroupActionResult:
        if action == "mute" and minutes is None:
            raise ApiError(422, "invalid request: minutes", detail=[{"field": "query.minutes",
                                                                     "message": "mute needs minutes (1..10080)"}])
        if action == "assign" and assignee is None:
            raise ApiError(422, "invalid request: assignee", detail=[{"field": "query.assignee",
                                                                      "message": "a staff name, or empty to clear"}])
        try:
            full = await shortid.resolve(store, gid)
        except shortid.Ambiguous as exc:
            await audit(who.name, who.role, action, f"exception-group/{gid}", "ambiguous short id", via)
            raise exc from None
        g = await store.set_status(full, action, minutes=minutes, assignee=(assignee or "").strip() or None) \
            if full else None
        if g is None:
            await audit(who.name, who.role, action, f"exception-group/{gid}", "unknown group", via)
            raise ApiError(404, f"unknown exception group {gid!r}")
        target = f"exception-group/{g.id}"
        what = {"mute": f"muted for {minutes} min", "assign": f"assigned to {g.assignee or 'nobody'}"}.get(
            action, f"now {g.status}")
        await audit(who.name, who.role, f"exception_{action}", target, f"ok: {what}", via)
        return GroupActionResult(ok=True, group=g, by=who.name)

    async def _group_or_404(gid: str) -> GroupView:
        full = await shortid.resolve(store, gid)
        g = await store.group(full) if full else None
        if g is None:
            raise ApiError(404, f"unknown exception group {gid!r}")
        return g

    # --- Sentry ---------------------------------------------------------------------------------
    async def sentry_principal(request: Request) -> Principal:
        key = sentry_key({k.lower(): v for k, v in request.headers.items()}, dict(request.query_params))
        who = await authenticate(request, key, "missing sentry_key: the DSN's public key must be an agent token")
        if not who.may("ingest"):
            raise ApiError(403, f"role {who.role!r} may not send exceptions; the DSN's key must be an agent token")
        return who

    async def sentry_events(request: Request, project_id: str, envelope: bool) -> tuple[list[ExceptionEvent], str]:
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", project_id):
            raise ApiError(404, "unknown project")
        try:
            body = inflate(await request.body(), request.headers.get("content-encoding", ""))
            items = parse_envelope(body)[1] if envelope else [({"type": "event"}, body)]
            raw = [load_json(p) for h, p in items if h.get("type") == "event"]
            events = [ExceptionEvent.model_validate(to_event(ev, project_id)) for ev in raw]
        except EnvelopeError as exc:
            REJECTS.note(EXCEPTIONS, f"Sentry envelope: {exc}")
            raise ApiError(exc.status, str(exc)) from None
        except ValueError as exc:  # includes pydantic's ValidationError and bad JSON
            REJECTS.note(EXCEPTIONS, f"Sentry event: {str(exc).splitlines()[0]}")
            detail = exc.errors(include_url=False) if isinstance(exc, ValidationError) else None
            raise ApiError(400, f"not a usable Sentry event: {str(exc).splitlines()[0]}", detail=detail) from None
        return events, (events[0].event_id.removeprefix("sentry-") if events else "")

    @router.post("/api/{project_id}/envelope/", responses=_SENTRY_RESPONSES)
    async def sentry_envelope(project_id: str, request: Request,
                              who: Annotated[Principal, Depends(sentry_principal)]) -> dict[str, str]:
        events, first = await sentry_events(request, project_id, envelope=True)
        admit(who, len(events), sentry=True)
        if events:
            await take(events, None)
        return {"id": first}

    @router.post("/api/{project_id}/store/", responses=_SENTRY_RESPONSES)
    async def sentry_store(project_id: str, request: Request,
                           who: Annotated[Principal, Depends(sentry_principal)]) -> dict[str, str]:
        events, first = await sentry_events(request, project_id, envelope=False)
        admit(who, len(events), sentry=True)
        if events:
            await take(events, None)
        return {"id": first}

    return router

"""The trainer server's HTTP API. State lives in Redis; this process holds only clients and limits.

A submission is accepted at once (202) and worked on in the background, step by step with
checkpoints (trainer/work.py); the learner polls it until it is done. POSTs honour Idempotency-Key
(trainer/idempotency.py), so a dispatcher or browser may safely resend them to any server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from fastapi import Body, FastAPI, Header, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from redis.asyncio.client import Pipeline
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctops.asgi_limits import BodyLimit
from ctops.config import Deployment
from ctops.envelope import Corrupt
from ctops.keys import Keys
from ctops.rejects import REJECTS, REQUEST_BODY, UNPARSABLE
from trainer import review, sandbox
from trainer.exercises import EXERCISES
from trainer.idempotency import (
    HEADER,
    Idempotency,
    Outcome,
    Writes,
    client_gone,
    fingerprint,
    generated_key_ttl_s,
)
from trainer.lease import Lease
from trainer.readiness import StoreProbe
from trainer.review import Reviewer
from trainer.store import Store, connect, connect_raw, new_id, now_ms, raw_twin
from trainer.work import Worker, step

log = logging.getLogger("trainer")

CODE_MAX_BYTES = 64 * 1024
# JSON escaping can double a body's size relative to the code it carries
BODY_MAX_BYTES = 3 * CODE_MAX_BYTES
COOKIE = "ctops_session"
# what a learner is told when a request needs the shared store and it does not answer
STORE_RETRY_AFTER_S = 2
WAIT_MAX_SECONDS = 60.0
WAIT_POLL_SECONDS = 0.1
IdemKey = Annotated[str | None, Header(alias=HEADER)]


async def _fingerprint(request: Request) -> str:
    return fingerprint(request.method, request.url.path, await request.body())


def _error_shape(status: int, message: str) -> dict:
    """The trainer's errors are FastAPI's shape, {"detail": ...}."""
    return {"detail": f"request body too large (limit {BODY_MAX_BYTES} bytes)" if status == 413 else message}


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    learner: StrictStr | None = Field(None, max_length=100)


class SubmissionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exercise_id: StrictStr = Field(min_length=1, max_length=64)
    code: StrictStr


class Damaged(Exception):
    """A record this request needs was damaged and set aside: answered with `response`."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__("damaged record")
        self.response = response


def session_damaged(sid: str, qid: str) -> JSONResponse:
    return JSONResponse({"error": "session_damaged", "session_id": sid, "quarantine": qid,
                         "detail": "this session's stored record was damaged and has been set aside for staff; "
                                   "start a new session", "next": "POST /api/sessions"}, 410)


# answers of a store that is away for the moment: starting, failing over, or short of replicas
_AWAY_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN")


def store_away(exc: Exception) -> bool:
    if isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError | redis_exc.ReadOnlyError):
        return True
    return isinstance(exc, redis_exc.ResponseError) and str(exc).startswith(_AWAY_REPLIES)


def create_app(deployment: Deployment, server_name: str, redis_client: aioredis.Redis | None = None) -> FastAPI:
    deployment.server(server_name)  # fails early on an unknown name
    keys = Keys(prefix=deployment.redis.prefix)
    # more parallel runs than cores would only make every learner wait longer for the CPU limit
    runs = asyncio.Semaphore(max(2, os.cpu_count() or 2))
    # built here, not at startup: loading the CA bundle costs tens of ms, which a warm spare pays
    # before it waits rather than after it is told to take over
    tls = httpx.create_ssl_context()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_client or connect(deployment.redis)
        raw = raw_twin(redis_client) if redis_client else connect_raw(deployment.redis)
        app.state.store = Store(client, keys, server_name, raw)
        REJECTS.attach(raw, keys)
        app.state.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), verify=tls)
        reviewer = Reviewer(app.state.http, review.endpoints(deployment), deployment.trainer)
        app.state.worker = Worker(app.state.store, keys, server_name, deployment, reviewer, runs)
        app.state.idem = Idempotency(raw, keys, server_name, deployment.trainer,
                                     generated_key_ttl_s(deployment.timings))
        app.state.worker.start_loops()
        app.state.sandbox = (await asyncio.to_thread(sandbox.confinement, deployment.sandbox)).to_dict()
        app.state.probe = StoreProbe(app.state.store)
        await app.state.probe.start()
        try:
            yield
        finally:
            await app.state.probe.stop()
            await app.state.worker.stop()
            await app.state.http.aclose()
            await raw.aclose()
            if redis_client is None:
                await client.aclose()

    app = FastAPI(title="Coding Trainer", version="1", lifespan=lifespan)

    def store(request: Request) -> Store:
        return request.app.state.store

    def worker(request: Request) -> Worker:
        return request.app.state.worker

    def idem(request: Request) -> Idempotency:
        return request.app.state.idem

    # counts chunked bodies too: a body without Content-Length is cut off at the limit, not buffered whole
    app.add_middleware(BodyLimit, max_bytes=BODY_MAX_BYTES, error=_error_shape,
                       on_reject=lambda path, _status, why: REJECTS.note(REQUEST_BODY, f"{path}: {why}"))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer (422 naming the field), counted where staff see it
        REJECTS.note(REQUEST_BODY, f"{request.method} {request.url.path}: {str(exc.errors())[:200]}")
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == UNPARSABLE:
            REJECTS.note(REQUEST_BODY, f"{request.method} {request.url.path}: body is not JSON in UTF-8")
            return JSONResponse({"detail": "request body is not valid JSON in UTF-8"}, 400)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Corrupt)
    async def corrupt_record(request: Request, exc: Corrupt) -> JSONResponse:
        # only reached if setting the record aside failed too (Redis trouble): still this learner's
        # problem alone, and one they can retry
        log.error("damaged record %s (%s) on %s %s; not contained", exc.key, exc.reason, request.method,
                  request.url.path)
        return JSONResponse({"error": "record_damaged", "detail": "a stored record this request needs is damaged; "
                             "retry shortly", "server": server_name}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_id("err")
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.url.path)
        return JSONResponse({"detail": "internal server error", "error_id": error_id, "server": server_name}, 500)

    @app.exception_handler(aioredis.RedisError)
    async def store_unavailable(request: Request, exc: aioredis.RedisError) -> JSONResponse:
        if not store_away(exc):
            return await internal_error(request, exc)
        # the shared store is away (an outage or a failover): a clear answer the learner can retry,
        # not an internal error
        log.warning("shared store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "shared state temporarily unavailable; retry shortly", "server": server_name,
                             "retry_after_s": STORE_RETRY_AFTER_S}, 503,
                            headers={"Retry-After": str(STORE_RETRY_AFTER_S)})

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        """Liveness: this process answers. Never touches Redis: a store outage must not get healthy
        servers restarted by their agents."""
        return JSONResponse({"status": "ok", "server": server_name, "sandbox": request.app.state.sandbox})

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Readiness for the dispatcher's checks: the store as last probed in the background (no wait)."""
        status, body = request.app.state.probe.readiness(server_name)
        return JSONResponse(body, status)

    @app.get("/api/exercises")
    async def list_exercises() -> dict:
        return {"exercises": [e.summary() for e in EXERCISES.values()]}

    @app.get("/api/exercises/{exercise_id}")
    async def get_exercise(exercise_id: str) -> dict:
        ex = EXERCISES.get(exercise_id)
        if ex is None:
            raise HTTPException(404, f"unknown exercise {exercise_id!r}; known: {sorted(EXERCISES)}")
        return ex.public()

    @app.post("/api/sessions", status_code=201)
    async def create_session(request: Request, body: Annotated[SessionCreate | None, Body()] = None,
                             idem_key: IdemKey = None) -> JSONResponse:
        async def prepare() -> tuple[Outcome, Writes]:
            session, writes = store(request).new_session(body.learner if body else None)
            cookie = f"{COOKIE}={session['session_id']}; HttpOnly; Path=/; SameSite=lax"
            return Outcome(201, {**session, "server": server_name}, {"set-cookie": cookie}), writes

        return await idem(request).run(idem_key, await _fingerprint(request), prepare,
                                       gone=lambda: client_gone(request))

    async def session_or_404(request: Request, sid: str) -> dict:
        session = await store(request).get_session(sid)
        if session is None:
            raise HTTPException(404, f"unknown session {sid!r}")
        if "damaged" in session:
            raise Damaged(session_damaged(sid, session["damaged"]))
        return session

    @app.exception_handler(Damaged)
    async def damaged(_request: Request, exc: Damaged) -> JSONResponse:
        return exc.response

    @app.get("/api/sessions/{sid}")
    async def get_session(request: Request, sid: str) -> dict:
        session = await session_or_404(request, sid)
        await store(request).touch(sid)
        subs = await store(request).session_submissions(sid)
        return {**session, "last_server": server_name, "submissions": subs, "server": server_name}

    @app.post("/api/sessions/{sid}/submissions", status_code=202)
    async def submit(request: Request, sid: str, body: SubmissionCreate, idem_key: IdemKey = None,
                     wait: Annotated[float, Query(ge=0, le=WAIT_MAX_SECONDS)] = 0) -> JSONResponse:
        """Accepts the submission (202) and works on it in the background; poll its URL until
        `status` is "done". With `wait`, waits up to that many seconds for it to be done (then 200)."""
        st = store(request)
        lease_for: dict[str, Lease] = {}

        async def prepare() -> tuple[Outcome, Writes]:
            await session_or_404(request, sid)
            exercise = EXERCISES.get(body.exercise_id)
            if exercise is None:
                raise HTTPException(404, f"unknown exercise {body.exercise_id!r}; known: {sorted(EXERCISES)}")
            if len(body.code.encode()) > CODE_MAX_BYTES:
                raise HTTPException(413, f"code is larger than the limit of {CODE_MAX_BYTES // 1024} KB")
            sub: dict[str, Any] = {
                "submission_id": new_id("sub"), "session_id": sid, "exercise_id": exercise.id,
                "status": "received", "verdict": None, "message": "", "tests": [],
                "review": {"status": "waiting", "text": "", "provider": None},
                "server": server_name, "created_ms": now_ms(), "code": body.code, "steps": [],
            }
            step(sub, "received", server_name)
            # the lease is taken in the same transaction, so no scanner races this server to start it
            lease = lease_for[sub["submission_id"]] = worker(request).lease(sub["submission_id"])
            writes = st.submission_writes(sub, new=True)

            def all_writes(p: Pipeline) -> None:
                writes(p)
                lease.claim_in(p)

            url = f"/api/sessions/{sid}/submissions/{sub['submission_id']}"
            return Outcome(202, sub, {"location": url}), all_writes

        async def after(outcome: Outcome) -> None:
            sub_id = outcome.body["submission_id"]
            worker(request).start(sub_id, lease_for[sub_id])
            await st.touch(sid)

        response = await idem(request).run(idem_key, await _fingerprint(request), prepare, after,
                                           gone=lambda: client_gone(request))
        if wait <= 0 or response.status_code != 202:
            return response
        accepted = json.loads(bytes(response.body))
        done = await _wait_done(request, accepted["submission_id"], wait)
        return JSONResponse(done, 200) if done else response

    async def _wait_done(request: Request, sub_id: str, seconds: float) -> dict | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sub = await store(request).get_submission(sub_id)
            if sub is not None and sub.get("status") in ("done", "failed"):
                return sub
            await worker(request).try_resume(sub_id)
            await asyncio.sleep(WAIT_POLL_SECONDS)
        return None

    @app.get("/api/sessions/{sid}/submissions/{sub_id}")
    async def get_submission(request: Request, sid: str, sub_id: str) -> dict:
        sub = await store(request).get_submission(sub_id, sid)
        if sub is not None and "damaged" in sub and not sub.get("session_id") \
                and await store(request).owns(sid, sub_id):
            sub["session_id"] = sid  # damaged while a server worked on it, which did not know the session
        if sub is None or sub.get("session_id") != sid:
            raise HTTPException(404, f"unknown submission {sub_id!r} in session {sid!r}")
        if "damaged" in sub:
            raise Damaged(JSONResponse({"error": "submission_damaged", "detail": sub["message"],
                                        "submission_id": sub_id, "quarantine": sub["damaged"],
                                        "next": f"POST /api/sessions/{sid}/submissions"}, 410))
        if sub["status"] not in ("done", "failed"):
            # the server working on it may have died: whoever the learner reaches takes it over
            await worker(request).try_resume(sub_id)
        await store(request).touch(sid)
        return sub

    return app

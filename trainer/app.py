"""The trainer server's HTTP API. State lives in Redis; this process holds only clients and limits."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import httpx
import redis.asyncio as aioredis
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ctops.config import Deployment
from ctops.keys import Keys
from trainer import review, sandbox
from trainer.exercises import EXERCISES
from trainer.store import Store, connect, new_id, now_ms

log = logging.getLogger("trainer")

CODE_MAX_BYTES = 64 * 1024
# JSON escaping can double a body's size relative to the code it carries
BODY_MAX_BYTES = 3 * CODE_MAX_BYTES
COOKIE = "ctops_session"
HEALTH_REDIS_TIMEOUT = 1.0


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    learner: StrictStr | None = Field(None, max_length=100)


class SubmissionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exercise_id: StrictStr = Field(min_length=1, max_length=64)
    code: StrictStr


def create_app(deployment: Deployment, server_name: str, redis_client: aioredis.Redis | None = None) -> FastAPI:
    deployment.server(server_name)  # fails early on an unknown name
    keys = Keys(prefix=deployment.redis.prefix)
    provider = next(iter(deployment.providers_by_priority()), None)
    # more parallel runs than cores would only make every learner wait longer for the CPU limit
    runs = asyncio.Semaphore(max(2, os.cpu_count() or 2))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_client or connect(deployment.redis.url)
        app.state.store = Store(client, keys, server_name)
        app.state.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64))
        try:
            yield
        finally:
            await app.state.http.aclose()
            if redis_client is None:
                await client.aclose()

    app = FastAPI(title="Coding Trainer", version="1", lifespan=lifespan)

    def store(request: Request) -> Store:
        return request.app.state.store

    @app.middleware("http")
    async def body_limit(request: Request, call_next):  # noqa: ANN001, ANN202
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > BODY_MAX_BYTES:
            return JSONResponse({"detail": f"request body too large (limit {BODY_MAX_BYTES} bytes)"}, 413)
        return await call_next(request)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_id("err")
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.url.path)
        return JSONResponse({"detail": "internal server error", "error_id": error_id, "server": server_name}, 500)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        try:
            n = await asyncio.wait_for(store(request).active_sessions(), HEALTH_REDIS_TIMEOUT)
        except (TimeoutError, aioredis.RedisError, OSError) as exc:
            # without Redis this server cannot serve any session, so it must not receive users
            return JSONResponse({"status": "redis-unavailable", "server": server_name, "active_sessions": None,
                                 "error": f"{type(exc).__name__}: {exc}"[:300]}, 503)
        return JSONResponse({"status": "ok", "server": server_name, "active_sessions": n})

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
    async def create_session(request: Request, response: Response,
                             body: Annotated[SessionCreate | None, Body()] = None) -> dict:
        session = await store(request).create_session(body.learner if body else None)
        response.set_cookie(COOKIE, session["session_id"], httponly=True, path="/", samesite="lax")
        return {**session, "server": server_name}

    async def session_or_404(request: Request, sid: str) -> dict:
        session = await store(request).get_session(sid)
        if session is None:
            raise HTTPException(404, f"unknown session {sid!r}")
        return session

    @app.get("/api/sessions/{sid}")
    async def get_session(request: Request, sid: str) -> dict:
        session = await session_or_404(request, sid)
        await store(request).touch(sid)
        subs = await store(request).session_submissions(sid)
        return {**session, "submissions": subs, "server": server_name}

    @app.post("/api/sessions/{sid}/submissions", status_code=201)
    async def submit(request: Request, sid: str, body: SubmissionCreate) -> dict:
        st = store(request)
        await session_or_404(request, sid)
        exercise = EXERCISES.get(body.exercise_id)
        if exercise is None:
            raise HTTPException(404, f"unknown exercise {body.exercise_id!r}; known: {sorted(EXERCISES)}")
        if len(body.code.encode()) > CODE_MAX_BYTES:
            raise HTTPException(413, f"code is larger than the limit of {CODE_MAX_BYTES // 1024} KB")
        sub = {
            "submission_id": new_id("sub"), "session_id": sid, "exercise_id": exercise.id,
            "status": "running", "verdict": None, "message": "", "tests": [],
            "review": {"status": "pending", "text": "", "provider": None},
            "server": server_name, "created_ms": now_ms(), "code": body.code,
        }
        await st.save_submission(sub, new=True)
        await st.touch(sid)
        try:
            async with runs:
                result = await sandbox.run(exercise, body.code, deployment.sandbox)
        except Exception:
            sub.update(status="error", verdict="error", message="the server could not run your code; try again")
            await st.save_submission(sub)
            raise
        sub.update(result.to_dict(), status="reviewing")
        await st.save_submission(sub)
        sub["review"] = await review.review(request.app.state.http, provider, exercise, body.code, sub)
        sub.update(status="done", finished_ms=now_ms())
        await st.save_submission(sub)
        await st.touch(sid)
        return sub

    @app.get("/api/sessions/{sid}/submissions/{sub_id}")
    async def get_submission(request: Request, sid: str, sub_id: str) -> dict:
        sub = await store(request).get_submission(sub_id)
        if sub is None or sub.get("session_id") != sid:
            raise HTTPException(404, f"unknown submission {sub_id!r} in session {sid!r}")
        return sub

    return app

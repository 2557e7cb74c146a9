"""`ctops fake-llm`: an OpenAI-compatible provider for the demo and tests whose failure mode can be
switched at run time (POST /_fake/mode), to show what the service does when the real one fails.

Switching is control: it needs `Authorization: Bearer <token>`, the token being in the environment
variable `--control-token-env` names (CONTROL_TOKEN_ENV by default). Whoever starts fakes makes one
with `control_token()`, which the fakes inherit, and sends `control_headers()`. Reading the mode
and the counters (GET /_fake/*) stays open: it changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypedDict, get_args

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ctops.serving import run_foreground

# garbage: 200 with a body that is no chat completion (bytes that are not UTF-8 JSON), streamed or not
Mode = Literal["ok", "500", "429", "hang", "slow", "garbage"]


class _State(TypedDict):
    mode: Mode
    delay_ms: int
MODEL = "fake-gpt-4"
CONTROL_TOKEN_ENV = "CTOPS_FAKE_LLM_CONTROL_TOKEN"
# methods that only read; anything else under /_fake/ is control
_READ = frozenset({"GET", "HEAD"})


def control_token() -> str:
    """The control token for the fakes this process starts: the one in CONTROL_TOKEN_ENV, made and put
    there (so children inherit it) the first time it is asked for."""
    token = os.environ.get(CONTROL_TOKEN_ENV)
    if not token:
        token = os.environ[CONTROL_TOKEN_ENV] = secrets.token_urlsafe(24)
    return token


def control_headers() -> dict[str, str]:
    """What a caller of POST /_fake/mode sends."""
    return {"Authorization": f"Bearer {control_token()}"}


class ModeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Mode
    delay_ms: int | None = Field(None, ge=0, le=600_000)


def _error(status: int, message: str, type_: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status,
                        headers=headers)


def _last_user_text(body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def canned_review(name: str, prompt: str) -> str:
    """A short review naming this fake and echoing the results the prompt states."""
    exercise = re.search(r"^Exercise:\s*(.+)$", prompt, re.M)
    verdict = re.search(r"^Verdict:\s*(\S+)\s*\(([^)]*)\)", prompt, re.M)
    what = exercise.group(1).strip() if exercise else "your exercise"
    if verdict is None:
        return f"[{name}] Review of {what}: I could not see the test results, but keep going!"
    outcome, counts = verdict.group(1), verdict.group(2)
    advice = ("Well done: the solution is correct. Consider adding a docstring and edge-case checks."
              if outcome == "passed" else
              "Look at the failing tests: compare what your function returns with what they expect, "
              "and check the edge cases first.")
    return f"[{name}] Review of {what}: verdict {outcome}, {counts}. {advice}"


def create_app(name: str = "fake", mode: str = "ok", delay_ms: int = 0, token: str | None = None) -> FastAPI:
    """`token`: what POST /_fake/* requires (see the module's note); None refuses every such request."""
    app = FastAPI(title=f"fake LLM {name}")
    state: _State = {"mode": ModeBody.model_validate({"mode": mode}).mode, "delay_ms": delay_ms}  # validates it
    stats: Counter[str] = Counter()
    expected = token.encode() if token else None

    @app.middleware("http")
    async def control_needs_the_token(request: Request,
                                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # before any body parsing, so an unauthenticated caller learns nothing from validation errors
        if request.url.path.startswith("/_fake/") and request.method not in _READ:
            scheme, _, sent = request.headers.get("authorization", "").partition(" ")
            if expected is None or scheme.lower() != "bearer" or not hmac.compare_digest(
                    sent.strip().encode(), expected):
                return JSONResponse({"error": "control token required",
                                     "detail": "send Authorization: Bearer <the token in the variable "
                                               "--control-token-env names>"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/_fake/mode")
    async def get_mode() -> dict:
        return {"name": name, **state}

    @app.post("/_fake/mode")
    async def set_mode(body: ModeBody) -> dict:
        state["mode"] = body.mode
        if body.delay_ms is not None:
            state["delay_ms"] = body.delay_ms
        return {"name": name, **state}

    @app.get("/_fake/stats")
    async def get_stats() -> dict:
        return {"name": name, "mode": state["mode"], "requests": dict(stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": name}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # JSON, SSE or an error: unannotated, else FastAPI takes it for a model
        stats["total"] += 1
        mode = state["mode"]
        stats[f"mode_{mode}"] += 1
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            stats["status_400"] += 1
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if mode == "500":
            stats["status_500"] += 1
            return _error(500, f"The server had an error while processing your request ({name}).",
                          "server_error")
        if mode == "429":
            stats["status_429"] += 1
            return _error(429, f"Rate limit reached for requests ({name}).", "requests", "rate_limit_exceeded",
                          headers={"Retry-After": "1"})
        if mode == "hang":
            # never answer; stop only when the client has given up, so hung requests do not pile up
            while not await request.is_disconnected():  # noqa: ASYNC110 - no disconnect event to await
                await asyncio.sleep(0.2)
            stats["abandoned"] += 1
            return _error(499, "client closed the request", "client_closed")
        if mode == "garbage":
            stats["status_200"] += 1
            ctype = "text/event-stream" if body.get("stream") is True else "application/json"
            return Response(b"\xff\xfe<html>not a completion", 200, media_type=ctype)
        if mode == "slow":
            await asyncio.sleep(state["delay_ms"] / 1000)
        text = canned_review(name, _last_user_text(body))
        model = asked if isinstance(asked := body.get("model"), str) else MODEL
        cid = f"chatcmpl-{secrets.token_hex(8)}"
        created = int(time.time())
        stats["status_200"] += 1
        if body.get("stream") is True:
            return StreamingResponse(_stream(cid, created, model, text), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        words = len(text.split())
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(_last_user_text(body).split()), "completion_tokens": words,
                      "total_tokens": len(_last_user_text(body).split()) + words},
        }

    return app


async def _stream(cid: str, created: int, model: str, text: str) -> AsyncIterator[bytes]:
    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(obj)}\n\n".encode()

    yield chunk({"role": "assistant", "content": ""}, None)
    words = text.split(" ")
    for i, word in enumerate(words):
        yield chunk({"content": word + (" " if i < len(words) - 1 else "")}, None)
        await asyncio.sleep(0)
    yield chunk({}, "stop")
    yield b"data: [DONE]\n\n"


def run(args: argparse.Namespace) -> int:
    if args.mode not in get_args(Mode):
        print(f"ctops fake-llm: --mode must be one of {', '.join(get_args(Mode))}, not {args.mode!r}", file=sys.stderr)
        return 2
    var = getattr(args, "control_token_env", None) or CONTROL_TOKEN_ENV
    token = os.environ.get(var) or None
    if token is None:
        print(f"ctops fake-llm: ${var} is not set: switching the mode (POST /_fake/mode) is refused", file=sys.stderr)
    return run_foreground(create_app(args.name, args.mode, args.delay_ms, token), args.host, args.port)

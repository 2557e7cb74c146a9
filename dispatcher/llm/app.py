"""The pool's OpenAI-compatible HTTP face (`/llm/v1/chat/completions`, `/llm/v1/models`), served
by uvicorn on a loopback port; the data-plane proxy forwards the public `/llm/` prefix to it.

Bad requests are answered here, in OpenAI's error shape, without calling any provider.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from ctops import serving
from ctops.asgi_limits import BodyLimit
from ctops.config import Deployment
from ctops.keys import Keys
from ctops.serving import Served
from dispatcher.llm.pool import Answer, Emit, LLMPool, PoolError, client_message, new_ref

log = logging.getLogger("ctops.dispatcher.llm")

PROVIDER_HEADER = "x-ctops-llm-provider"


def openai_error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


def _openai_shape(status: int, message: str) -> dict:
    code = "request_too_large" if status == 413 else "invalid_request"
    return {"error": {"message": f"{message[:1].upper()}{message[1:]}.", "type": "invalid_request_error", "param": None,
                      "code": code}}


def _validate(raw: bytes, models: list[str]) -> dict | JSONResponse:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return openai_error(400, "We could not parse the JSON body of your request: it is not valid JSON.")
    if not isinstance(body, dict):
        return openai_error(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "You must provide a model parameter (a string).", param="model",
                            code="missing_model" if model is None else "invalid_type")
    if model not in models:
        return openai_error(404, f"The model `{model}` does not exist here; available: {', '.join(models)}.",
                            param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return openai_error(400, "'messages' must be a non-empty array of message objects.", param="messages",
                            code="missing_messages" if messages is None else "invalid_type")
    if "stream" in body and not isinstance(body["stream"], bool):
        return openai_error(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    return body


async def _relay(pool: LLMPool, answer: Answer) -> AsyncIterator[bytes]:
    """The rest of a committed stream, chunk by chunk. A provider that breaks off now cannot be
    replaced (the client has its bytes), so the client gets an SSE error event instead of silence."""
    p = pool.by_name[answer.provider]
    try:
        yield answer.first
        assert answer.chunks is not None
        while True:
            try:
                chunk = await asyncio.wait_for(anext(answer.chunks), p.timeout)
            except StopAsyncIteration:
                return
            yield chunk
    except (TimeoutError, OSError, Exception) as exc:  # noqa: B014 - name the usual ones for the reader
        reason = "stalled mid-stream" if isinstance(exc, TimeoutError) else f"broke off: {type(exc).__name__}"
        p.failed(f"stream {reason}")
        ref = new_ref()
        log.warning("LLM request %s: provider %s %s", ref, p.name, reason)
        err = {"error": {"message": client_message("stream_interrupted", ref), "type": "server_error",
                         "param": None, "code": "stream_interrupted"}}
        yield f"data: {json.dumps(err)}\n\n".encode()
    finally:
        await answer.aclose()


def create_llm_app(pool: LLMPool, client_key: str | None = None) -> ASGIApp:

    def unauthorized(request: Request) -> JSONResponse | None:
        if not client_key:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), client_key.encode()):
            return None
        return openai_error(401, "Incorrect or missing API key.", code="invalid_api_key")

    async def chat(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        try:
            raw = await request.body()  # within the limit: BodyLimit has read and counted it
        except ClientDisconnect:
            return Response(status_code=400)
        body = _validate(raw, pool.models)
        if isinstance(body, JSONResponse):
            return body
        stream = body.get("stream") is True
        result = await pool.complete(body, stream)
        if isinstance(result, PoolError):
            return JSONResponse(result.body(), result.status, headers=result.headers)
        headers = {PROVIDER_HEADER: result.provider, "x-ctops-llm-tries": str(result.tries)}
        if result.chunks is None:
            return Response(result.body, result.status, headers=headers, media_type=result.content_type)
        headers["cache-control"] = "no-cache"
        return StreamingResponse(_relay(pool, result), result.status, headers=headers,
                                 media_type=result.content_type)

    async def models(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "ctops"} for m in pool.models]})

    async def not_found(request: Request, _exc: Exception) -> Response:
        return openai_error(404, f"Unknown path {request.method} {request.url.path} (try POST "
                                 "/llm/v1/chat/completions or GET /llm/v1/models).", code="unknown_url")

    async def wrong_method(request: Request, _exc: Exception) -> Response:
        return openai_error(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed")

    app = Starlette(routes=[
        Route("/llm/v1/chat/completions", chat, methods=["POST"]),
        Route("/llm/v1/models", models, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: wrong_method})
    return BodyLimit(app, pool.settings.body_max_bytes, error=_openai_shape)


@dataclass
class LLMPoolHandle:
    host: str
    port: int
    pool: LLMPool
    served: Served

    @property
    def url(self) -> str:
        """Internal base address; the OpenAI base URL is `{url}/llm/v1`."""
        return f"http://{self.host}:{self.port}"

    async def stop(self, grace: float = 3.0) -> None:
        await self.served.stop(grace)
        await self.pool.aclose()


async def start_llm_pool(dep: Deployment, redis: Redis | None, keys: Keys | None, emit: Emit,
                         is_leader: Callable[[], bool], name: str | None = None,
                         host: str = "127.0.0.1", port: int = 0) -> LLMPoolHandle:
    """Start the pool's loops and its HTTP server inside the running event loop.

    `emit(kind, severity, message, target)` records an event (leader-only is the caller's rule,
    checked again here so a standby's own breakers stay quiet); `is_leader()` tells which.
    """
    def leader_emit(kind: str, severity: str, message: str, target: str | None) -> None:
        if is_leader():
            emit(kind, severity, message, target)

    pool = LLMPool(dep.llm_providers, dep.llm, redis, keys, leader_emit, name)
    if redis is not None and keys is not None:
        try:
            await pool.sync_controls()  # a restarted dispatcher starts with the staff's current choices
        except Exception as exc:  # noqa: BLE001 - Redis down at start must not stop the dispatcher
            log.warning("cannot read LLM controls at start: %s", exc)
    pool.start()
    client_key = dep.llm.client_key
    # bind first, so the port is ours before uvicorn starts (no free-port race)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    # no graceful-stop limit here: `stop` gives in-flight answers its own grace, then forces the exit
    try:
        served = await serving.start(serving.config(create_llm_app(pool, client_key), host, port, graceful_s=None),
                                     sock, name="llm-http")
    except BaseException:
        await pool.aclose()
        raise
    log.info("LLM pool on http://%s:%d/llm/v1 (%d providers)", served.host, served.port, len(pool.providers))
    return LLMPoolHandle(served.host, served.port, pool, served)

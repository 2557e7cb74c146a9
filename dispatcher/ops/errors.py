"""The ops API's one error shape, {"error": ..., "detail": ...}, so the console and scripts can show
errors without guessing; and the error answers every route may give."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctops.rejects import REJECTS, UNPARSABLE, source_of
from ctops.wire import ErrorBody

log = logging.getLogger("ctops.dispatcher.ops")

# what any route may answer besides its own result; each route adds the ones only it can give
_ERR = {"model": ErrorBody}
COMMON_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {**_ERR, "description": "body is not JSON, or too deeply nested"},
    401: {**_ERR, "description": "missing or unknown token"},
    403: {**_ERR, "description": "the token's role or scope does not allow this"},
    413: {**_ERR, "description": "request body over the limit"},
    422: {**_ERR, "description": "invalid request; detail names the fields"},
    429: {**_ERR, "description": "too many requests (see Retry-After)"},
    503: {**_ERR, "description": "shared state (Redis) unavailable; retry after Retry-After"},
}
Responses = dict[int | str, dict[str, object]]
R404: Responses = {404: {**_ERR, "description": "no such item"}}
R409: Responses = {409: {**_ERR, "description": "the action does not apply in the current state"}}
R504: Responses = {504: {**_ERR, "description": "the action did not complete in time"}}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: object | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can give, in the one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(ErrorBody(error=exc.error, detail=exc.detail).model_dump(), exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            REJECTS.note(source_of(request.url.path), f"{request.url.path}: body is not valid JSON")
            return JSONResponse(ErrorBody(error="request body is not valid JSON").model_dump(), 400)
        detail = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in errors]
        fields = ", ".join(d["field"] for d in detail)
        REJECTS.note(source_of(request.url.path), f"{request.url.path}: invalid {fields}")
        return JSONResponse(ErrorBody(error=f"invalid request: {fields}", detail=detail).model_dump(), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == UNPARSABLE:
            # FastAPI's words for a body it could not decode (e.g. not UTF-8): said plainly, and counted
            REJECTS.note(source_of(request.url.path), f"{request.url.path}: body is not JSON in UTF-8")
            return JSONResponse(ErrorBody(error="request body is not valid JSON in UTF-8").model_dump(), 400)
        # keeps the router's headers, e.g. Allow on a 405
        return JSONResponse(ErrorBody(error=str(exc.detail)).model_dump(), exc.status_code, headers=exc.headers)

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # only a body nested deeper than the interpreter's stack gets here
        return JSONResponse(ErrorBody(error="request body is nested too deeply").model_dump(), 400)

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis error while serving the ops API: %s", exc)
        return JSONResponse(ErrorBody(error="shared state (Redis) unavailable").model_dump(), 503,
                            headers={"Retry-After": "1"})

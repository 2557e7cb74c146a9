"""Test and demo hooks, mounted only when CTOPS_TRAINER_DEBUG=1: make the server fail on purpose."""

from __future__ import annotations

from fastapi import FastAPI


class DebugFailure(RuntimeError):
    """Raised on request, so an exception with a known stack reaches the exception pipeline."""


def explode(label: str) -> None:
    raise DebugFailure(f"debug failure requested: {label}")


def add_debug_routes(app: FastAPI) -> None:
    @app.post("/_debug/raise")
    async def debug_raise(label: str = "manual") -> dict:
        explode(label[:100])
        return {}  # not reached

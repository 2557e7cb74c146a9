"""Delivered data that was refused or skipped where it arrived, counted by source.

Heartbeats, agent command results, request bodies, LLM provider answers and idempotency replays are
checked where they arrive (schema, size, encoding); a bad one is refused with a clear error or
skipped, never stored. Each is noted here: a log line (at most one per source per second, saying
how many since, so a flood cannot flood the log) and a counter, kept in this process and added to
`{prefix}:rejected` in Redis (one field per source) so that `GET /api/v1/state` and
`ctops status --json` show the whole cluster's under `rejected`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from typing import Any

from ctops.keys import Keys

log = logging.getLogger("ctops.rejects")

HEARTBEAT, COMMAND_RESULT, EXCEPTIONS, REQUEST_BODY = "heartbeat", "command_result", "exceptions", "request_body"
LLM_ANSWER, IDEMPOTENCY_REPLAY, SPOOL_LINE = "llm_answer", "idempotency_replay", "spool_line"

# what FastAPI says (400) of a body it cannot decode at all, e.g. bytes that are not UTF-8
UNPARSABLE = "There was an error parsing the body"

_BY_PATH = ((re.compile(r"^/api/v1/heartbeat/?$"), HEARTBEAT),
            (re.compile(r"^/api/v1/agents/[^/]+/commands/[^/]+/result/?$"), COMMAND_RESULT),
            (re.compile(r"^/api/v1/exceptions/?$|^/api/[^/]+/envelope/?$"), EXCEPTIONS))


def source_of(path: str) -> str:
    """The source a refused request body counts under, by the route it was sent to."""
    return next((name for pattern, name in _BY_PATH if pattern.match(path)), REQUEST_BODY)


class Rejects:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._redis: Any = None
        self._key = ""
        self._logged: dict[str, tuple[float, int]] = {}  # source -> (when last logged, count then)
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, redis: Any, keys: Keys) -> None:
        """Add every later count to the cluster's totals in Redis too."""
        self._redis, self._key = redis, keys.rejected

    def note(self, source: str, why: str) -> None:
        self.counts[source] += 1
        now = time.monotonic()
        last, seen = self._logged.get(source, (float("-inf"), 0))
        if now - last >= 1.0:
            more = self.counts[source] - seen - 1
            log.warning("refused %s: %s%s", source.replace("_", " "), why[:300],
                        f" (and {more} more since the last line)" if more > 0 else "")
            self._logged[source] = (now, self.counts[source])
        if self._redis is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._add(source))
        except RuntimeError:
            return  # no event loop (a synchronous caller): counted in this process only
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add(self, source: str) -> None:
        try:
            await self._redis.hincrby(self._key, source, 1)
        except Exception as exc:  # noqa: BLE001 - a count lost to a store outage must not fail anything
            log.debug("cannot count a refused %s in Redis: %s", source, exc)


REJECTS = Rejects()

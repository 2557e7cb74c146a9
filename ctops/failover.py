"""Trying several dispatcher URLs in turn: the one retry policy every ctops client follows.

The ops client (console, CLI), the agents' heartbeats, the exception forwarder and the load client
each talk to a list of addresses of which any may be down. They differ in transport (httpx, the
agent's small client, sync or async), so each hands in a `send(url)` that raises `TryNext` for a
failure worth trying elsewhere, and this module decides the rest:

- start from the URL that answered last, then the others in order; stick with whichever answers;
- jump to the leader when an answer names it (`follow`);
- after a failure that may have reached a server (a read timeout, a reset), try again elsewhere
  only if the request is safe to repeat: otherwise an action could happen twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
MAYBE_DONE = "; the action may or may not have happened"


class TryNext(Exception):
    """`send(url)` got no usable answer from `url`. `reached`: the request may have been received."""

    def __init__(self, reason: str, *, reached: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.reached = reason, reached


class Unreachable(Exception):
    """No URL answered. `tried` keeps each URL's reason, for a banner or a log line; `last` the last failure."""

    def __init__(self, tried: list[tuple[str, str]], last: TryNext | None = None) -> None:
        super().__init__("; ".join(f"{url}: {why}" for url, why in tried) or "no URL configured")
        self.tried, self.last = tried, last


class Failover:
    """Which URL to try, in what order, and when to stop. One per client; not thread-safe."""

    def __init__(self, urls: Sequence[str], *, start: int = 0) -> None:
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.current = start % len(self.urls) if self.urls else 0

    @property
    def current_url(self) -> str | None:
        return self.urls[self.current] if self.urls else None

    def answered(self, url: str) -> bool:
        """Stick with `url`, which answered; True when that is a move."""
        i = self.urls.index(url)
        moved, self.current = i != self.current, i
        return moved

    def follow(self, leader_url: str | None) -> bool:
        """Go to the leader next time, if it is one of ours; True when that is a move."""
        if leader_url is None or leader_url.rstrip("/") not in self.urls:
            return False
        return self.answered(leader_url.rstrip("/"))

    def _order(self, attempts: int | None) -> Iterator[str]:
        n = len(self.urls)
        if not n:
            return
        for step in range(n if attempts is None else attempts):
            yield self.urls[(self.current + step) % n]

    def _failed(self, url: str, exc: TryNext, safe: bool, tried: list[tuple[str, str]]) -> None:
        if exc.reached and not safe:
            raise Unreachable([*tried, (url, exc.reason + MAYBE_DONE)], exc) from exc
        tried.append((url, exc.reason))

    async def call(self, send: Callable[[str], Awaitable[T]], *, safe: bool, attempts: int | None = None) -> T:
        """`send` on each URL in turn until one answers. `safe`: the request may be repeated
        (a GET, or a POST the server deduplicates). `attempts` past len(urls) wraps around."""
        tried: list[tuple[str, str]] = []
        last: TryNext | None = None
        for url in self._order(attempts):
            try:
                out = await send(url)
            except TryNext as exc:
                self._failed(url, exc, safe, tried)
                last = exc
                continue
            self.answered(url)
            return out
        raise Unreachable(tried, last)

    async def race(self, send: Callable[[str], Awaitable[T]]) -> T:
        """`send` on every URL at once, for a request safe to repeat: the first answer wins (the
        others are cancelled) and is stuck with. For a one-shot command that knows no URL yet, so
        that every dispatcher down (or frozen) costs one timeout, not one per URL."""
        tasks = {asyncio.ensure_future(send(url)): url for url in self._order(None)}
        pending = set(tasks)
        failed: dict[str, str] = {}
        last: TryNext | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        self.answered(tasks[task])
                        return task.result()
                    if not isinstance(exc, TryNext):
                        raise exc
                    failed[tasks[task]], last = exc.reason, exc
        finally:
            for task in pending:
                task.cancel()
        raise Unreachable([(url, failed[url]) for url in self._order(None) if url in failed], last)

    def call_sync(self, send: Callable[[str], T], *, safe: bool, attempts: int | None = None) -> T:
        """`call` for a client in a thread of its own (the exception forwarder)."""
        tried: list[tuple[str, str]] = []
        last: TryNext | None = None
        for url in self._order(attempts):
            try:
                out = send(url)
            except TryNext as exc:
                self._failed(url, exc, safe, tried)
                last = exc
                continue
            self.answered(url)
            return out
        raise Unreachable(tried, last)

"""A small HTTP/1.1 client for the agent: one keep-alive connection, one request at a time.

The agent's footprint target (≤ 40 MB RSS) leaves no room for a general client library; the
agent only ever sends small JSON requests to the ops API, which answers with a Content-Length
(or chunked) body, so this is all it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

MAX_BODY = 8 * 1024 * 1024


class HttpError(Exception):
    """The request did not get an answer (connection refused, reset, timed out, malformed reply)."""


class HttpClient:
    def __init__(self, token: str | None, timeout: float) -> None:
        self.headers = f"Authorization: Bearer {token}\r\n" if token else ""
        self.timeout = timeout
        self._conn: tuple[str, asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, url: str, body: bytes | None = None,
                      timeout: float | None = None) -> tuple[int, bytes]:
        u = urlsplit(url)
        origin = f"{u.hostname}:{u.port or 80}"
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = (f"{method} {target} HTTP/1.1\r\nHost: {origin}\r\n{self.headers}"
                f"Content-Type: application/json\r\nContent-Length: {len(body or b'')}\r\n\r\n").encode()
        try:
            async with asyncio.timeout(timeout or self.timeout):
                for attempt in (0, 1):
                    conn = self._conn if self._conn is not None and self._conn[0] == origin else None
                    reused = conn is not None
                    if conn is None:
                        await self.aclose()
                        reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
                        conn = self._conn = (origin, reader, writer)
                    _, reader, writer = conn
                    try:
                        writer.write(head + (body or b""))
                        return await self._response(reader)
                    except (ConnectionError, asyncio.IncompleteReadError):
                        await self.aclose()
                        if not reused or attempt:
                            raise
                        # a kept-alive connection the server had closed: once more on a fresh one
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            await self.aclose()
            raise HttpError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        raise HttpError(f"{method} {url}: no answer")

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(chunks)
        else:
            length = int(headers.get("content-length", "0"))
            if length > MAX_BODY:
                raise ValueError("response too large")
            body = await reader.readexactly(length)
        if headers.get("connection", "").lower() == "close":
            await self.aclose()
        return status, body

    async def aclose(self) -> None:
        if self._conn is not None:
            writer = self._conn[2]
            self._conn = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

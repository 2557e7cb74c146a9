"""The backend behind both proxies in `ctops bench proxy --mix learners`: answers shaped like the
trainer's (uvicorn's headers, a Date that changes every second, JSON bodies), cheap enough that the
proxies, not it, set the pace. Session opened: 201 with a cookie; submission: 202 with a Location;
polls: 200 with a submission's steps and review (~0.9 KB); the exercise list: a chunked answer in
two chunks (~2 KB), as a streamed answer comes.

    python -m ctops_tools.bench.proxy_learners --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from email.utils import formatdate

import httptools
import uvloop

_SESSION = json.dumps({"session_id": "s1", "learner": "bench", "created_ms": 1_700_000_000_000,
                       "submissions": [], "server": "trainer-1"}).encode()
_SUBMITTED = json.dumps({"submission_id": "sub1", "session_id": "s1", "exercise_id": "fizzbuzz",
                         "status": "received", "steps": [{"step": "received", "at_ms": 1_700_000_000_000}]}).encode()
_POLL = json.dumps({"submission_id": "sub1", "session_id": "s1", "exercise_id": "fizzbuzz", "status": "done",
                    "verdict": "passed", "tests": [{"name": f"case {i}", "ok": True} for i in range(8)],
                    "steps": [{"step": s, "at_ms": 1_700_000_000_000 + i * 40} for i, s in
                              enumerate(["received", "tested", "review_requested", "review_received", "done"])],
                    "review": "Clear and correct. " * 18}).encode()
_EXERCISES = json.dumps([{"id": f"exercise-{i}", "title": f"Exercise {i}", "difficulty": i % 3,
                          "summary": "Write a function that returns the right values."} for i in range(16)]).encode()


def _answers(date: bytes) -> dict[bytes, bytes]:
    """The answers by the start of the request line, with today's Date."""
    def head(status: bytes, extra: bytes = b"") -> bytes:
        return b"HTTP/1.1 %b\r\ndate: %b\r\nserver: uvicorn\r\n%b" % (status, date, extra)

    def json_answer(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
        fields = b"content-length: %d\r\ncontent-type: application/json\r\n%b\r\n" % (len(body), extra)
        return head(status, fields) + body

    half = len(_EXERCISES) // 2
    chunked = (head(b"200 OK", b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
               + b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (half, _EXERCISES[:half], len(_EXERCISES) - half,
                                                          _EXERCISES[half:]))
    return {
        b"POST /api/sessions ": json_answer(b"201 Created", _SESSION,
                                            b"set-cookie: ctops_session=s1; HttpOnly; Path=/; SameSite=lax\r\n"),
        b"POST /api/sessions/": json_answer(b"202 Accepted", _SUBMITTED,
                                            b"location: /api/sessions/s1/submissions/sub1\r\n"),
        b"GET /api/sessions/": json_answer(b"200 OK", _POLL),
        b"GET /api/exercises": chunked,
    }


class Learners(asyncio.Protocol):
    __slots__ = ("transport", "parser", "line")
    second = 0
    answers: dict[bytes, bytes] = {}
    other = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.line = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_url(self, url: bytes) -> None:
        self.line = self.parser.get_method() + b" " + url

    def on_message_complete(self) -> None:
        now = int(time.time())
        if now != Learners.second:  # a new Date once a second, as uvicorn's
            Learners.second = now
            Learners.answers = _answers(formatdate(now, usegmt=True).encode())
        line = self.line
        answer = self.other
        for start, a in Learners.answers.items():
            if (line + b" ").startswith(start):
                answer = a
                break
        self.transport.write(answer)  # type: ignore[union-attr]
        if not self.parser.should_keep_alive():
            self.transport.close()  # type: ignore[union-attr]


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Learners, host, port, backlog=2048, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ctops_tools.bench.proxy_learners")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""Small real trainer-server stand-ins for the proxy tests, run as a separate process.

    python tests/backends.py --names a,b,c

listens on one HTTP port per name plus one websocket echo port, prints
{"http": {name: port}, "ws": port} as one JSON line, and serves until stdin closes.

HTTP routes (responses carry X-Backend, X-Conn-Id and X-Conn-Requests so tests see which server
and which upstream connection answered):
  /hello                      small text body
  /headers                    the request head as JSON
  /echo?mode=cl|chunked|close the request body back (framed by Content-Length, chunks, or close)
  /big?n=N&mode=cl|chunked    N deterministic bytes (see `pattern`)
  /slow?ms=M                  answers after M ms
  /close-mid                  promises 1 MB, sends 1000 bytes, closes
  /close-before               closes without answering
  /once                       answers, then closes the connection when the next request arrives
  /hop                        a response carrying hop-by-hop headers
  /raw?kind=K                 an answer written byte for byte (see RAW): split, overlong, duplicate length
  /flaky?key=K[&head=1]       closes without answering (or after a head) the first time it sees K
  /drip                       a chunked response: one chunk, then the rest once /release is asked
  /release                    lets every waiting /drip finish
  /stats                      counters, e.g. requests whose body was cut short
  /seen?tag=T                 the request lines received through a proxy (with X-Forwarded-For), on
                              any server, whose target contains T, with their Transfer-Encoding
                              headers, so tests see what the proxy let through
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import sys
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
# /raw?kind=K: the answer's bytes, each part written after a pause
RAW = {
    "split": [b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhel", b"lo, ", b"world"],
    "overlong": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"],
    "overlong-split": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"loEXTRA"],
    "dup-length": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"],
    "head-then-body": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello"],
    "hop-last": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kept: yes\r\nkeep-alive: timeout=5\r\n\r\nhello"],
}
_conn_ids = itertools.count(1)
STATS = {"requests": 0, "truncated_bodies": 0, "connections": 0}
FLAKY_SEEN: set[str] = set()
SEEN: list[dict] = []  # every request head received: {"line", "transfer_encoding"}
RELEASE: list[asyncio.Event] = []


def pattern(n: int) -> bytes:
    """Deterministic, non-repeating-looking bytes, so a reordered or lost chunk changes the hash."""
    block = hashlib.sha256(b"ctops").digest() * 2048  # 64 KiB
    out = bytearray()
    i = 0
    while len(out) < n:
        out += bytes([i & 0xFF]) + block[1:]
        i += 1
    return bytes(out[:n])


class Truncated(Exception):
    pass


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise Truncated
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    n = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(n) if n else b""


async def write_response(writer: asyncio.StreamWriter, status: int, body: bytes, headers: list[tuple[str, str]],
                         mode: str = "cl") -> bool:
    """Write a response; returns False when the connection must close after it."""
    reason = {200: "OK", 101: "Switching Protocols"}.get(status, "X")
    head = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    if mode == "cl":
        head.append(f"Content-Length: {len(body)}")
    elif mode == "chunked":
        head.append("Transfer-Encoding: chunked")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if mode == "chunked":
        for i in range(0, len(body), CHUNK):
            part = body[i:i + CHUNK]
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
    else:
        for i in range(0, len(body), CHUNK):
            writer.write(body[i:i + CHUNK])
            await writer.drain()
    await writer.drain()
    return mode != "close"


async def serve_http(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn_id = next(_conn_ids)
    STATS["connections"] += 1
    served = 0
    close_on_next = False
    try:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if close_on_next:
                return
            lines = raw.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            pairs = [tuple(x.split(":", 1)) for x in lines[1:] if x]
            headers = {k.strip().lower(): v.strip() for k, v in pairs}
            if "x-forwarded-for" in headers:
                SEEN.append({"line": lines[0], "transfer_encoding": [v.strip() for k, v in pairs
                                                                     if k.strip().lower() == "transfer-encoding"]})
            url = urlsplit(target)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                body = await read_body(reader, headers)
            except (asyncio.IncompleteReadError, Truncated, ConnectionError):
                STATS["truncated_bodies"] += 1
                return
            served += 1
            STATS["requests"] += 1
            std = [("X-Backend", name), ("X-Conn-Id", str(conn_id)), ("X-Conn-Requests", str(served))]
            path = url.path.removeprefix("/llm")  # the proxy's fixed route keeps the path as is
            if path == "/close-before":
                return
            if path == "/flaky" and q.get("key") not in FLAKY_SEEN:
                FLAKY_SEEN.add(q.get("key", ""))
                if q.get("head"):  # a response head, then death before the body
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                    await writer.drain()
                return
            if path == "/drip":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                             b"X-Backend: " + name.encode() + b"\r\n\r\n5\r\none\n\n\r\n")
                await writer.drain()
                event = asyncio.Event()
                RELEASE.append(event)
                await event.wait()
                writer.write(b"5\r\ntwo\n\n\r\n0\r\n\r\n")
                await writer.drain()
                continue
            if path == "/release":
                for event in RELEASE:
                    event.set()
                RELEASE.clear()
            if path == "/close-mid":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
                await writer.drain()
                return
            if path == "/raw":  # answers written byte for byte, some of them odd
                conn_hdr = b"X-Conn-Id: %d\r\n" % conn_id
                parts = RAW[q.get("kind", "")]
                writer.write(parts[0].replace(b"\r\n", b"\r\n" + conn_hdr, 1))
                for part in parts[1:]:
                    await writer.drain()
                    await asyncio.sleep(0.05)  # separate reads for the proxy
                    writer.write(part)
                await writer.drain()
                continue
            if path == "/slow":
                await asyncio.sleep(int(q.get("ms", "1000")) / 1000)
            keep = True
            if path == "/headers":
                doc = {"method": method, "target": target, "version": version,
                       "headers": [[k.strip(), v.strip()] for k, v in pairs]}
                keep = await write_response(writer, 200, json.dumps(doc).encode(),
                                            std + [("Content-Type", "application/json")])
            elif path == "/echo":
                extra = [("X-Body-Sha256", hashlib.sha256(body).hexdigest()), ("X-Body-Len", str(len(body)))]
                keep = await write_response(writer, 200, body, std + extra, q.get("mode", "cl"))
            elif path == "/big":
                keep = await write_response(writer, 200, pattern(int(q["n"])), std, q.get("mode", "cl"))
            elif path == "/hop":
                hop = [("Connection", "keep-alive, X-Hop-Private"), ("Keep-Alive", "timeout=5"),
                       ("X-Hop-Private", "secret"), ("Proxy-Authenticate", "Basic"), ("X-End-To-End", "kept")]
                keep = await write_response(writer, 200, b"hop", std + hop)
            elif path == "/seen":
                tag = q.get("tag", "")
                doc = [s for s in SEEN if tag in s["line"] and "/seen?" not in s["line"]]
                keep = await write_response(writer, 200, json.dumps(doc).encode(), std)
            elif path == "/stats":
                keep = await write_response(writer, 200, json.dumps(STATS).encode(), std)
            elif method == "HEAD":  # the length of the GET body, and no body
                size = len(f"hello from {name}")
                await write_response(writer, 200, b"", std + [("Content-Length", str(size))], "none")
            else:
                await write_response(writer, 200, f"hello from {name}".encode(), std)
            if path == "/once":
                close_on_next = True
            if not keep or headers.get("connection", "").lower() == "close":
                return
    finally:
        writer.close()


async def ws_echo(ws) -> None:  # type: ignore[no-untyped-def]
    async for message in ws:
        await ws.send(message)


async def main() -> None:
    from websockets.asyncio.server import serve

    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="a,b")
    args = ap.parse_args()
    ports = {}
    servers = []
    for name in args.names.split(","):
        srv = await asyncio.start_server(lambda r, w, n=name: serve_http(n, r, w), "127.0.0.1", 0)
        servers.append(srv)
        ports[name] = srv.sockets[0].getsockname()[1]
    ws = await serve(ws_echo, "127.0.0.1", 0, max_size=None)
    print(json.dumps({"http": ports, "ws": ws.sockets[0].getsockname()[1]}), flush=True)
    # stop when the test process goes away (stdin closes)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main())

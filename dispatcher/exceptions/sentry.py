"""Sentry's envelope format, so a service that already uses `sentry-sdk` reports to ctops by pointing
its DSN at the dispatcher's ops port: `http://<agent token>@<dispatcher ops host:port>/<project>`."""

from __future__ import annotations

import json
import re
import zlib
from datetime import datetime
from typing import Any

from ctops.capture.wire import MAX_CONTEXT_KEYS, MAX_CONTEXT_VALUE, MAX_FRAMES, MAX_MESSAGE

MAX_INFLATED = 2 * 1024 * 1024
# deeper than any event an SDK sends; a bomb of brackets is refused before it reaches the stack limit
MAX_DEPTH = 64
_KEY = re.compile(r"sentry_key\s*=\s*([^,\s]+)")


class EnvelopeError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sentry_key(headers: dict[str, str], query: dict[str, str]) -> str | None:
    for name in ("x-sentry-auth", "authorization"):
        m = _KEY.search(headers.get(name, ""))
        if m:
            return m.group(1)
    return query.get("sentry_key")


def inflate(body: bytes, encoding: str) -> bytes:
    """The body without its Content-Encoding, refusing more than MAX_INFLATED bytes (a zip bomb)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "br":
        try:
            import brotli  # type: ignore[import-not-found]  # noqa: PLC0415 - optional
        except ImportError:
            raise EnvelopeError(415, "brotli bodies need the brotli module; use gzip") from None
        out = brotli.decompress(body)
        if len(out) > MAX_INFLATED:
            raise EnvelopeError(413, f"inflated body over {MAX_INFLATED} bytes")
        return out
    if encoding not in ("gzip", "deflate", "x-gzip"):
        raise EnvelopeError(415, f"unsupported Content-Encoding {encoding!r}")
    d = zlib.decompressobj(47)  # gzip or zlib header, detected
    try:
        out = d.decompress(body, MAX_INFLATED)
    except zlib.error as exc:
        raise EnvelopeError(400, f"body does not inflate: {exc}") from None
    if d.unconsumed_tail:
        raise EnvelopeError(413, f"inflated body over {MAX_INFLATED} bytes")
    return out


def load_json(raw: bytes | str) -> Any:
    """json.loads that refuses nesting deeper than MAX_DEPTH with a 400 (never a RecursionError)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise EnvelopeError(400, f"JSON nested deeper than {MAX_DEPTH} levels") from None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > MAX_DEPTH:
                    raise EnvelopeError(400, f"JSON nested deeper than {MAX_DEPTH} levels")
                stack.append((child, depth + 1))
    return value


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]:
    """(envelope header, [(item header, payload)])."""
    try:
        first, _, rest = body.partition(b"\n")
        header = load_json(first or b"{}")
        items = []
        while rest.strip():
            line, _, rest = rest.partition(b"\n")
            if not line.strip():
                continue
            ih = load_json(line)
            if not isinstance(ih, dict):
                raise ValueError("item header is not an object")
            if "length" in ih:
                n = int(ih["length"])
                payload, rest = rest[:n], rest[n:]
                if len(payload) != n:
                    raise ValueError("item shorter than its length")
                rest = rest[1:] if rest.startswith(b"\n") else rest
            else:
                payload, _, rest = rest.partition(b"\n")
            items.append((ih, payload))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(400, f"not a Sentry envelope: {exc}") from None
    if not isinstance(header, dict):
        raise EnvelopeError(400, "not a Sentry envelope: header is not an object")
    return header, items


def _ts_ms(value: object) -> int:
    if isinstance(value, int | float):
        return int(value * 1000)
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            pass
    return int(datetime.now().timestamp() * 1000)


def _str(v: object, n: int) -> str:
    return (v if isinstance(v, str) else json.dumps(v, default=str))[:n]


def to_event(ev: dict[str, Any], project: str) -> dict[str, Any]:
    """A Sentry event as a ctops event (a dict for ExceptionEvent); raises EnvelopeError if it is not an object."""
    if not isinstance(ev, dict):
        raise EnvelopeError(400, "event item is not a JSON object")
    tags = ev.get("tags") or {}
    if isinstance(tags, list):  # the SDK may send [[key, value], ...]
        tags = {str(t[0]): t[1] for t in tags if isinstance(t, list | tuple) and len(t) == 2}
    tags = tags if isinstance(tags, dict) else {}
    values = ((ev.get("exception") or {}).get("values") or []) if isinstance(ev.get("exception"), dict) else []
    values = [v for v in values if isinstance(v, dict)]
    frames: list[dict[str, Any]] = []
    if values:
        exc = values[-1]  # the chain is oldest first; the last one is what was raised
        mod = exc.get("module")
        etype = str(exc.get("type") or "Error")
        etype = f"{mod}.{etype}" if mod and mod not in ("builtins", "__main__") else etype
        message = str(exc.get("value") or "")
        for f in ((exc.get("stacktrace") or {}).get("frames") or [])[-MAX_FRAMES:]:
            if not isinstance(f, dict):
                continue
            lineno = f.get("lineno")
            frames.append({
                "filename": _str(f.get("abs_path") or f.get("filename") or "?", 1000),
                "module": _str(f["module"], 300) if f.get("module") else None,
                "function": _str(f.get("function") or "?", 300),
                "lineno": lineno if isinstance(lineno, int) and lineno >= 0 else None,
                "in_app": bool(f.get("in_app")),
                "context_line": _str(f["context_line"], 1000) if f.get("context_line") else None,
            })
    else:
        entry = ev.get("logentry") or ev.get("message") or {}
        message = str(entry.get("formatted") or entry.get("message") or "") if isinstance(entry, dict) else str(entry)
        etype = "sentry.Message"
    level = {"fatal": "critical", "critical": "critical", "warning": "warning"}.get(str(ev.get("level")), "error")
    ctx: dict[str, Any] = {}
    for k, v in [*tags.items(), *((ev.get("extra") or {}).items() if isinstance(ev.get("extra"), dict) else [])]:
        if len(ctx) >= MAX_CONTEXT_KEYS - 3:
            break
        ctx[str(k)[:100]] = v if v is None or isinstance(v, bool | int | float) else _str(v, MAX_CONTEXT_VALUE)
    for k in ("release", "environment"):
        if ev.get(k):
            ctx[k] = _str(ev[k], MAX_CONTEXT_VALUE)
    ctx["sentry_project"] = project[:MAX_CONTEXT_VALUE]
    eid = str(ev.get("event_id") or "").replace("-", "")
    return {
        "event_id": f"sentry-{eid}" if eid else "", "ts_ms": _ts_ms(ev.get("timestamp")),
        "service": _str(tags.get("service") or f"sentry-{project}", 64) or "sentry",
        "host": _str(ev.get("server_name") or "unknown", 128) or "unknown", "type": etype[:200],
        "message": message[:MAX_MESSAGE], "level": level, "source": "sentry",
        "logger": _str(ev["logger"], 200) if ev.get("logger") else None, "frames": frames, "context": ctx,
    }

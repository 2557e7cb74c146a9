"""Exception capture for Python services: a logging handler and excepthooks that turn unhandled and
logged exceptions into events, forwarded to a dispatcher (or spooled on disk until one answers).

    capture = ctops.capture.install("trainer", host="host-1", dispatcher_urls=[...], token=...,
                                    spool_dir="/var/lib/ctops/spool/trainer-1")

It never blocks or breaks its service: capturing only builds a small dict and appends it to a
bounded in-memory queue; a background thread does all I/O; any failure inside is swallowed and
counted (`capture.stats()`).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import linecache
import logging
import os
import socket
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ctops.capture.forwarder import Forwarder
from ctops.capture.spool import open_spool
from ctops.capture.wire import MAX_CONTEXT_KEYS, MAX_CONTEXT_VALUE, MAX_FRAMES, MAX_MESSAGE

__all__ = ["Capture", "install", "installed", "from_env", "loop_exception_handler"]

log = logging.getLogger("ctops.capture")

_MARK = "__ctops_event_id__"
_LIB_PATHS = tuple({p for k in ("stdlib", "platstdlib", "purelib", "platlib")
                    if (p := sysconfig.get_paths().get(k))})
_installed: Capture | None = None


def _library_file(filename: str) -> bool:
    return filename.startswith("<") or filename.startswith(_LIB_PATHS) or "site-packages" in filename


class Capture:
    def __init__(self, service: str, host: str, forwarder: Forwarder, *, context: Mapping[str, Any] | None = None,
                 in_app: Sequence[str] = ()) -> None:
        self.service, self.host = service[:64], host[:128]
        self.forwarder = forwarder
        self.context = dict(context or {})
        self.in_app = tuple(in_app)
        self.captured = 0
        self.internal_errors = 0
        self._local = threading.local()
        self._hooks: list[Callable[[], None]] = []

    # --- capturing -----------------------------------------------------------------------------
    def capture_exception(self, exc: BaseException | None = None, *, context: Mapping[str, Any] | None = None,
                          level: str = "error", logger: str | None = None) -> str | None:
        """Capture `exc` (default: the one being handled). The event id, or None if it was not captured."""
        if getattr(self._local, "busy", False) or threading.current_thread() is self.forwarder.thread:
            return None  # a failure while capturing, or the forwarder's own logging: never loop
        self._local.busy = True
        try:
            if exc is None:
                exc = sys.exc_info()[1]
                if exc is None:
                    return None
            if getattr(exc, _MARK, None):
                return None  # already captured (e.g. logged by a handler, then by the server)
            event = self._event(type(exc), str(exc), exc.__traceback__, level, logger, context)
            try:
                setattr(exc, _MARK, event["event_id"])
            except (AttributeError, TypeError):
                pass
            prior = exc.__cause__ or exc.__context__
            if prior is not None:
                event["context"].setdefault("caused_by", f"{_type_name(type(prior))}: {prior}"[:MAX_CONTEXT_VALUE])
            return self._submit(event)
        except Exception:  # noqa: BLE001 - capture must never break the service
            self.internal_errors += 1
            return None
        finally:
            self._local.busy = False

    def capture_message(self, message: str, *, level: str = "error", logger: str | None = None,
                        frames: list[dict[str, Any]] | None = None, context: Mapping[str, Any] | None = None,
                        type_name: str = "LoggedError") -> str | None:
        if getattr(self._local, "busy", False) or threading.current_thread() is self.forwarder.thread:
            return None
        self._local.busy = True
        try:
            event = self._base(type_name, message, level, logger, context)
            event["frames"] = frames or []
            return self._submit(event)
        except Exception:  # noqa: BLE001
            self.internal_errors += 1
            return None
        finally:
            self._local.busy = False

    def _submit(self, event: dict[str, Any]) -> str | None:
        if not self.forwarder.submit(json.dumps(event, separators=(",", ":"), default=str).encode()):
            return None
        self.captured += 1
        return str(event["event_id"])

    def _base(self, type_name: str, message: str, level: str, logger: str | None,
              context: Mapping[str, Any] | None) -> dict[str, Any]:
        ctx = _clean_context({**self.context, **(context or {})})
        return {
            "event_id": uuid.uuid4().hex, "ts_ms": int(time.time() * 1000), "service": self.service,
            "host": self.host, "type": type_name[:200], "message": message[:MAX_MESSAGE],
            "level": level if level in ("warning", "error", "critical") else "error", "source": "capture",
            "logger": (logger or None) and logger[:200], "context": ctx,
        }

    def _event(self, etype: type[BaseException], message: str, tb: TracebackType | None, level: str,
               logger: str | None, context: Mapping[str, Any] | None) -> dict[str, Any]:
        event = self._base(_type_name(etype), message, level, logger, context)
        event["frames"] = self._frames(tb)
        return event

    def _frames(self, tb: TracebackType | None) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        while tb is not None:
            f = tb.tb_frame
            filename = f.f_code.co_filename
            module = f.f_globals.get("__name__") if isinstance(f.f_globals.get("__name__"), str) else None
            line = linecache.getline(filename, tb.tb_lineno).strip() or None
            frames.append({
                "filename": filename[-1000:], "module": module and module[:300],
                "function": f.f_code.co_qualname[:300], "lineno": tb.tb_lineno,
                "in_app": self._in_app(filename, module), "context_line": line and line[:1000],
            })
            tb = tb.tb_next
        return frames[-MAX_FRAMES:]  # the innermost frames say where it broke

    def _in_app(self, filename: str, module: str | None) -> bool:
        if self.in_app and module:
            return module.startswith(self.in_app)
        return not _library_file(filename)

    # --- hooks ---------------------------------------------------------------------------------
    def install_hooks(self) -> None:
        prev_sys = sys.excepthook
        prev_thread = threading.excepthook

        def sys_hook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            if not issubclass(etype, KeyboardInterrupt):
                self.capture_exception(value, level="critical", context={"unhandled": True})
            prev_sys(etype, value, tb)

        def thread_hook(args: threading.ExceptHookArgs) -> None:
            if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
                name = args.thread.name if args.thread else "?"
                self.capture_exception(args.exc_value, context={"unhandled": True, "thread": name})
            prev_thread(args)

        sys.excepthook = sys_hook
        threading.excepthook = thread_hook
        self._hooks.append(lambda: setattr(sys, "excepthook", prev_sys))
        self._hooks.append(lambda: setattr(threading, "excepthook", prev_thread))

    def handler(self, level: int = logging.ERROR) -> CaptureHandler:
        return CaptureHandler(self, level)

    # --- lifecycle -----------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        return self.forwarder.flush(timeout)

    def close(self, timeout: float = 2.0) -> None:
        global _installed
        for undo in reversed(self._hooks):
            undo()
        self._hooks.clear()
        self.forwarder.close(timeout)
        if _installed is self:
            _installed = None

    def stats(self) -> dict[str, int | str]:
        fw = self.forwarder
        return {"captured": self.captured, "internal_errors": self.internal_errors + fw.errors, "sent": fw.sent,
                "spooled": fw.spooled, "queued": len(fw.queue), **fw.counters()}


class CaptureHandler(logging.Handler):
    """ERROR and worse log records become events; with exc_info, the exception's event."""

    def __init__(self, capture: Capture, level: int = logging.ERROR) -> None:
        super().__init__(level)
        self.capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.name.startswith("ctops.capture"):
                return
            level = "critical" if record.levelno >= logging.CRITICAL else "error"
            if record.levelno < logging.ERROR:
                level = "warning"
            try:
                text = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string must not lose the event
                text = str(record.msg)
            ctx = {"log_message": text[:MAX_CONTEXT_VALUE]}
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                self.capture.capture_exception(exc, context=ctx, level=level, logger=record.name)
                return
            frame = {"filename": record.pathname[-1000:], "module": record.module, "function": record.funcName or "?",
                     "lineno": record.lineno, "in_app": self.capture._in_app(record.pathname, record.module),
                     "context_line": None}
            # the unformatted template groups "user 17 failed" with "user 18 failed"
            ctx["log_template"] = str(record.msg)[:MAX_CONTEXT_VALUE]
            self.capture.capture_message(text, level=level, logger=record.name, frames=[frame], context=ctx,
                                         type_name=f"log.{record.levelname}")
        except Exception:  # noqa: BLE001
            self.capture.internal_errors += 1


def _type_name(etype: type[BaseException]) -> str:
    mod = getattr(etype, "__module__", "") or ""
    name = getattr(etype, "__qualname__", None) or etype.__name__
    return name if mod in ("builtins", "__main__", "") else f"{mod}.{name}"


def _clean_context(ctx: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in list(ctx.items())[:MAX_CONTEXT_KEYS]:
        if v is None or isinstance(v, bool | int | float):
            out[str(k)[:100]] = v
        else:
            out[str(k)[:100]] = (v if isinstance(v, str) else repr(v))[:MAX_CONTEXT_VALUE]
    return out


def loop_exception_handler(capture: Capture) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """For `loop.set_exception_handler`: exceptions asyncio would only log (a failed task nobody awaited)."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            capture.capture_exception(exc, context={"asyncio": str(context.get("message", ""))[:200]})
        loop.default_exception_handler(context)

    return handler


def install(service: str, host: str | None = None, dispatcher_urls: Iterable[str] = (), token: str | None = None,
            spool_dir: str | os.PathLike[str] | None = None, *, level: int = logging.ERROR,
            logger: logging.Logger | None = None, hooks: bool = True, context: Mapping[str, Any] | None = None,
            in_app: Sequence[str] = (), queue_max: int = 10_000, spool_max_bytes: int = 64 * 1024 * 1024,
            forwarder_kw: Mapping[str, Any] | None = None) -> Capture:
    """Start capturing for this process. Without URLs events only spool locally; without a spool
    directory they are kept in memory only (and counted as dropped if none answers)."""
    global _installed
    if _installed is not None:
        return _installed
    host = host or socket.gethostname()
    spool = None
    if spool_dir is not None:
        try:
            spool = open_spool(spool_dir, max_bytes=spool_max_bytes)
        except OSError as exc:
            log.warning("no exception spool at %s (%s): events are kept in memory only", spool_dir, exc)
    sender = f"{service}@{host}" + (f"#{spool.sender_id}" if spool else "")
    fw = Forwarder(list(dispatcher_urls), token, spool, sender=sender, queue_max=queue_max, **(forwarder_kw or {}))
    cap = Capture(service, host, fw, context=context, in_app=in_app)
    fw.start()
    target, handler = logger or logging.getLogger(), cap.handler(level)
    target.addHandler(handler)
    cap._hooks.append(lambda: target.removeHandler(handler))
    if hooks:
        cap.install_hooks()
    # a short grace at exit: what is not sent by then is spooled, and shutdown is never held up for long
    atexit.register(cap.close, 0.5)
    _installed = cap
    return cap


def installed() -> Capture | None:
    return _installed


def from_env(service: str, host: str, default_urls: Sequence[str] = (), default_token: str | None = None,
             default_spool: str | os.PathLike[str] | None = None, **kw: Any) -> Capture:
    """install() with CTOPS_CAPTURE_URLS (comma-separated), CTOPS_CAPTURE_TOKEN and CTOPS_CAPTURE_SPOOL (a
    base directory; this process uses <base>/<service>-<host>) overriding the defaults."""
    urls = [u.strip() for u in os.environ.get("CTOPS_CAPTURE_URLS", "").split(",") if u.strip()] or list(default_urls)
    token = os.environ.get("CTOPS_CAPTURE_TOKEN") or default_token
    base = os.environ.get("CTOPS_CAPTURE_SPOOL")
    spool = Path(base) / f"{service}-{host}" if base else default_spool
    return install(service, host, urls, token, spool, **kw)

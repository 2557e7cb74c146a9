"""Follows log files (globs from the agent's config) and turns Python tracebacks and ERROR lines
into exception events, sent like a service's own (ctops.capture's forwarder and spool).

Files are polled (no inotify: it misses NFS and is one more thing to go wrong); rotation is seen as
a new inode at the path (the old file is read to its end first), truncation as a size below the
offset. Offsets are saved in the spool directory, so a restarted agent neither re-reports nor
skips; a file seen for the first time is read from its end (its history is not news).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctops.capture.forwarder import Forwarder
from ctops.capture.wire import MAX_FRAMES, MAX_MESSAGE

log = logging.getLogger("ctops.agent.logtail")

_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
_EXC = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Failure|[A-Z]\w*))"
                  r"(?::\s?(?P<msg>.*))?$")
_LEVEL = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
MAX_LINE = 16 * 1024
PENDING_S = 0.5  # an ERROR line waits this long for the traceback that may follow it


@dataclass
class _Followed:
    path: str
    inode: int
    offset: int
    fh: Any = None
    partial: bytes = b""


@dataclass
class _Parser:
    """Line-by-line state for one file: an ERROR line waiting for its traceback, a traceback being read."""

    error_line: str | None = None
    error_at: float = 0.0
    in_tb: bool = False
    frames: list[dict[str, Any]] = field(default_factory=list)


class LogTail:
    def __init__(self, host: str, patterns: list[str], forwarder: Forwarder, state_dir: str | os.PathLike[str],
                 interval: float = 0.5) -> None:
        self.host, self.patterns, self.forwarder = host, patterns, forwarder
        self.interval = interval
        self.state_path = Path(state_dir) / "logtail.json"
        self.files: dict[str, _Followed] = {}
        self.parsers: dict[str, _Parser] = {}
        self.events = 0
        self._saved: dict[str, list[int]] = self._load()
        self._first_scan = True

    # --- state ---------------------------------------------------------------------------------
    def _load(self) -> dict[str, list[int]]:
        try:
            doc = json.loads(self.state_path.read_text())
            return {k: v for k, v in doc.items() if isinstance(v, list) and len(v) == 2}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        doc = {p: [f.inode, f.offset] for p, f in self.files.items()}
        if doc == self._saved:
            return
        with contextlib.suppress(OSError):
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.state_path)
            self._saved = doc

    # --- polling -------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception:  # a bad file must not stop the agent's other work
                log.exception("log tail poll failed")
            await asyncio.sleep(self.interval)

    def poll_once(self) -> None:
        paths = sorted({p for pat in self.patterns for p in glob.glob(pat) if os.path.isfile(p)})
        for path in paths:
            self._follow(path)
        for path in [p for p in self.files if p not in paths]:
            self._drain(self.files[path])  # deleted (or renamed away): read what is left, then let go
            self._close(path)
        now = time.monotonic()
        for path, st in self.parsers.items():
            if st.error_line is not None and not st.in_tb and now - st.error_at > PENDING_S:
                self._emit_error_line(path, st)
        self._first_scan = False
        self._save()

    def _follow(self, path: str) -> None:
        try:
            stat = os.stat(path)
        except OSError:
            return
        f = self.files.get(path)
        if f is not None and f.inode != stat.st_ino:
            self._drain(f)  # rotated: the old file's last lines first
            self._close(path)
            f = None
            start = 0
        elif f is None:
            saved = self._saved.get(path)
            if saved and saved[0] == stat.st_ino and saved[1] <= stat.st_size:
                start = saved[1]
            else:
                start = stat.st_size if self._first_scan else 0
        if f is None:
            try:
                fh = open(path, "rb")  # noqa: SIM115 - kept open across polls to survive rotation
            except OSError:
                return
            f = self.files[path] = _Followed(path, stat.st_ino, start, fh)
            self.parsers.setdefault(path, _Parser())
        if stat.st_size < f.offset:
            log.info("%s was truncated; reading from its start", path)
            f.offset, f.partial = 0, b""
        self._drain(f)

    def _drain(self, f: _Followed) -> None:
        if f.fh is None:
            return
        f.fh.seek(f.offset)
        while True:
            chunk = f.fh.read(1 << 16)
            if not chunk:
                break
            f.offset += len(chunk)
            data = f.partial + chunk
            *lines, f.partial = data.split(b"\n")
            if len(f.partial) > MAX_LINE:
                f.partial = f.partial[:MAX_LINE]
            for raw in lines:
                self._line(f.path, raw.decode("utf-8", "replace").rstrip("\r"))

    def _close(self, path: str) -> None:
        f = self.files.pop(path, None)
        if f is not None and f.fh is not None:
            with contextlib.suppress(OSError):
                f.fh.close()

    # --- parsing -------------------------------------------------------------------------------
    def _line(self, path: str, line: str) -> None:
        st = self.parsers.setdefault(path, _Parser())
        if line.startswith("Traceback (most recent call last):"):
            st.in_tb, st.frames = True, []
            return
        if st.in_tb:
            m = _FRAME.match(line)
            if m:
                st.frames.append({"filename": m["file"][-1000:], "module": None, "function": m["func"][:300],
                                  "lineno": int(m["line"]), "in_app": not _library(m["file"]), "context_line": None})
                return
            if line.startswith((" ", "\t")) or not line.strip():
                if st.frames and line.strip() and st.frames[-1]["context_line"] is None:
                    st.frames[-1]["context_line"] = line.strip()[:1000]
                return
            if line.startswith(_CHAINED):
                return
            m = _EXC.match(line)
            st.in_tb = False
            if m:
                self._emit(path, m["type"], (m["msg"] or "").strip(), st.frames, st.error_line)
                st.error_line, st.frames = None, []
                return
            st.frames = []  # not a traceback after all; treat the line normally
        if _LEVEL.search(line):
            if st.error_line is not None:
                self._emit_error_line(path, st)
            st.error_line, st.error_at = line, time.monotonic()

    def _emit_error_line(self, path: str, st: _Parser) -> None:
        line, st.error_line = st.error_line or "", None
        self._emit(path, "LogError", line, [], None)

    def _emit(self, path: str, etype: str, message: str, frames: list[dict[str, Any]], log_line: str | None) -> None:
        ctx: dict[str, Any] = {"log_file": path[-500:]}
        if log_line:
            ctx["log_line"] = log_line[:500]
        event = {"event_id": uuid.uuid4().hex, "ts_ms": int(time.time() * 1000),
                 "service": Path(path).stem[:64] or "log", "host": self.host, "type": etype[:200],
                 "message": message[:MAX_MESSAGE], "level": "error", "source": "logtail",
                 "logger": None, "frames": frames[-MAX_FRAMES:], "context": ctx}
        self.forwarder.submit(json.dumps(event, separators=(",", ":")).encode())
        self.events += 1

    def close(self) -> None:
        self._save()  # before letting go of the files, whose offsets it records
        for path in list(self.files):
            self._close(path)


def _library(path: str) -> bool:
    return "site-packages" in path or "dist-packages" in path or "/lib/python3" in path or path.startswith("<")


def start(host: str, patterns: list[str], urls: list[str], token: str, log_dir: str | None) -> LogTail:
    """A LogTail with its own forwarder thread and spool (<CTOPS_CAPTURE_SPOOL or log dir or tmp>/logtail-<host>)."""
    from ctops.capture.spool import open_spool  # only agents that tail logs need it

    base = os.environ.get("CTOPS_CAPTURE_SPOOL") or (str(Path(log_dir) / "spool") if log_dir else None) \
        or str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ctops-spool-{os.getuid()}")
    directory = Path(base) / f"logtail-{host}"
    spool = None
    try:
        spool = open_spool(directory)
    except OSError as exc:
        log.warning("no spool for tailed exceptions at %s (%s): kept in memory only", directory, exc)
    fw = Forwarder(urls, token, spool, sender=f"logtail@{host}" + (f"#{spool.sender_id}" if spool else ""))
    fw.start()
    return LogTail(host, patterns, fw, spool.dir if spool else directory)

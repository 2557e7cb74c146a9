"""An append-only, bounded, checksummed on-disk queue for events no dispatcher took.

Layout: numbered segment files of records `crc32hex length json\n`, a `cursor` file (segment and
offset of the first record not yet delivered, replaced atomically) and `counters.json`.

- A record whose checksum or length does not match, or a torn last record (a write cut short by a
  crash or a full disk), is skipped, logged and counted; the records after it still replay.
- A new process never appends to an existing segment: a torn tail then can never swallow the next
  record's first bytes.
- Bounded: past `max_bytes` the oldest segment is deleted and its undelivered records counted as
  dropped. Losing the oldest keeps the newest (most relevant to an ongoing outage) errors.
- Delivery is at least once (the cursor is written after the dispatcher acknowledged); the
  dispatcher deduplicates by event id.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ctops.capture.spool")

SEGMENT_SUFFIX = ".seg"


class SpoolBusy(Exception):
    """Another live process holds this spool directory."""


@dataclass(frozen=True, slots=True)
class Position:
    segment: int
    offset: int


def encode(payload: bytes) -> bytes:
    return b"%08x %d " % (zlib.crc32(payload), len(payload)) + payload + b"\n"


def decode(line: bytes) -> bytes | None:
    """The payload of one record line (without its newline), or None when it is damaged."""
    try:
        crc_s, len_s, payload = line.split(b" ", 2)
        if len(crc_s) != 8 or int(len_s) != len(payload) or int(crc_s, 16) != zlib.crc32(payload):
            return None
    except ValueError:
        return None
    return payload


class Spool:
    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 64 * 1024 * 1024,
                 segment_bytes: int = 4 * 1024 * 1024, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max(max_bytes, 2 * segment_bytes)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolBusy(str(self.dir)) from None
        self.counters = self._load_counters()
        self.sender_id: str = self.counters.setdefault("id", uuid.uuid4().hex[:12])
        self._save_counters()
        segs = self._segments()
        self.cursor = self._load_cursor(segs)
        # this process writes only to segments it created (see module docstring)
        self._write_seg = (segs[-1] + 1) if segs else max(1, self.cursor.segment)
        self._write_fd: int | None = None
        self._write_size = 0
        self._sizes = {s: self._path(s).stat().st_size for s in segs}

    # --- counters ------------------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        return int(self.counters.get("dropped", 0))

    @property
    def corrupt(self) -> int:
        return int(self.counters.get("corrupt", 0))

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = int(self.counters.get(name, 0)) + n
        self._save_counters()

    def _load_counters(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.dir / "counters.json").read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_counters(self) -> None:
        _atomic_write(self.dir / "counters.json", json.dumps(self.counters).encode())

    # --- segments ------------------------------------------------------------------------------
    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:010d}{SEGMENT_SUFFIX}"

    def _segments(self) -> list[int]:
        out = []
        for p in self.dir.iterdir():
            if p.suffix == SEGMENT_SUFFIX and p.stem.isdigit():
                out.append(int(p.stem))
        return sorted(out)

    def _load_cursor(self, segs: list[int]) -> Position:
        try:
            seg_s, off_s = (self.dir / "cursor").read_text().split()
            pos = Position(int(seg_s), int(off_s))
        except (OSError, ValueError):
            pos = Position(segs[0] if segs else 1, 0)
        if segs and pos.segment < segs[0]:
            pos = Position(segs[0], 0)  # its segment was dropped
        return pos

    def size(self) -> int:
        return sum(self._sizes.values())

    def pending(self) -> bool:
        """Anything not yet delivered (possibly only damaged records, which a read then skips)."""
        for seg, size in self._sizes.items():
            if seg > self.cursor.segment and size > 0:
                return True
            if seg == self.cursor.segment and size > self.cursor.offset:
                return True
        return False

    # --- writing -------------------------------------------------------------------------------
    def append(self, payloads: list[bytes]) -> None:
        """Append records; the caller's OSError (disk full, read-only) means they are not stored."""
        if not payloads:
            return
        data = b"".join(encode(p) for p in payloads)
        if self._write_fd is None or self._write_size >= self.segment_bytes:
            self._open_next_segment()
        assert self._write_fd is not None
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._write_fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(self._write_fd)
        except OSError:
            # whatever part got written is a torn tail: never append after it
            self._close_writer()
            raise
        finally:
            with contextlib.suppress(OSError):
                size = self._path(self._write_seg).stat().st_size
                self._write_size = size
                self._sizes[self._write_seg] = size
        self._enforce_cap()

    def _open_next_segment(self) -> None:
        self._close_writer()  # moves on to the next segment number
        self._write_fd = os.open(self._path(self._write_seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._write_size = os.fstat(self._write_fd).st_size
        self._sizes[self._write_seg] = self._write_size

    def _close_writer(self) -> None:
        if self._write_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._write_fd)
            self._write_fd = None
            self._write_seg += 1

    def _enforce_cap(self) -> None:
        while self.size() > self.max_bytes and len(self._sizes) > 1:
            oldest = min(self._sizes)
            if oldest == self._write_seg and self._write_fd is not None:
                break
            lost = self._count_records(oldest, self.cursor.offset if oldest == self.cursor.segment else 0) \
                if oldest >= self.cursor.segment else 0
            with contextlib.suppress(FileNotFoundError):
                self._path(oldest).unlink()
            del self._sizes[oldest]
            if lost:
                log.warning("spool %s over %d bytes: dropped the oldest segment with %d undelivered events",
                            self.dir, self.max_bytes, lost)
                self.count("dropped", lost)
            if self.cursor.segment <= oldest:
                self._set_cursor(Position(min(self._sizes) if self._sizes else oldest + 1, 0))

    def _count_records(self, seg: int, offset: int) -> int:
        try:
            with open(self._path(seg), "rb") as f:
                f.seek(offset)
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except OSError:
            return 0

    # --- reading -------------------------------------------------------------------------------
    def read(self, max_records: int, max_bytes: int) -> tuple[list[bytes], Position]:
        """Up to `max_records` payloads from the cursor, and the position after them (for commit).

        Damaged records on the way are skipped and counted here, once: the returned position is past them.
        """
        out: list[bytes] = []
        total = 0
        pos = self.cursor
        for seg in sorted(s for s in self._sizes if s >= pos.segment):
            offset = pos.offset if seg == pos.segment else 0
            active = seg == self._write_seg and self._write_fd is not None
            try:
                f = open(self._path(seg), "rb")  # noqa: SIM115 - closed below; loop exits early
            except FileNotFoundError:
                continue
            with f:
                f.seek(offset)
                while len(out) < max_records and total < max_bytes:
                    line = f.readline()
                    if not line:
                        break
                    if not line.endswith(b"\n"):
                        if active:
                            break  # being written by this process; not torn
                        self._damaged(seg, offset, "torn record (no end of line)")
                        offset += len(line)
                        break
                    payload = decode(line[:-1])
                    if payload is None:
                        self._damaged(seg, offset, "checksum or length mismatch")
                    else:
                        out.append(payload)
                        total += len(payload)
                    offset += len(line)
            pos = Position(seg, offset)
            if len(out) >= max_records or total >= max_bytes or active:
                break
            if offset < self._sizes.get(seg, 0):
                break  # stopped short within this segment (shouldn't happen); resume here next time
            # segment finished: continue at the start of the next one
        return out, pos

    def _damaged(self, seg: int, offset: int, reason: str) -> None:
        log.error("spool %s: skipped a damaged record in segment %d at byte %d: %s", self.dir, seg, offset, reason)
        self.count("corrupt")

    def commit(self, pos: Position) -> None:
        """Everything before `pos` is delivered: move the cursor, delete finished segments."""
        self._set_cursor(pos)
        for seg in [s for s in self._sizes if s < pos.segment or (s == pos.segment and self._finished(s, pos))]:
            if seg == self._write_seg and self._write_fd is not None:
                continue
            with contextlib.suppress(FileNotFoundError):
                self._path(seg).unlink()
            del self._sizes[seg]

    def _finished(self, seg: int, pos: Position) -> bool:
        return pos.offset >= self._sizes.get(seg, 0) and any(s > seg for s in self._sizes)

    def _set_cursor(self, pos: Position) -> None:
        self.cursor = pos
        _atomic_write(self.dir / "cursor", f"{pos.segment} {pos.offset}\n".encode())

    def close(self) -> None:
        if self._write_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._write_fd)
            self._write_fd = None
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def open_spool(directory: str | os.PathLike[str], *, max_bytes: int = 64 * 1024 * 1024,
               segment_bytes: int = 4 * 1024 * 1024, fsync: bool = True) -> Spool:
    """The spool in `directory`, or a per-process sibling when another live process holds it."""
    try:
        return Spool(directory, max_bytes=max_bytes, segment_bytes=segment_bytes, fsync=fsync)
    except SpoolBusy:
        alt = f"{os.fspath(directory)}.{os.getpid()}"
        log.warning("spool %s is held by another process; using %s", directory, alt)
        return Spool(alt, max_bytes=max_bytes, segment_bytes=segment_bytes, fsync=fsync)

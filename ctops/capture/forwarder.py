"""Moves captured events to a dispatcher from a background thread, spooling whatever none takes.

The capturing thread only appends to a bounded in-memory queue; every network and disk operation
happens here. While the spool holds anything, new events go behind it, so replay keeps their order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

import httpx

from ctops.capture.spool import Spool
from ctops.failover import Failover, TryNext, Unreachable

log = logging.getLogger("ctops.capture.forwarder")

PATH = "/api/v1/exceptions"
# answers that mean "this batch itself is bad": retrying it can never succeed
POISON = {400, 413, 422}


class Forwarder:
    def __init__(self, urls: Sequence[str], token: str | None, spool: Spool | None, *, sender: str,
                 queue_max: int = 10_000, batch_max: int = 200, batch_bytes: int = 192 * 1024,
                 timeout: float = 5.0, retry_max: float = 2.0, transport: httpx.BaseTransport | None = None) -> None:
        # a batch is safe to send again: the dispatcher deduplicates events by id
        self.failover = Failover(urls)
        self.urls = self.failover.urls
        self.spool = spool
        self.sender = sender
        self.queue: deque[bytes] = deque()
        self.queue_max = queue_max
        self.batch_max, self.batch_bytes = batch_max, batch_bytes
        self.retry_max = retry_max
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(1.0, timeout)),
                                  transport=transport)
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._stop = False
        self._deadline = 0.0
        self._retry_at = 0.0
        self._delay = 0.25
        self.thread = threading.Thread(target=self._run, name="ctops-capture", daemon=True)
        # counted here when there is no spool to keep them in
        self.dropped = 0
        self.rejected = 0
        self.sent = 0
        self.spooled = 0
        self.errors = 0
        self._last_complaint = 0.0

    # --- called from any thread ----------------------------------------------------------------
    def submit(self, payload: bytes) -> bool:
        """Queue one event (its JSON); never blocks. False when the queue is full and it was dropped."""
        if len(self.queue) >= self.queue_max:
            self.dropped += 1
            return False
        self.queue.append(payload)
        self._idle.clear()
        self._wake.set()
        return True

    def start(self) -> None:
        self.thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty and the spool, if a dispatcher answers, drained."""
        self._wake.set()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread; whatever it could not send in `timeout` goes to the spool."""
        self._deadline = time.monotonic() + timeout
        self._stop = True
        self._wake.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout + 1.0)
        self._spool_queue()
        with contextlib.suppress(Exception):
            self._http.close()
        if self.spool is not None:
            self.spool.close()

    def counters(self) -> dict[str, int | str]:
        sp = self.spool
        return {"sender": self.sender, "dropped": self.dropped + (sp.dropped if sp else 0),
                "corrupt": sp.corrupt if sp else 0, "rejected": self.rejected + int(sp.counters.get("rejected", 0)
                                                                                    if sp else 0)}

    # --- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                busy = self._step()
            except Exception:  # noqa: BLE001 - the thread must survive anything; count and go on
                self.errors += 1
                busy = False
                self._backoff()
            if self._stop and (not busy or time.monotonic() > self._deadline):
                return
            if busy:
                continue
            if not self.queue and not (self.spool is not None and self.spool.pending()):
                self._idle.set()
            timeout = 1.0
            if self._retry_at:
                timeout = min(1.0, max(0.01, self._retry_at - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()

    def _step(self) -> bool:
        """One unit of work; True when there may be more to do right away."""
        waiting = time.monotonic() < self._retry_at
        if self.spool is not None and self.spool.pending():
            self._spool_queue()  # newer events queue up behind the spooled ones
            if waiting:
                return False
            records, pos = self.spool.read(self.batch_max, self.batch_bytes)
            if not records:
                self.spool.commit(pos)  # only damaged records there: skip past them
                return self.spool.pending()
            if self._deliver(records):
                self.spool.commit(pos)
                return True
            self._backoff()
            return False
        if not self.queue:
            return False
        batch = self._take()
        if waiting or not self.urls or not self._deliver(batch):
            if not waiting and self.urls:
                self._backoff()
            self._to_spool(batch)
            return bool(self.queue) and not waiting
        return bool(self.queue)

    def _take(self) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        while self.queue and len(out) < self.batch_max and size < self.batch_bytes:
            p = self.queue.popleft()
            out.append(p)
            size += len(p)
        return out

    def _spool_queue(self) -> None:
        while self.queue:
            self._to_spool(self._take())

    def _to_spool(self, batch: list[bytes]) -> None:
        if self.spool is None:
            self.dropped += len(batch)
            return
        try:
            self.spool.append(batch)
            self.spooled += len(batch)
        except OSError as exc:
            self.dropped += len(batch)
            self._complain("cannot write the spool; %d events lost: %s", len(batch), exc)

    def _backoff(self) -> None:
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self.retry_max, self._delay * 2)

    # --- HTTP ----------------------------------------------------------------------------------
    def _deliver(self, records: list[bytes]) -> bool:
        """True when every record was taken (or refused as invalid, and counted); False when nobody answered."""
        if not self.urls:
            return False
        status = self._post(records)
        if status is None:
            return False
        if status in POISON:
            if len(records) > 1:
                mid = len(records) // 2
                return self._deliver(records[:mid]) and self._deliver(records[mid:])
            self._reject(records[0], status)
        self._retry_at, self._delay = 0.0, 0.25
        return True

    def _reject(self, record: bytes, status: int) -> None:
        self.rejected += 1
        if self.spool is not None:
            self.spool.count("rejected")
            self.rejected -= 1
        self._complain("dispatcher refused an event (%s); it is dropped: %.200r", status, record)

    def _post(self, records: list[bytes]) -> int | None:
        """The status of the first dispatcher that answered for itself, or None when none did."""
        body = b'{"events":[' + b",".join(records) + b'],"counters":' + json.dumps(self.counters()).encode() + b"}"

        def post(url: str) -> int:
            try:
                r = self._http.post(url + PATH, content=body)
            except httpx.HTTPError as exc:
                log.debug("exceptions to %s failed: %s", url, exc)
                raise TryNext(str(exc)) from None
            if r.status_code == 200 or r.status_code in POISON:
                return r.status_code
            # 401/403: a wrong token; 404: an older dispatcher; 5xx: Redis down. Keep the events and retry.
            self._complain("dispatcher %s answered %s to exceptions: %.200s", url, r.status_code, r.text)
            raise TryNext(f"answered {r.status_code}")

        before = self.failover.current
        try:
            status = self.failover.call_sync(post, safe=True)
        except Unreachable:
            return None
        if self.failover.current != before:
            log.info("exceptions now go to %s", self.failover.current_url)
        if status == 200:
            self.sent += len(records)
        return status

    def _complain(self, msg: str, *args: object) -> None:
        # at most one line per 10 s: an outage must not flood the service's own log
        now = time.monotonic()
        if now - self._last_complaint > 10:
            self._last_complaint = now
            log.warning(msg, *args)

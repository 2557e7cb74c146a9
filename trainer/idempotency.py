"""`Idempotency-Key` on POSTs: executed at most once across all trainer servers.

The first server to see a key claims it in Redis (a lease, renewed while it works). The request's
writes and its outcome (status, body, replayed headers) are committed in one transaction fenced by
that claim, so either both happen or neither: a server dying before the commit leaves nothing done
and its claim expires; one dying after leaves the outcome for every repeat. A repeat of a finished
request gets the stored outcome; a repeat of one still in progress (possibly on another server)
waits for it, up to a bound, then gets a 409 it can retry.

How long an outcome is kept depends on whose key it is. A client's own key may come again much later
(a browser resending after a reconnect): `[trainer] idempotency_ttl_s`, a day by default. A key the
dispatcher made for a write that came without one (`ctops-...`) is sent only by the dispatcher's own
tries of that one request, so its outcome is kept only as long as such a try can still reach a server
(`generated_key_ttl_s`); every keyless POST would otherwise leave a record behind for a day.

A finished outcome is sealed (`ctops.envelope`). One found damaged is set aside and replaced by a
tombstone; every repeat of that key then gets a 410 saying to check the resource and use a new key
(the request may well have been executed, so it must not run again under the same key).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import JSONResponse
from redis.asyncio.client import Pipeline

from ctops.config import Timings, TrainerSettings
from ctops.envelope import Corrupt
from ctops.integrity import IDEMPOTENCY, contain_idempotency, read_idempotency, seal_json
from ctops.keys import Keys
from ctops.rejects import IDEMPOTENCY_REPLAY, REJECTS
from trainer.lease import Lease, LeaseLost

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
# the start of the keys the dispatcher makes for writes without one (dispatcher/proxy.py)
GENERATED_PREFIX = "ctops-"
POLL_SECONDS = 0.05


@dataclass
class Outcome:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, replayed: bool = False) -> JSONResponse:
        headers = {**self.headers, REPLAYED: "true"} if replayed else dict(self.headers)
        return JSONResponse(self.body, self.status, headers=headers)


Writes = Callable[[Pipeline], None]
Gone = Callable[[], Awaitable[bool]]
Prepare = Callable[[], Awaitable[tuple[Outcome, Writes]]]
After = Callable[[Outcome], Awaitable[None]]


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"%s %s\n%s" % (method.encode(), path.encode(), body)).hexdigest()


def generated_key_ttl_s(t: Timings) -> int:
    """How long an outcome under a dispatcher-made key is kept: as long as a try carrying that key can
    still reach a server. The dispatcher sends its tries of a request within `retry_total_ms` of its
    arrival, each connecting within `upstream_connect_timeout_ms`, and waits at most
    `upstream_read_timeout_ms` for a try's answer; past the sum it has answered the learner, and the
    key, never shown to anyone, is not sent again. A try left unread in the socket of a server frozen
    for longer than that is found when the server thaws, its outcome gone: it is not run, because the
    dispatcher closed that connection when it moved the request on (`client_gone`)."""
    return max(1, math.ceil((t.retry_total_ms + t.upstream_connect_timeout_ms + t.upstream_read_timeout_ms) / 1000))


async def client_gone(request: Request) -> bool:
    """Whether the client (the dispatcher) has closed the connection this request came on. A close
    that already waits in the socket is seen by the event loop one iteration after the request's bytes,
    and handed to the app one more later: let both pass before asking."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return await request.is_disconnected()


def problem(status: int, detail: str, error: str = "", **extra: object) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 409 else None
    return JSONResponse({"error": error or f"http_{status}", "detail": detail, **extra}, status, headers=headers)


class Idempotency:
    def __init__(self, client: aioredis.Redis, keys: Keys, server: str, settings: TrainerSettings,
                 generated_ttl_s: int | None = None) -> None:
        """`client` must not decode responses: a damaged outcome has to reach the check as bytes.
        `generated_ttl_s`: how long outcomes under dispatcher-made keys are kept (`generated_key_ttl_s`);
        None: as long as any other."""
        self.r = client
        self.k = keys
        self.server = server
        self.settings = settings
        self.generated_ttl_s = generated_ttl_s or settings.idempotency_ttl_s

    async def run(self, key: str | None, fp: str, prepare: Prepare, after: After | None = None,
                  gone: Gone | None = None) -> JSONResponse:
        """Execute `prepare` (which must not write) and commit its writes, at most once per key.

        `after` runs only on the execution that committed (e.g. to start background work). `gone`: whether
        the client has left (`client_gone`); a try under a dispatcher-made key whose dispatcher has left
        is not run (see `generated_key_ttl_s`)."""
        if key is None:
            outcome, writes = await prepare()
            async with self.r.pipeline(transaction=True) as p:
                writes(p)
                await p.execute()
            if after:
                await after(outcome)
            return outcome.response()
        if not KEY_RE.match(key):
            REJECTS.note(IDEMPOTENCY_REPLAY, f"a malformed {HEADER} ({len(key)} characters)")
            return problem(400, f"{HEADER} must be 1 to 255 printable ASCII characters without spaces")
        generated = key.startswith(GENERATED_PREFIX)
        if generated and gone is not None and await gone():
            # the dispatcher moved this try on long ago and has answered the learner; the outcome under
            # its key may have expired already, so running it now could run it twice. Nobody reads this
            return problem(410, "the dispatcher that sent this request has given up on it; not executed")
        rkey = self.k.idempotency(hashlib.sha256(key.encode()).hexdigest())
        deadline = time.monotonic() + self.settings.idempotency_wait_ms / 1000
        while True:
            claim = Lease(self.r, rkey, self.server, self.settings.lease_ttl_ms)
            claim.token = json.dumps({"state": "pending", "fingerprint": fp, "server": self.server,
                                      "nonce": claim.token})
            if await claim.acquire():
                ttl = self.generated_ttl_s if generated else self.settings.idempotency_ttl_s
                done = await self._execute(claim, prepare, rkey, ttl)
                if done is not None:
                    if after:
                        await after(done)
                    return done.response()
                # our claim lapsed and another server took the key over: its outcome is the answer
                continue
            stored = await self._stored(rkey)
            if stored is None:
                continue  # the holder's claim expired (it died before committing): claim it ourselves
            if stored.get("state") == "damaged":
                return problem(410, f"the stored outcome of this {HEADER} was damaged and has been set aside for "
                               "staff; the request may have been executed: check the resource (e.g. GET your "
                               f"session) before sending it again with a new {HEADER}",
                               "idempotency_outcome_damaged", idempotency_key=key, quarantine=stored.get("quarantine"))
            if stored.get("fingerprint") != fp:
                REJECTS.note(IDEMPOTENCY_REPLAY, f"an {HEADER} repeated with a different request")
                return problem(422, f"this {HEADER} was already used for a different request")
            if stored["state"] == "done":
                return Outcome(stored["status"], stored["body"], stored.get("headers", {})).response(replayed=True)
            if time.monotonic() >= deadline:
                return problem(409, f"a request with this {HEADER} is still in progress; retry shortly",
                               idempotency_key=key)
            await asyncio.sleep(POLL_SECONDS)

    async def _stored(self, rkey: str) -> dict | None:
        """The claim or outcome at `rkey`; a damaged one is set aside and tombstoned first."""
        for _ in range(3):
            try:
                got = await read_idempotency(self.r, rkey)
            except Corrupt:
                pass
            else:
                return got[0] if got else None
            tomb = await contain_idempotency(self.r, self.k, rkey, self.server)
            if tomb is not None:
                return tomb
        return None

    async def _execute(self, claim: Lease, prepare: Prepare, rkey: str, ttl_s: int) -> Outcome | None:
        fp = json.loads(claim.token)["fingerprint"]
        async with claim.kept():
            outcome, writes = await prepare()
            stored = seal_json(rkey, IDEMPOTENCY, {"state": "done", "fingerprint": fp, "status": outcome.status,
                                                   "body": outcome.body, "headers": outcome.headers,
                                                   "server": self.server}, 1)

            def commit(p: Pipeline) -> None:
                writes(p)
                p.set(rkey, stored, ex=ttl_s)

            try:
                await claim.write(commit)
            except LeaseLost:
                return None
        return outcome

"""The LLM pool: picks the best usable provider, fails over before the first byte, hedges a try
that stalls, and keeps each provider's breaker, health and staff controls up to date.

A try is *committed* once the provider has answered: the whole body (stream=False) or the status
and the first chunk (stream=True). Until then any failure, or a stall well past the provider's
usual latency, moves the request on to the next provider; after it, the bytes are the client's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctops import integrity
from ctops.config import LLMProviderSpec, LLMSettings
from ctops.envelope import Corrupt
from ctops.keys import Keys
from ctops.rejects import LLM_ANSWER, REJECTS
from ctops.wire import LLMPoolView
from dispatcher.llm.breaker import BreakerState
from dispatcher.llm.providers import ANSWER_MAX_BYTES, Provider, answer_problem, stream_problem

# the record kind of the staff controls, as counted and named in `record_corrupt` events
CONTROL_KIND = "llm-control"
log = logging.getLogger("ctops.dispatcher.llm")

Emit = Callable[[str, str, str, str | None], None]
# provider answers that mean "this provider cannot serve it now"; others (400, 422 …) are the client's
FAILOVER_STATUS = frozenset({401, 403, 404, 408, 409, 425})
PROBE_BODY = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
MONITOR_TICK_S = 0.1


class TryFailed(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclass
class Answer:
    provider: str
    status: int
    content_type: str
    body: bytes = b""
    # stream=True only: the first chunk, and the open response the rest comes from
    first: bytes = b""
    chunks: AsyncIterator[bytes] | None = None
    response: httpx.Response | None = None
    tries: int = 1

    async def aclose(self) -> None:
        if self.response is not None:
            await self.response.aclose()


# what a client is told when no provider answers, by error code: never which providers there are or
# how they failed (that is logged, under the reference the client is given)
CLIENT_MESSAGES = {
    "rate_limit_exceeded": "The AI service is busy right now. Try again shortly.",
    "providers_unavailable": "The AI service is unavailable right now. Try again shortly.",
    "providers_failed": "The AI service could not answer this request. Try again shortly.",
    "stream_interrupted": "The AI service's answer was interrupted. Try again.",
}


def new_ref() -> str:
    """A reference a client can quote and staff can find in the dispatcher's log."""
    return "llm-" + secrets.token_hex(6)


def client_message(code: str, ref: str) -> str:
    return f"{CLIENT_MESSAGES[code]} (reference {ref})"


@dataclass
class PoolError:
    status: int
    detail: str  # for the log only: names the providers and what each did
    type: str = "server_error"
    code: str = "providers_failed"
    headers: dict[str, str] = field(default_factory=dict)
    ref: str = field(default_factory=new_ref)

    @property
    def message(self) -> str:
        return client_message(self.code, self.ref)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


@dataclass
class _Try:
    provider: Provider
    started: float
    gone: asyncio.Task
    stalled: bool = False


def retry_after_seconds(value: str | None, default: float) -> float:
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


class LLMPool:
    def __init__(self, providers: list[LLMProviderSpec], settings: LLMSettings, redis: Redis | None = None,
                 keys: Keys | None = None, emit: Emit | None = None, name: str | None = None) -> None:
        self.settings, self.redis, self.keys, self.name = settings, redis, keys, name
        self._last_controls: dict[str, str] = {}  # as last read intact, to repair damaged ones from
        self.emit = emit or (lambda *_: None)
        order = {p.name: i for i, p in enumerate(providers)}
        self.providers = [Provider(s, settings, self._listener(s.name))
                          for s in sorted(providers, key=lambda p: (p.priority, order[p.name]))]
        self.by_name = {p.name: p for p in self.providers}
        self.models = list(dict.fromkeys([*settings.models, *(p.model for p in providers)]))
        self.pinned: str | None = None
        self.client = httpx.AsyncClient(timeout=None, trust_env=False,
                                        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        self._tasks: list[asyncio.Task] = []
        self._probing: set[str] = set()
        self._control_error_logged = False
        self._stopping = False

    # --- breaker transitions -------------------------------------------------------------------
    def _listener(self, name: str) -> Callable[[BreakerState, BreakerState, str], None]:
        def changed(old: BreakerState, new: BreakerState, reason: str) -> None:
            p = self.by_name.get(name)
            if new == "open" and old == "closed":
                log.warning("LLM provider %s down: %s", name, reason)
                if p is not None:
                    p.mark_gone()
                self.emit("llm_provider_down", "critical", f"LLM provider {name} down: {reason}", name)
            elif new == "closed":
                log.warning("LLM provider %s up: %s", name, reason)
                if p is not None and p.disabled_by is None:
                    p.mark_back()
                self.emit("llm_provider_up", "info", f"LLM provider {name} up: {reason}", name)
        return changed

    # --- routing -------------------------------------------------------------------------------
    def _next(self, tried: list[str]) -> Provider | None:
        now = time.monotonic()
        left = [p for p in self.providers if p.name not in tried]
        pinned = self.by_name.get(self.pinned or "")
        if pinned is not None and pinned in left and pinned.usable(now):
            return pinned
        for p in left:
            if p.usable(now):
                return p
        # a provider that is merely slow right now is better than none
        for p in left:
            if p.disabled_by is None and p.breaker.allows() and now >= p.skip_until:
                return p
        return None

    def _unavailable(self) -> PoolError:
        now = time.monotonic()
        waits = [p.skip_until - now for p in self.providers
                 if p.disabled_by is None and p.breaker.allows() and now < p.skip_until]
        states = ", ".join(f"{p.name}: {p.state(now)}" for p in self.providers) or "none configured"
        if waits:
            secs = max(1, int(min(waits) + 0.999))
            return self._failed(PoolError(429, f"every LLM provider is rate limited ({states})", "requests",
                                          "rate_limit_exceeded", {"Retry-After": str(secs)}))
        return self._failed(PoolError(503, f"no LLM provider is available ({states})", "server_error",
                                      "providers_unavailable", {"Retry-After": "1"}))

    def payload(self, p: Provider, body: dict) -> bytes:
        return json.dumps({**body, "model": p.spec.model}, separators=(",", ":")).encode()

    async def complete(self, body: dict, stream: bool) -> Answer | PoolError:
        s = self.settings
        deadline = time.monotonic() + s.total_timeout_ms / 1000
        tried: list[str] = []
        errors: list[str] = []
        running: dict[asyncio.Task, _Try] = {}

        def launch() -> bool:
            p = self._next(tried)
            if p is None:
                return False
            tried.append(p.name)
            task = asyncio.create_task(self._try(p, self.payload(p, body), stream, deadline))
            running[task] = _Try(p, time.monotonic(), asyncio.create_task(p.gone.wait()))
            return True

        if not launch():
            return self._unavailable()
        try:
            while running:
                now = time.monotonic()
                if now >= deadline:
                    break
                wake = deadline
                for tr in running.values():
                    if not tr.stalled:
                        at = tr.started + tr.provider.stall_after(stream)
                        # past its stall point with nowhere to hedge to: look again shortly
                        wake = min(wake, at if at > now else now + MONITOR_TICK_S)
                waits = set(running) | {tr.gone for tr in running.values() if not tr.stalled and not tr.gone.done()}
                done, _ = await asyncio.wait(waits, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED)
                for task in [t for t in done if t in running]:
                    tr = running.pop(task)
                    tr.gone.cancel()
                    exc = task.exception()
                    if exc is None:
                        answer: Answer = task.result()
                        answer.tries = len(tried)
                        if answer.status < 400:
                            tr.provider.ok(time.monotonic() - tr.started, stream)
                        if tr.stalled:
                            tr.provider.stalled -= 1
                        return answer
                    if tr.stalled:
                        tr.provider.stalled -= 1
                    assert isinstance(exc, TryFailed), exc
                    errors.append(f"{tr.provider.name}: {exc.reason}")
                    if exc.retry_after is not None:
                        tr.provider.throttled(exc.retry_after)
                    elif not tr.stalled:  # a stalled try was counted when it stalled
                        tr.provider.failed(exc.reason)
                    if len(tried) < s.max_tries:
                        launch()
                self._hedge(running, tried, stream, launch)
        finally:
            await self._abandon(running)
        if time.monotonic() >= deadline:
            errors.append(f"gave up after {s.total_timeout_ms} ms")
        if not errors:
            return self._unavailable()
        status = 429 if all("429" in e for e in errors) else (504 if "gave up" in errors[-1] else 502)
        return self._failed(PoolError(status, "no LLM provider could answer: " + "; ".join(errors),
                                      "requests" if status == 429 else "server_error",
                                      "rate_limit_exceeded" if status == 429 else "providers_failed",
                                      {"Retry-After": "1"}))

    @staticmethod
    def _failed(err: PoolError) -> PoolError:
        log.warning("LLM request %s answered %d: %s", err.ref, err.status, err.detail)
        return err

    def _hedge(self, running: dict[asyncio.Task, _Try], tried: list[str], stream: bool,
               launch: Callable[[], bool]) -> None:
        """A try past its stall point, or on a provider just found broken, gets a second try
        elsewhere; the first one to answer wins. Only judged when there is somewhere else to go,
        so a lone slow provider is waited for, not failed."""
        now = time.monotonic()
        for tr in list(running.values()):
            if tr.stalled:
                continue
            gone = tr.gone.done()
            if not gone and now < tr.started + tr.provider.stall_after(stream):
                continue
            if len(tried) >= self.settings.max_tries or self._next(tried) is None:
                continue
            tr.stalled = True
            tr.provider.stalled += 1
            if not gone:
                tr.provider.failed(f"stalled: no answer after {int((now - tr.started) * 1000)} ms")
            launch()

    async def _abandon(self, running: dict[asyncio.Task, _Try]) -> None:
        for task, tr in running.items():
            tr.gone.cancel()
            if tr.stalled:
                tr.provider.stalled -= 1
            task.cancel()
        for result in await asyncio.gather(*running, return_exceptions=True):
            if isinstance(result, Answer):  # answered in the same instant as the winner
                await result.aclose()

    async def _try(self, p: Provider, payload: bytes, stream: bool, deadline: float) -> Answer:
        p.requests += 1
        p.inflight += 1
        budget = min(p.timeout, deadline - time.monotonic())
        try:
            async with asyncio.timeout(budget):
                return await self._send(p, payload, stream)
        except TimeoutError:
            raise TryFailed(f"no answer within {int(budget * 1000)} ms") from None
        except httpx.HTTPError as exc:
            raise TryFailed(f"{type(exc).__name__}: {exc}"[:200]) from None
        except TryFailed:
            raise
        except Exception as exc:  # a bug or an odd answer must fail this try, not the request
            log.exception("LLM try to %s failed unexpectedly", p.name)
            raise TryFailed(f"{type(exc).__name__}: {exc}"[:200]) from None
        finally:
            p.inflight -= 1

    async def _send(self, p: Provider, payload: bytes, stream: bool) -> Answer:
        req = self.client.build_request("POST", p.url + "/chat/completions", content=payload,
                                        headers={**p.headers, "content-type": "application/json"})
        resp = await self.client.send(req, stream=True)
        handed_over = False
        try:
            status, ctype = resp.status_code, resp.headers.get("content-type", "application/json")
            if status == 429:
                await resp.aread()
                default = self.settings.rate_limit_default_ms / 1000
                raise TryFailed("HTTP 429", retry_after_seconds(resp.headers.get("retry-after"), default))
            if status >= 500 or status in FAILOVER_STATUS:
                await resp.aread()
                raise TryFailed(f"HTTP {status}")
            if not stream or status >= 400 or not ctype.startswith("text/event-stream"):
                body = bytearray()
                async for part in resp.aiter_bytes():
                    body += part
                    if len(body) > ANSWER_MAX_BYTES:
                        raise self._invalid(p, f"an answer over {ANSWER_MAX_BYTES} bytes")
                if 200 <= status < 300 and (why := answer_problem(bytes(body))):
                    raise self._invalid(p, why)
                return Answer(p.name, status, ctype, body=bytes(body))
            chunks = resp.aiter_raw()
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                raise TryFailed("empty stream") from None
            if why := stream_problem(first):
                raise self._invalid(p, why)
            handed_over = True
            return Answer(p.name, status, ctype, first=first, chunks=chunks, response=resp)
        finally:
            if not handed_over:
                await resp.aclose()

    @staticmethod
    def _invalid(p: Provider, why: str) -> TryFailed:
        REJECTS.note(LLM_ANSWER, f"provider {p.name}: {why}")
        return TryFailed(f"invalid answer: {why}")

    # --- background: health checks, probes, staff controls --------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._monitor(), name="llm-monitor")]
        if self.redis is not None and self.keys is not None:
            self._tasks.append(asyncio.create_task(self._control_loop(), name="llm-control"))

    async def aclose(self) -> None:
        self._stopping = True
        pending = set(self._tasks)
        for _ in range(10):
            if not pending:
                break
            # cancel again if needed: a cancellation that lands inside a Redis call can be swallowed there
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        await self.client.aclose()

    async def _monitor(self) -> None:
        interval = self.settings.health_interval_ms / 1000
        next_check = 0.0
        checks: set[asyncio.Task] = set()
        probes: set[asyncio.Task] = set()
        try:
            while not self._stopping:
                now = time.monotonic()
                checks = {t for t in checks if not t.done()}
                probes = {t for t in probes if not t.done()}
                if now >= next_check and not checks:
                    next_check = now + interval
                    checks = {asyncio.create_task(self._check(p)) for p in self.providers}
                for p in self.providers:
                    if p.name not in self._probing and p.breaker.probe_due(now) and p.health_ok is not False:
                        self._probing.add(p.name)
                        probes.add(asyncio.create_task(self._probe(p)))
                await asyncio.sleep(MONITOR_TICK_S)
        finally:
            for t in checks | probes:
                t.cancel()
            await asyncio.gather(*checks, *probes, return_exceptions=True)

    async def _check(self, p: Provider) -> None:
        """Cheap reachability check: GET /models. It can open a breaker, never close one: a
        provider whose model list answers may still hang on completions."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.health_timeout_ms / 1000):
                resp = await self.client.get(p.url + "/models", headers=p.headers)
            ok = resp.status_code < 500 and resp.status_code not in (401, 403)
            error = None if ok else f"health check: HTTP {resp.status_code}"
        except TimeoutError:
            ok, error = False, f"health check: no answer within {self.settings.health_timeout_ms} ms"
        except httpx.HTTPError as exc:
            ok, error = False, f"health check: {type(exc).__name__}"
        p.health_ok = ok
        p.health_latency_ms = round((time.monotonic() - started) * 1000, 2) if ok else None
        if ok:
            p.health_failures = 0
            return
        p.health_failures += 1
        p.last_error = error
        if p.health_failures >= self.settings.health_fall and p.breaker.state == "closed":
            p.breaker.trip(time.monotonic(), f"{p.health_failures} failed {error}s")

    async def _probe(self, p: Provider) -> None:
        """Half-open: one tiny real completion decides, so no user request is the guinea pig."""
        try:
            p.breaker.start_probe(time.monotonic())
            p.probes += 1
            try:
                answer = await self._try(p, self.payload(p, PROBE_BODY), False, time.monotonic() + p.timeout)
            except TryFailed as exc:
                if exc.retry_after is not None:  # rate limited means alive
                    p.throttled(exc.retry_after)
                    p.breaker.success(time.monotonic())
                else:
                    p.failed(f"probe: {exc.reason}")
                return
            if answer.status < 400:
                p.breaker.success(time.monotonic())
            else:
                p.failed(f"probe: HTTP {answer.status}")
        finally:
            p.requests -= 1  # probes are not user requests
            self._probing.discard(p.name)

    # --- staff controls (shared through Redis) ---------------------------------------------------
    def apply_controls(self, fields: dict[str, str]) -> None:
        pin = fields.get("pin") or None
        self.pinned = pin if pin in self.by_name else None
        for p in self.providers:
            p.pinned = p.name == self.pinned
            who = fields.get(f"disabled:{p.name}")
            if who is not None and p.disabled_by is None:
                log.warning("LLM provider %s disabled by %s", p.name, who)
                p.disabled_by = who
                p.mark_gone()
            elif who is None and p.disabled_by is not None:
                log.warning("LLM provider %s enabled again", p.name)
                p.disabled_by = None
                if p.breaker.state == "closed":
                    p.mark_back()

    async def read_controls(self) -> dict[str, str]:
        """Checked (ctops.integrity): bytes that are not UTF-8 or a key of another type raise Corrupt."""
        assert self.redis is not None and self.keys is not None
        got = await integrity.read_hash(self.redis, self.keys.llm_control, CONTROL_KIND)
        return got[0] if got else {}

    async def sync_controls(self) -> None:
        controls = await self.read_controls()
        self.apply_controls(controls)
        self._last_controls = controls

    async def _contain_controls(self) -> None:
        """Damaged staff controls: set aside and rewritten from the controls this pool last applied
        (they were intact then), so every dispatcher keeps the same pins and disabled providers."""
        assert self.redis is not None and self.keys is not None
        key, last = self.keys.llm_control, dict(self._last_controls)

        def replace(p, _qid: str) -> None:  # noqa: ANN001 - a redis pipeline
            if last:
                p.hset(key, mapping=last)

        done = await integrity.contain(self.redis, self.keys, key, CONTROL_KIND,
                                       lambda c: integrity.read_hash(c, key, CONTROL_KIND),
                                       reader=f"dispatcher:{self.name or '?'}", replace=replace, repaired=bool(last))
        if done is not None:
            log.error("LLM controls %s were damaged (%s): set aside as %s, %s", key, done.reason, done.qid,
                      "rewritten from the last intact copy" if last else "cleared (no intact copy known)")

    async def _control_loop(self) -> None:
        while not self._stopping:
            try:
                await self.sync_controls()
                self._control_error_logged = False
            except Corrupt:
                try:
                    await self._contain_controls()
                except (RedisError, OSError) as exc:
                    log.warning("cannot set damaged LLM controls aside: %s", exc)
            except (RedisError, OSError) as exc:
                if not self._control_error_logged:  # keep the last known controls; say so once
                    log.warning("cannot read LLM controls from Redis: %s", exc)
                    self._control_error_logged = True
            await asyncio.sleep(self.settings.control_poll_ms / 1000)

    async def control(self, action: str, name: str, who: str) -> None:
        """Store a staff action in Redis (every dispatcher polls it) and apply it here at once."""
        if self.redis is None or self.keys is None:
            raise RuntimeError("LLM pool has no Redis for staff controls")
        key = self.keys.llm_control
        if action == "pin":
            await self.redis.hset(key, "pin", name)
        elif action == "unpin":
            if await self.redis.hget(key, "pin") in (name, name.encode()):
                await self.redis.hdel(key, "pin")
        elif action == "disable":
            await self.redis.hset(key, f"disabled:{name}", who)
            if await self.redis.hget(key, "pin") in (name, name.encode()):
                await self.redis.hdel(key, "pin")  # a disabled provider cannot stay pinned
        elif action == "enable":
            await self.redis.hdel(key, f"disabled:{name}")
        else:
            raise ValueError(action)
        await self.sync_controls()

    def view(self) -> LLMPoolView:
        return LLMPoolView(served_by=self.name, pinned=self.pinned, models=self.models,
                           providers=[p.view() for p in self.providers])

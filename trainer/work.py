"""A submission's steps, checkpointed in Redis so that any trainer server can finish what another began.

received -> tested -> review_requested -> review_received | review_deferred -> done

The server working on a submission holds its lease (renewed while it works) and writes each step's
result, fenced by the lease, before starting the next. A server resuming one skips every step whose
result is already written, so the tests run and a review is received at most once. Unfinished work
is listed in a sorted set; each server scans it and takes over the work whose lease has expired,
and a learner's poll does the same for the submission it asks about.

A review that no provider gave in time is deferred: the submission is done with the test results
and its review pending; a retry loop on every server fills pending reviews in, one server per
review (a lease of its own), with a per-review backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import cast

from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from ctops.config import Deployment
from ctops.keys import Keys
from trainer import review as rv
from trainer import sandbox
from trainer.exercises import EXERCISES
from trainer.lease import Lease, LeaseLost
from trainer.review import Reviewer
from trainer.store import TTL_SECONDS, Store, now_ms

log = logging.getLogger("trainer.work")

# all open work is looked at each pass (it is bounded by what the servers are running), so work
# held by live servers at the front of the list cannot hide a dead server's work behind it
SCAN_MAX = 2000
REVIEW_BATCH = 50
# one retry pass fills at most this many pending reviews at once
REVIEW_PARALLEL = 4
# a submission taken over this many times without finishing (its checkpoint or its code keeps
# killing whoever works on it) is marked failed instead of being retried forever
MAX_TAKEOVERS = 5


def _members(reply: object) -> list[str]:
    """A sorted set's members without scores from `Store.r`, a text client (redis-py types the
    reply for every decoding and WITHSCORES at once)."""
    return cast("list[str]", reply)


def step(sub: dict, name: str, server: str) -> None:
    sub.setdefault("steps", []).append({"step": name, "server": server, "at_ms": now_ms()})


def has(sub: dict, name: str) -> bool:
    return any(s["step"] == name for s in sub.get("steps", []))


class Worker:
    def __init__(self, store: Store, keys: Keys, server: str, deployment: Deployment, reviewer: Reviewer,
                 runs: asyncio.Semaphore) -> None:
        self.store = store
        self.r = store.r
        self.k = keys
        self.server = server
        self.deployment = deployment
        self.settings = deployment.trainer
        self.reviewer = reviewer
        self.runs = runs
        self.tasks: dict[str, asyncio.Task] = {}
        self.reviewing: set[str] = set()
        self._loops: list[asyncio.Task] = []

    def lease(self, sub_id: str) -> Lease:
        return Lease(self.r, self.k.submission_lease(sub_id), self.server, self.settings.lease_ttl_ms)

    # --- starting and taking over -------------------------------------------------------------------
    def start(self, sub_id: str, lease: Lease) -> None:
        """Work on a submission whose lease this server already holds."""
        if sub_id in self.tasks:
            return
        task = asyncio.create_task(self._process(sub_id, lease), name=f"submission {sub_id}")
        self.tasks[sub_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(sub_id, None))

    async def try_resume(self, sub_id: str) -> bool:
        """Take the submission over if nobody holds its lease (its server died or never started it)."""
        if sub_id in self.tasks:
            return False
        lease = self.lease(sub_id)
        if not await lease.acquire():
            return False
        counter = self.k.submission_takeovers(sub_id)
        async with self.r.pipeline(transaction=True) as p:
            p.incr(counter)
            p.expire(counter, TTL_SECONDS)
            takeovers, _ = await p.execute()
        if takeovers > MAX_TAKEOVERS:
            await self._give_up(sub_id, lease, takeovers)
            return False
        log.info("taking over submission %s (takeover %d)", sub_id, takeovers)
        self.start(sub_id, lease)
        return True

    async def _give_up(self, sub_id: str, lease: Lease, takeovers: int) -> None:
        reason = f"taken over {takeovers - 1} times without finishing"
        log.error("submission %s: %s; marked failed", sub_id, reason)
        try:
            sub = await self.store.get_submission(sub_id)
            if sub is None or sub.get("status") in ("done", "failed"):
                await lease.write(lambda p: p.zrem(self.k.submissions_open, sub_id))
                return
            sub.update(status="failed", verdict="error", failed_reason=reason, finished_ms=now_ms(),
                       message=f"the servers gave up on this submission ({reason}); submit your code again")
            step(sub, "failed", self.server)
            await self._checkpoint(lease, sub, [lambda p: p.zrem(self.k.submissions_open, sub_id)])
        except LeaseLost:
            pass
        finally:
            await lease.release()

    # --- the steps ----------------------------------------------------------------------------------
    async def _checkpoint(self, lease: Lease, sub: dict, extra: list | None = None) -> None:
        sub["server"] = self.server
        writes = self.store.submission_writes(sub)

        def ops(p: Pipeline) -> None:
            writes(p)
            for fn in extra or ():
                fn(p)

        await lease.write(ops)

    async def _process(self, sub_id: str, lease: Lease) -> None:
        try:
            async with lease.kept():
                await self._steps(sub_id, lease)
        except LeaseLost:
            log.warning("submission %s: lease lost to another server; dropped without writing", sub_id)
        except (RedisError, OSError) as exc:
            # the lease lapses and another server (or this one's scanner) resumes from the last step
            log.warning("submission %s: Redis failed (%s); left for a takeover", sub_id, exc)
        except Exception:
            log.exception("submission %s: unexpected error; left for a takeover", sub_id)

    async def _steps(self, sub_id: str, lease: Lease) -> None:
        sub = await self.store.get_submission(sub_id)
        if sub is None or sub.get("status") in ("done", "failed"):
            await lease.write(lambda p: p.zrem(self.k.submissions_open, sub_id))
            return
        exercise = EXERCISES[sub["exercise_id"]]
        if not has(sub, "tested"):
            sub["status"] = "running"
            await self._checkpoint(lease, sub)
            async with self.runs:
                await self.r.incr(self.k.sandbox_runs)
                try:
                    result = (await sandbox.run(exercise, sub["code"], self.deployment.sandbox)).to_dict()
                except Exception:
                    log.exception("submission %s: the sandbox failed", sub_id)
                    result = {"verdict": "error", "message": "the server could not run your code; try again",
                              "tests": [], "duration_ms": 0}
            if lease.lost:
                raise LeaseLost(lease.key)
            sub.update(result, status="reviewing")
            step(sub, "tested", self.server)
            await self._checkpoint(lease, sub)
        if not has(sub, "review_received") and not has(sub, "review_deferred"):
            if not self.reviewer.configured:
                sub["review"] = rv.unavailable("no LLM provider is configured")
                step(sub, "review_received", self.server)
            else:
                if not has(sub, "review_requested"):
                    step(sub, "review_requested", self.server)
                    await self._checkpoint(lease, sub)
                got = await self.reviewer.review(exercise, sub["code"], sub)
                if got is None:
                    sub["review"] = rv.pending()
                    step(sub, "review_deferred", self.server)
                else:
                    sub["review"] = got
                    step(sub, "review_received", self.server)
            await self._checkpoint(lease, sub)
        deferred = sub["review"]["status"] == "pending"
        sub.update(status="done", finished_ms=now_ms())
        step(sub, "done", self.server)
        retry_at = now_ms() + self.settings.review_retry_initial_ms

        def finish(p: Pipeline) -> None:
            p.zrem(self.k.submissions_open, sub_id)
            if deferred:
                p.zadd(self.k.reviews_pending, {sub_id: retry_at})

        await self._checkpoint(lease, sub, [finish])
        await self.store.touch(sub["session_id"])

    # --- background loops -----------------------------------------------------------------------------
    def start_loops(self) -> None:
        self._loops = [asyncio.create_task(self._every(self.scan_open), name="scan open submissions"),
                       asyncio.create_task(self._every(self.retry_reviews), name="retry pending reviews")]

    async def stop(self) -> None:
        for t in [*self._loops, *self.tasks.values()]:
            t.cancel()
        for t in [*self._loops, *self.tasks.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _every(self, fn: Callable[[], Awaitable[None]]) -> None:
        interval = self.settings.scan_interval_ms / 1000
        while True:
            # jitter keeps the servers from scanning in lockstep
            await asyncio.sleep(interval * random.uniform(0.75, 1.25))
            try:
                await fn()
            except (RedisError, OSError) as exc:
                log.warning("%s: Redis failed: %s", fn.__name__, exc)
            except Exception:
                log.exception("%s failed", fn.__name__)

    async def scan_open(self) -> None:
        ids = _members(await self.r.zrange(self.k.submissions_open, 0, SCAN_MAX - 1))
        ids = [i for i in ids if i not in self.tasks]
        if not ids:
            return
        async with self.r.pipeline(transaction=False) as p:
            for i in ids:
                p.exists(self.k.submission_lease(i))
            held = await p.execute()
        for sub_id, is_held in zip(ids, held, strict=True):
            if not is_held:
                await self.try_resume(sub_id)

    async def retry_reviews(self) -> None:
        due = _members(await self.r.zrangebyscore(self.k.reviews_pending, "-inf", now_ms(), start=0, num=REVIEW_BATCH))
        due = [d for d in due if d not in self.reviewing]
        sem = asyncio.Semaphore(REVIEW_PARALLEL)

        async def one(sub_id: str) -> None:
            async with sem:
                await self._fill_review(sub_id)

        await asyncio.gather(*(one(d) for d in due))

    async def _fill_review(self, sub_id: str) -> None:
        lease = Lease(self.r, self.k.review_lease(sub_id), self.server, self.settings.lease_ttl_ms)
        if not await lease.acquire():
            return
        self.reviewing.add(sub_id)
        try:
            async with lease.kept():
                sub = await self.store.get_submission(sub_id)
                if sub is None or sub.get("review", {}).get("status") != "pending":
                    await lease.write(lambda p: p.zrem(self.k.reviews_pending, sub_id))
                    return
                got = await self.reviewer.review(EXERCISES[sub["exercise_id"]], sub["code"], sub, probe=True)
                if got is None:
                    attempts = sub["review"].get("attempts", 0) + 1
                    sub["review"] = rv.pending(attempts)
                    delay = min(self.settings.review_retry_initial_ms * 2 ** attempts,
                                self.settings.review_retry_max_ms)
                    await self._checkpoint(lease, sub, [lambda p: p.zadd(self.k.reviews_pending,
                                                                         {sub_id: now_ms() + delay})])
                    return
                sub["review"] = got
                step(sub, "review_received", self.server)
                await self._checkpoint(lease, sub, [lambda p: p.zrem(self.k.reviews_pending, sub_id)])
                log.info("pending review of %s filled by %s", sub_id, got["provider"])
                await self._bring_forward()
        except LeaseLost:
            log.warning("review of %s: lease lost; another server fills it", sub_id)
        finally:
            self.reviewing.discard(sub_id)

    async def _bring_forward(self) -> None:
        """A provider answered again: the other pending reviews need not wait out their backoff."""
        waiting = _members(await self.r.zrange(self.k.reviews_pending, 0, 999))
        if waiting:
            await self.r.zadd(self.k.reviews_pending, dict.fromkeys(waiting, now_ms()), xx=True, lt=True)

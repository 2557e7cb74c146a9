"""`ctops bench store-failover`: the same learner load and the same SIGKILL of the store's primary
against (a) ctops's duplicated store, tuned (Sentinel down-after 1000 ms, failover-timeout 5000 ms,
every transaction confirmed by a replica with WAIT), (b) the same topology with Sentinel's defaults
(down-after 30000 ms, failover-timeout 180000 ms), (c) one Redis (AOF everysec) restarted by its
supervisor RESTART_DELAY_S after the kill, on its own data directory.

Learners (real HTTP through the dispatcher to real trainers) open sessions and submit code with an
Idempotency-Key, polling for results; they do not retry a failed request beyond starting the next one.
Measured per setup:
- failed: learner requests answered with an error or not at all (timeout REQUEST_TIMEOUT_S);
- writes back: from the SIGKILL until a learner write (session or submission) sent after the kill
  was acknowledged;
- acknowledged lost: every session (201), submission (202) and result seen "done" that the load was
  given, read back from the store afterwards (the store of record, not a trainer);
- p99 of the requests in flight during the fault (the kill until writes were back).
Also the steady-state cost of WAIT: submission (POST) p50/p99 with `[redis] replica_acks = 1` and
`= 0`: two clusters on one tuned store, loaded in turn WAIT_ROUNDS times each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from ctops.envelope import Corrupt, unseal
from ctops.integrity import SUBMISSION
from ctops.keys import Keys
from ctops_tools.load import SOLUTIONS, percentile
from ctops_tools.localcluster import QUICK_TIMINGS, Cluster, wait_for
from ctops_tools.redis_embed import EmbeddedRedis, EmbeddedStore

TARGET_FAILED, TARGET_WRITES_BACK_S, TARGET_LOST = 0, 3.0, 0
LEARNERS = 6
WARM_S = 3.0
WINDOW_S = 15.0  # load after the kill
DEFAULTS_WINDOW_S = 40.0  # Sentinel's defaults need 30 s only to call the primary down
RESTART_DELAY_S = 0.3
REQUEST_TIMEOUT_S = 10.0
POLL_EVERY_S = 0.1
SUBMISSIONS_PER_SESSION = 5
WAIT_ROUNDS, WAIT_ROUND_S = 4, 8.0
WRITES = ("session", "submission")

SETUPS = {"tuned": "(a) ctops tuned Sentinel + WAIT", "defaults": "(b) Sentinel defaults (30 s)",
          "single": "(c) one Redis, supervisor restart"}


@dataclass
class Call:
    kind: str  # session | submission | poll
    start: float
    end: float
    ok: bool
    outcome: str  # the status code, or the error's kind


@dataclass
class LearnerLoad:
    """Learners against one data URL, recording every call and every acknowledgement they got."""

    url: str
    timeout: float = REQUEST_TIMEOUT_S
    calls: list[Call] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    submissions: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)  # submissions the learner saw "done"

    async def _call(self, http: httpx.AsyncClient, kind: str, method: str, path: str,
                    **kw: Any) -> httpx.Response | None:
        start = time.monotonic()
        try:
            r = await http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.calls.append(Call(kind, start, time.monotonic(), False, type(exc).__name__))
            return None
        self.calls.append(Call(kind, start, time.monotonic(), r.status_code < 400, str(r.status_code)))
        return r if r.status_code < 400 else None

    async def learner(self, stop: threading.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as http:
            sid, made = None, 0
            while not stop.is_set():
                if sid is None or made >= SUBMISSIONS_PER_SESSION:
                    r = await self._call(http, "session", "POST", "/api/sessions",
                                         json={"learner": f"bench-{uuid.uuid4().hex[:6]}"},
                                         headers={"Idempotency-Key": uuid.uuid4().hex})
                    if r is None:
                        await asyncio.sleep(0.2)
                        continue
                    sid, made = r.json()["session_id"], 0
                    self.sessions.append(sid)
                exercise = random.choice(list(SOLUTIONS))
                made += 1
                r = await self._call(http, "submission", "POST", f"/api/sessions/{sid}/submissions",
                                     json={"exercise_id": exercise, "code": SOLUTIONS[exercise]},
                                     headers={"Idempotency-Key": uuid.uuid4().hex})
                if r is None:
                    await asyncio.sleep(0.2)
                    continue
                sub_id = r.json()["submission_id"]
                self.submissions.append(sub_id)
                while not stop.is_set():
                    await asyncio.sleep(POLL_EVERY_S)
                    r = await self._call(http, "poll", "GET", f"/api/sessions/{sid}/submissions/{sub_id}")
                    if r is not None and r.json().get("status") == "done":
                        self.results.append(sub_id)
                        break


def drive(load: LearnerLoad, learners: int, warm_s: float, window_s: float,
          fault: Callable[[], float] | None) -> tuple[float, float | None]:
    """Learners for warm_s, then the fault (it returns when it struck), then window_s more.
    Returns (when the load started, when the fault struck). The learners run in a thread of their
    own: the fault starts processes from this one, and a process started from a thread that ends
    would die with it (PR_SET_PDEATHSIG)."""
    stop = threading.Event()

    async def all_learners() -> None:
        await asyncio.gather(*(load.learner(stop) for _ in range(learners)))

    thread = threading.Thread(target=asyncio.run, args=(all_learners(),), name="learners", daemon=True)
    started = time.monotonic()
    thread.start()
    time.sleep(warm_s)
    struck = fault() if fault else None
    time.sleep(max(0.0, window_s - (time.monotonic() - (struck or time.monotonic()))))
    stop.set()
    thread.join(REQUEST_TIMEOUT_S + 5)
    return started, struck


def read_back(admin: redis.Redis, prefix: str, load: LearnerLoad) -> dict[str, int]:
    """Every acknowledgement the load got, looked up in the store: what is missing was lost."""
    k = Keys(prefix)
    p = admin.pipeline(transaction=False)
    for sid in load.sessions:
        p.exists(k.session(sid))
    for sub_id in [*load.submissions, *load.results]:
        p.get(k.submission(sub_id))
    found = p.execute()
    sessions, rest = found[:len(load.sessions)], found[len(load.sessions):]
    subs, results = rest[:len(load.submissions)], rest[len(load.submissions):]

    def done(sub_id: str, raw: bytes | None) -> bool:
        # submissions are sealed records (ctops.envelope); a damaged one counts as lost
        try:
            rec = unseal(k.submission(sub_id), raw, SUBMISSION)
        except Corrupt:
            return False
        return rec is not None and json.loads(rec.payload).get("status") == "done"

    return {"sessions": sum(1 for x in sessions if not x), "submissions": sum(1 for x in subs if not x),
            "results": sum(1 for sub_id, x in zip(load.results, results, strict=True) if not done(sub_id, x))}


def summarize(load: LearnerLoad, started: float, struck: float | None, lost: dict[str, int]) -> dict[str, Any]:
    failed = [c for c in load.calls if not c.ok]
    out: dict[str, Any] = {
        "requests": len(load.calls), "failed": len(failed), "failures": dict(Counter(c.outcome for c in failed)),
        "acknowledged": {"sessions": len(load.sessions), "submissions": len(load.submissions),
                         "results": len(load.results)},
        "lost": lost, "acknowledged_lost": sum(lost.values()),
        "p99_before_ms": _p99([c for c in load.calls if c.end < (struck or float("inf"))]),
        "duration_s": round(max((c.end for c in load.calls), default=started) - started, 1)}
    if struck is not None:
        back = [c.end for c in load.calls if c.kind in WRITES and c.ok and c.start >= struck]
        writes_back = min(back) - struck if back else None
        until = struck + writes_back if writes_back is not None else float("inf")
        out |= {"writes_back_s": round(writes_back, 2) if writes_back is not None else None,
                "p99_fault_ms": _p99([c for c in load.calls if c.start <= until and c.end >= struck]),
                "failed_after_kill": sum(1 for c in failed if c.end >= struck)}
    return out


def _p99(calls: list[Call]) -> float | None:
    return round(percentile([c.end - c.start for c in calls], 99) * 1000, 1) if calls else None


def _kill_primary(store: EmbeddedStore) -> Callable[[], float]:
    def fault() -> float:
        node = store.primary()
        struck = time.monotonic()
        node.proc.kill()  # type: ignore[union-attr]
        return struck
    return fault


def _kill_and_restart(node: EmbeddedRedis, delay: float) -> Callable[[], float]:
    def fault() -> float:
        old = node.proc
        assert old is not None
        struck = time.monotonic()
        old.kill()
        old.wait()
        if old.stderr:
            old.stderr.close()
        time.sleep(delay)  # what a supervisor takes to notice and start it again
        node.start()
        return struck
    return fault


def _live_admin(store: EmbeddedStore | EmbeddedRedis) -> redis.Redis:
    """An admin client of the node that takes writes now (after a failover: the promoted one)."""
    def probe() -> redis.Redis | None:
        node = store.primary() if isinstance(store, EmbeddedStore) else store
        r = node.admin()
        if r.info("replication")["role"] == "master":
            return r
        r.close()
        return None
    return wait_for("a primary to read back from", probe, timeout=240, every=0.5)


def scenario(setup: str, root: Path, *, learners: int = LEARNERS, warm_s: float = WARM_S,
             window_s: float | None = None) -> dict[str, Any]:
    """One setup: a fresh store and cluster, learners, the SIGKILL, the read-back."""
    root.mkdir(parents=True, exist_ok=True)
    store: EmbeddedStore | EmbeddedRedis
    if setup == "single":
        store = EmbeddedRedis(data_dir=str(root / "redis"), appendonly=True).start()
        fault = _kill_and_restart(store, RESTART_DELAY_S)
    else:
        timings: dict[str, Any] = ({"down_after_ms": 30_000, "failover_timeout_ms": 180_000}
                                   if setup == "defaults" else {})
        store = EmbeddedStore(root / "store", **timings).start()
        fault = _kill_primary(store)
    if window_s is None:
        window_s = DEFAULTS_WINDOW_S if setup == "defaults" else WINDOW_S
    prefix = f"bsf-{setup}"
    try:
        (root / "c").mkdir(exist_ok=True)
        # the timings its figures were first measured with (a trainer that cannot reach the store leaves
        # rotation as quickly as it did then)
        c = Cluster(root / "c", store, prefix, trainers=2, timings=QUICK_TIMINGS)
        if isinstance(store, EmbeddedRedis):
            # a deployment keeps its users in the ACL file, so they are there again after a restart
            with store.admin() as r:
                r.execute_command("ACL", "SAVE")
        try:
            c.start_all()
            load = LearnerLoad(c.data_url())
            started, struck = drive(load, learners, warm_s, window_s, fault)
        finally:
            c.stop()
        with _live_admin(store) as admin:
            lost = read_back(admin, prefix, load)
    finally:
        store.stop()
    return {"setup": setup, "label": SETUPS[setup], **summarize(load, started, struck, lost)}


def wait_cost(root: Path, *, learners: int = LEARNERS, rounds: int = WAIT_ROUNDS,
              round_s: float = WAIT_ROUND_S) -> dict[str, Any]:
    """Submission latency with and without WAIT: two clusters on one tuned store, loaded in turn."""
    store = EmbeddedStore(root / "store").start()
    clusters: dict[int, Cluster] = {}
    lat: dict[int, list[float]] = {1: [], 0: []}
    failed: dict[int, int] = {1: 0, 0: 0}
    try:
        for acks in (1, 0):
            (root / f"acks{acks}").mkdir(parents=True)
            clusters[acks] = Cluster(root / f"acks{acks}", store, f"bsf-acks{acks}", trainers=2,
                                     redis_extra=f"replica_acks = {acks}", timings=QUICK_TIMINGS)
            clusters[acks].start_all()
        for i in range(rounds):
            for acks in ((1, 0) if i % 2 == 0 else (0, 1)):  # alternate which goes first
                load = LearnerLoad(clusters[acks].data_url())
                started, _ = drive(load, learners, round_s, 0.0, None)
                lat[acks] += [c.end - c.start for c in load.calls if c.kind == "submission" and c.ok
                              and c.start >= started + 0.5]
                failed[acks] += sum(1 for c in load.calls if not c.ok)
    finally:
        for c in clusters.values():
            c.stop()
        store.stop()
    return {f"acks_{a}": {"submissions": len(v), "failed": failed[a],
                          "p50_ms": round(percentile(v, 50) * 1000, 1), "p99_ms": round(percentile(v, 99) * 1000, 1)}
            for a, v in lat.items()}


def _fmt(v: object, unit: str = "") -> str:
    return "never" if v is None else f"{v}{unit}"


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="ctops-bench-sf-"))
    try:
        results = [scenario(s, root / s) for s in SETUPS]
        wait = wait_cost(root / "wait")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    targets = {"failed": TARGET_FAILED, "writes_back_s": TARGET_WRITES_BACK_S, "acknowledged_lost": TARGET_LOST}
    doc = {"targets": targets,
           "learners": LEARNERS, "warm_s": WARM_S, "restart_delay_s": RESTART_DELAY_S,
           "request_timeout_s": REQUEST_TIMEOUT_S, "setups": results, "wait_cost": wait}
    print(json.dumps(doc, indent=2) if args.json else table(doc))
    return 0


def table(doc: dict[str, Any]) -> str:
    t = doc["targets"]
    out = [f"store failover: {doc['learners']} learners through the dispatcher to 2 trainers, SIGKILL of the "
           f"primary after {doc['warm_s']:.0f} s; targets: {t['failed']} failed, writes back ≤ "
           f"{t['writes_back_s']:.0f} s, {t['acknowledged_lost']} acknowledged lost",
           f"{'setup':<36} {'requests':>8} {'failed':>6} {'writes back':>11} {'acked':>6} {'lost':>5} "
           f"{'p99 fault':>10} {'p99 before':>10}"]
    for r in doc["setups"]:
        out.append(f"{r['label']:<36} {r['requests']:>8} {r['failed']:>6} {_fmt(r['writes_back_s'], ' s'):>11} "
                   f"{sum(r['acknowledged'].values()):>6} {r['acknowledged_lost']:>5} "
                   f"{_fmt(r['p99_fault_ms'], ' ms'):>10} {_fmt(r['p99_before_ms'], ' ms'):>10}")
    out += [f"  {r['setup']}: failures {r['failures']}" for r in doc["setups"] if r["failures"]]
    a1, a0 = doc["wait_cost"]["acks_1"], doc["wait_cost"]["acks_0"]
    out.append(f"WAIT cost, steady state (one tuned store, {WAIT_ROUNDS} alternating rounds of {WAIT_ROUND_S:.0f} s "
               f"each): submission p50/p99 {a1['p50_ms']}/{a1['p99_ms']} ms with replica_acks = 1 "
               f"({a1['submissions']} submissions), {a0['p50_ms']}/{a0['p99_ms']} ms with 0 ({a0['submissions']})")
    return "\n".join(out)

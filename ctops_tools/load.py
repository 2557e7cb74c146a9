"""`ctops load`: simulated learners against the dispatchers, counting what a learner would notice.

Each learner opens a session, submits exercises (with an Idempotency-Key, as the browser does)
and polls until the result arrives. When an address refuses the connection the learner moves to
the next one, as a browser behind a floating address would. At the end every session is read
back to count submissions executed more than once (`duplicates`) or never (`lost`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx

from ctops import statefile

SOLUTIONS = {
    "fizzbuzz": "def fizzbuzz(n):\n    return 'FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 "
                "else 'Buzz' if n % 5 == 0 else str(n)\n",
    "reverse_words": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
    "is_prime": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
    "sum_digits": "def sum_digits(n):\n    return sum(int(c) for c in str(abs(n)))\n",
    "anagram": "def is_anagram(a, b):\n    key = lambda s: sorted(s.lower().replace(' ', ''))\n"
               "    return key(a) == key(b)\n",
}
WRONG = "def fizzbuzz(n):\n    return str(n)\n"
POLL_EVERY = 0.1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


@dataclass
class Report:
    requests: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    moved: int = 0
    submissions_started: int = 0
    submissions_completed: int = 0
    results_seen: Counter[str] = field(default_factory=Counter)  # submission id -> results received
    sessions: dict[str, int] = field(default_factory=dict)  # session id -> submissions made
    duplicates: int = 0
    lost: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0

    def as_dict(self) -> dict:
        dur = (self.ended or time.monotonic()) - self.started
        return {
            "duration_s": round(dur, 2),
            "requests": self.requests,
            "failed": sum(self.failures.values()),
            "failures": dict(self.failures),
            "rps": round(self.requests / dur, 1) if dur else 0,
            "latency_ms": {k: round(percentile(self.latencies, q) * 1000, 2)
                           for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "moved_to_next_address": self.moved,
            "submissions": {"started": self.submissions_started, "completed": self.submissions_completed,
                            "duplicates": self.duplicates, "lost": self.lost},
            "sessions": len(self.sessions),
        }


class Failed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Learner:
    def __init__(self, urls: list[str], report: Report, timeout: float) -> None:
        self.urls, self.report = urls, report
        self.current = random.randrange(len(urls))
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)))

    async def request(self, method: str, path: str, **kw: object) -> httpx.Response:
        """One learner-visible request. A refused address moves to the next, as a browser would;
        so does a connection lost mid-request when the request is safe to send again (a GET, or a
        POST with an Idempotency-Key), as a browser retries a request on a dead keep-alive connection."""
        start = time.monotonic()
        self.report.requests += 1
        headers = kw.get("headers") or {}
        safe = method == "GET" or "Idempotency-Key" in headers  # type: ignore[operator]
        for attempt in range(len(self.urls) + 1):
            url = self.urls[self.current]
            try:
                r = await self.client.request(method, url + path, **kw)  # type: ignore[arg-type]
            except (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
                kind = "connect" if isinstance(exc, httpx.ConnectError) else type(exc).__name__
                if kind != "connect" and not safe:
                    self.report.failures[kind] += 1
                    raise Failed(kind) from None
                self.current = (self.current + 1) % len(self.urls)
                self.report.moved += 1
                if attempt == len(self.urls):
                    self.report.failures[kind] += 1
                    raise Failed(kind) from None
                continue
            except httpx.TimeoutException:
                self.report.failures["timeout"] += 1
                raise Failed("timeout") from None
            except httpx.HTTPError as exc:
                kind = type(exc).__name__
                self.report.failures[kind] += 1
                raise Failed(kind) from None
            self.report.latencies.append(time.monotonic() - start)
            if r.status_code >= 400:
                kind = f"http_{r.status_code}"
                self.report.failures[kind] += 1
                raise Failed(kind)
            return r
        raise Failed("connect")

    async def run(self, deadline: float) -> None:
        try:
            r = await self.request("POST", "/api/sessions", json={"learner": f"load-{uuid.uuid4().hex[:6]}"},
                                   headers={"Idempotency-Key": uuid.uuid4().hex})
            sid = r.json()["session_id"]
        except (Failed, ValueError, KeyError):
            return
        self.report.sessions[sid] = 0
        while time.monotonic() < deadline:
            exercise = random.choice(list(SOLUTIONS))
            code = SOLUTIONS[exercise] if random.random() < 0.8 or exercise != "fizzbuzz" else WRONG
            try:
                await self.submit(sid, exercise, code, deadline)
            except Failed:
                await asyncio.sleep(0.2)

    async def submit(self, sid: str, exercise: str, code: str, deadline: float) -> None:
        key = uuid.uuid4().hex
        self.report.submissions_started += 1
        self.report.sessions[sid] += 1
        r = await self.request("POST", f"/api/sessions/{sid}/submissions", json={"exercise_id": exercise, "code": code},
                               headers={"Idempotency-Key": key})
        doc = r.json()
        sub_id = doc["submission_id"]
        # a learner keeps polling for a result a while after the run ends
        while doc.get("status", "done") != "done" and time.monotonic() < deadline + 30:
            await asyncio.sleep(POLL_EVERY)
            doc = (await self.request("GET", f"/api/sessions/{sid}/submissions/{sub_id}")).json()
        if doc.get("status", "done") == "done":
            self.report.submissions_completed += 1
            self.report.results_seen[sub_id] += 1

    async def aclose(self) -> None:
        await self.client.aclose()


async def verify(urls: list[str], report: Report, timeout: float) -> None:
    """Read every session back: more stored submissions than made means one ran twice."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        for sid, made in report.sessions.items():
            for url in urls:
                try:
                    r = await client.get(f"{url}/api/sessions/{sid}")
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    stored = len(r.json().get("submissions", []))
                    report.duplicates += max(0, stored - made)
                    report.lost += max(0, made - stored)
                    break


async def run_load(urls: list[str], concurrency: int, duration: float, timeout: float = 10.0,
                   check: bool = True) -> Report:
    report = Report()
    deadline = time.monotonic() + duration
    learners = [Learner(urls, report, timeout) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(learner.run(deadline) for learner in learners))
    finally:
        for learner in learners:
            await learner.aclose()
    report.ended = time.monotonic()
    # a result that reached the learner more than once for one submission is also a duplicate
    report.duplicates += sum(n - 1 for n in report.results_seen.values() if n > 1)
    if check:
        await verify(urls, report, timeout)
    return report


def data_urls(args: argparse.Namespace) -> list[str]:
    if args.url:
        return [u.rstrip("/") for u in args.url]
    doc = statefile.read(args.state_file)
    return [d["data_url"] for d in doc["dispatchers"]]


def run(args: argparse.Namespace) -> int:
    try:
        urls = data_urls(args)
    except statefile.StateFileError as exc:
        print(f"ctops load: {exc}", file=sys.stderr)
        return 2
    report = asyncio.run(run_load(urls, args.concurrency, args.duration, args.timeout))
    doc = report.as_dict()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        lat = doc["latency_ms"]
        sub = doc["submissions"]
        print(f"{doc['requests']} requests in {doc['duration_s']}s ({doc['rps']}/s), {doc['failed']} failed "
              f"{doc['failures'] or ''}")
        print(f"latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms")
        print(f"submissions: {sub['started']} started, {sub['completed']} completed, "
              f"{sub['duplicates']} duplicates, {sub['lost']} lost; moved address {doc['moved_to_next_address']}x")
    return 0 if doc["failed"] == 0 and doc["submissions"]["duplicates"] == 0 else 1

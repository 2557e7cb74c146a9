"""`ctops bench store`: what record integrity costs, on a real (embedded) Redis over loopback.

- per-record write and read of a submission checkpoint, plain JSON against sealed (the envelope,
  plus the copy kept for repair), µs p50/p99;
- the scrub's rate (records/s) over `--events` records (default 100,000);
- a learner-like request loop's p99 (read a session, rewrite it) alone, then while a scrub at the
  leader's default rate runs in another process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time

import redis.asyncio as aioredis

from ctops import integrity
from ctops.envelope import seal_fields
from ctops.keys import Keys
from ctops_tools.redis_embed import EmbeddedRedis

PREFIX = "bench"
N_OPS = 3000


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1)


def _summary(samples: list[float]) -> dict[str, float]:
    return {"p50_us": _pct(samples, 0.5), "p99_us": _pct(samples, 0.99), "mean_us": round(statistics.mean(samples), 1)}


def checkpoint(i: int) -> dict:
    code = "def fizzbuzz(n):\n" + "    pass\n" * 60  # a typical learner's answer, ~700 bytes
    return {"submission_id": f"sub_{i}", "session_id": f"s_{i}", "exercise_id": "fizzbuzz", "status": "done",
            "verdict": "passed", "message": "", "code": code, "server": "trainer-1", "created_ms": 1,
            "tests": [{"name": f"t{j}", "passed": True, "message": ""} for j in range(5)],
            "review": {"status": "done", "text": "Looks good. " * 40, "provider": "primary"},
            "steps": [{"step": s, "server": "trainer-1", "at_ms": 1} for s in ("received", "tested", "done")]}


async def per_record(r: aioredis.Redis, keys: Keys) -> dict:
    out: dict[str, dict] = {}
    sub = checkpoint(0)
    plain_w, sealed_w, plain_r, sealed_r = [], [], [], []
    for i in range(N_OPS):
        key = keys.submission(f"p{i}")
        t0 = time.perf_counter()
        await r.set(key, json.dumps(sub))
        plain_w.append((time.perf_counter() - t0) * 1e6)
    for i in range(N_OPS):
        key = keys.submission(f"s{i}")
        history = keys.submission_history(f"s{i}")
        t0 = time.perf_counter()
        sealed = integrity.seal_json(key, integrity.SUBMISSION, sub, 1)
        async with r.pipeline(transaction=False) as p:
            p.set(key, sealed)
            p.lpush(history, sealed)
            p.ltrim(history, 0, integrity.HISTORY - 1)
            await p.execute()
        sealed_w.append((time.perf_counter() - t0) * 1e6)
    for i in range(N_OPS):
        t0 = time.perf_counter()
        json.loads(await r.get(keys.submission(f"p{i}")))
        plain_r.append((time.perf_counter() - t0) * 1e6)
    for i in range(N_OPS):
        t0 = time.perf_counter()
        await integrity.read_json(r, keys.submission(f"s{i}"), integrity.SUBMISSION)
        sealed_r.append((time.perf_counter() - t0) * 1e6)
    out["write_plain"], out["write_sealed"] = _summary(plain_w), _summary(sealed_w)
    out["read_plain"], out["read_sealed"] = _summary(plain_r), _summary(sealed_r)
    # a submission writes 5 checkpoints and is read by the worker once and by the learner's polls
    extra = 5 * (out["write_sealed"]["p50_us"] - out["write_plain"]["p50_us"]) + \
        6 * (out["read_sealed"]["p50_us"] - out["read_plain"]["p50_us"])
    out["envelope_per_submission_us"] = round(extra, 1)
    return out


async def fill(r: aioredis.Redis, keys: Keys, n: int) -> None:
    sub = checkpoint(0)
    sub["code"] = "x"  # small records: the scrub's cost is per record, and 1e6 big ones need GBs
    for start in range(0, n, 1000):
        async with r.pipeline(transaction=False) as p:
            for i in range(start, min(n, start + 1000)):
                if i % 2:
                    key = keys.session(f"f{i}")
                    p.hset(key, mapping=seal_fields(key, integrity.SESSION, {"session_id": f"f{i}", "learner": "x"}))
                else:
                    key = keys.submission(f"f{i}")
                    p.set(key, integrity.seal_json(key, integrity.SUBMISSION, sub, 1))
            await p.execute()


def _scrub_process(url: str, rate: float, out: multiprocessing.Queue) -> None:
    async def go() -> None:
        r = aioredis.Redis.from_url(url)
        rep = await integrity.scrub(r, Keys(prefix=PREFIX), repair=False, reader="bench", rate=rate)
        out.put(rep.to_dict())
        await r.aclose()

    asyncio.run(go())


async def learner_p99(r: aioredis.Redis, keys: Keys, seconds: float) -> dict:
    """One learner-like request after another: read a session (checked), rewrite it sealed."""
    samples = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        key = keys.session(f"f{2 * (i % 1000) + 1}")
        t0 = time.perf_counter()
        got = await integrity.read_hash(r, key, integrity.SESSION)
        fields = got[0] if got else {"session_id": "x"}
        await r.hset(key, mapping=integrity.seal_hash(key, integrity.SESSION, fields, 1))
        samples.append((time.perf_counter() - t0) * 1e6)
        i += 1
    return {"requests": len(samples), **_summary(samples)}


async def main(records: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        node = EmbeddedRedis(data_dir=tmp).start()
        try:
            r = aioredis.Redis.from_url(node.url)
            keys = Keys(prefix=PREFIX)
            report: dict = {"per_record": await per_record(r, keys)}
            await r.flushall()
            await fill(r, keys, records)
            t0 = time.monotonic()
            full = await integrity.scrub(r, keys, repair=False, reader="bench")
            report["scrub"] = {"records": full.checked, "seconds": round(time.monotonic() - t0, 2),
                               "records_per_s": round(full.checked / max(time.monotonic() - t0, 1e-9))}
            report["learner_alone"] = await learner_p99(r, keys, seconds)
            ctx = multiprocessing.get_context("spawn")
            q = ctx.Queue()
            proc = ctx.Process(
                target=_scrub_process, args=(node.url, 5000.0, q), daemon=True)
            proc.start()
            await asyncio.sleep(0.5)
            report["learner_during_scrub"] = await learner_p99(r, keys, seconds)
            proc.terminate()
            proc.join(5)
            report["learner_p99_added_us"] = round(report["learner_during_scrub"]["p99_us"]
                                                   - report["learner_alone"]["p99_us"], 1)
            await r.aclose()
            return report
        finally:
            node.stop()


def run(args: argparse.Namespace) -> int:
    report = asyncio.run(main(args.events, args.duration))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    pr = report["per_record"]
    for k in ("write_plain", "write_sealed", "read_plain", "read_sealed"):
        print(f"{k:<14} p50 {pr[k]['p50_us']:>8} µs   p99 {pr[k]['p99_us']:>8} µs")
    print(f"envelope per submission (5 checkpoints, 6 reads): {pr['envelope_per_submission_us']} µs")
    s = report["scrub"]
    print(f"scrub: {s['records']} records in {s['seconds']} s = {s['records_per_s']} records/s")
    print(f"learner p99 alone {report['learner_alone']['p99_us']} µs, during a 5000/s scrub "
          f"{report['learner_during_scrub']['p99_us']} µs (+{report['learner_p99_added_us']} µs)")
    return 0

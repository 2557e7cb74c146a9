"""`ctops bench store`: what record integrity costs, on a real (embedded) Redis over loopback.

- per-record write and read of a submission checkpoint, plain JSON against sealed (the envelope,
  plus the copy kept for repair), µs p50/p99, and the envelope's own CPU cost without Redis;
- the scrub's rate unpaced, in the batches the leader uses, over a sample of 100,000 records
  (records/s, and its CPU a record); then the store filled with `--records` records (default
  1,000,000; pipelined);
- learners through the dispatcher's proxy (real HTTP: a loop of `GET /api/sessions/ID`, which
  reads the session, rewrites it sealed and lists its submissions, on a real trainer) while the
  leader's scrub walks that store at its default rate: `--reps` pairs of `--duration`-second
  windows, the scrub process stopped (SIGSTOP) in one and running in the other, in turn; p50/p99
  with the scrub against without it, pooled and as the median over pairs;
- a submission's end-to-end p50 (POST with `?wait=`, sandbox run and review included) and what the
  envelope costs inside it: the sealed writes and reads a submission makes, counted on Redis, times
  the per-record cost above. There is no switch that turns the envelope off, so the share is that
  cost over the p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import redis.asyncio as aioredis

from ctops import integrity
from ctops.envelope import seal_fields, unseal, unseal_fields
from ctops.keys import Keys
from ctops_tools.load import SOLUTIONS, percentile
from ctops_tools.localcluster import Cluster, wait_for
from ctops_tools.redis_embed import EmbeddedRedis
from dispatcher.integrity import SCRUB_BATCH, SCRUB_RATE

PREFIX = "bench"
N_OPS = 3000
FILL_PIPELINE = 2000
LEARNER_SESSIONS = 50
WARMUP_REQUESTS = 200
SUBMISSIONS = 30
SCRUB_ON_MS = 100  # a pass starts as soon as the dispatcher leads, and again right after one ends
# the unpaced scrub rate is taken over this many records (the cost is per record, not per store size)
UNPACED_SAMPLE = 100_000


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


def _cpu_us(fn: Any, n: int = 5000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def envelope_cpu() -> dict[str, float]:
    """The envelope's own CPU per record, without Redis (mean µs): seal and check, against plain."""
    key, sub = "bench:submission:x", checkpoint(0)
    sealed = integrity.seal_json(key, integrity.SUBMISSION, sub, 1)
    plain = json.dumps(sub, separators=(",", ":")).encode()
    hkey = "bench:session:x"
    fields = {"session_id": "x", "learner": "ada", "created_ms": "1", "created_by": "trainer-1",
              "last_activity_ms": "1", "last_server": "trainer-1"}
    hsealed = {k.encode(): v if isinstance(v, bytes) else v.encode()
               for k, v in integrity.seal_hash(hkey, integrity.SESSION, fields, 1).items()}
    hplain = {k.encode(): v.encode() for k, v in fields.items()}
    out = {
        "write_plain_us": _cpu_us(lambda: json.dumps(sub, separators=(",", ":"))),
        "write_sealed_us": _cpu_us(lambda: integrity.seal_json(key, integrity.SUBMISSION, sub, 1)),
        "read_plain_us": _cpu_us(lambda: json.loads(plain)),
        "read_sealed_us": _cpu_us(lambda: json.loads(unseal(key, sealed, integrity.SUBMISSION).payload)),  # type: ignore[union-attr]
        "hash_write_plain_us": _cpu_us(lambda: {k: str(v) for k, v in fields.items()}),
        "hash_write_sealed_us": _cpu_us(lambda: integrity.seal_hash(hkey, integrity.SESSION, fields, 1)),
        "hash_read_plain_us": _cpu_us(lambda: {k.decode(): v.decode() for k, v in hplain.items()}),
        "hash_read_sealed_us": _cpu_us(lambda: unseal_fields(hkey, hsealed, integrity.SESSION)),
    }
    return {k: round(v, 2) for k, v in out.items()}


async def fill(r: aioredis.Redis, keys: Keys, n: int) -> float:
    """N sealed records, half sessions, half submissions, pipelined; seconds taken."""
    t0 = time.monotonic()
    sub = checkpoint(0)
    # small records: the scrub's cost is per record, and 10^6 big ones need GBs
    sub["code"], sub["review"]["text"] = "x", "ok"
    for start in range(0, n, FILL_PIPELINE):
        async with r.pipeline(transaction=False) as p:
            for i in range(start, min(n, start + FILL_PIPELINE)):
                if i % 2:
                    key = keys.session(f"f{i}")
                    p.hset(key, mapping=seal_fields(key, integrity.SESSION, {
                        "session_id": f"f{i}", "learner": "x", "created_ms": "1", "created_by": "trainer-1",
                        "last_activity_ms": "1", "last_server": "trainer-1"}))
                else:
                    key = keys.submission(f"f{i}")
                    p.set(key, integrity.seal_json(key, integrity.SUBMISSION, sub, 1))
            await p.execute()
    return time.monotonic() - t0


def _commands(admin: redis.Redis) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def _latencies_ms(http: httpx.Client, sids: list[str], seconds: float) -> list[float]:
    out: list[float] = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        resp = http.get(f"/api/sessions/{sids[i % len(sids)]}")
        out.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise RuntimeError(f"learner request failed: {resp.status_code} {resp.text[:200]}")
        i += 1
    return out


def _ms(samples: list[float]) -> dict[str, float]:
    return {"requests": len(samples), "p50_ms": round(percentile(samples, 50), 3),
            "p99_ms": round(percentile(samples, 99), 3)}


def _submissions(c: Cluster, http: httpx.Client, admin: redis.Redis, n: int) -> dict[str, Any]:
    """N submissions one after another, each POST waiting until it is done; the p50, and the
    sealed writes and reads each made, counted on Redis (an upper bound: other traffic adds some)."""
    sid = http.post("/api/sessions", json={"learner": "bench-submit"}).json()["session_id"]
    times: list[float] = []
    before = _commands(admin)
    for _ in range(n):
        t0 = time.perf_counter()
        resp = http.post(f"/api/sessions/{sid}/submissions?wait=20", json={
            "exercise_id": "fizzbuzz", "code": SOLUTIONS["fizzbuzz"]}, headers={"Idempotency-Key": uuid.uuid4().hex})
        times.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200 or resp.json().get("status") != "done":
            raise RuntimeError(f"submission not done: {resp.status_code} {resp.text[:200]}")
    after = _commands(admin)
    per = {name: round(_delta(before, after, name) / n, 1) for name in ("lpush", "set", "get", "hset", "hgetall")}
    return {"submissions": n, "p50_ms": round(statistics.median(times), 1), "commands_per_submission": per}


def _scrub_process(c: Cluster) -> psutil.Process | None:
    """The running dispatcher's scrub child (`ScrubProcess`), to count its CPU."""
    try:
        kids = psutil.Process(c.children["A"].pid).children(recursive=True)
    except psutil.Error:
        return None
    return next((k for k in kids if "spawn_main" in " ".join(k.cmdline())), None)


def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _pairs(rows: list[dict[str, Any]]) -> list[float]:
    by_pair: dict[int, dict[bool, float]] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], {})[row["scrub"]] = row["p99_ms"]
    return [round(d[True] - d[False], 3) for d in by_pair.values()]


def learners_through_proxy(node: EmbeddedRedis, root: Path, pairs: int, seconds: float) -> dict[str, Any]:
    """One dispatcher whose scrub walks the whole store without a pause; the scrub process is
    stopped (SIGSTOP) and let go on (SIGCONT) in turn, `seconds` at a time, while a learner loop
    runs: windows this short, taken in turn, share the machine's other load far better than rounds
    with a dispatcher restarted between them (on a shared machine that load swings by more than the
    effect measured within a minute)."""
    c = Cluster(root, node, PREFIX, trainers=2, timings={"scrub_interval_ms": SCRUB_ON_MS})
    admin = node.admin(decode_responses=True)
    proc: psutil.Process | None = None
    try:
        c.start_all()
        wait_for("the scrub to start", lambda: "scrub: pass started" in c.log("A"), 60)
        proc = _scrub_process(c)
        if proc is None:
            raise RuntimeError("no scrub process under the dispatcher")
        with httpx.Client(base_url=c.data_url(), timeout=30) as http:
            sids = [http.post("/api/sessions", json={"learner": f"l{i}"}).json()["session_id"]
                    for i in range(LEARNER_SESSIONS)]
            for i in range(WARMUP_REQUESTS):
                http.get(f"/api/sessions/{sids[i % len(sids)]}")
            off: list[float] = []
            on: list[float] = []
            rows = []
            scan_rates = []
            cpu_shares = []
            for pair in range(pairs):
                # off then on, then on then off: a drift in the machine's load falls on both alike
                for scrub in (False, True) if pair % 2 == 0 else (True, False):
                    if scrub:
                        proc.resume()
                    else:
                        proc.suspend()
                    cpu0 = _cpu_s(proc)
                    before, t0 = _commands(admin), time.monotonic()
                    got = _latencies_ms(http, sids, seconds)
                    took = time.monotonic() - t0
                    scans = _delta(before, _commands(admin), "scan") / took
                    (on if scrub else off).extend(got)
                    row: dict[str, Any] = {"pair": pair, "scrub": scrub, **_ms(got),
                                           "scan_calls_per_s": round(scans, 1),
                                           "load_1min": round(os.getloadavg()[0], 1)}
                    if scrub:
                        scan_rates.append(scans)
                        share = (_cpu_s(proc) - cpu0) / took * 100
                        cpu_shares.append(share)
                        row["scrub_cpu_pct"] = round(share, 1)
                    rows.append(row)
            proc.suspend()  # a submission's figure without the scrub, as before envelopes
            subs = _submissions(c, http, admin, SUBMISSIONS)
        deltas = _pairs(rows)
        return {"windows": rows, "scrub_off": _ms(off), "scrub_on": _ms(on),
                "scrub_rate_configured": SCRUB_RATE, "scrub_batch": SCRUB_BATCH,
                "scrub_keys_per_s_seen": round(statistics.mean(scan_rates) * SCRUB_BATCH) if scan_rates else 0,
                "scrub_cpu_pct_of_a_core": round(statistics.mean(cpu_shares), 1) if cpu_shares else 0,
                # all the windows with the scrub against all without it: taken in turn, so pooled
                "p99_added_ms": round(percentile(on, 99) - percentile(off, 99), 3),
                "p50_added_ms": round(percentile(on, 50) - percentile(off, 50), 3),
                "p99_added_ms_median_of_pairs": round(statistics.median(deltas), 3),
                "submission": subs}
    finally:
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                proc.resume()  # a stopped scrub would outlive its dispatcher: it cannot see it go
        c.stop()
        admin.close()


def envelope_share(pr: dict, cpu: dict, subs: dict) -> dict[str, float]:
    """What the envelope adds to one submission: its sealed writes (the checkpoint plus its repair
    copy, measured with Redis; session rewrites, CPU) and its checked reads, over the p50."""
    per = subs["commands_per_submission"]
    # the larger of the two ways of measuring each difference, never below 0: on a busy machine one
    # of them can come out negative, and a cost is not a saving
    d_write = max(pr["write_sealed"]["p50_us"] - pr["write_plain"]["p50_us"],
                  cpu["write_sealed_us"] - cpu["write_plain_us"], 0.0)
    d_read = max(pr["read_sealed"]["p50_us"] - pr["read_plain"]["p50_us"],
                 cpu["read_sealed_us"] - cpu["read_plain_us"], 0.0)
    d_hash_write = max(cpu["hash_write_sealed_us"] - cpu["hash_write_plain_us"], 0.0)
    d_hash_read = max(cpu["hash_read_sealed_us"] - cpu["hash_read_plain_us"], 0.0)
    cost = per["lpush"] * d_write + per["hset"] * d_hash_write + per["get"] * d_read + per["hgetall"] * d_hash_read
    return {"envelope_us_per_submission": round(cost, 1), "submission_p50_ms": subs["p50_ms"],
            "share_pct": round(cost / 1000 / subs["p50_ms"] * 100, 3)}


async def _scrub_unpaced(url: str, records: int) -> dict:
    """The scrub's rate, unpaced, over a sample of the store (then flushed), and the store filled."""
    r = aioredis.Redis.from_url(url)
    try:
        keys = Keys(prefix=PREFIX)
        await fill(r, keys, min(records, UNPACED_SAMPLE))
        t0, cpu0 = time.monotonic(), time.process_time()
        full = await integrity.scrub(r, keys, repair=False, reader="bench", batch=SCRUB_BATCH)
        took, cpu = time.monotonic() - t0, time.process_time() - cpu0
        await r.flushall()
        filled = await fill(r, keys, records)
        # CPU per record, of the scrub's process alone: what a pass costs the machine, and a figure
        # the other jobs on a shared machine change less than the wall-clock rate
        return {"records": records, "sample": full.checked, "fill_seconds": round(filled, 1),
                "seconds": round(took, 1), "records_per_s": round(full.checked / max(took, 1e-9)),
                "batch": SCRUB_BATCH, "cpu_us_per_record": round(cpu / max(full.checked, 1) * 1e6, 1),
                "damaged": full.corrupt}
    finally:
        await r.aclose()


async def _per_record(url: str) -> dict:
    r = aioredis.Redis.from_url(url)
    try:
        out = await per_record(r, Keys(prefix=PREFIX))
        await r.flushall()
        return out
    finally:
        await r.aclose()


def main(records: int, seconds: float, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        node = EmbeddedRedis(data_dir=str(Path(tmp) / "redis")).start()
        try:
            report: dict = {"per_record": asyncio.run(_per_record(node.url)), "envelope_cpu": envelope_cpu()}
            report["scrub"] = asyncio.run(_scrub_unpaced(node.url, records))
            report["learners"] = learners_through_proxy(node, Path(tmp) / "cluster", rounds, seconds)
            report["envelope_in_submission"] = envelope_share(report["per_record"], report["envelope_cpu"],
                                                              report["learners"]["submission"])
            return report
        finally:
            node.stop()


def run(args: argparse.Namespace) -> int:
    report = main(args.records, args.duration, args.reps)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    pr = report["per_record"]
    for k in ("write_plain", "write_sealed", "read_plain", "read_sealed"):
        print(f"{k:<14} p50 {pr[k]['p50_us']:>8} µs   p99 {pr[k]['p99_us']:>8} µs")
    print("envelope CPU alone (µs/record):", json.dumps(report["envelope_cpu"]))
    s = report["scrub"]
    print(f"filled {s['records']} records in {s['fill_seconds']} s; unpaced scrub (batches of {s['batch']}) over "
          f"{s['sample']}: {s['seconds']} s = {s['records_per_s']} records/s, {s['cpu_us_per_record']} µs CPU a record")
    ln = report["learners"]
    print(f"learners through the proxy, {args.reps} pairs of {args.duration} s windows with the scrub stopped and "
          f"running in turn: p99 scrub off {ln['scrub_off']['p99_ms']} ms, on {ln['scrub_on']['p99_ms']} ms "
          f"({ln['p99_added_ms']:+} ms); p50 {ln['scrub_off']['p50_ms']} / {ln['scrub_on']['p50_ms']} ms "
          f"({ln['p50_added_ms']:+} ms); median over pairs of the p99 added {ln['p99_added_ms_median_of_pairs']:+} ms; "
          f"scrub at ~{ln['scrub_keys_per_s_seen']} keys/s seen (configured {ln['scrub_rate_configured']}), "
          f"{ln['scrub_cpu_pct_of_a_core']} % of a core")
    for w in ln["windows"]:
        cpu = f", scrub CPU {w['scrub_cpu_pct']} %" if w["scrub"] else ""
        print(f"  pair {w['pair']} scrub {'on ' if w['scrub'] else 'off'}: {w['requests']} requests, "
              f"p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, SCAN {w['scan_calls_per_s']}/s, "
              f"load {w['load_1min']}{cpu}")
    e = report["envelope_in_submission"]
    print(f"submission p50 {e['submission_p50_ms']} ms (commands per submission "
          f"{json.dumps(ln['submission']['commands_per_submission'])}); envelope inside it "
          f"{e['envelope_us_per_submission']} µs = {e['share_pct']} %")
    return 0

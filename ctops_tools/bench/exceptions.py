"""`ctops bench exceptions`: ingest rate into one dispatcher (with grouping and dedupe), and how long a
spool of N events takes to replay through the capture library's forwarder.

Anchor: the Sentry Python SDK keeps a 100-event in-memory queue and drops past it; ctops spools to
disk instead, so the figure that matters is how fast a backlog drains once a dispatcher answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from ctops.auth import hash_token, new_token
from ctops.capture.forwarder import Forwarder
from ctops.capture.spool import Spool
from ctops_tools.procs import ctops_argv, spawn, stop_all
from ctops_tools.redis_embed import EmbeddedRedis, free_port

TARGET_EVENTS_PER_S = 2000
BATCH = 100
CONCURRENCY = 4


def synthetic_event(rng: random.Random, n_groups: int = 50) -> dict[str, Any]:
    g = rng.randrange(n_groups)
    frames = [{"filename": f"/srv/lib/python3.11/site-packages/fw/mod{i}.py", "module": f"fw.mod{i}",
               "function": f"call{i}", "lineno": 100 + i, "in_app": False, "context_line": "return handler(request)"}
              for i in range(6)]
    frames += [{"filename": f"/srv/app/trainer/part{g % 7}.py", "module": f"trainer.part{g % 7}",
                "function": f"handler_{g}", "lineno": rng.randrange(10, 400), "in_app": True,
                "context_line": "value = payload[key]"} for _ in range(4)]
    return {"event_id": uuid.uuid4().hex, "ts_ms": int(time.time() * 1000), "service": "trainer",
            "host": f"host-{rng.randrange(1, 21)}", "type": "KeyError", "message": f"'item-{rng.randrange(10**6)}'",
            "frames": frames, "context": {"server": f"trainer-{g % 3}", "request_id": uuid.uuid4().hex}}


def _deployment(path: Path, redis_url: str, ops: int, data: int, agent_token: str, viewer_token: str) -> None:
    path.write_text("\n".join([
        'cluster = "bench"', "[redis]", f'url = "{redis_url}"', 'prefix = "bench-exc"',
        # the figure is the dispatcher's capacity, so the per-token ingest limit is lifted
        "[limits]", "exceptions_per_s = 1000000", "exceptions_burst = 10000000",
        "[[dispatchers]]", 'name = "A"', f'data = "127.0.0.1:{data}"', f'ops = "127.0.0.1:{ops}"',
        "[[tokens]]", 'name = "bench-agent"', 'role = "agent"', f'sha256 = "{hash_token(agent_token)}"',
        "[[tokens]]", 'name = "bench-viewer"', 'role = "viewer"', f'sha256 = "{hash_token(viewer_token)}"',
    ]) + "\n")


def _stored(url: str, viewer: str) -> int:
    r = httpx.get(f"{url}/api/v1/exceptions/groups", params={"limit": 5000}, timeout=30,
                  headers={"Authorization": f"Bearer {viewer}"})
    r.raise_for_status()
    return sum(g["count"] for g in r.json()["groups"])


async def _ingest(url: str, token: str, duration: float) -> dict[str, Any]:
    rng = random.Random(1)
    # bodies made up front: the figure is the dispatcher's, not this client's JSON encoding
    bodies = [json.dumps({"events": [synthetic_event(rng) for _ in range(BATCH)]}).encode() for _ in range(400)]
    sent = 0
    errors = 0
    deadline = time.perf_counter() + duration
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                 timeout=30) as client:
        async def worker(k: int) -> None:
            nonlocal sent, errors
            i = k
            while time.perf_counter() < deadline and i < len(bodies):
                r = await client.post(f"{url}/api/v1/exceptions", content=bodies[i])
                if r.status_code == 200 and r.json()["accepted"] == BATCH:
                    sent += BATCH
                else:
                    errors += 1
                i += CONCURRENCY

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
        took = time.perf_counter() - started
    rate = sent / took if took else 0.0
    return {"events": sent, "seconds": round(took, 2), "events_per_s": round(rate), "errors": errors,
            "batch": BATCH, "connections": CONCURRENCY, "target_events_per_s": TARGET_EVENTS_PER_S,
            "ok": rate >= TARGET_EVENTS_PER_S and errors == 0}


def _replay(url: str, token: str, viewer: str, n: int, workdir: Path) -> dict[str, Any]:
    rng = random.Random(2)
    spool = Spool(workdir / "spool", fsync=False, max_bytes=4 * 1024**3)
    chunk = 1000
    for start in range(0, n, chunk):
        spool.append([json.dumps(synthetic_event(rng), separators=(",", ":")).encode()
                      for _ in range(min(chunk, n - start))])
    size = spool.size()
    before = _stored(url, viewer)
    fw = Forwarder([url], token, spool, sender="bench", timeout=30)
    started = time.perf_counter()
    fw.start()
    drained = fw.flush(timeout=max(600.0, n / 100))
    took = time.perf_counter() - started
    fw.close()
    arrived = _stored(url, viewer) - before
    return {"events": n, "spool_bytes": size, "seconds": round(took, 2), "events_per_s": round(n / took) if took else 0,
            "drained": drained, "arrived": arrived, "ok": drained and arrived == n}


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ctops-bench-exc-"))
    redis = EmbeddedRedis(port=free_port(), data_dir=str(workdir / "redis")).start()
    children = []
    try:
        agent, viewer = new_token(), new_token()
        ops, data = free_port(), free_port()
        cfg = workdir / "bench.toml"
        _deployment(cfg, redis.url, ops, data, agent, viewer)
        children.append(spawn("A", ctops_argv("dispatcher", "--config", str(cfg), "--name", "A"),
                              str(workdir / "A.log"), {"CTOPS_LOG_LEVEL": "WARNING"}))
        url = f"http://127.0.0.1:{ops}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/v1/exceptions/stats", headers={"Authorization": f"Bearer {viewer}"},
                             timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"ctops bench exceptions: dispatcher did not start; see {workdir / 'A.log'}")
            time.sleep(0.2)
        ingest = asyncio.run(_ingest(url, agent, args.duration))
        replay = _replay(url, agent, viewer, args.events, workdir)
    finally:
        stop_all(children)
        redis.stop()
    result = {"ingest": ingest, "replay": replay,
              "note": "one dispatcher process and Redis on this machine; events with 10 frames, 50 groups"}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"ingest: {ingest['events_per_s']} events/s ({ingest['events']} events in {ingest['seconds']} s, "
              f"batches of {BATCH}, {CONCURRENCY} connections; target ≥ {TARGET_EVENTS_PER_S}) "
              f"{'OK' if ingest['ok'] else 'BELOW TARGET'}")
        print(f"replay: {replay['events']} spooled events ({replay['spool_bytes'] / 1e6:.1f} MB) replayed in "
              f"{replay['seconds']} s ({replay['events_per_s']} events/s); arrived {replay['arrived']}"
              f" {'OK' if replay['ok'] else 'INCOMPLETE'}")
    return 0 if ingest["ok"] and replay["ok"] else 1

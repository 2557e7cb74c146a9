"""`ctops bench llm`: what users feel when the primary LLM provider hangs, for the dispatcher's
LLM pool and for LiteLLM's Router, side by side in one run against the same two fake providers.

A steady open-loop load (requests start on schedule whether or not earlier ones finished) runs
through each; midway the primary is switched to `hang`. Reported per system:
- baseline: latency before the switch;
- before open: requests started after the switch until the system settled (the first moment
  from which every request for `SETTLE_S` was fast): how many were slow (> baseline p99 + 50 ms)
  or failed;
- after open: everything after that point: added p50/p99 over the baseline, slow and failed.
Both get the same per-try timeout; LiteLLM otherwise keeps its default retry/cooldown settings,
with the secondary configured as the primary's fallback. If LiteLLM cannot be installed or run,
a plain retry-then-fallback httpx client takes its place and the report says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from ctops import config
from ctops_tools.procs import Child, ctops_argv, spawn, stop_all
from ctops_tools.redis_embed import EmbeddedRedis, free_port
from trainer.fake_llm import CONTROL_TOKEN_ENV, control_headers, control_token

RATE = 20.0  # requests per second
MIN_DURATION_S = 20.0
TIMEOUT_MS = 3000  # per try, the same for every system
SLOW_MARGIN_S = 0.050  # "slow" = more than baseline p99 + this
SETTLE_S = 2.0
TARGET_SLOW_BEFORE_OPEN = 3
TARGET_ADDED_P99_MS = 50.0
MESSAGES = [{"role": "user", "content": "Exercise: fizzbuzz\nVerdict: passed (3 tests)"}]

Call = Callable[[], Awaitable[str]]  # returns the provider that answered; raises on failure


@dataclass
class Sample:
    start: float  # seconds since the load began
    latency: float
    ok: bool
    provider: str = ""
    error: str = ""


@dataclass
class Phase:
    requests: int = 0
    failed: int = 0
    slow: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


@dataclass
class Report:
    system: str
    note: str = ""
    switch_at_s: float = 0.0
    settled_after_s: float | None = None  # from the switch
    breaker_opened_after_s: float | None = None  # ctops only: when the pool itself says so
    baseline: Phase = field(default_factory=Phase)
    before_open: Phase = field(default_factory=Phase)
    after_open: Phase = field(default_factory=Phase)
    meets_target: bool | None = None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def analyse(system: str, samples: list[Sample], switch_at: float) -> Report:
    rep = Report(system, switch_at_s=round(switch_at, 2))
    base = [s for s in samples if s.start < switch_at]
    base_lat = [s.latency for s in base if s.ok]
    b50, b99 = pct(base_lat, 0.5), pct(base_lat, 0.99)
    rep.baseline = Phase(len(base), sum(not s.ok for s in base), 0, ms(b50), ms(b99))
    slow_after = (b99 or 0.0) + SLOW_MARGIN_S

    def bad(s: Sample) -> bool:
        return not s.ok or s.latency > slow_after

    after = sorted((s for s in samples if s.start >= switch_at), key=lambda s: s.start)
    settle = None
    for i, s in enumerate(after):
        window = [x for x in after[i:] if x.start < s.start + SETTLE_S]
        if after[-1].start >= s.start + SETTLE_S and not any(bad(x) for x in window):
            settle = s.start
            break
    rep.settled_after_s = round(settle - switch_at, 3) if settle is not None else None
    cut = settle if settle is not None else float("inf")
    for phase_samples, attr in (([s for s in after if s.start < cut], "before_open"),
                                ([s for s in after if s.start >= cut], "after_open")):
        lat = [s.latency for s in phase_samples if s.ok]
        p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
        setattr(rep, attr, Phase(
            len(phase_samples), sum(not s.ok for s in phase_samples), sum(bad(s) for s in phase_samples),
            ms(p50), ms(p99),
            ms(p50 - b50) if p50 is not None and b50 is not None else None,
            ms(p99 - b99) if p99 is not None and b99 is not None else None))
    a = rep.after_open
    rep.meets_target = (settle is not None and rep.before_open.slow <= TARGET_SLOW_BEFORE_OPEN and a.failed == 0
                        and a.added_p99_ms is not None and a.added_p99_ms <= TARGET_ADDED_P99_MS)
    return rep


async def load(call: Call, duration: float, on_switch: Callable[[], Awaitable[None]]) -> tuple[list[Sample], float]:
    """Open loop at RATE; `on_switch` (the hang) runs at the midpoint."""
    samples: list[Sample] = []
    t0 = time.monotonic()
    switch_at = duration / 2

    async def one(start: float) -> None:
        began = time.monotonic()
        try:
            prov = await call()
            samples.append(Sample(start, time.monotonic() - began, True, prov))
        except Exception as exc:  # noqa: BLE001 - any failure is a failed user request
            samples.append(Sample(start, time.monotonic() - began, False, error=f"{type(exc).__name__}: {exc}"[:200]))

    tasks = []
    switched = False
    n = int(duration * RATE)
    for i in range(n):
        at = i / RATE
        if not switched and at >= switch_at:
            await on_switch()
            switched = True
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(time.monotonic() - t0)))
    await asyncio.gather(*tasks)
    return samples, switch_at


async def set_mode(client: httpx.AsyncClient, url: str, mode: str) -> None:
    r = await client.post(url + "/_fake/mode", json={"mode": mode}, headers=control_headers(), timeout=5)
    r.raise_for_status()


# --- systems -------------------------------------------------------------------------------------------
async def run_ctops(fakes: dict[str, str], redis_url: str, duration: float) -> Report:
    from redis.asyncio import Redis

    from ctops.keys import Keys
    from dispatcher.llm import start_llm_pool

    dep = config.parse({
        "dispatchers": [{"name": "bench", "data": "127.0.0.1:1", "ops": "127.0.0.1:2"}],
        "llm_providers": [{"name": n, "base_url": f"{u}/v1", "priority": i, "timeout_ms": TIMEOUT_MS}
                          for i, (n, u) in enumerate(fakes.items(), start=1)],
    })
    redis = Redis.from_url(redis_url)
    handle = await start_llm_pool(dep, redis, Keys("bench-llm"), lambda *_: None, lambda: True, name="bench")
    url = f"{handle.url}/llm/v1/chat/completions"
    opened: list[float] = []
    primary = handle.pool.by_name["primary"]
    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1000)) as client:
            async def call() -> str:
                r = await client.post(url, json={"model": "gpt-4", "messages": MESSAGES})
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:100]}")
                return r.headers.get("x-ctops-llm-provider", "")

            for _ in range(20):  # warm-up: connections, and the pool learns the usual latency
                await call()
            t_switch: list[float] = []

            async def switch() -> None:
                t_switch.append(time.monotonic())
                await set_mode(client, fakes["primary"], "hang")
                asyncio.get_running_loop().create_task(watch())

            async def watch() -> None:
                await primary.gone.wait()  # set when the breaker opens
                opened.append(time.monotonic() - t_switch[0])

            samples, switch_at = await load(call, duration, switch)
    finally:
        await handle.stop()
        await redis.aclose()
    rep = analyse("ctops LLM pool", samples, switch_at)
    rep.breaker_opened_after_s = round(opened[0], 3) if opened else None
    rep.note = ("dispatcher/llm pool in this process, over HTTP on loopback; breaker: 3 failures; a try "
                "unanswered after max(100 ms, 3 x p99) counts as failed and is hedged to the secondary")
    return rep


def ensure_litellm() -> str | None:
    """Import LiteLLM, installing it into this environment if missing; None, or why it cannot be used."""
    # its bundled price list, not a download at import time (the bench may run offline)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
        return None
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "litellm"], capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        return f"pip install litellm failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
    try:
        import litellm  # noqa: F401
    except ImportError as exc:
        return f"litellm installed but does not import: {exc}"
    return None


async def run_litellm(fakes: dict[str, str], duration: float, layout: str) -> Report:
    """layout "fallbacks": two model groups, the secondary as the primary's fallback (LiteLLM's
    documented failover); "order": one group, both deployments, `order` 1 and 2 (priority)."""
    import litellm
    from litellm import Router

    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
    logging.getLogger("LiteLLM Router").setLevel(logging.CRITICAL)

    def dep(name: str, url: str, **extra: object) -> dict:
        return {"model_name": name, "litellm_params": {"model": "openai/gpt-4", "api_base": f"{url}/v1",
                                                       "api_key": "bench", "timeout": TIMEOUT_MS / 1000, **extra}}

    if layout == "fallbacks":
        router = Router(model_list=[dep("gpt-4", fakes["primary"]), dep("gpt-4-backup", fakes["secondary"])],
                        fallbacks=[{"gpt-4": ["gpt-4-backup"]}])
    else:
        router = Router(model_list=[dep("gpt-4", fakes["primary"], order=1),
                                    dep("gpt-4", fakes["secondary"], order=2)])

    async def call() -> str:
        r = await router.acompletion(model="gpt-4", messages=MESSAGES)
        text = r.choices[0].message.content or ""
        return text[1:text.index("]")] if text.startswith("[") else ""

    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(20):
            await call()

        async def switch() -> None:
            await set_mode(client, fakes["primary"], "hang")

        samples, switch_at = await load(call, duration, switch)
    rep = analyse(f"LiteLLM {_dist_version('litellm')} Router, {layout}", samples, switch_at)
    how = ("fallbacks gpt-4 -> gpt-4-backup (a single-deployment group is never cooled down)"
           if layout == "fallbacks" else "one model group, deployments with order 1 and 2")
    rep.note = (f"Router defaults (num_retries {router.num_retries}, allowed_fails {router.allowed_fails}, "
                f"cooldown {router.cooldown_time} s), {how}; per-try timeout {TIMEOUT_MS} ms as for ctops "
                "(LiteLLM's own default is 600 s)")
    return rep


async def run_plain(fakes: dict[str, str], duration: float, why: str) -> Report:
    """The simplest client a service would write: try the primary (one retry), then the secondary."""
    async with httpx.AsyncClient(timeout=TIMEOUT_MS / 1000, limits=httpx.Limits(max_connections=1000)) as client:
        async def call() -> str:
            last: Exception | None = None
            for name in ("primary", "primary", "secondary"):
                try:
                    r = await client.post(f"{fakes[name]}/v1/chat/completions",
                                          json={"model": "gpt-4", "messages": MESSAGES})
                    if r.status_code == 200:
                        return name
                    last = RuntimeError(f"HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    last = exc
            raise last or RuntimeError("no answer")

        for _ in range(20):
            await call()

        async def switch() -> None:
            await set_mode(client, fakes["primary"], "hang")

        samples, switch_at = await load(call, duration, switch)
    rep = analyse("plain retry-then-fallback client", samples, switch_at)
    rep.note = f"instead of LiteLLM, because {why}"
    return rep


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


# --- orchestration ------------------------------------------------------------------------------------
def start_fakes(logs: Path) -> tuple[dict[str, str], list[Child]]:
    ports = {n: free_port() for n in ("primary", "secondary")}
    children = [spawn(n, ctops_argv("fake-llm", "--port", str(p), "--name", n), str(logs / f"{n}.log"),
                      {CONTROL_TOKEN_ENV: control_token()})
                for n, p in ports.items()]
    urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    deadline = time.monotonic() + 30
    for u in urls.values():
        while True:
            try:
                if httpx.get(u + "/_fake/mode", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop_all(children)
                raise SystemExit(f"ctops bench llm: fake provider {u} did not start (see {logs})")
            time.sleep(0.1)
    return urls, children


def print_table(reports: list[Report]) -> None:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:g}"

    print(f"LLM provider outage: {RATE:g} req/s, primary hangs at the midpoint, per-try timeout {TIMEOUT_MS} ms")
    for r in reports:
        print(f"\n{r.system}\n  {r.note}")
        b, x, a = r.baseline, r.before_open, r.after_open
        print(f"  baseline     : {b.requests} requests, p50 {f(b.p50_ms)} ms, p99 {f(b.p99_ms)} ms, failed {b.failed}")
        opened = f", pool breaker opened after {f(r.breaker_opened_after_s)} s" if r.breaker_opened_after_s else ""
        print(f"  before open  : {x.requests} requests, slow {x.slow}, failed {x.failed}, p50 {f(x.p50_ms)} ms, "
              f"p99 {f(x.p99_ms)} ms (settled {f(r.settled_after_s)} s after the switch{opened})")
        print(f"  after open   : {a.requests} requests, added p50 {f(a.added_p50_ms)} ms, added p99 "
              f"{f(a.added_p99_ms)} ms, slow {a.slow}, failed {a.failed}")
        print(f"  target (<= {TARGET_SLOW_BEFORE_OPEN} slow before, <= {TARGET_ADDED_P99_MS:g} ms added p99 and 0 "
              f"failed after): {'met' if r.meets_target else 'NOT met'}")


async def bench(duration: float, redis_url: str, fakes: dict[str, str]) -> list[Report]:
    reports = [await run_ctops(fakes, redis_url, duration)]
    async with httpx.AsyncClient() as client:
        await set_mode(client, fakes["primary"], "ok")
    why = await asyncio.to_thread(ensure_litellm)
    if why is None:
        try:
            for layout in ("fallbacks", "order"):
                reports.append(await run_litellm(fakes, duration, layout))
                async with httpx.AsyncClient() as client:
                    await set_mode(client, fakes["primary"], "ok")
            return reports
        except Exception as exc:  # noqa: BLE001 - report it and measure the plain client instead
            why = f"LiteLLM failed to run: {type(exc).__name__}: {exc}"[:300]
        async with httpx.AsyncClient() as client:
            await set_mode(client, fakes["primary"], "ok")
    reports.append(await run_plain(fakes, duration, why))
    return reports


def run(args: argparse.Namespace) -> int:
    duration = max(float(getattr(args, "duration", 0) or 0), MIN_DURATION_S)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="ctops-bench-llm-") as tmp, EmbeddedRedis() as redis:
        fakes, children = start_fakes(Path(tmp))
        try:
            # the standard loop for both: LiteLLM under uvloop fell far behind the schedule here
            reports = asyncio.run(bench(duration, redis.url, fakes))
        finally:
            stop_all(children)
    if getattr(args, "json", False):
        print(json.dumps({"rate_rps": RATE, "duration_s": duration, "timeout_ms": TIMEOUT_MS,
                          "systems": [asdict(r) for r in reports]}, indent=2))
    else:
        print_table(reports)
    return 0 if reports[0].meets_target else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m ctops_tools.bench.llm")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--duration", type=float, default=MIN_DURATION_S)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(run(ap.parse_args()))

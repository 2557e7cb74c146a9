"""`ctops bench console`: the console refreshing a 2,000-server cluster, measured headless.

Each refresh goes through the real path: JSON bytes -> ClusterState (worker thread) -> table rows
(worker thread) -> diff and cell updates (event loop) -> Textual redraw (event loop). Reported
per refresh: CPU time of the event-loop thread to apply it and draw it (what blocks keys and
drawing; thread CPU time, so neither the worker threads nor a busy machine count), the apply step
alone (wall and CPU, as the app reports it through `on_applied`), time in the worker thread
(parse + rows), the longest event-loop stall a probe saw (the parse thread holds the GIL in
slices), and whether the cursor stayed on its row. Scenarios: `steady` (values move but nothing
visible changes, the usual second), `some` (5 % of rows change), `churn` (every row changes: the
worst case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from console.client import Whoami, parse_state
from ctops.wire import (
    ClusterState,
    DispatcherView,
    HostMetrics,
    HostView,
    ProcessMetrics,
    ServerView,
    WatchdogStatus,
)

SCENARIOS = ("steady", "some", "churn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", type=int, default=2000, help="servers (and hosts) in the cluster (default 2000)")
    p.add_argument("--refreshes", type=int, default=30, help="refreshes measured per scenario (default 30)")
    p.add_argument("--size", default="200x50", help="terminal size, COLSxROWS (default 200x50)")
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="scenario(s) to run (default all)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def make_state(n: int, rng: random.Random, generation: int, changed: Callable[[int], bool]) -> ClusterState:
    """A cluster of n servers on n hosts (one supervised process each); rows for which `changed(i)` is
    true get visibly different values every generation, the others only invisible jitter."""
    metrics = HostMetrics(cpu_percent=20, memory_percent=40, memory_used_bytes=1 << 30, disk_percent=50,
                          load1=0.5, load5=0.4, load15=0.3)
    servers, hosts = [], []
    for i in range(1, n + 1):
        bump = generation if changed(i) else 0
        state = "down" if i % 97 == 0 else "up"
        servers.append(ServerView(
            name=f"trainer-{i}", url=f"http://10.{i // 250}.{i % 250}.1:8080", host=f"host-{i}", state=state,
            admin="enabled", health=state, active_sessions=(i * 7 + bump) % 23,
            heartbeat_age_ms=rng.randrange(0, 1500), cpu_percent=(i * 13 + bump) % 97 + rng.random() * 0.4,
            memory_percent=20 + (i * 11 + bump) % 70 + rng.random() * 0.4, since_ms=1_700_000_000_000,
            last_check_ms=1_700_000_000_000 + generation * 1000,
            diagnosis="software fault" if state == "down" else "ok",
            last_error="connection refused" if state == "down" else None,
        ))
        hosts.append(HostView(
            name=f"host-{i}", state="alive", heartbeat_age_ms=rng.randrange(0, 1500), seq=generation * 3 + i,
            metrics=metrics, processes=[ProcessMetrics(
                name=f"trainer-{i}", state="running", pid=10_000 + i, restarts=0,
                cpu_percent=(i * 7 + bump) % 40 + rng.random() * 0.4, rss_bytes=(80 << 20) + rng.randrange(1 << 19),
                check_latency_ms=3.0 + rng.random() * 0.4)],
            watchdog=WatchdogStatus(checker_alive=True, guard_alive=True, generation=1),
        ))
    return ClusterState(
        cluster="bench", leader="A", served_by="A", now_ms=1_700_000_000_000 + generation * 1000,
        dispatchers=[
            DispatcherView(name="A", role="leader", healthy=True, ops_url="http://a:9001", data_url="http://a:80",
                           epoch=3, lease_age_ms=150, peer_heartbeat_age_ms=200),
            DispatcherView(name="B", role="standby", healthy=True, ops_url="http://b:9001", data_url="http://b:80",
                           epoch=3, peer_heartbeat_age_ms=200),
        ],
        servers=servers, hosts=hosts,
    )


class BenchSource:
    """Serves pre-made JSON documents in turn and parses them in a worker thread, as ConsoleClient does."""

    def __init__(self, docs: list[bytes]) -> None:
        self.docs = docs
        self.i = 0
        self.parse_ms: list[float] = []

    def describe(self) -> str:
        return "bench://"

    async def whoami(self) -> Whoami:
        return Whoami(name="bench", role="viewer")

    async def state(self) -> ClusterState:
        doc = self.docs[self.i % len(self.docs)]
        self.i += 1
        t0 = time.perf_counter()
        state = await asyncio.to_thread(parse_state, doc)
        self.parse_ms.append((time.perf_counter() - t0) * 1000)
        return state

    async def events(self, after: str | None, limit: int = 200) -> list:
        return []

    async def providers(self) -> list:
        return []

    async def aclose(self) -> None:
        return None


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else 0.0


async def measure(n: int, refreshes: int, size: tuple[int, int], scenario: str) -> dict[str, Any]:
    from console.app import Applied, create_app
    from console.widgets.tables import ServersTable

    rng = random.Random(7)
    changed: Callable[[int], bool] = {
        "steady": lambda i: False, "some": lambda i: i % 20 == 0, "churn": lambda i: True,
    }[scenario]
    docs = [make_state(n, rng, g, changed).model_dump_json().encode() for g in range(1, 4)]
    source = BenchSource(docs)
    applied: list[Applied] = []
    app = create_app(source, interval=3600, on_applied=applied.append)  # type: ignore[arg-type]
    stalls: list[float] = []
    async with app.run_test(size=size) as pilot:
        while app.applied < 1:
            await pilot.pause(0.05)
        table = app.query_one(ServersTable)
        target = f"trainer-{min(n, 1500)}"
        table.move_cursor(row=table.get_row_index(target), animate=False)
        await pilot.pause(0.2)
        probing = True

        async def probe() -> None:
            while probing:
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                stalls.append((time.perf_counter() - t0) * 1000 - 1)

        loop_cpu_ms, cells = [], []
        for _ in range(refreshes):
            stalls.clear()
            task = asyncio.create_task(probe())
            cells_before = sum(t.cells_updated for t in app.tables())
            seen = app.applied
            app.action_refresh_now()
            while app.applied <= seen:  # noqa: ASYNC110 - polling the app's counter is the point
                await asyncio.sleep(0.0005)
            c0 = time.thread_time()  # this coroutine runs on the event-loop thread: the redraw is counted
            await pilot.pause()  # let the redraw happen
            loop_cpu_ms.append(applied[-1].apply_cpu_ms + (time.thread_time() - c0) * 1000)
            probing = False
            await task
            probing = True
            cells.append(sum(t.cells_updated for t in app.tables()) - cells_before)
            worst = max(stalls, default=0.0)
            stalls.clear()
            stalls.append(worst)
            _stall_max.append(worst)
        kept = table.selected == target
        apply = [a.apply_ms for a in applied[-refreshes:]]
        apply_cpu = [a.apply_cpu_ms for a in applied[-refreshes:]]
        rows = [a.parse_ms for a in applied[-refreshes:]]
        parse = [p + r for p, r in zip(source.parse_ms[-refreshes:], rows, strict=False)]
    stall = list(_stall_max)
    _stall_max.clear()
    return {
        "scenario": scenario, "servers": n, "hosts": n, "refreshes": refreshes, "size": f"{size[0]}x{size[1]}",
        "json_bytes": len(docs[0]),
        "loop_cpu_ms": {"median": round(statistics.median(loop_cpu_ms), 2), "p99": round(_pct(loop_cpu_ms, 0.99), 2)},
        "apply_ms": {"median": round(statistics.median(apply), 2), "p99": round(_pct(apply, 0.99), 2)},
        "apply_cpu_ms": {"median": round(statistics.median(apply_cpu), 2), "p99": round(_pct(apply_cpu, 0.99), 2)},
        # JSON parse + validation and row preparation, both in worker threads
        "thread_ms": {"median": round(statistics.median(parse), 2), "p99": round(_pct(parse, 0.99), 2)},
        "max_loop_stall_ms": {"median": round(statistics.median(stall), 2), "p99": round(_pct(stall, 0.99), 2)},
        "cells_changed_per_refresh": round(statistics.median(cells)),
        "cursor_kept": kept,
    }


_stall_max: list[float] = []


def run(args: argparse.Namespace) -> int:
    n = getattr(args, "servers", 2000)
    refreshes = getattr(args, "refreshes", 30)
    cols, _, rows = str(getattr(args, "size", "200x50")).partition("x")
    scenarios = getattr(args, "scenario", None) or list(SCENARIOS)
    from console.main import SWITCH_INTERVAL_S

    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as `ctops console` runs
    results = [asyncio.run(measure(n, refreshes, (int(cols), int(rows)), s)) for s in scenarios]
    ok = all(r["cursor_kept"] for r in results)
    if getattr(args, "json", False):
        print(json.dumps({"target_ms": 50, "results": results}, indent=2))
    else:
        print(f"console refresh, {n} servers + {n} hosts, {results[0]['size']}, {refreshes} refreshes each "
              f"(JSON {results[0]['json_bytes'] / 1e6:.1f} MB); target: <= 50 ms per refresh on the event loop")
        print("loop CPU: event-loop thread CPU to apply and draw it; apply: the diff step "
              "alone (wall);")
        print("thread: parse + rows in worker threads; stall: longest event-loop delay a 1 ms probe saw (wall)")
        print(f"{'scenario':<8} {'loop CPU med/p99':>17} {'apply med/p99':>14} {'thread med/p99':>15} "
              f"{'stall med/p99':>14} {'cells':>6}  cursor")
        def mp(r: dict[str, object], k: str) -> str:
            v = r[k]
            return f"{v['median']:.1f}/{v['p99']:.1f}"  # type: ignore[index]

        for r in results:
            cursor, cells = "kept" if r["cursor_kept"] else "LOST", r["cells_changed_per_refresh"]
            print(f"{r['scenario']:<8} {mp(r, 'loop_cpu_ms'):>17} {mp(r, 'apply_ms'):>14} {mp(r, 'thread_ms'):>15} "
                  f"{mp(r, 'max_loop_stall_ms'):>14} {cells:>6}  {cursor}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctops bench console", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The agent's optional Prometheus port (`metrics_listen` in its [[agents]] entry; off by default).

It answers from its own thread (prometheus_client's server), so a scrape never waits on the agent's
event loop, and a stalled loop still shows in what it answers. Each scrape reads the watchdog's
snapshot and the host as it is then; nothing is counted for it in between.

Names match the dispatcher's `/metrics` where the meaning is the same (`ctops_process_state`,
`ctops_process_restarts_total`, `ctops_host_*`), with the host as a label, so one query covers both
sources. CPU is exported as seconds consumed (counters, for `rate()`), never as a percentage: a
percentage is measured between two calls, and the scrape must not shift the interval the heartbeat
measures its own over.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import get_args

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ctops import __version__
from ctops.config import split_hostport
from ctops.wire import ProcessState, WatchdogStatus

log = logging.getLogger("ctops.agent")

PROCESS_STATES: tuple[str, ...] = get_args(ProcessState)
# (processes as the watchdog reports them, its own status), e.g. Supervisor.snapshot
Snapshot = Callable[[], tuple[list[dict], WatchdogStatus]]


class AgentCollector(Collector):
    def __init__(self, host: str, snapshot: Snapshot, disk_path: str, heartbeats: Callable[[], dict[str, int]]) -> None:
        self.host, self.snapshot, self.disk_path, self.heartbeats = host, snapshot, disk_path, heartbeats
        self._procs: dict[int, psutil.Process] = {}

    def _process(self, pid: int | None) -> psutil.Process | None:
        if pid is None:
            return None
        p = self._procs.get(pid)
        if p is None:
            try:
                p = self._procs[pid] = psutil.Process(pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return None
        return p

    def collect(self) -> Iterable[Metric]:
        h = self.host
        info = GaugeMetricFamily("ctops_build_info", "ctops version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        procs, wd = self.snapshot()
        state = GaugeMetricFamily("ctops_process_state", "supervised process state (1 for the current one)",
                                  labels=["host", "process", "state"])
        restarts = CounterMetricFamily("ctops_process_restarts", "restarts by the watchdog", labels=["host", "process"])
        cpu = CounterMetricFamily("ctops_process_cpu_seconds", "CPU time the process used (user + system)",
                                  labels=["host", "process"])
        rss = GaugeMetricFamily("ctops_process_resident_memory_bytes", "resident memory", labels=["host", "process"])
        check = GaugeMetricFamily("ctops_process_check_latency_seconds", "latency of the last liveness check",
                                  labels=["host", "process"])
        live: set[int] = set()
        for p in procs:
            name = p["name"]
            for s in PROCESS_STATES:
                state.add_metric([h, name, s], 1.0 if p["state"] == s else 0.0)
            restarts.add_metric([h, name], float(p["restarts"]))
            if p.get("check_latency_ms") is not None:
                check.add_metric([h, name], p["check_latency_ms"] / 1000)
            proc = self._process(p["pid"])
            if proc is None:
                continue
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu.add_metric([h, name], t.user + t.system)
                    rss.add_metric([h, name], float(proc.memory_info().rss))
                live.add(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._procs.pop(proc.pid, None)
        for pid in list(self._procs):
            if pid not in live:
                del self._procs[pid]
        yield from (state, restarts, cpu, rss, check)

        alive = GaugeMetricFamily("ctops_agent_watchdog_thread_alive", "1 while the watchdog's thread beats",
                                  labels=["host", "thread"])
        alive.add_metric([h, "checker"], 1.0 if wd.checker_alive else 0.0)
        alive.add_metric([h, "guard"], 1.0 if wd.guard_alive else 0.0)
        yield alive
        wd_restarts = CounterMetricFamily("ctops_agent_watchdog_restarts", "the watchdog's own threads and loop "
                                          "restarted after stalling", labels=["host", "what"])
        wd_restarts.add_metric([h, "thread"], float(wd.thread_restarts))
        wd_restarts.add_metric([h, "loop"], float(wd.loop_restarts))
        yield wd_restarts

        hb = self.heartbeats()
        made = CounterMetricFamily("ctops_agent_heartbeats", "heartbeats the agent made", labels=["host"])
        made.add_metric([h], float(hb["made"]))
        yield made
        failing = GaugeMetricFamily("ctops_agent_heartbeat_failures_in_row", "rounds in a row no dispatcher took "
                                    "the heartbeat", labels=["host"])
        failing.add_metric([h], float(hb["failures_in_row"]))
        yield failing
        dropped = CounterMetricFamily("ctops_agent_events_dropped", "events dropped from a full outbox",
                                      labels=["host"])
        dropped.add_metric([h], float(hb["events_dropped"]))
        yield dropped
        yield from self._host()

    def _host(self) -> Iterable[Metric]:
        h = self.host
        cpu = CounterMetricFamily("ctops_host_cpu_seconds", "host CPU time by mode", labels=["host", "mode"])
        t = psutil.cpu_times()
        for mode in ("user", "system", "idle", "iowait"):
            if hasattr(t, mode):
                cpu.add_metric([h, mode], float(getattr(t, mode)))
        yield cpu
        vm = psutil.virtual_memory()
        mem = GaugeMetricFamily("ctops_host_memory_percent", "host memory use", labels=["host"])
        mem.add_metric([h], vm.percent)
        yield mem
        disk = GaugeMetricFamily("ctops_host_disk_percent", "use of the disk the agent watches", labels=["host"])
        try:
            disk.add_metric([h], psutil.disk_usage(self.disk_path).percent)
        except OSError:
            pass
        yield disk
        load = GaugeMetricFamily("ctops_host_load1", "1-minute load average", labels=["host"])
        load.add_metric([h], os.getloadavg()[0])
        yield load


def start(host: str, listen: str, collector: Collector) -> threading.Thread:
    """Serve GET /metrics on `listen` from a daemon thread; a port that cannot be bound stops the
    agent at start (ConfigError-like OSError), never later."""
    addr, port = split_hostport(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    _server, thread = start_http_server(port, addr=addr, registry=registry)
    log.info("agent %s: Prometheus metrics on http://%s/metrics", host, listen)
    return thread

"""Host and process metrics with psutil, cheap enough to take every second."""

from __future__ import annotations

import os

import psutil

from ctops.wire import HostMetrics


class ProcessSampler:
    """Keeps a psutil.Process per pid: cpu_percent needs the previous sample of the same object."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int | None) -> tuple[float, int]:
        if pid is None:
            return 0.0, 0
        p = self._procs.get(pid)
        try:
            if p is None:
                p = self._procs[pid] = psutil.Process(pid)
                p.cpu_percent(None)
            with p.oneshot():
                return p.cpu_percent(None), p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._procs.pop(pid, None)
            return 0.0, 0

    def forget_others(self, live: set[int]) -> None:
        for pid in list(self._procs):
            if pid not in live:
                del self._procs[pid]


def host_metrics(disk_path: str = "/") -> HostMetrics:
    vm = psutil.virtual_memory()
    try:
        disk = psutil.disk_usage(disk_path).percent
    except OSError:
        disk = 0.0
    l1, l5, l15 = os.getloadavg()
    return HostMetrics(cpu_percent=psutil.cpu_percent(None), memory_percent=vm.percent,
                       memory_used_bytes=vm.total - vm.available, disk_percent=disk,
                       load1=l1, load5=l5, load15=l15)

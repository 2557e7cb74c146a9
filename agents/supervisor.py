"""The agent's watchdog: supervises the host's processes with two threads that watch each other.

The checker thread reaps exits (pidfds, so a crash is seen at once), runs liveness probes,
restarts with backoff and declares crash loops. The guard thread only watches the checker (and
the agent's heartbeat loop): when the checker stops beating it starts a new one with the next
generation number. Every action is taken under the lock and only by the checker of the current
generation, so a stale checker that wakes up again can never act.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

from agents import handdown
from agents.probes import ProbeResult, probe
from agents.sdnotify import NotifyListener
from agents.states import BACKOFF, FATAL, RUNNING, STARTING, STOPPED, check_move
from ctops.clock import now_ms
from ctops.config import ProcessSpec
from ctops.opsapi import ProcessAction
from ctops.sdnotify import child_env
from ctops.wire import AgentEvent, ProcessState, WatchdogStatus

log = logging.getLogger("ctops.agent.watchdog")

Command = ProcessAction  # a staff command is the ops-API contract's process action
# without a liveness probe, a process that stayed up this long counts as having started well
STABLE_AFTER = 1.0
TICK = 0.2  # the checker beats at least this often
STALL_AFTER = 1.0  # a thread silent this long is replaced


class StaleGeneration(Exception):
    pass


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


@dataclass(eq=False)
class Spare:
    """A process started ahead of need, imported and waiting on the shared socket for its turn."""

    proc: subprocess.Popen[bytes]
    pidfd: int
    handover: socket.socket
    ready: bool = False  # it said it is set up and waiting


@dataclass(eq=False)
class Supervised:
    spec: ProcessSpec
    state: ProcessState = STOPPED  # changed only by change_state
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    wanted: bool = True
    next_start: float = 0.0  # when a process in backoff may start again
    quick_exits: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    check_due: float = 0.0
    check: Future[ProbeResult] | None = None
    check_failures: int = 0
    check_latency_ms: float | None = None
    ever_alive: bool = False
    kill_reason: str | None = None  # why the watchdog is taking it down
    staff_restart: bool = False  # restarted on request: at once, and not counted as a crash
    stop_deadline: float | None = None  # SIGKILL after this, when stopping gracefully
    notify: NotifyListener | None = None
    waiters: list[tuple[Command, Future[str]]] = field(default_factory=list)
    listener: socket.socket | None = None  # spec.listen, bound by the agent and handed to each process
    spare: Spare | None = None
    spare_due: float = 0.0  # a spare that died is started again no sooner than this
    spare_failures: int = 0
    handovers: int = 0  # times a spare took over
    handed_to: int | None = None  # the pid of the spare that took over last, until a new spare starts

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def change_state(self, new: ProcessState, why: str = "") -> None:
        """The one way a process's state changes: checked against `agents.states.MOVES` and logged."""
        old = self.state
        if new == old:
            return
        check_move(self.spec.name, old, new)
        self.state = new
        log.info("%s: %s -> %s%s", self.spec.name, old, new, f" ({why})" if why else "")


class Supervisor:
    def __init__(self, specs: list[ProcessSpec], log_dir: str | None = None,
                 on_event: Callable[[AgentEvent], None] | None = None, *,
                 restart_loop: Callable[[], object] | None = None, loop_stall_after: float = 5.0,
                 systemd_ping: Callable[[], None] | None = None) -> None:
        """`restart_loop`: starts the agent's heartbeat loop again when it has not beaten for
        `loop_stall_after` s; `systemd_ping`: tells systemd's watchdog all is well (under systemd)."""
        self.items = {s.name: Supervised(s) for s in specs}
        self.log_dir = log_dir
        self.on_event = on_event or (lambda e: None)
        self.lock = threading.RLock()
        self.generation = 0
        self.guard_generation = 0
        self.thread_restarts = 0
        self.loop_restarts = 0
        self.checker_beat = time.monotonic()
        self.guard_beat = time.monotonic()
        self.running = False
        self.probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._commands: deque[tuple[str, Command, Future[str]]] = deque()
        self._notify_dir: str | None = None
        # the asyncio heartbeat loop is watched too, once it beats (the heartbeat sender sets loop_beat)
        self.loop_beat: float | None = None
        # when the guard last asked for the loop to be started again: it waits a stall time before
        # asking again, but only the loop's own beat counts as alive for systemd's watchdog
        self.loop_restart_asked = 0.0
        self.restart_loop = restart_loop
        self.loop_stall_after = loop_stall_after
        self.systemd_ping = systemd_ping

    # --- public, thread-safe -------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        if any(i.spec.liveness.kind == "notify" for i in self.items.values()):
            self._notify_dir = tempfile.mkdtemp(prefix="ctops-notify-")
            for item in self.items.values():
                if item.spec.liveness.kind == "notify":
                    item.notify = NotifyListener(os.path.join(self._notify_dir, f"{item.spec.name}.sock"))
        self._start_checker()
        self._start_guard()

    def command(self, name: str, action: Command) -> Future[str]:
        fut: Future[str] = Future()
        if name not in self.items:
            fut.set_exception(KeyError(f"no supervised process named {name!r}"))
            return fut
        self._commands.append((name, action, fut))
        self._wake()
        return fut

    def snapshot(self) -> tuple[list[dict], WatchdogStatus]:
        now = time.monotonic()
        with self.lock:
            procs = [{"name": i.spec.name, "state": i.state, "pid": i.pid, "restarts": i.restarts,
                      "last_exit": i.last_exit, "check_latency_ms": i.check_latency_ms, "spare": self._spare_view(i)}
                     for i in self.items.values()]
            wd = WatchdogStatus(checker_alive=now - self.checker_beat < STALL_AFTER,
                                guard_alive=now - self.guard_beat < STALL_AFTER,
                                generation=self.generation, thread_restarts=self.thread_restarts,
                                loop_restarts=self.loop_restarts)
        return procs, wd

    def spare(self, name: str) -> dict | None:
        """The warm spare of a process, if one is started: its pid and whether it is waiting."""
        with self.lock:
            sp = self.items[name].spare
            return None if sp is None or sp.proc.returncode is not None else {"pid": sp.proc.pid, "ready": sp.ready}

    @staticmethod
    def _spare_view(item: Supervised) -> dict | None:
        """For the heartbeat: the state of the warm spare of a process configured with one (see SpareView)."""
        if not item.spec.warm_spare:
            return None
        sp = item.spare
        if sp is not None and sp.proc.returncode is None:
            return {"state": "ready" if sp.ready else "warming", "pid": sp.proc.pid, "handovers": item.handovers}
        if item.handed_to is not None and item.handed_to == item.pid:
            return {"state": "handed_over", "pid": item.handed_to, "handovers": item.handovers}
        return {"state": "none", "pid": None, "handovers": item.handovers}

    def stop(self, timeout: float = 15.0) -> None:
        with self.lock:
            self.running = False
            for item in self.items.values():
                item.wanted = False
        self._wake()
        deadline = time.monotonic() + timeout
        for item in self.items.values():
            with self.lock:
                self._dismiss_spare(item)
            self._terminate_blocking(item, deadline)
            self._close_listener(item)
            if item.notify:
                item.notify.close()
        self.probes.shutdown(wait=False, cancel_futures=True)
        if self._notify_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self._notify_dir)

    # --- threads -------------------------------------------------------------------------------
    def _start_checker(self) -> None:
        with self.lock:
            self.generation += 1
            gen = self.generation
            self.checker_beat = time.monotonic()
        threading.Thread(target=self._checker, args=(gen,), name=f"watchdog-checker-{gen}", daemon=True).start()

    def _start_guard(self) -> None:
        with self.lock:
            self.guard_generation += 1
            gen = self.guard_generation
            self.guard_beat = time.monotonic()
        threading.Thread(target=self._guard, args=(gen,), name=f"watchdog-guard-{gen}", daemon=True).start()

    def _guard(self, gen: int) -> None:
        """Second thread: watches only the checker (and the heartbeat loop); replaces what stalls."""
        while self.running and self.guard_generation == gen:
            now = time.monotonic()
            self.guard_beat = now
            if now - self.checker_beat > STALL_AFTER:
                log.error("watchdog checker (generation %d) silent for %.1fs; starting a new one",
                          self.generation, now - self.checker_beat)
                with self.lock:
                    self.thread_restarts += 1
                self._start_checker()
                self._event("watchdog_restarted", None, "warning",
                            f"watchdog checker thread stalled; generation {self.generation} took over")
            if self.loop_beat is not None and self.restart_loop \
                    and now - max(self.loop_beat, self.loop_restart_asked) > self.loop_stall_after:
                log.error("heartbeat loop silent for %.1fs; restarting it", now - self.loop_beat)
                with self.lock:
                    self.loop_restarts += 1
                self.loop_restart_asked = now
                self.restart_loop()
                self._event("loop_restarted", None, "warning", "agent heartbeat loop stalled and was restarted")
            # a restart asked for is not a loop alive: with the event loop itself blocked it never
            # happens, the pings stop and systemd restarts the agent
            fresh = now - self.checker_beat < STALL_AFTER and (
                self.loop_beat is None or now - self.loop_beat < self.loop_stall_after)
            if fresh and self.systemd_ping:
                self.systemd_ping()
            time.sleep(TICK)

    def _checker(self, gen: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        registered: dict[int, Supervised] = {}
        try:
            while self.running and self.generation == gen:
                now = time.monotonic()
                self.checker_beat = now
                if now - self.guard_beat > STALL_AFTER:
                    log.error("watchdog guard silent for %.1fs; starting a new one", now - self.guard_beat)
                    self._start_guard()
                self._sync_selector(sel, registered)
                for key, _ in sel.select(self._timeout(now)):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif isinstance(key.data, NotifyListener):
                        key.data.drain(time.monotonic())
                try:
                    with self.lock:
                        if self.generation != gen:
                            raise StaleGeneration
                        self._step(time.monotonic())
                except StaleGeneration:
                    return
        finally:
            sel.close()

    def _sync_selector(self, sel: selectors.BaseSelector, registered: dict[int, Supervised]) -> None:
        wanted: dict[int, Supervised] = {}
        for item in self.items.values():
            if item.pidfd is not None:
                wanted[item.pidfd] = item
            if item.notify is not None:
                wanted[item.notify.fileno()] = item
            if item.spare is not None:
                wanted[item.spare.pidfd] = item
                if not item.spare.ready:  # until it says ready; then the channel is quiet until we speak
                    wanted[item.spare.handover.fileno()] = item
        for fd in list(registered):
            if fd not in wanted:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    sel.unregister(fd)
                del registered[fd]
        for fd, item in wanted.items():
            if fd not in registered:
                data: object = item.notify if item.notify and fd == item.notify.fileno() else "exit"
                with contextlib.suppress(KeyError, ValueError, OSError):
                    sel.register(fd, selectors.EVENT_READ, data)
                registered[fd] = item

    def _timeout(self, now: float) -> float:
        due = [i.next_start for i in self.items.values() if i.state == BACKOFF]
        due += [i.check_due for i in self.items.values()
                if i.pid and i.check is None and i.spec.liveness.kind != "none"]
        due += [i.stop_deadline for i in self.items.values() if i.stop_deadline is not None]
        due += [i.spare_due for i in self.items.values() if self._spare_wanted(i)]
        soonest = min(due, default=now + TICK)
        return max(0.0, min(TICK, soonest - now))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # --- the checker's work (under the lock) ---------------------------------------------------
    def _step(self, now: float) -> None:
        while self._commands:
            name, action, fut = self._commands.popleft()
            self._apply_command(self.items[name], action, fut, now)
        for item in self.items.values():
            self._reap_spare(item, now)
            self._reap(item, now)
            if item.state == BACKOFF and item.wanted and now >= item.next_start:
                self._spawn(item, now)
            elif item.state == STOPPED and item.wanted and item.proc is None and self.running:
                self._spawn(item, now)
            if item.pid:
                self._liveness(item, now)
            if item.stop_deadline is not None and item.pid and now >= item.stop_deadline:
                self._killpg(item, signal.SIGKILL)
                item.stop_deadline = None
            if self._spare_wanted(item) and now >= item.spare_due:
                self._start_spare(item, now)

    def _apply_command(self, item: Supervised, action: Command, fut: Future[str], now: float) -> None:
        if action == "start":
            item.wanted = True
            item.restart_times.clear()
            if item.pid:
                fut.set_result(f"already running (pid {item.pid})")
                return
            item.change_state(STOPPED, "started by staff")
            item.proc = None
            self._spawn(item, now)
            fut.set_result(f"started (pid {item.pid})" if item.pid else f"not started: {item.last_exit}")
            return
        if action == "stop":
            item.wanted = False
            # a stopped server refuses connections rather than letting them wait for nobody
            self._dismiss_spare(item)
            self._close_listener(item)
            if not item.pid:
                item.change_state(STOPPED, "stopped by staff")
                fut.set_result("already stopped")
                return
            self._graceful_stop(item, now, "stopped by staff")
            item.waiters.append((action, fut))
            return
        # restart: a graceful stop, then the reaper starts it again at once. A fresh process, not the
        # spare: staff restart to pick up a change, which a spare started earlier would not have
        self._dismiss_spare(item)
        item.wanted = True
        item.restart_times.clear()
        if not item.pid:
            item.change_state(STOPPED, "restarted by staff")
            item.proc = None
            self._spawn(item, now)
            fut.set_result(f"started (pid {item.pid})")
            return
        self._graceful_stop(item, now, "restarted by staff")
        item.staff_restart = True
        item.waiters.append((action, fut))

    def _graceful_stop(self, item: Supervised, now: float, reason: str) -> None:
        item.kill_reason = reason
        self._killpg(item, signal.SIGTERM)
        self._killpg(item, signal.SIGCONT)  # a frozen process would never see the SIGTERM
        item.stop_deadline = now + item.spec.stop_grace_ms / 1000

    def _launch(self, item: Supervised, spare: bool) -> handdown.Launch:
        spec = item.spec
        # systemd's NOTIFY_SOCKET is the agent's own: a child that inherited it would speak for the agent
        env = {**child_env(dict(os.environ)), **spec.env}
        if item.notify:
            env["NOTIFY_SOCKET"] = item.notify.path
        out: int | IO[bytes] = subprocess.DEVNULL
        fh = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            fh = open(os.path.join(self.log_dir, f"{spec.name}.log"), "ab")  # noqa: SIM115
            out = fh
        try:
            if spec.listen and item.listener is None:
                item.listener = handdown.bind(spec.listen)
            return handdown.launch(spec.command, env, spec.cwd, out, spec.name, item.listener, spare)
        finally:
            if fh:
                fh.close()

    def _spawn(self, item: Supervised, now: float) -> None:
        spec = item.spec
        if item.spare is not None and self._promote(item, now):
            return
        if item.notify:
            item.notify.last_ping = None
        try:
            item.proc = self._launch(item, spare=False).proc
        except OSError as exc:
            item.proc = None
            item.last_exit = f"cannot start: {exc.strerror or exc}"
            log.error("cannot start %s: %s", spec.name, exc)
            self._schedule_restart(item, now, quick=True)
            return
        item.pidfd = os.pidfd_open(item.proc.pid)
        self._adopt(item, now)
        log.info("started %s (pid %d)", spec.name, item.proc.pid)

    def _adopt(self, item: Supervised, now: float) -> None:
        """item.proc is the process now serving: judge it from scratch."""
        spec = item.spec
        item.started_at = now
        item.ever_alive = False
        item.check_failures = 0
        item.kill_reason = None
        item.stop_deadline = None
        kind = spec.liveness.kind
        item.change_state(RUNNING if kind == "none" else STARTING, f"pid {item.proc.pid}" if item.proc else "")
        # probe soon after start so a restarted server is back in service quickly
        item.check_due = now + min(0.05, spec.liveness.interval_ms / 1000)

    # --- the warm spare ------------------------------------------------------------------------
    def _spare_wanted(self, item: Supervised) -> bool:
        # started once the active process is up, so the two do not compete for the CPU at start
        return (item.spec.warm_spare and item.spare is None and item.wanted and self.running
                and item.state == RUNNING and item.pid is not None and item.stop_deadline is None)

    def _start_spare(self, item: Supervised, now: float) -> None:
        try:
            launch = self._launch(item, spare=True)
        except OSError as exc:
            self._spare_failed(item, now, f"cannot start: {exc.strerror or exc}")
            return
        assert launch.handover is not None
        item.spare = Spare(launch.proc, os.pidfd_open(launch.proc.pid), launch.handover)
        item.handed_to = None
        log.info("started a warm spare for %s (pid %d)", item.spec.name, launch.proc.pid)

    def _spare_failed(self, item: Supervised, now: float, reason: str) -> None:
        item.spare_failures += 1
        delay = min(max(1000, item.spec.backoff_initial_ms) * 2 ** (item.spare_failures - 1),
                    max(1000, item.spec.backoff_max_ms)) / 1000
        item.spare_due = now + delay
        log.warning("warm spare of %s %s; next one in %.1fs", item.spec.name, reason, delay)
        if item.spare_failures == 1:  # once per run of failures, not at every retry
            self._event("spare_failed", item.spec.name, "warning",
                        f"warm spare of {item.spec.name} {reason}; restarts will be cold until one starts")

    def _reap_spare(self, item: Supervised, now: float) -> None:
        sp = item.spare
        if sp is None:
            return
        if not sp.ready:
            try:
                word = sp.handover.recv(16)
            except (BlockingIOError, InterruptedError):
                word = None
            except OSError:
                word = b""
            if word:
                sp.ready = handdown.READY in word
                if sp.ready:
                    item.spare_failures = 0
            elif word == b"" and sp.proc.poll() is None:
                # it dropped the channel but lives on: it could never be told to take over
                self._dismiss_spare(item)
                self._spare_failed(item, now, "closed its handover channel")
                return
        if sp.proc.poll() is None:
            return
        self._close_spare(item)
        self._spare_failed(item, now, describe_exit(sp.proc.returncode))

    def _close_spare(self, item: Supervised) -> None:
        sp, item.spare = item.spare, None
        if sp is None:
            return
        with contextlib.suppress(OSError):
            os.close(sp.pidfd)
        sp.handover.close()

    def _dismiss_spare(self, item: Supervised) -> None:
        """End the spare (closing its channel tells it to exit; SIGKILL makes sure)."""
        sp = item.spare
        if sp is None:
            return
        self._close_spare(item)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sp.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            sp.proc.wait(1)

    def _promote(self, item: Supervised, now: float) -> bool:
        """The spare takes over at once; False if it is gone (then a fresh process is started)."""
        sp = item.spare
        assert sp is not None
        try:
            if sp.proc.poll() is not None:
                raise ProcessLookupError
            sp.handover.setblocking(True)
            sp.handover.sendall(handdown.GO)
        except OSError:
            self._dismiss_spare(item)
            return False
        item.spare = None
        sp.handover.close()
        item.proc, item.pidfd = sp.proc, sp.pidfd
        item.handovers += 1
        item.handed_to = sp.proc.pid
        if item.notify:
            item.notify.last_ping = None
        self._adopt(item, now)
        item.spare_due = now
        log.info("warm spare of %s took over (pid %d)%s", item.spec.name, sp.proc.pid,
                 "" if sp.ready else " before it was ready")
        return True

    def _close_listener(self, item: Supervised) -> None:
        if item.listener is not None:
            item.listener.close()
            item.listener = None

    def _reap(self, item: Supervised, now: float) -> None:
        if item.proc is None or item.proc.poll() is None:
            return
        code = item.proc.returncode
        pgid = item.proc.pid
        reason = describe_exit(code)
        if item.kill_reason:
            reason = f"{item.kill_reason} ({describe_exit(code)})"
        item.last_exit = reason
        if item.pidfd is not None:
            os.close(item.pidfd)
            item.pidfd = None
        if item.check is not None:
            item.check.cancel()
            item.check = None
        item.stop_deadline = None
        item.proc = None
        # the group may have children left after the leader died
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        log.warning("%s %s", item.spec.name, reason)
        for action, fut in item.waiters:
            if action == "stop":
                fut.set_result(f"stopped ({describe_exit(code)})")
        waiters, item.waiters = item.waiters, []
        if not item.wanted or not self.running:
            item.change_state(STOPPED, reason)
            return
        restart = item.spec.restart
        if restart == "never" or (restart == "on-failure" and code == 0 and not item.kill_reason):
            item.change_state(STOPPED, f"{reason}; restart = {restart}")
            item.wanted = False
            self._dismiss_spare(item)
            self._close_listener(item)
            return
        if item.staff_restart:
            item.staff_restart = False
            item.restarts += 1
            item.change_state(BACKOFF, reason)
            item.next_start = now
            self._event("process_restarted", item.spec.name, "info", f"{item.spec.name} {reason}")
        else:
            # one that answered its liveness probe was healthy: it restarts at once (a crash loop is
            # still caught by the restart window); one that never did, or without a probe died
            # young, backs off
            no_probe = item.spec.liveness.kind == "none"
            ran_stable = item.ever_alive if not no_probe else now - item.started_at >= STABLE_AFTER
            self._schedule_restart(item, now, quick=not ran_stable, reason=reason)
        if item.state == BACKOFF and item.next_start <= now:
            self._spawn(item, now)
        for action, fut in waiters:
            if action == "restart":
                fut.set_result(f"restarted (pid {item.pid})" if item.pid else f"restart pending: {item.state}")

    def _schedule_restart(self, item: Supervised, now: float, quick: bool, reason: str = "") -> None:
        spec = item.spec
        window = spec.crashloop_window_ms / 1000
        while item.restart_times and now - item.restart_times[0] > window:
            item.restart_times.popleft()
        if len(item.restart_times) >= spec.crashloop_restarts:
            item.change_state(FATAL, "crash loop")
            item.wanted = False
            self._dismiss_spare(item)
            self._close_listener(item)
            msg = (f"{spec.name} restarted {len(item.restart_times)} times in {window:.0f}s; "
                   f"giving up (last: {item.last_exit})")
            log.error(msg)
            self._event("crash_loop", spec.name, "critical", msg)
            return
        item.restart_times.append(now)
        item.quick_exits = item.quick_exits + 1 if quick else 0
        delay = 0.0
        if item.quick_exits:
            delay = min(spec.backoff_initial_ms * 2 ** (item.quick_exits - 1), spec.backoff_max_ms) / 1000
        item.restarts += 1
        item.change_state(BACKOFF, reason or item.last_exit or "")
        item.next_start = now + delay
        self._event("process_restarted", spec.name, "warning",
                    f"{spec.name} {reason or item.last_exit}; restart #{item.restarts}"
                    + (f" in {delay * 1000:.0f} ms" if delay else ""))

    def _liveness(self, item: Supervised, now: float) -> None:
        spec = item.spec.liveness
        if spec.kind == "none":
            return
        if item.check is not None:
            if not item.check.done():
                return
            result = item.check.result()
            item.check = None
            item.check_latency_ms = round(result.latency_ms, 2)
            if result.ok:
                item.check_failures = 0
                item.ever_alive = True
                if item.state == STARTING:
                    item.change_state(RUNNING, "liveness probe answered")
            else:
                in_grace = not item.ever_alive and now - item.started_at < spec.start_grace_ms / 1000
                if not in_grace:
                    item.check_failures += 1
                if item.check_failures >= spec.failures and item.kill_reason is None:
                    # a hung process ignores SIGTERM: it is killed outright
                    item.kill_reason = f"hung: liveness failed {item.check_failures}x ({result.error})"
                    log.error("%s %s; killing it", item.spec.name, item.kill_reason)
                    self._killpg(item, signal.SIGKILL)
                    return
                if not in_grace:
                    # confirm a failure at once rather than an interval later: a hang is then caught
                    # in about interval + failures x timeout
                    item.check_due = now
                    return
            item.check_due = now + spec.interval_ms / 1000
            return
        if now >= item.check_due and item.kill_reason is None:
            age = None
            if item.notify and item.notify.last_ping is not None:
                age = now - item.notify.last_ping
            item.check = self.probes.submit(probe, spec, age)
            item.check.add_done_callback(lambda _f: self._wake())

    def _killpg(self, item: Supervised, sig: signal.Signals) -> None:
        if item.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(item.proc.pid, sig)

    def _terminate_blocking(self, item: Supervised, deadline: float) -> None:
        proc = item.proc
        if proc is None or proc.poll() is not None:
            item.change_state(STOPPED, "agent stopping")
            return
        self._killpg(item, signal.SIGTERM)
        self._killpg(item, signal.SIGCONT)
        try:
            proc.wait(max(0.1, min(item.spec.stop_grace_ms / 1000, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            self._killpg(item, signal.SIGKILL)
            proc.wait()
        item.change_state(STOPPED, "agent stopping")

    def _event(self, kind: str, process: str | None, severity: str, message: str) -> None:
        self.on_event(AgentEvent(id=uuid.uuid4().hex, kind=kind, process=process, severity=severity,
                                 message=message, ts_ms=now_ms()))

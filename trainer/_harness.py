"""Runs inside the sandbox (python3 -I -S, stdlib only): loads the learner's code, runs each test and
writes one JSON line per event on the original stdout, so results that arrived before a kill survive.

Usage: _harness.py SPEC.json   (SPEC: {"solution", "function", "tests": [{name, call, expected}], "limits"})
"""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import signal
import sys
import types

MARK = "\x1ectops "
MAIN_PID = os.getpid()


class CpuLimit(BaseException):
    """Raised from SIGXCPU; a BaseException so a learner's `except Exception` does not swallow it."""


class _Sink(io.TextIOBase):
    """Where the learner's prints go: kept small so printing in a loop cannot flood the pipe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.size += len(s)
        return len(s)


def _emit(out, event: dict) -> None:
    # a forked child of the learner's code must not report results of its own
    if os.getpid() != MAIN_PID:
        os._exit(0)
    out.write(MARK + json.dumps(event) + "\n")
    out.flush()


def _classify(exc: BaseException, limits: dict) -> tuple[str | None, str]:
    """(limit hit or None, message for the learner)."""
    if isinstance(exc, CpuLimit):
        return "cpu", (f"stopped: used more than the CPU time limit ({limits['cpu_seconds']} s); "
                       "is there an endless loop?")
    if isinstance(exc, MemoryError):
        return "memory", f"stopped: ran out of memory (limit {limits['memory_mb']} MB)"
    if isinstance(exc, RecursionError):
        return None, "RecursionError: too many nested calls; is the recursion missing a base case?"
    if isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
        return "processes", (
            f"stopped: your code tried to start too many processes (limit {limits['max_processes']})"
        )
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file_size", "stopped: your code tried to write a file larger than the limit"
    return None, f"{type(exc).__name__}: {exc}"[:1000]


def main() -> None:
    out = sys.stdout
    spec = json.load(open(sys.argv[1], encoding="utf-8"))
    limits = spec["limits"]
    sink = _Sink(limits.get("output_max_bytes", 65536))
    sys.stdout = sys.stderr = sink

    def on_xcpu(signum, frame):
        raise CpuLimit()

    signal.signal(signal.SIGXCPU, on_xcpu)
    # an oversized write then fails with EFBIG the learner can read, instead of a silent kill
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    try:
        source = open(spec["solution"], encoding="utf-8").read()
        try:
            code = compile(source, "solution.py", "exec")
        except SyntaxError as exc:
            _emit(out, {"event": "load", "ok": False, "limit": None,
                        "message": f"SyntaxError on line {exc.lineno}: {exc.msg}"})
            return
        module = types.ModuleType("solution")
        module.__file__ = "solution.py"
        sys.modules["solution"] = module
        try:
            exec(code, module.__dict__)
        except BaseException as exc:  # noqa: BLE001 - any failure of the learner's code is a result
            limit, message = _classify(exc, limits)
            _emit(out, {"event": "load", "ok": False, "limit": limit,
                        "message": f"your code failed while loading: {message}"})
            return
        fn = spec["function"]
        if not callable(module.__dict__.get(fn)):
            _emit(out, {"event": "load", "ok": False, "limit": None,
                        "message": f"define a function named {fn}"})
            return
        _emit(out, {"event": "load", "ok": True})
        for test in spec["tests"]:
            passed, limit, message = False, None, ""
            try:
                expected = ast.literal_eval(test["expected"])
                got = eval(test["call"], dict(module.__dict__))
                passed = got == expected
                if not passed:
                    message = f"{test['call']} returned {got!r:.300}, expected {expected!r:.300}"
            except BaseException as exc:  # noqa: BLE001
                limit, message = _classify(exc, limits)
                message = f"{test['call']}: {message}"
            _emit(out, {"event": "test", "name": test["name"], "passed": passed, "limit": limit,
                        "message": message})
            if limit == "cpu":
                break
        _emit(out, {"event": "done"})
    except CpuLimit:
        _emit(out, {"event": "load", "ok": False, "limit": "cpu",
                    "message": f"stopped: used more than the CPU time limit ({limits['cpu_seconds']} s)"})
    finally:
        if os.getpid() != MAIN_PID:
            os._exit(0)


main()

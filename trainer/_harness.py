"""Runs inside the sandbox (python3 -I -S, stdlib only): loads the learner's code and makes each test's
call, reporting one JSON line per event on the results pipe, so results that arrived before a kill
survive. It reports what each call returned (its repr), never a verdict: the expected values stay
with the server, which compares. Anything the learner's code writes to that pipe can therefore at
most claim what a function returning those values would have returned.

Usage: _harness.py RESULT_FD, with {"function", "calls": [...], "limits"} as JSON on stdin and the
learner's code in solution.py in the working directory.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
import types

MAIN_PID = os.getpid()
# the server reads back at most this much of a returned value's repr
VALUE_MAX = 65536


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
    out.write(json.dumps(event) + "\n")
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
    out = os.fdopen(int(sys.argv[1]), "w", encoding="utf-8")
    spec = json.loads(sys.stdin.buffer.read())
    limits = spec["limits"]
    sink = _Sink(limits.get("output_max_bytes", 65536))
    sys.stdout = sys.stderr = sink

    def on_xcpu(signum, frame):
        raise CpuLimit()

    signal.signal(signal.SIGXCPU, on_xcpu)
    # an oversized write then fails with EFBIG the learner can read, instead of a silent kill
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    try:
        with open("solution.py", encoding="utf-8") as fh:
            source = fh.read()
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
        for i, call in enumerate(spec["calls"]):
            event, limit = {"event": "result", "i": i}, None
            try:
                got = repr(eval(call, dict(module.__dict__)))
                if len(got) > VALUE_MAX:
                    event["error"] = f"{call} returned a value too large to compare ({len(got)} characters)"
                else:
                    event["value"] = got
            except BaseException as exc:  # noqa: BLE001
                limit, message = _classify(exc, limits)
                event["error"] = f"{call}: {message}"
            _emit(out, {**event, "limit": limit})
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

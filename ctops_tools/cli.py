"""The one command, `ctops`. Subcommands import their package only when chosen, so
`ctops agent` never loads Textual and `ctops console` never loads the dispatcher."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ctops.config import ConfigError
from ctops.failover import Unreachable
from ctops.logs import FORMAT_ENV, FORMATS
from ctops.statefile import StateFileError
from ctops_tools import exitcodes

DEFAULT_STATE_FILE = ".ctops_tools/demo.json"
# `ctops bench NAME` runs ctops_tools.bench.<NAME with - as _>:run
BENCHMARKS = ["proxy", "failover", "dispatcher-failover", "watchdog", "llm", "exceptions", "console",
              "store-failover", "store", "heartbeats", "metrics"]

# the long-running processes; the others are tools, whose errors end as one line and an exit code
SERVICES = {"demo", "dispatcher", "agent", "trainer", "fake-llm", "console"}
# subcommand -> "module:function" taking the parsed arguments and returning an exit code
HANDLERS = {
    "demo": "ctops_tools.demo:run",
    "dispatcher": "dispatcher.main:run",
    "agent": "agents.main:run",
    "trainer": "trainer.main:run",
    "fake-llm": "trainer.fake_llm:run",
    "console": "console.main:run",
    "status": "ctops_tools.status:run",
    "chaos": "ctops_tools.chaos:run",
    "store": "ctops_tools.storecli:run",
    "bench": "ctops_tools.bench:run",
    "load": "ctops_tools.load:run",
    "exceptions": "ctops_tools.exceptions_cli:run",
}


def version() -> str:
    """The installed distribution's version and which data plane it would run (a wheel built without a
    C compiler installs the plain-Python one: slower, same behaviour)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from ctops import __version__
    from dispatcher.planebuild import data_plane_build, describe

    try:
        v = dist_version("ctops")
    except PackageNotFoundError:
        v = __version__
    return f"ctops {v} (data plane: {describe(data_plane_build())})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctops", description="Keep the Coding Trainer service up.")
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the whole cluster locally (embedded Redis) and the console")
    d.add_argument("--headless", action="store_true", help="no console; stay in the foreground")
    d.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    d.add_argument("--base-port", type=int, default=0, help="first port to use (default: free ports)")
    d.add_argument("--workdir", default=".ctops", help="where configs, logs and Redis data go")

    for name, what in (("dispatcher", "dispatcher"), ("agent", "agent"), ("trainer", "server")):
        s = sub.add_parser(name, help=f"run one {what} from a deployment file")
        s.add_argument("--config", required=True, help="deployment TOML file")
        s.add_argument("--name", required=True, help=f"which {what} of the file this process is")
        s.add_argument("--log-format", choices=FORMATS, default=None,
                       help=f"log lines as text or one JSON object each (default: ${FORMAT_ENV} or text)")

    f = sub.add_parser("fake-llm", help="an OpenAI-compatible fake provider whose behaviour can be switched")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--name", default="fake")
    f.add_argument("--mode", default="ok", help="ok | 500 | 429 | hang | slow")
    f.add_argument("--delay-ms", type=int, default=0)
    f.add_argument("--control-token-env", default="CTOPS_FAKE_LLM_CONTROL_TOKEN",
                   help="the environment variable holding the token that POST /_fake/* (switching the "
                        "mode) requires as `Authorization: Bearer`; unset: switching is refused")

    c = sub.add_parser("console", help="the staff console (Textual)")
    _cluster_args(c)
    c.add_argument("--config", default=None, metavar="PATH",
                   help="console settings (keys, refresh, theme); default ~/.config/ctops/console.toml")

    st = sub.add_parser("status", help="the cluster as the leading dispatcher sees it")
    _cluster_args(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--quiet", "-q", action="store_true",
                    help="print nothing; the exit code says it: 0 healthy, 1 degraded, 2 critical, 3 unknown")

    ch = sub.add_parser("chaos", help="SIGKILL / SIGSTOP / SIGCONT a demo process by name; block its event "
                        "loop; corrupt a record")
    ch.add_argument("action", choices=["kill", "freeze", "thaw", "block", "corrupt"])
    ch.add_argument("target", nargs="?", default="",
                    help="a name from the state file, e.g. trainer-1, A, host-2, redis-2, sentinel-1; "
                    "or redis-primary, redis-replica-N: the node in that role now; for corrupt: a Redis key")
    ch.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    ch.add_argument("--random", metavar="KIND", help="corrupt: a random record of this kind (session, ...)")
    ch.add_argument("--config", default=None, help="corrupt: deployment TOML (default: the demo's)")
    ch.add_argument("--seconds", type=float, default=30.0,
                    help="block: how long its event-loop thread stays stopped (unless it exits first)")

    so = sub.add_parser("store", help="the shared state: verify records, back up, restore, quarantine")
    sos = so.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    so_v = sos.add_parser("verify", help="check every record; with --repair, contain the damaged ones")
    so_v.add_argument("--repair", action="store_true")
    so_b = sos.add_parser("backup", help="a consistent snapshot (from a replica if any) with a manifest")
    so_b.add_argument("path")
    so_r = sos.add_parser("restore", help="check a backup and load it into an empty store")
    so_r.add_argument("path")
    so_r.add_argument("--check-only", action="store_true", help="only check the file")
    so_r.add_argument("--replace", action="store_true", help="overwrite keys the store already holds")
    so_q = sos.add_parser("quarantine", help="damaged records set aside: list, discard or restore one")
    so_q.add_argument("action", choices=["list", "discard", "restore"])
    so_q.add_argument("qid", nargs="?")
    for s in (so_v, so_b, so_r, so_q):
        s.add_argument("--config", default=None, help="deployment TOML (default: the demo's)")
        s.add_argument("--state-file", default=DEFAULT_STATE_FILE)
        s.add_argument("--json", action="store_true")

    lo = sub.add_parser("load", help="simulated learners against the dispatchers")
    lo.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    lo.add_argument("--url", action="append", default=[], help="dispatcher data URL (repeatable)")
    lo.add_argument("--concurrency", type=int, default=10)
    lo.add_argument("--duration", type=float, default=10.0, help="seconds")
    lo.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    lo.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="benchmarks, side by side with a peer")
    b.add_argument("which", choices=BENCHMARKS)
    b.add_argument("--reps", type=int, default=5, help="repetitions, where a benchmark repeats a fault")
    b.add_argument("--json", action="store_true")
    b.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    b.add_argument("--connections", type=int, default=32)
    b.add_argument("--mix", choices=["get", "learners"], default="get",
                   help="proxy: the load, GETs of / or a learners' mix (sessions, submissions, polls)")
    b.add_argument("--events", type=int, default=100_000, help="exceptions: events in the spool to replay")
    b.add_argument("--records", type=int, default=1_000_000, help="store: records to fill the store with")
    b.add_argument("--hosts", type=int, default=200, help="heartbeats: simulated agents at 1 Hz")
    b.add_argument("--procs", type=int, default=4, help="heartbeats: processes the simulated agents run in")
    b.add_argument("--max-rate", action="store_true",
                   help="heartbeats: raise the offered load until p99 passes 20 ms (no herd)")
    b.add_argument("--sim-hosts", type=int, default=2000, help="metrics: hosts simulated in the store")
    b.add_argument("--no-herd", action="store_true", help="heartbeats: ingest only, no leader kill/freeze")

    ex = sub.add_parser("exceptions", help="exception groups: list, show one, tail incoming; ack, resolve, mute")
    exs = ex.add_subparsers(dest="exc_command", required=True, metavar="ACTION")
    ex_list = exs.add_parser("list", help="groups, most recent first")
    ex_list.add_argument("--sort", choices=["last", "count"], default="last")
    ex_list.add_argument("--status", choices=["unresolved", "acknowledged", "resolved", "muted", "regressed"])
    ex_list.add_argument("--query", "-q", default="", help="words to find in type, message, service or host")
    ex_list.add_argument("--limit", type=int, default=100)
    ex_show = exs.add_parser("show", help="one group: traceback and recent occurrences")
    ex_show.add_argument("id", help="the group's id, or its first 6 or more hex digits")
    ex_tail = exs.add_parser("tail", help="incoming exceptions, oldest first")
    ex_tail.add_argument("--follow", "-f", action="store_true", help="keep printing new ones until Ctrl+C")
    ex_tail.add_argument("--after", default=None, help="stream id to start after (a previous cursor)")
    ex_tail.add_argument("--limit", type=int, default=20)
    ex_tail.add_argument("--query", "-q", default="")
    triage = []
    for verb, what in (("ack", "acknowledge: someone is on it"), ("resolve", "resolved: a new event reopens it"),
                       ("mute", "muted for --minutes"), ("unresolve", "back to unresolved")):
        t = exs.add_parser(verb, help=f"one or more groups {what}")
        t.add_argument("ids", nargs="+", metavar="ID", help="group ids, or their first 6 or more hex digits")
        t.set_defaults(role="operator")
        if verb == "mute":
            t.add_argument("--minutes", type=int, default=60, help="how long (1..10080, default 60)")
        triage.append(t)
    for exp in (ex_list, ex_show, ex_tail, *triage):
        _cluster_args(exp)
        exp.add_argument("--json", action="store_true")
    return p


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-file", default=DEFAULT_STATE_FILE, help="demo state file (addresses, tokens)")
    p.add_argument("--url", action="append", default=[], help="ops API URL (repeatable); overrides the state file")
    p.add_argument("--token", default=None, help="bearer token; default CTOPS_TOKEN or the state file")


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand; what no subcommand handles ends here as one line and an exit code from
    `ctops_tools.exitcodes`, never a traceback. A subcommand that has settled its exit code before
    it writes (`ctops status`) records it as `args.exit_code`, so a reader that leaves early
    (`| head`) does not change it."""
    args = build_parser().parse_args(argv)
    if getattr(args, "log_format", None):
        # through the environment: the processes an agent starts log the same way
        os.environ[FORMAT_ENV] = args.log_format
    module, func = HANDLERS[args.command].split(":")

    def fail(code: int, message: str) -> int:
        print(f"ctops {args.command}: {message}", file=sys.stderr)
        return code

    try:
        args.exit_code = int(getattr(importlib.import_module(module), func)(args) or 0)
        sys.stdout.flush()  # here, not at exit, where a reader gone would print a traceback-like note
    except (ConfigError, StateFileError) as exc:
        return fail(exitcodes.USAGE, str(exc))
    except Unreachable as exc:
        return fail(exitcodes.UNREACHABLE, f"no dispatcher answered: {exc}")
    except BrokenPipeError:
        _reader_gone()
        return int(getattr(args, "exit_code", exitcodes.OK))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.command in SERVICES:
            raise  # a service's crash keeps its traceback, for its log
        # only a subcommand that talks to the ops API (or Redis) has loaded its client: others
        # must not pay for importing it here
        redis_errors = sys.modules.get("redis.exceptions")
        if redis_errors is not None and isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
            return fail(exitcodes.UNREACHABLE, f"the store (Redis) did not answer: {exc}")
        opsclient = sys.modules.get("ctops.opsclient")
        if opsclient is None or not isinstance(exc, opsclient.OpsError):
            raise
        if exc.status in (401, 403):
            role = getattr(args, "role", "viewer")
            return fail(exitcodes.AUTH, exitcodes.refused(exc.status, exc.error, exitcodes.token_source(args, role),
                                                          role))
        return fail(exitcodes.FAILED, str(exc))
    return int(args.exit_code)


def _reader_gone() -> None:
    """The reader of our output left (`| head`): what is still buffered goes nowhere, quietly, also
    at exit, when Python would flush stdout again and print the error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())

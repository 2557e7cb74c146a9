"""The one command, `ctops`. Subcommands import their package only when chosen, so
`ctops agent` never loads Textual and `ctops console` never loads the dispatcher."""

from __future__ import annotations

import argparse
import importlib
import sys

from ctops.config import ConfigError

DEFAULT_STATE_FILE = ".ctops_tools/demo.json"
# `ctops bench NAME` runs ctops_tools.bench.<NAME with - as _>:run
BENCHMARKS = ["proxy", "failover", "dispatcher-failover", "watchdog", "llm", "exceptions", "console",
              "store-failover", "store", "heartbeats"]

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctops", description="Keep the Coding Trainer service up.")
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

    ch = sub.add_parser("chaos", help="SIGKILL / SIGSTOP / SIGCONT a demo process by name; corrupt a record")
    ch.add_argument("action", choices=["kill", "freeze", "thaw", "corrupt"])
    ch.add_argument("target", nargs="?", default="",
                    help="a name from the state file, e.g. trainer-1, A, host-2, redis-2, sentinel-1; "
                    "or redis-primary, redis-replica-N: the node in that role now; for corrupt: a Redis key")
    ch.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    ch.add_argument("--random", metavar="KIND", help="corrupt: a random record of this kind (session, ...)")
    ch.add_argument("--config", default=None, help="corrupt: deployment TOML (default: the demo's)")

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
    b.add_argument("--no-herd", action="store_true", help="heartbeats: ingest only, no leader kill/freeze")

    ex = sub.add_parser("exceptions", help="exception groups: list, show one, tail incoming")
    exs = ex.add_subparsers(dest="exc_command", required=True, metavar="ACTION")
    ex_list = exs.add_parser("list", help="groups, most recent first")
    ex_list.add_argument("--sort", choices=["last", "count"], default="last")
    ex_list.add_argument("--status", choices=["unresolved", "acknowledged", "resolved", "muted", "regressed"])
    ex_list.add_argument("--query", "-q", default="", help="words to find in type, message, service or host")
    ex_list.add_argument("--limit", type=int, default=100)
    ex_show = exs.add_parser("show", help="one group: traceback and recent occurrences")
    ex_show.add_argument("id")
    ex_tail = exs.add_parser("tail", help="incoming exceptions, oldest first")
    ex_tail.add_argument("--follow", "-f", action="store_true", help="keep printing new ones until Ctrl+C")
    ex_tail.add_argument("--after", default=None, help="stream id to start after (a previous cursor)")
    ex_tail.add_argument("--limit", type=int, default=20)
    ex_tail.add_argument("--query", "-q", default="")
    for exp in (ex_list, ex_show, ex_tail):
        _cluster_args(exp)
        exp.add_argument("--json", action="store_true")
    return p


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-file", default=DEFAULT_STATE_FILE, help="demo state file (addresses, tokens)")
    p.add_argument("--url", action="append", default=[], help="ops API URL (repeatable); overrides the state file")
    p.add_argument("--token", default=None, help="bearer token; default CTOPS_TOKEN or the state file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, func = HANDLERS[args.command].split(":")
    try:
        code = getattr(importlib.import_module(module), func)(args)
    except ConfigError as exc:
        print(f"ctops {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

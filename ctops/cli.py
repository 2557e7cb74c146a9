"""The one command, `ctops`. Subcommands import their package only when chosen, so
`ctops agent` never loads Textual and `ctops console` never loads the dispatcher."""

from __future__ import annotations

import argparse
import importlib
import sys

from ctops.config import ConfigError

DEFAULT_STATE_FILE = ".ctops/demo.json"

# subcommand -> "module:function" taking the parsed arguments and returning an exit code
HANDLERS = {
    "demo": "ctops.demo:run",
    "dispatcher": "dispatcher.main:run",
    "agent": "agents.main:run",
    "trainer": "trainer.main:run",
    "fake-llm": "trainer.fake_llm:run",
    "console": "console.main:run",
    "status": "ctops.status:run",
    "chaos": "ctops.chaos:run",
    "bench": "ctops.bench:run",
    "load": "ctops.load:run",
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

    c = sub.add_parser("console", help="the staff console (Textual)")
    _cluster_args(c)

    st = sub.add_parser("status", help="the cluster as the leading dispatcher sees it")
    _cluster_args(st)
    st.add_argument("--json", action="store_true")

    ch = sub.add_parser("chaos", help="SIGKILL / SIGSTOP / SIGCONT a demo process by name")
    ch.add_argument("action", choices=["kill", "freeze", "thaw"])
    ch.add_argument("target", help="a name from the state file, e.g. trainer-1, A, host-2, redis")
    ch.add_argument("--state-file", default=DEFAULT_STATE_FILE)

    lo = sub.add_parser("load", help="simulated learners against the dispatchers")
    lo.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    lo.add_argument("--url", action="append", default=[], help="dispatcher data URL (repeatable)")
    lo.add_argument("--concurrency", type=int, default=10)
    lo.add_argument("--duration", type=float, default=10.0, help="seconds")
    lo.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    lo.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="benchmarks, side by side with a peer")
    b.add_argument("which", choices=["proxy"])
    b.add_argument("--json", action="store_true")
    b.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    b.add_argument("--connections", type=int, default=32)
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

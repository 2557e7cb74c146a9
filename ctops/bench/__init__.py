"""`ctops bench …`: each target measured side by side with its peer in one run."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    if args.which == "proxy":
        from ctops.bench.proxy import run as run_proxy

        return run_proxy(args)
    if args.which == "exceptions":
        from ctops.bench.exceptions import run as run_exceptions

        return run_exceptions(args)
    raise SystemExit(f"ctops bench: unknown benchmark {args.which!r}")

"""`ctops console`: find the ops API, then run the app in the foreground until quit or SIGHUP."""

from __future__ import annotations

import argparse
import os
import sys

from console import settings
from console.client import ConsoleClient
from ctops import statefile

SWITCH_INTERVAL_S = 0.001


def target(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """Explicit --url wins (token from --token or CTOPS_TOKEN); else the demo state file's operator token."""
    token = args.token or os.environ.get("CTOPS_TOKEN")
    if args.url:
        return [u.rstrip("/") for u in args.url], token
    doc = statefile.read(args.state_file)
    return statefile.ops_urls(doc), token or statefile.token(doc, "operator")


def token_origin(args: argparse.Namespace) -> str:
    """Where `target` took the token from, so a rejected token is named (a 401 says which to fix)."""
    if args.token:
        return "--token"
    if os.environ.get("CTOPS_TOKEN"):
        return "the CTOPS_TOKEN environment variable"
    if args.url:
        return "nowhere (no --token, no CTOPS_TOKEN)"
    return f"the demo state file {args.state_file} (its operator token)"


def run(args: argparse.Namespace) -> int:
    try:
        urls, token = target(args)
        conf = settings.load(getattr(args, "config", None))
    except (statefile.StateFileError, settings.SettingsError) as exc:
        print(f"ctops console: {exc}", file=sys.stderr)
        return 2
    if not urls:
        print("ctops console: no ops URL (pass --url or start `ctops demo`)", file=sys.stderr)
        return 2
    # imported only now, so a bad address fails fast without loading Textual
    from console.app import create_app

    # worker threads parse the state; hand the GIL back to the UI thread every 1 ms, not 5 ms
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(ConsoleClient(urls, token), handle_sighup=True, token_from=token_origin(args),
                     interval=conf.refresh, keymap=conf.keymap, theme=conf.theme)
    return int(app.run() or 0)

"""`ctops console`: resolve where the ops API is, then run the app in the foreground."""

from __future__ import annotations

import argparse

from console.addresses import resolve
from console.client import OpsClient


def run(args: argparse.Namespace) -> int:
    target = resolve(args.url, args.token, args.state_file)
    # imported here so `ctops console --help` and address errors stay fast
    from console.app import create_app

    app = create_app(OpsClient(target.urls, target.token), handle_sighup=True)
    code = app.run()
    return int(code or 0)

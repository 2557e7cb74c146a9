"""`ctops trainer --config FILE --name SERVER`: one trainer server of a deployment."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import httpx

from ctops import capture, logs
from ctops.config import load
from ctops.serving import run_foreground
from trainer import sandbox
from trainer.app import create_app
from trainer.serve import harden


def run(args: argparse.Namespace) -> int:
    deployment = load(args.config)
    spec = deployment.server(args.name)
    harden()
    sandbox.become_subreaper()
    logs.setup(args.name)
    # its TLS setup (the CA bundle) is paid now, before a warm spare waits
    capture_transport = httpx.HTTPTransport()

    def start_capture() -> None:
        # exceptions go to the dispatchers (the host's agent token), spooled next to the deployment file
        # meanwhile; a warm spare starts this only when it takes over (one process holds the spool)
        capture.from_env("trainer", spec.host or socket.gethostname(),
                         default_urls=[d.ops_url for d in deployment.dispatchers],
                         default_token=os.environ.get(deployment.host_token_env(spec.host)),
                         default_spool=Path(args.config).resolve().parent / "spool" / f"trainer-{args.name}",
                         context={"server": args.name}, forwarder_kw={"transport": capture_transport})

    # probed and logged once, here: what confines learner code, or why it will not be run (sessions
    # and health are still served; submissions then end in an error naming the reason)
    conf = sandbox.confinement(deployment.sandbox)
    sandbox.reclaim_leftovers(conf)
    host, port = spec.address
    app = create_app(deployment, args.name)
    if os.environ.get("CTOPS_TRAINER_DEBUG") == "1":
        from trainer.debug import add_debug_routes  # never loaded in production

        add_debug_routes(app)
    return run_foreground(app, host, port, on_start=start_capture)

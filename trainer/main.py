"""`ctops trainer --config FILE --name SERVER`: one trainer server of a deployment."""

from __future__ import annotations

import argparse
import logging
import os

from ctops.config import load
from trainer import sandbox
from trainer.app import create_app
from trainer.serve import harden, serve


def run(args: argparse.Namespace) -> int:
    deployment = load(args.config)
    spec = deployment.server(args.name)
    harden()
    sandbox.become_subreaper()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    try:
        sandbox.interpreter(os.geteuid() == 0)
    except RuntimeError as exc:
        # still serve sessions and health; submissions will fail with this reason until it is fixed
        logging.getLogger("trainer").error("sandbox unusable: %s", exc)
    host, port = spec.address
    return serve(create_app(deployment, args.name), host, port)

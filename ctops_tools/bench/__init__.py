"""`ctops bench …`: each target measured side by side with its peer in one run.

`ctops bench NAME` runs `run(args)` of the module `ctops_tools.bench.<NAME>` (dashes as underscores);
the console's refresh benchmark lives with the console.
"""

from __future__ import annotations

import argparse
import importlib

MODULES = {"console": "console.bench"}


def run(args: argparse.Namespace) -> int:
    module = MODULES.get(args.which, f"ctops_tools.bench.{args.which.replace('-', '_')}")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise SystemExit(f"ctops bench: benchmark {args.which!r} is not available ({exc})") from None
    return int(mod.run(args) or 0)

"""Plain, greppable log lines on stderr for every ctops process."""

from __future__ import annotations

import logging
import os


def setup(process: str) -> None:
    level = os.environ.get("CTOPS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")
    # one line per request made would drown what matters
    logging.getLogger("httpx").setLevel(logging.WARNING)

"""Log lines on stderr for every ctops process: plain and greppable by default, or one JSON object a
line (`--log-format json`, or CTOPS_LOG_FORMAT=json) for journald/Loki to index by field.

The format travels in the environment so the processes an agent starts (trainer servers) log the
same way as the agent, whatever started it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Literal, get_args

LogFormat = Literal["text", "json"]
FORMATS: tuple[str, ...] = get_args(LogFormat)
FORMAT_ENV = "CTOPS_LOG_FORMAT"

# what every LogRecord carries; anything else on a record came from `extra=` and is worth indexing
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC, ms), level, process, logger, msg, pid, and the
    traceback as `exc` when there is one; fields passed with `extra=` are kept as they are."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "process": self.process, "logger": record.name,
            "msg": record.getMessage(), "pid": record.process,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        return json.dumps(doc, default=str, ensure_ascii=False)


def log_format() -> LogFormat:
    fmt = os.environ.get(FORMAT_ENV, "text").lower()
    return "json" if fmt == "json" else "text"


def setup(process: str) -> None:
    level = os.environ.get("CTOPS_LOG_LEVEL", "INFO").upper()
    if log_format() == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(process))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")
    # one line per request made would drown what matters
    logging.getLogger("httpx").setLevel(logging.WARNING)

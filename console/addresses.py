"""Where the console finds the ops API and which token it presents (no Textual, no network)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ctops.config import ConfigError


@dataclass(frozen=True, slots=True)
class Target:
    urls: tuple[str, ...]
    token: str | None


def resolve(urls: list[str], token: str | None, state_file: str) -> Target:
    """Explicit `--url`s win over the demo state file; the state file gives the operator token."""
    token = token or os.environ.get("CTOPS_TOKEN") or None
    if urls:
        return Target(tuple(u.rstrip("/") for u in urls), token)
    path = Path(state_file)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no --url given and no demo state file at {path} (start `ctops demo --headless` or pass --url)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read demo state file {path}: {exc}") from None
    try:
        found = tuple(str(d["ops_url"]).rstrip("/") for d in data["dispatchers"])
        token = token or data.get("tokens", {}).get("operator")
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"demo state file {path} lacks dispatchers[].ops_url: {exc}") from None
    if not found:
        raise ConfigError(f"demo state file {path} lists no dispatchers")
    return Target(found, token)

"""The demo's state file (see DESIGN.md): where each process listens, its pid, and the tokens."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


class StateFileError(Exception):
    pass


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise StateFileError(f"{p}: no state file; is `ctops demo` running? (or pass --url and --token)") from None
    except (OSError, ValueError) as exc:
        raise StateFileError(f"{p}: unreadable state file: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("dispatchers"), list):
        raise StateFileError(f"{p}: not a ctops state file (no dispatchers list)")
    return doc


def write_private(path: str | os.PathLike[str], text: str) -> None:
    """Write a file that holds secrets: mode 0600 from its creation (never readable by others, not
    even briefly), replacing any older file atomically so readers never see a half-written one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(p)


def write(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    write_private(path, json.dumps(doc, indent=2))  # it holds tokens


def redis_nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The store's nodes as the demo launched them: redis-1..3 and sentinel-1..3."""
    redis = doc.get("redis")
    nodes = redis.get("nodes") if isinstance(redis, dict) else None
    return [n for n in nodes or [] if isinstance(n, dict) and n.get("name")]


def ops_urls(doc: dict[str, Any]) -> list[str]:
    return [d["ops_url"] for d in doc["dispatchers"] if isinstance(d, dict) and d.get("ops_url")]


def token(doc: dict[str, Any], role: str) -> str:
    tok = (doc.get("tokens") or {}).get(role)
    if not tok:
        raise StateFileError(f"state file has no {role} token")
    return str(tok)


def find_process(doc: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """A process by name across every section; returns (section, entry)."""
    for section in ("dispatchers", "trainers", "agents", "llm_providers"):
        for entry in doc.get(section) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                return section, entry
    for node in redis_nodes(doc):
        if node["name"] == name:
            return "redis", node
    if name == "redis" and isinstance(doc.get("redis"), dict):
        return "redis", doc["redis"]
    known = [e.get("name") for s in ("dispatchers", "trainers", "agents", "llm_providers")
             for e in doc.get(s) or [] if isinstance(e, dict)] + [n["name"] for n in redis_nodes(doc)] + ["redis"]
    raise StateFileError(f"no process named {name!r} in the state file; known: {', '.join(map(str, known))}")

"""Which build of the data plane a process runs, and whether a compiled one is stale.

setup.py compiles `dispatcher/proxy.py` (typed by `proxy.pxd`) and writes, next to the built module,
`proxy.build.json` with the SHA-256 of the sources it compiled. A compiled module whose record is
missing or names other sources than those on disk now is stale: it runs code that is no longer in
the repository (an edit after the last `make`, or pytest run without `make`). `/api/v1/state`
(`data_plane`), `ctops bench proxy` and the proxy tests all read it from here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

SOURCES = ("proxy.py", "proxy.pxd")
RECORD = "proxy.build.json"


def source_sha256(directory: Path) -> str | None:
    """The hash setup.py records: over the data plane's sources, in a fixed order."""
    h = hashlib.sha256()
    for name in SOURCES:
        try:
            h.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
        except OSError:
            return None
    return h.hexdigest()


def data_plane_build(origin: str | None = None) -> dict[str, Any]:
    """{kind: compiled | python, module, source_sha256, built_from, stale} for the module this process
    imported (or would import), or for the module file `origin`."""
    if origin is None:
        mod = sys.modules.get("dispatcher.proxy")
        origin = getattr(mod, "__file__", None) if mod is not None else None
    if origin is None:
        spec = importlib.util.find_spec("dispatcher.proxy")
        origin = spec.origin if spec else None
    path = Path(origin or "")
    compiled = path.suffix in (".so", ".pyd")
    current = source_sha256(path.parent)
    built_from = None
    if compiled:
        try:
            built_from = json.loads((path.parent / RECORD).read_text()).get("source_sha256")
        except (OSError, ValueError, AttributeError):
            built_from = None
    return {"kind": "compiled" if compiled else "python", "module": str(path),
            "source_sha256": current, "built_from": built_from,
            # without a record, or with sources that differ from it, the compiled code is not this source
            "stale": compiled and (built_from is None or built_from != current)}


def describe(build: dict[str, Any]) -> str:
    """One line for people: "compiled (Cython)", "plain Python", or a stale build called out."""
    if build["kind"] != "compiled":
        return "plain Python"
    if build["stale"]:
        return "compiled (Cython), STALE: built from other sources than dispatcher/proxy.py now (run make)"
    return "compiled (Cython)"

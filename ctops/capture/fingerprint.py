"""Which events are "the same error": exception type plus the in-app stack by module and function.

Line numbers, addresses, ids and install paths are left out, so the same bug seen on two hosts, or
after an unrelated edit shifted its lines, lands in one group.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence

_HEX_ADDR = re.compile(r"0x[0-9a-fA-F]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_LONG_HEX = re.compile(r"\b[0-9a-fA-F]{12,}\b")
_NUMBER = re.compile(r"\d+")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def normalise_message(text: str) -> str:
    """A message without the parts that vary between occurrences of one error (ids, numbers, quoted values)."""
    text = _HEX_ADDR.sub("0x?", text)
    text = _UUID.sub("<id>", text)
    text = _LONG_HEX.sub("<id>", text)
    text = _QUOTED.sub("<v>", text)
    text = _NUMBER.sub("0", text)
    return " ".join(text.split())[:300]


def _name(value: str | None) -> str:
    # a repr'd address can end up in generated names ("<function <lambda> at 0x7f..>"); digits stay:
    # step1 and step2 are different functions
    return _HEX_ADDR.sub("", value or "")


def module_of(frame: Mapping[str, object]) -> str:
    """The frame's module; for frames parsed from text, the file's last two path parts as a dotted name."""
    mod = frame.get("module")
    if isinstance(mod, str) and mod:
        return mod
    path = str(frame.get("filename") or "").replace("\\", "/").removesuffix(".py")
    return ".".join(p for p in path.split("/")[-2:] if p)


def frame_keys(frames: Sequence[Mapping[str, object]]) -> list[str]:
    in_app = [f for f in frames if f.get("in_app")]
    chosen: Iterable[Mapping[str, object]] = in_app or frames
    keys: list[str] = []
    for f in chosen:
        k = f"{_name(module_of(f))}:{_name(str(f.get('function') or ''))}"
        # recursion depth differs between occurrences; one entry per repeated step is enough
        if not keys or keys[-1] != k:
            keys.append(k)
    return keys


def fingerprint(exc_type: str, frames: Sequence[Mapping[str, object]], message: str = "",
                logger: str | None = None) -> str:
    """A short stable id for the group an event belongs to."""
    parts = [exc_type]
    keys = frame_keys(frames)
    if keys:
        parts += keys
    else:
        # nothing to go by but the text (an ERROR line in a log): its shape, not its values
        parts += [logger or "", normalise_message(message)]
    return hashlib.sha1("\n".join(parts).encode(), usedforsecurity=False).hexdigest()[:16]


def culprit(frames: Sequence[Mapping[str, object]]) -> str:
    """module.function of the innermost in-app frame (where staff start reading)."""
    in_app = [f for f in frames if f.get("in_app")] or list(frames)
    if not in_app:
        return ""
    f = in_app[-1]
    return f"{module_of(f)}.{f.get('function') or '?'}"

"""The console's settings file: `~/.config/ctops/console.toml` (or `--config PATH`).

    refresh = 2.0              # seconds between state fetches (0.2 to 60; default 1)
    theme = "ansi"             # 16 colours as the terminal draws them (down/lost in its red); or any
                               # Textual theme: "textual-dark" (default), "textual-light", "nord", ...
    [keys]                     # binding id = key(s); the ids are in `?` help and console/commands.py
    "console.drain" = "ctrl+d"
    "console.refresh" = "f5,r"

A bad file is reported before the app starts; every problem is one sentence.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# "ansi" and its spellings: Textual's ANSI theme, which leaves colours to the terminal's own palette
# (converted to RGB first and back to 16 colours, red came out magenta on some terminals)
THEME_ALIASES = {"ansi": "ansi-dark", "16": "ansi-dark", "16-colour": "ansi-dark", "16-color": "ansi-dark"}
REFRESH_RANGE = (0.2, 60.0)
# bindings of the dialogs and screens, remappable like the command table's
EXTRA_IDS = frozenset({"confirm.yes", "confirm.no", "help.close", "notices.close", "event.close"})


class SettingsError(Exception):
    """The settings file cannot be used; the message says which file, what is wrong and how to fix it."""


@dataclass(frozen=True, slots=True)
class Settings:
    keymap: dict[str, str] = field(default_factory=dict)
    refresh: float = 1.0
    theme: str | None = None  # None: Textual's default
    path: Path | None = None  # the file read, if any


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ctops" / "console.toml"


def load(path: str | None = None) -> Settings:
    """An explicit path must exist; the default one may be absent (then the defaults hold)."""
    p = Path(path).expanduser() if path else default_path()
    if not p.exists():
        if path:
            raise SettingsError(f"{p}: no such settings file (see the README, section The console).")
        return Settings()
    try:
        doc = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{p}: cannot read it: {exc}.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{p}: not valid TOML: {exc}.") from exc
    return parse(doc, p)


def parse(doc: dict[str, object], p: Path | None = None) -> Settings:
    where = f"{p}: " if p else ""
    unknown = sorted(set(doc) - {"refresh", "theme", "keys"})
    if unknown:
        raise SettingsError(f"{where}unknown setting(s) {', '.join(unknown)}; known: refresh, theme, [keys].")
    refresh = doc.get("refresh", 1.0)
    if isinstance(refresh, bool) or not isinstance(refresh, int | float) or not (
            REFRESH_RANGE[0] <= refresh <= REFRESH_RANGE[1]):
        raise SettingsError(f"{where}refresh must be a number of seconds from {REFRESH_RANGE[0]} to "
                            f"{REFRESH_RANGE[1]:.0f}, not {refresh!r}.")
    theme = doc.get("theme")
    if theme is not None and (not isinstance(theme, str) or not theme):
        raise SettingsError(f"{where}theme must be a theme name such as \"ansi\" or \"textual-dark\".")
    keys = doc.get("keys", {})
    if not isinstance(keys, dict):
        raise SettingsError(f"{where}[keys] must be a table of binding id = \"key\".")
    from console.commands import COMMANDS  # noqa: PLC0415 - the command table loads Textual: only for [keys]

    known = {c.id for c in COMMANDS} | EXTRA_IDS
    for bid, key in keys.items():
        if bid not in known:
            raise SettingsError(f"{where}[keys] has no binding {bid!r}; the ids are listed in ? help "
                                f"(e.g. console.drain, console.refresh).")
        if not isinstance(key, str) or not key.strip():
            raise SettingsError(f"{where}[keys] {bid} must be a key name such as \"ctrl+d\" or \"f5,r\".")
    return Settings(keymap={str(k): str(v) for k, v in keys.items()}, refresh=float(refresh),
                    theme=THEME_ALIASES.get(theme, theme) if isinstance(theme, str) else None, path=p)

"""The cluster state as a version plus the changes since a version (GET /api/v1/state/changes).

At 2,000 hosts the whole state document is megabytes; a console polling it every second needs only
what changed. The serving dispatcher keeps, for every field of every item (host, server, dispatcher)
and for the document's own fields, the version at which it last changed (`FeedLog`); a client names
the version it holds and gets the fields changed since, the items removed, and a list's order when
its members changed. A version from another dispatcher process (or one it never gave) gets the full
document instead. `apply_changes` is the client's half: applied to the document at the version named,
it gives the document at the version answered, exactly (tests/test_statefeed.py).
"""

from __future__ import annotations

import copy
import secrets
from typing import Any

from ctops.wire import ClusterState, StateChanges

LISTS = ("dispatchers", "servers", "hosts")
Doc = dict[str, Any]


class FeedLog:
    """One dispatcher process's record of when each part of the state last changed."""

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(4)  # versions of another process are not comparable with ours
        self.n = 0
        self.top: dict[str, tuple[int, Any]] = {}
        self.items: dict[str, dict[str, dict[str, tuple[int, Any]]]] = {k: {} for k in LISTS}
        self.removed: dict[str, dict[str, int]] = {k: {} for k in LISTS}
        self.order: dict[str, tuple[int, list[str]]] = {k: (0, []) for k in LISTS}
        self.state: ClusterState | None = None

    @property
    def version(self) -> str:
        return f"{self.epoch}:{self.n}"

    def record(self, state: ClusterState) -> None:
        """Take a freshly built state; the version moves on if anything in it changed."""
        doc = state.model_dump(mode="json")
        n = self.n + 1
        changed = False
        for key, value in doc.items():
            if key in LISTS:
                continue
            if key not in self.top or self.top[key][1] != value:
                self.top[key] = (n, value)
                changed = True
        for kind in LISTS:
            known = self.items[kind]
            names = [item["name"] for item in doc[kind]]
            if names != self.order[kind][1]:
                self.order[kind] = (n, names)
                changed = True
            for item in doc[kind]:
                name = item["name"]
                fields = known.setdefault(name, {})
                self.removed[kind].pop(name, None)
                for f, value in item.items():
                    if f not in fields or fields[f][1] != value:
                        fields[f] = (n, value)
                        changed = True
            for gone in set(known) - set(names):
                del known[gone]
                self.removed[kind][gone] = n
                changed = True
        if changed:
            self.n = n
        self.state = state

    def since(self, version: str | None) -> StateChanges:
        """What changed after `version`; the full document when `version` is not one of ours."""
        assert self.state is not None, "record a state first"
        after = self._parse(version)
        if after is None:
            return StateChanges(version=self.version, full=self.state)
        top = {k: v for k, (at, v) in self.top.items() if at > after}
        changed: dict[str, list[Doc]] = {}
        for kind in LISTS:
            rows = []
            for name, fields in self.items[kind].items():
                diff = {f: v for f, (at, v) in fields.items() if at > after}
                if diff:
                    rows.append({**diff, "name": name})
            if rows:
                changed[kind] = rows
        removed = {kind: sorted(n for n, at in gone.items() if at > after) for kind, gone in self.removed.items()}
        order = {kind: names for kind, (at, names) in self.order.items() if at > after}
        return StateChanges(version=self.version, fields=top, changed=changed,
                            removed={k: v for k, v in removed.items() if v}, order=order)

    def _parse(self, version: str | None) -> int | None:
        if not version:
            return None
        epoch, _, n = version.partition(":")
        if epoch != self.epoch or not n.isdigit() or int(n) > self.n:
            return None
        return int(n)


def apply_changes(doc: Doc | None, changes: StateChanges) -> Doc:
    """The state document (as JSON data) at `changes.version`, from `doc` at the version asked about."""
    if changes.full is not None:
        return changes.full.model_dump(mode="json")
    if doc is None:
        raise ValueError("changes without a document to apply them to: ask without a version")
    out = copy.deepcopy(doc)
    out.update(changes.fields)
    for kind in LISTS:
        by_name = {item["name"]: item for item in out.get(kind, [])}
        for name in changes.removed.get(kind, []):
            by_name.pop(name, None)
        for row in changes.changed.get(kind, []):
            by_name.setdefault(row["name"], {}).update(row)
        names = changes.order.get(kind) or [item["name"] for item in out.get(kind, []) if item["name"] in by_name]
        out[kind] = [by_name[n] for n in names if n in by_name]
    return out

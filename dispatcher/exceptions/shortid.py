"""Short exception-group ids: staff type or paste the first hex digits of an id (as with git or
docker), the CLI and the console alike, and the routes resolve them here to the one full id."""

import re

from dispatcher.exceptions.store import ExceptionStore
from dispatcher.ops.errors import ApiError

FULL = re.compile(r"^[0-9a-f]{16}$")
PREFIX = re.compile(r"^[0-9a-f]{6,15}$")
MIN_PREFIX = 6
# enough for the person to pick one; the count says how many there are
SHOWN = 10


class Ambiguous(ApiError):
    def __init__(self, given: str, candidates: list[str]) -> None:
        super().__init__(409, f"exception group id {given!r} is ambiguous: {len(candidates)} groups start with it; "
                              "give more digits", detail={"candidates": candidates[:SHOWN], "count": len(candidates)})


async def candidates(store: ExceptionStore, prefix: str) -> list[str]:
    """Ids of the known groups that start with `prefix`, sorted. The index holds at most the
    store's group limit (2,000), so a pattern scan of it is cheap."""
    found = {m.decode() if isinstance(m, bytes) else str(m)
             async for m, _ in store.r.zscan_iter(store.k.by_last, match=f"{prefix}*", count=1000)}
    return sorted(found)


async def resolve(store: ExceptionStore, given: str) -> str | None:
    """The full id `given` names: itself when it is a full id, the one group it is a prefix of
    (at least 6 hex digits), None when it names none. Raises Ambiguous for a prefix of several."""
    gid = given.strip().lower()
    if FULL.match(gid):
        return gid
    if not PREFIX.match(gid):
        return None
    found = await candidates(store, gid)
    if len(found) > 1:
        raise Ambiguous(given, found)
    return found[0] if found else None

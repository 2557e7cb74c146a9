"""What can still serve: servers that take new sessions, LLM providers that take reviews.

Pure and Textual-free: the confirm dialogs say what an action leaves in rotation, the header and the
NO CAPACITY banner say when nothing is left. Whether something "serves" is decided here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ctops.wire import LLMProviderView, ServerView

# a suspect server still gets sessions (it is out only once down); draining ones finish theirs only
_SERVING = frozenset({"up", "suspect"})


def server_serves(s: ServerView) -> bool:
    return s.state in _SERVING


def provider_serves(p: LLMProviderView) -> bool:
    return not p.disabled and p.state not in ("down", "disabled")


@dataclass(frozen=True, slots=True)
class Capacity:
    after: int  # in rotation once the action is done
    total: int
    now: int  # in rotation now
    noun: str  # "servers" or "providers"

    @property
    def takes_last(self) -> bool:
        """The action leaves nothing in rotation where something was (or leaves it at nothing)."""
        return self.after == 0 and self.total > 0

    def sentence(self) -> str:
        return f"{self.after} of {self.total} {self.noun} in rotation after this."


def server_capacity(action: str, target: ServerView, servers: Sequence[ServerView]) -> Capacity:
    """Drain and disable take the server out of rotation; enable puts it back if its health allows."""
    now = sum(1 for s in servers if server_serves(s))
    others = sum(1 for s in servers if s.name != target.name and server_serves(s))
    joins = action == "enable" and target.health in _SERVING
    return Capacity(others + (1 if joins else 0), len(servers), now, "servers")


def provider_capacity(action: str, target: LLMProviderView, providers: Sequence[LLMProviderView]) -> Capacity:
    now = sum(1 for p in providers if provider_serves(p))
    others = sum(1 for p in providers if p.name != target.name and provider_serves(p))
    if action == "disable":
        after = others
    elif action == "enable":
        after = others + (1 if target.breaker != "open" else 0)  # an open breaker keeps it out when enabled
    else:  # pin and unpin change the order, not the set
        after = now
    return Capacity(after, len(providers), now, "providers")


def servers_out(servers: Sequence[ServerView]) -> bool:
    """No server takes new sessions: learners get 503."""
    return bool(servers) and not any(server_serves(s) for s in servers)


def providers_out(providers: Sequence[LLMProviderView] | None) -> bool:
    """No LLM provider takes requests: reviews cannot be served (they wait, deferred)."""
    return bool(providers) and not any(provider_serves(p) for p in providers or ())

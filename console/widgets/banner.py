"""The outage banners: hidden while all is well, loud when the ops API or the shared store is away."""

from __future__ import annotations

from textual.widgets import Static

from console.capacity import providers_out, servers_out
from ctops.wire import ClusterState, LLMProviderView, StoreView


class OutageBanner(Static):
    def show_problem(self, reason: str, last_ok_age_s: float | None) -> None:
        if last_ok_age_s is None:
            tail = "No data yet."
        else:
            tail = f"Showing the last data, from {int(last_ok_age_s)} s ago (stale)."
        self.update(f"⚠  ops API unreachable: {reason}\n   {tail} Retrying…")
        self.display = True

    def show_error(self, reason: str) -> None:
        self.update(f"⚠  ops API error: {reason}")
        self.display = True

    def clear_problem(self) -> None:
        self.display = False


class StoreBanner(Static):
    """The dispatcher answers but the shared store (Redis) does not: say so, rather than let
    staff read the symptoms (silent hosts, refused actions) as a host or network failure."""

    def show(self, store: StoreView | None) -> None:
        if store is None or (store.available and store.primary is not None):
            self.display = False
            return
        why = store.diagnosis or "shared state unavailable"
        self.update(f"⚠  {why}\n   Servers stay in rotation; staff actions and new sessions wait for the store.")
        self.display = True


class CapacityBanner(Static):
    """Nothing left to serve learners (no server in rotation) or reviews (no LLM provider): the one
    outage staff cause themselves, so it is said in red until capacity is back."""

    def show(self, state: ClusterState | None, providers: list[LLMProviderView] | None) -> None:
        lines = []
        if state is not None and servers_out(state.servers):
            lines.append(f"✖ NO CAPACITY: none of {len(state.servers)} servers is in rotation; every learner "
                         "request gets 503 until one is enabled (e) or comes back up.")
        if providers_out(providers):
            lines.append(f"✖ NO LLM CAPACITY: none of {len(providers or [])} LLM providers is in rotation; "
                         "reviews cannot be served until one is enabled or recovers (tab 5).")
        if not lines:
            self.display = False
            return
        self.update("\n".join(lines))
        self.display = True

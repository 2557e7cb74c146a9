"""Rows for every table from one fetch. Pure and Textual-free, so the fetch worker runs it in a thread."""

from __future__ import annotations

from console.format import dispatcher_raw, host_rows, provider_raw, quarantine_rows, server_raw, store_rows
from console.messages import Prepared
from ctops.wire import ClusterState, LLMProviderView, StoreIntegrityView


def prepare(state: ClusterState, providers: list[LLMProviderView] | None,
            integrity: StoreIntegrityView | None = None) -> Prepared:
    return Prepared(
        servers={s.name: server_raw(s, state.now_ms) for s in state.servers},
        processes=host_rows(state.hosts),
        dispatchers={d.name: dispatcher_raw(d) for d in state.dispatchers},
        providers=None if providers is None else {p.name: provider_raw(p) for p in providers},
        store=store_rows(state.store),
        quarantined=None if integrity is None else quarantine_rows(integrity.quarantined),
    )

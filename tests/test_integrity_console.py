"""The console's Store tab shows damaged records once there are any (or a scrub has run)."""

from __future__ import annotations

from console.format import store_summary
from ctops.wire import StoreView


def test_store_summary_shows_damaged_records_and_the_last_scrub() -> None:
    quiet = store_summary(StoreView(available=True, primary="redis-1")).plain
    assert "Damaged" not in quiet
    text = store_summary(StoreView(available=True, primary="redis-1", corrupt_found=3, repaired=1,
                                   last_scrub_ms=2500)).plain
    assert "Damaged records found 3 · repaired 1 · last full check took 2.5 s" in text
    assert "set aside: see Quarantined below" in text

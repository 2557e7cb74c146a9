"""The outage banner: hidden while the ops API answers, loud when it does not."""

from __future__ import annotations

from textual.widgets import Static


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

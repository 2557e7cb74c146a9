"""Exceptions from services: ingest (own batches and Sentry envelopes), grouping, triage.

Wire into the ops app with `app.include_router(exceptions_router(rt, require))`.
"""

from dispatcher.exceptions.api import exceptions_router

__all__ = ["exceptions_router"]

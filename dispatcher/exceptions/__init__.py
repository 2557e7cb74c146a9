"""Exceptions from services: ingest (own batches and Sentry envelopes), grouping, triage.

Wired into the ops app by `dispatcher.ops_api.create_ops_app`, with the store built by the
composition root (`dispatcher.main`).
"""

from dispatcher.exceptions.api import exceptions_router

__all__ = ["exceptions_router"]

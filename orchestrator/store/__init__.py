"""Run history over SQLAlchemy: `Store` is the API; `records` holds the frozen values it returns."""

from orchestrator.store.store import Store

__all__ = ["Store"]

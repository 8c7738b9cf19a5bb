"""Run history (SQLAlchemy): `store.Store` is the API, `records` the values it returns.

This file imports nothing, so that `orchestrator.store.records` can be imported without loading SQLAlchemy.
"""

"""Run history over SQLAlchemy: `store.Store` is the API; `records` holds the frozen values it returns.

Nothing is imported here, so that reading `records` (the console, `pipe --help`) does not load SQLAlchemy.
"""

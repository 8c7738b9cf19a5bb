"""pipe: run machine-learning pipelines as a DAG of Docker containers, cached by content."""

__version__ = "0.1.0"

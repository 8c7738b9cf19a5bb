"""`python -m orchestrator` is `pipe`."""

from orchestrator.cli import main

main()

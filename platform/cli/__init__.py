"""The `walle` command line: one module per command group, registered in app.py."""
from .app import main  # noqa: F401  (the `walle` console entry point)

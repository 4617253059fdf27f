"""`fastinst-hf`: the command line (one module per command, `main.main` dispatches and handles errors)."""

from .main import main

__all__ = ["main"]

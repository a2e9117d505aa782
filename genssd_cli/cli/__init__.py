"""The `genssd` command line: the Typer app (app.py) and one module per command."""

from genssd_cli.cli.app import main

__all__ = ["main"]

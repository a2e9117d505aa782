"""The `genssd` command line: the Typer app (app.py, whose `main` is the `genssd` script) and one
module per command."""

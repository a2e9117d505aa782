"""What every command module of the CLI shares: the error console and the resume hint."""

from __future__ import annotations

import shlex
import sys

from rich.console import Console

err_console = Console(stderr=True)


def resume_command() -> str:
    """The command line that resumes what this one started (printed on an interruption)."""
    return "genssd " + " ".join(shlex.quote(a) for a in sys.argv[1:])

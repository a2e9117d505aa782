"""The `genssd` command. Commands stay thin and import their machinery when called, so
`genssd --help` never pays for torch."""

from __future__ import annotations

import sys

import typer

from genssd_cli.cli import bench, doctor, eval, export, pipeline, report, run, train, tune
from genssd_cli.cli.common import err_console
from genssd_cli.errors import GenssdError
from genssd_cli.files import is_write_error, write_failed
from genssd_cli.redact import shown

app = typer.Typer(
    help="Gen-SSD: grow a teacher's chain of thought chunk by chunk, keep the chunks a small "
    "student can follow, and distill them into the student.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from genssd_cli import __version__

        print(f"genssd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """Gen-SSD: grow a teacher's chain of thought chunk by chunk, keep the chunks a small student
    can follow, and distill them into the student."""
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())


app.command()(run.run)
app.command()(train.train)
app.command()(pipeline.pipeline)
app.command("eval")(eval.evaluate)
app.command()(doctor.doctor)
app.command()(report.report)
app.command()(tune.tune)
app.command()(export.export)
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C outside a command's own handling
        _fail("interrupted", 130)
    except typer.TyperException as exc:  # a bad flag or argument (click's usage errors): one line
        _fail(f"{exc.format_message()} (see --help)", getattr(exc, "exit_code", 2))
    except GenssdError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:  # a write refused where no writer of ours names its file (a library's)
        if not is_write_error(exc):
            raise
        _fail(str(write_failed(exc.filename or "a file", exc)), 1)
    sys.exit(code or 0)


def _fail(message: str, code: int) -> None:
    """The one error line: credentials in a URL redacted, a server's control characters removed."""
    err_console.print(f"error: {shown(message)}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)

"""The ``hwprune`` command line.

Every command turns a :class:`~hwprune.errors.HwpruneError` (bad input, missing backend,
unreadable table...) into one line on stderr and exit code 2, without a traceback.
Commands that a script may consume take ``--json``.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from .errors import HwpruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hardware-aware channel pruning: measure a device, predict latency, prune where time is spent.")
console = Console(stderr=True)


def _register_commands() -> None:
    from . import cli_bench, cli_predict, cli_profile, cli_prune, cli_quickstart, cli_train  # noqa: F401  (register)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except HwpruneError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: partial results that were committed are kept")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


"""The ``hwprune`` command line.

Every command turns a :class:`~hwprune.errors.HwpruneError` (bad input, missing backend,
unreadable table...) into one line on stderr and exit code 2, without a traceback.
Commands that a script may consume take ``--json``.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from hwprune.errors import HwpruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hardware-aware channel pruning: measure a device, predict latency, prune where time is spent.")
console = Console(stderr=True)


def _register_commands() -> None:
    from hwprune.cli import (bench, calibrate, noise, predict, profile, prune, quickstart, search,  # noqa: F401  (register)
                             supernet, train)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        rc = app(args=argv, standalone_mode=False)
    except HwpruneError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: partial results that were committed are kept")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and the like
        exc = _click_exceptions()
        if isinstance(e, exc["Exit"]):
            sys.exit(e.exit_code)
        if isinstance(e, exc["ClickException"]):  # one line, like every other error
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {e.format_message()}{hint}", file=sys.stderr)
            sys.exit(e.exit_code)
        if isinstance(e, exc["Abort"]):
            sys.exit(130)
        raise
    if isinstance(rc, int) and rc:  # typer.Exit(code) comes back as a return value outside standalone mode
        sys.exit(rc)


def _click_exceptions() -> dict[str, tuple]:
    """Click's exception classes. Typer 0.29 ships its own copy of click (``typer._click``), whose
    classes are not click's: a usage error such as ``--configs 0`` must match either."""
    import typer

    mods = [typer.exceptions]
    try:  # click itself is not a dependency of typer 0.29: a fresh install may lack it
        from click import exceptions as click_exceptions

        mods.append(click_exceptions)
    except ImportError:
        pass
    try:
        from typer._click import exceptions as vendored

        mods.append(vendored)
    except ImportError:
        pass
    return {name: tuple(getattr(m, name) for m in mods if isinstance(getattr(m, name, None), type))
            for name in ("Exit", "ClickException", "Abort")}


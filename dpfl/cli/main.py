"""The ``dpfl`` command line.

Every command parses its input into validated values first; bad input of any kind (unknown
option, unparsable number, out-of-range value, unknown config key, malformed file) is reported as
ONE line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from typer.core import TyperGroup

from dpfl.errors import DpflError

__all__ = ["app", "main"]


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"dpfl: error: {_one_line(message)}", err=True)
    sys.exit(code)


class DpflGroup(TyperGroup):
    """Typer's group, with errors reduced to one line (typer prints a multi-line panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv: Any = super().main(
                args=args,
                prog_name=prog_name or "dpfl",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.NoArgsIsHelpError:
            sys.exit(2)  # the help text is already printed
        except click.UsageError as e:
            where = ""
            if e.ctx is not None and e.ctx.command_path and e.ctx.command_path != "dpfl":
                where = f"{e.ctx.command_path}: "
            _fail(where + e.format_message())
        except click.ClickException as e:  # e.g. BadParameter from file options
            _fail(e.format_message())
        except DpflError as e:
            _fail(str(e))
        except click.Abort:
            click.echo("dpfl: aborted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("dpfl: interrupted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=DpflGroup,
    name="dpfl",
    help="Differentially private and federated training. Every config key, its default and "
    "range: dpfl config show.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from dpfl import __version__

        click.echo(f"dpfl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Differentially private and federated training."""


# Commands register themselves on `app` when their modules are imported.
from dpfl.cli import (  # noqa: E402,F401
    audit,
    budget,
    config_cmd,
    finetune,
    optimizers,
    runs,
    simulate,
    train,
)

#: libraries whose Python warnings are not shown by the CLI (they speak of their own internals,
#: e.g. Opacus' "secure RNG turned off"; dpfl checks what matters and says it in its own words).
#: DPFL_SHOW_WARNINGS=1 shows them.
QUIET_LIBRARIES = ("opacus", "torch", "flwr", "ray", "transformers", "peft", "dp_accounting")


def _quiet_library_warnings() -> None:
    import os
    import warnings

    if os.environ.get("DPFL_SHOW_WARNINGS") == "1":
        return
    for lib in QUIET_LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{lib}(\.|$)")


def main() -> None:
    """Console-script entry point."""
    _quiet_library_warnings()
    app()


if __name__ == "__main__":  # pragma: no cover
    # ``python -m dpfl.cli.main``: the commands are registered on the imported module's app
    from dpfl.cli.main import main as _main

    _main()

"""The command line. The only place that prints errors or exits."""

from __future__ import annotations

import logging
import sys

import click

from provision.errors import ProvisionError, ValidationError


def main() -> None:
    from provision.cli.main import cli

    debug = "--debug" in sys.argv[1:]
    try:
        code = cli.main(standalone_mode=False, prog_name="provision")
        # Without standalone mode click returns (not raises) a command's
        # click.exceptions.Exit code.
        if isinstance(code, int) and code:
            sys.exit(code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ValidationError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        _report(exc, debug)
    except ProvisionError as exc:
        _report(exc, debug)
    except Exception as exc:
        if debug:
            raise
        logging.getLogger("provision").debug("internal error", exc_info=True)
        detail = " ".join(str(exc).split())[:300]
        click.echo(f"error: internal error: {type(exc).__name__}: {detail}", err=True)
        click.echo("hint: rerun with --debug and report it", err=True)
        sys.exit(1)


def _report(exc: ProvisionError, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    click.echo(f"error: {_one_line(exc.message)}", err=True)
    if exc.hint:
        click.echo(f"hint: {_one_line(exc.hint)}", err=True)
    sys.exit(1)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())

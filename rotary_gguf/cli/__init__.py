"""The `rotary-gguf` command line: thin front ends over the stages of the data flow, one module
per group of commands (registered on one Typer app in the order `--help` lists them)."""

from __future__ import annotations

import sys

import typer

from .. import log
from ..errors import UserError
from . import pull, inspect, plan, run, bench, files, machine  # noqa: F401  (registers the commands)
from .app import app
from .inspect import inspect_summary
from .placement import plan_for, plan_or_cpu

__all__ = ["app", "main", "inspect_summary", "plan_for", "plan_or_cpu"]


def main() -> None:
    """Console-script entry point: user errors and bad command lines become one red line and exit
    code 2."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")  # a bare `rotary-gguf` shows the help
    try:
        code = app(standalone_mode=False)
    except UserError as e:
        log.error(str(e))
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        log.error("interrupted")
        sys.exit(130)
    except typer.TyperException as e:  # a bad command line: typer's usage box, as one line
        ctx = getattr(e, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        log.error(" ".join(e.format_message().split()) + where)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code or 0)

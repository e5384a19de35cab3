"""One logging setup for the whole tool: our messages on stderr, errors in red.

llama.cpp's own log lines are routed here too (see `native.route_llama_logs`) and shown only
with --verbose.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

stderr = Console(stderr=True, highlight=False)
logger = logging.getLogger("rotary_gguf")
llama_logger = logging.getLogger("rotary_gguf.llama_cpp")


def setup(verbose: bool = False) -> None:
    """Configure logging once per process; --verbose also shows llama.cpp's lines."""
    handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    llama_logger.setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def error(message: str) -> None:
    """Print a one-line error in red on stderr."""
    stderr.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)

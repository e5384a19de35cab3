"""`pull`: download a model by name from Hugging Face into its usual cache."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import log
from .app import app


@app.command()
def pull(
    name: Annotated[
        str,
        typer.Argument(
            help="NAME[:QUANT] from the catalog (models.toml, plus $ROTARY_GGUF_MODELS), OWNER/REPO[:QUANT] "
            "(the repository's *-QUANT.gguf; Q4_K_M when no quant is given) or hf:OWNER/REPO/FILE.gguf.",
            show_default=False,
        ),
    ],
) -> None:
    """Download a model by name from Hugging Face, check it, and print its path.

    Checks the free disk space first, downloads with huggingface_hub into its usual cache (HF_HOME /
    HF_HUB_CACHE; a dropped connection resumes where it stopped), then checks the file's sha256 against
    the Hub's and its GGUF header. Nothing to do when the model is already there."""
    from ..hub import parse_name, pull as pull_model

    path = pull_model(parse_name(name), say=lambda line: log.stderr.print(line, style="dim", markup=False, soft_wrap=True))
    print(path)

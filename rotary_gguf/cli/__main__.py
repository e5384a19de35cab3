"""`python -m rotary_gguf.cli`."""

from . import main

main()

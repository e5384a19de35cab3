"""`rotary-gguf serve`: an OpenAI-compatible (and Anthropic Messages) HTTP API over one engine.

Requests are checked and tokenized on the event loop's side (`schemas`, `app`), then wait in a
bounded queue for the one worker thread that owns the engine (`worker`). Tokens flow back to each
request's coroutine as they are generated; a client that goes away sets its job's cancel flag,
which the engine checks between tokens. Figures come from the engine's `LiveStats` (see /metrics),
never measured here. `server` runs the app under uvicorn.
"""

from .app import ServeOptions, create_app
from .server import listen, run
from .worker import Job

__all__ = ["Job", "ServeOptions", "create_app", "listen", "run"]

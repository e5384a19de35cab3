"""Running the app: uvicorn with read deadlines, and a shutdown that ends running generations."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .. import log
from ..engine import Engine
from ..errors import UserError
from .app import IDLE_TIMEOUT_SECONDS, ServeOptions, create_app
from .worker import Worker


# --- running -----------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn, plus: a shutdown signal also ends running generations, so open streams close at once."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self._worker = worker

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        # Runs inside a signal handler: do the work as an event-loop step, not between two bytecodes
        # of a request that is being queued.
        asyncio.get_running_loop().call_soon_threadsafe(self._worker.cancel_all)


class _TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with deadlines for reading a request: its headers within
    `read_timeout` of the connection (or of the request's first byte), its body within as long
    again. A client that misses one is disconnected; uvicorn alone would keep a connection with
    half-sent headers open forever."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._too_slow) if seconds is not None else None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self._read_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self._read_timeout)

    def on_headers_complete(self) -> None:
        self._arm(self._read_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._arm(None)
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._arm(None)
        super().connection_lost(exc)


def run(engine: Engine, options: ServeOptions, sock: socket.socket) -> None:
    """Serve `engine` on `sock` (from `listen`) until SIGINT/SIGTERM, then shut down cleanly; the
    caller closes the engine."""
    app = create_app(engine, options)
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.handlers[:] = log.logger.handlers
    uvicorn_logger.propagate = False
    uvicorn_logger.setLevel(logging.WARNING)
    protocol = functools.partial(_TimedHttpProtocol, read_timeout=options.read_timeout)
    # uvicorn's access log is off: ours (access_log.py, set up by the caller) carries the tokens.
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10,
                            http=protocol, timeout_keep_alive=IDLE_TIMEOUT_SECONDS)
    server = _Server(config, app.state.worker)
    # uvicorn re-raises the signal it shut down on once it is done; these handlers make that a no-op,
    # so a requested shutdown ends with exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    log.logger.info("serving %s at http://%s:%d/v1 (Ctrl-C to stop)", options.model_id, host, port)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.worker.close()
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError that says why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock

"""The operator page as a process: started by `linewatch run` beside the stages, or alone by `linewatch station`.

It binds its port itself, so a port already taken costs the page (one error line), never the line: the
process then just waits for the run to end. Uvicorn serves in this process's main thread without its own
signal handlers: in a run, the supervisor alone decides when stages stop (the `stop` callable says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator

import uvicorn

from pipeline.station.app import create_app
from pipeline.station.health import HealthSource
from pipeline.station.live import LiveHub
from pipeline.station.settings import StationSettings
from pipeline.store.verdicts import VerdictStore

STOP_POLL_S = 0.25

log = logging.getLogger(__name__)


class _QuietServer(uvicorn.Server):
    """Uvicorn without signal handlers of its own: it stops when told to."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on (host, port); OSError naming `ui.host`/`ui.port` when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"ui.host/ui.port = {host}:{port}: cannot listen ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def serve(
    settings: StationSettings, health: HealthSource, stop: Callable[[], bool], on_listening: Callable[[int], None]
) -> None:
    """Serve the page until `stop()` is true; `on_listening` gets the port once it listens."""
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("%s; the operator page is off for this run (the line is not affected)", exc)
        while not stop():
            asyncio.run(asyncio.sleep(STOP_POLL_S))
        return
    store = VerdictStore(settings.store_url, check=False, line=settings.store_line)
    hub = LiveHub(settings.feed_address, settings.heartbeat_address).start()
    try:
        app = create_app(settings, store, hub, health)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1)
        server = _QuietServer(config)
        port = sock.getsockname()[1]
        log.info("operator page on http://%s:%d/", settings.host, port)
        on_listening(port)
        asyncio.run(_serve_until(server, sock, stop, app.state.station.closing))
    finally:
        hub.stop()
        store.close()
        sock.close()


async def _serve_until(
    server: uvicorn.Server, sock: socket.socket, stop: Callable[[], bool], closing: asyncio.Event
) -> None:
    async def watch() -> None:
        while not stop():
            await asyncio.sleep(STOP_POLL_S)
        closing.set()  # open live views end their streams, so the shutdown has no request to cancel
        await asyncio.sleep(STOP_POLL_S)
        server.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()

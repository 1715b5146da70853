"""The worker's HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

Served by the standard library's WSGI server on a thread of its own, so a scrape never
waits on the event loop; readiness asks the loop to ping MongoDB, with a short bound.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app

from consumer.errors import MailbusError
from consumer.logging import get_logger

log = get_logger(__name__)
PING_SECONDS = 2.0
T = TypeVar("T")


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would drown the logs."""


def _text(start: StartResponse, status: str, body: str) -> list[bytes]:
    start(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]


def on_loop(
    loop: asyncio.AbstractEventLoop, work: Callable[[], Coroutine[Any, Any, T]]
) -> T | None:
    """Run ``work`` on the event loop from the server thread; None when it fails or takes
    longer than ``PING_SECONDS``.
    """
    future = asyncio.run_coroutine_threadsafe(work(), loop)
    try:
        return future.result(PING_SECONDS)
    except (MailbusError, FutureTimeout):
        future.cancel()
        return None


class Readiness:
    """What ``/readyz`` checks: consuming from RabbitMQ, and MongoDB answering."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        consuming: Callable[[], bool],
        ping: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.loop = loop
        self.consuming = consuming
        self.ping = ping

    def problems(self) -> list[str]:
        """Why the worker is not ready; empty when it is. Called from the server thread."""
        found = []
        if not self.consuming():
            found.append("not consuming from RabbitMQ")
        if on_loop(self.loop, self._answered) is None:
            found.append("MongoDB does not answer")
        return found

    async def _answered(self) -> bool:
        await self.ping()
        return True


def application(
    registry: CollectorRegistry, readiness: Readiness
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """The WSGI app serving the three paths."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            served: Iterable[bytes] = metrics(environ, start)
            return served
        if path == "/healthz":
            return _text(start, "200 OK", "ok\n")
        if path == "/readyz":
            problems = readiness.problems()
            if problems:
                return _text(start, "503 Service Unavailable", "\n".join(problems) + "\n")
            return _text(start, "200 OK", "ready\n")
        return _text(start, "404 Not Found", "try /metrics, /healthz or /readyz\n")

    return app


@contextmanager
def serving(
    host: str, port: int, registry: CollectorRegistry, readiness: Readiness
) -> Iterator[WSGIServer]:
    """Serve the endpoints on ``host:port`` (port 0: any free one) until the block ends."""
    server = make_server(host, port, application(registry, readiness), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="mailbus-http", daemon=True)
    thread.start()
    log.info("http.serving", address=f"http://{host}:{server.server_port}")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

"""The HTTP endpoints of a worker, the webhook service and the gateways: ``/metrics``
(Prometheus), ``/healthz`` and ``/readyz``.

Served by the standard library's WSGI server on threads of their own, so a scrape never
waits on the event loop; readiness asks the loop to ping MongoDB, with a short bound. Each
connection has its own thread, at most ``MAILBUS_HTTP_MAX_CONNECTIONS`` of them, and must
send its request within ``MAILBUS_HTTP_READ_TIMEOUT``: a silent or dripping client cannot
hold up the liveness probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from io import BytesIO
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIEnvironment

from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry, make_wsgi_app

from consumer.errors import ListenError, MailbusError
from consumer.logging import get_logger
from consumer.service.admission import ConnectionSlots

log = get_logger(__name__)
PING_SECONDS = 2.0
# How long one readiness check answers every /readyz probe.
READINESS_SECONDS = 1.0
NOT_CHECKED = "readiness is being checked"
# A GET's request line and headers; a longer head is refused unread.
MAX_HEAD_BYTES = 16 * 1024
T = TypeVar("T")


def read_head(connection: socket.socket, *, seconds: float) -> bytes | None:
    """A request's line and headers, read within ``seconds`` in all (a client dripping a
    byte at a time gets no longer); None when they do not come in time, the client goes,
    or they pass ``MAX_HEAD_BYTES``.
    """
    deadline = time.monotonic() + seconds
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        left = deadline - time.monotonic()
        if left <= 0 or len(head) > MAX_HEAD_BYTES:
            return None
        connection.settimeout(left)
        try:
            chunk = connection.recv(4096)
        except OSError:  # the timeout, a reset, or shut down to make room
            return None
        if not chunk:
            return None
        head += chunk
    return head


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per connection, bounded by ``slots``; requests read within ``read_timeout``."""

    daemon_threads = True
    slots: ConnectionSlots[socket.socket]
    read_timeout: float

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread, or close it when every slot is answering."""
        if self.slots.admit(request, lambda: _shut(request)):
            super().process_request(request, client_address)
        else:
            self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        """Close the connection and free its slot."""
        self.slots.release(request)
        super().shutdown_request(request)


def _shut(connection: socket.socket) -> None:
    """Wake the thread reading ``connection``: its recv returns at once."""
    with contextlib.suppress(OSError):  # already gone
        connection.shutdown(socket.SHUT_RDWR)


class _Handler(WSGIRequestHandler):
    server: _Server

    def handle(self) -> None:
        """Read the head within the timeout, then answer as the WSGI handler does."""
        head = read_head(self.connection, seconds=self.server.read_timeout)
        if head is None:
            return
        self.server.slots.answering(self.connection)
        self.connection.settimeout(self.server.read_timeout)  # for writing the answer
        self.rfile.close()  # the head is read: the request is answered from it
        self.rfile = BytesIO(head)
        super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would drown the logs."""


def _text(start: StartResponse, status: str, body: str) -> list[bytes]:
    start(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]


def consuming_live(consuming: bool, connection: AbstractRobustConnection | None) -> bool:
    """Consuming, on a RabbitMQ connection that is up: the broker half of readiness (read
    from the HTTP thread).
    """
    return consuming and connection is not None and connection.connected.is_set()


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
    """What ``/readyz`` checks: consuming from RabbitMQ (for a gateway: listening, its
    RabbitMQ connection up; ``not_ready`` says which), and MongoDB answering.

    One check runs at a time and its answer serves every probe for
    :data:`READINESS_SECONDS`: probes arriving together (or a client sending them over
    and over) never hold the server's connections waiting on MongoDB.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        consuming: Callable[[], bool],
        ping: Callable[[], Coroutine[Any, Any, None]],
        *,
        not_ready: str = "not consuming from RabbitMQ",
    ) -> None:
        self.loop = loop
        self.consuming = consuming
        self.ping = ping
        self.not_ready = not_ready
        self._lock = threading.Lock()
        self._checking = False
        self._last: list[str] = [NOT_CHECKED]
        self._checked_at = -math.inf

    def problems(self) -> list[str]:
        """Why the worker is not ready; empty when it is. Called from the server threads:
        the last answer while a check is under way or fresh, else a new check's.
        """
        with self._lock:
            if self._checking or time.monotonic() - self._checked_at < READINESS_SECONDS:
                return list(self._last)
            self._checking = True
        found = [NOT_CHECKED]
        try:
            found = self._check()
        finally:
            with self._lock:
                self._last, self._checked_at, self._checking = found, time.monotonic(), False
        return list(found)

    def _check(self) -> list[str]:
        found = []
        if not self.consuming():
            found.append(self.not_ready)
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


@contextlib.contextmanager
def serving(
    host: str,
    port: int,
    registry: CollectorRegistry,
    readiness: Readiness,
    *,
    max_connections: int,
    read_timeout: float,
) -> Iterator[WSGIServer]:
    """Serve the endpoints on ``host:port`` (port 0: any free one) until the block ends,
    holding at most ``max_connections`` connections, each given ``read_timeout`` seconds
    to send its request.
    """
    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        raise ListenError("MAILBUS_HTTP_PORT", host, port, exc) from None
    server.slots = ConnectionSlots(max_connections)
    server.read_timeout = read_timeout
    server.set_app(application(registry, readiness))
    thread = threading.Thread(target=server.serve_forever, name="mailbus-http", daemon=True)
    thread.start()
    log.info("http.serving", address=f"http://{host}:{server.server_port}")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

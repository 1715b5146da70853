"""A loopback HTTP(S) server with scripted routes, for URL attachments."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Route:
    """What one path answers."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    location: str | None = None
    declare_length: bool = True  # without it the body ends when the connection closes
    delay: float = 0.0
    encoding: str | None = None  # a Content-Encoding header, the body already encoded
    drip: float = 0.0  # seconds between bytes of the body (a server that never finishes)
    disposition: str | None = None  # a Content-Disposition header, sent as is (latin-1)
    cookie: str | None = None  # a Set-Cookie header


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    routes: dict[str, Route]
    hits: list[str]
    hosts: list[str]
    cookies: list[str | None]
    connections: int


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def setup(self) -> None:
        """One handler serves one connection (one TLS handshake that succeeded)."""
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        self.server.hosts.append(self.headers.get("Host", ""))
        self.server.cookies.append(self.headers.get("Cookie"))
        route = self.server.routes.get(self.path, Route(status=404, body=b"not found"))
        if route.delay:
            time.sleep(route.delay)
        self.send_response(route.status)
        if route.content_type:
            self.send_header("Content-Type", route.content_type)
        if route.location:
            self.send_header("Location", route.location)
        if route.encoding:
            self.send_header("Content-Encoding", route.encoding)
        if route.disposition:
            self.send_header("Content-Disposition", route.disposition)
        if route.cookie:
            self.send_header("Set-Cookie", route.cookie)
        if route.declare_length:
            self.send_header("Content-Length", str(len(route.body)))
        elif self.protocol_version == "HTTP/1.1":  # the body ends when the connection does
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        # The client may give up on purpose (size cap, timeout).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if not route.drip:
                self.wfile.write(route.body)
            for byte in route.body if route.drip else b"":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(route.drip)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read ``hits`` instead."""


class _KeepAliveHandler(_Handler):
    """HTTP/1.1: a connection serves one request after another."""

    protocol_version = "HTTP/1.1"


class FileServer:
    """Serves scripted routes on a free loopback port from a background thread; with
    ``tls``, over HTTPS; with ``keep_alive``, many requests on one connection.
    """

    def __init__(self, *, tls: ssl.SSLContext | None = None, keep_alive: bool = False) -> None:
        self._server = _Server(("127.0.0.1", 0), _KeepAliveHandler if keep_alive else _Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._scheme = "https" if tls is not None else "http"
        self._server.routes = {}
        self._server.hits = []
        self._server.hosts = []
        self._server.cookies = []
        self._server.connections = 0
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def hits(self) -> list[str]:
        """Paths requested so far, in order."""
        return list(self._server.hits)

    @property
    def hosts(self) -> list[str]:
        """The Host header of each request so far, in order."""
        return list(self._server.hosts)

    @property
    def cookies(self) -> list[str | None]:
        """The Cookie header of each request so far (None: none sent), in order."""
        return list(self._server.cookies)

    @property
    def connections(self) -> int:
        """Connections accepted so far (over TLS: their handshakes succeeded)."""
        return self._server.connections

    def route(self, path: str, route: Route) -> str:
        """Answer ``path`` with ``route``; returns its URL."""
        self._server.routes[path] = route
        return self.url(path)

    def url(self, path: str, host: str | None = None) -> str:
        """The URL of ``path`` on this server, named by its address or by ``host``."""
        address, port = self._server.server_address[:2]
        return f"{self._scheme}://{host or address!s}:{port}{path}"

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

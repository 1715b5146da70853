"""Fetching URL attachments safely: http(s) only, public addresses only, bounded in size,
time and redirects.

Each new connection resolves its host here, checks every address it has, and connects
to the checked address: a DNS answer that changes between check and connect cannot reach
a private address. The request itself keeps the host's name, so the connection pool is
keyed by the name (a connection opened for one host is never reused for another that
shares its address) and TLS verifies the certificate for that name. Each redirect is
checked the same way. The body streams into an anonymous temporary file, so nothing is
left on disk whatever happens; a compressed body is inflated a piece at a time, so the
size cap holds for what it inflates to. A URL is shown (in errors, and so in dead
letters, events, records, replies and digests) without its userinfo, query and fragment:
a presigned URL's signature is a credential.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import tempfile
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from consumer.core.refusals import AttachmentError
from consumer.errors import AttachmentUnavailableError
from consumer.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Gives every address a host (and port) has: the system resolver, or a test's.
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
_SCHEMES = ("http", "https")
_CHUNK = 64 * 1024
# The encodings a download may come in, as zlib's wbits (None: as is). Requested as
# "gzip, deflate" so that a server does not pick one mailbus cannot bound.
_WBITS: dict[str, int | None] = {
    "identity": None,
    "gzip": zlib.MAX_WBITS | 16,
    "x-gzip": zlib.MAX_WBITS | 16,
    "deflate": zlib.MAX_WBITS,
}


@dataclass(frozen=True)
class FetchLimits:
    """How far a fetch may go."""

    max_bytes: int
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    fetch_timeout: float = 120.0
    max_redirects: int = 5
    allow_private: bool = False
    tmp_dir: Path | None = None


def fetch_limits(settings: Settings) -> FetchLimits:
    """The limits ``MAILBUS_ATTACHMENT_*`` and ``MAILBUS_MAX_ATTACHMENT_BYTES`` set."""
    return FetchLimits(
        max_bytes=settings.max_attachment_bytes,
        connect_timeout=settings.attachment_connect_timeout,
        read_timeout=settings.attachment_read_timeout,
        fetch_timeout=settings.attachment_fetch_timeout,
        max_redirects=settings.attachment_max_redirects,
        allow_private=settings.attachment_allow_private,
        tmp_dir=settings.attachment_tmp_dir,
    )


@dataclass(frozen=True)
class Fetched:
    """A fetched body with what the server said about it."""

    data: bytes
    content_type: str | None
    filename: str | None


def refused_address(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be fetched from by default (None: it is a public address).

    Loopback, private, link-local, site-local, multicast, reserved, unspecified and shared
    (CGNAT) ranges are refused. An IPv6 address that carries an IPv4 one on to where it leads (an
    IPv4-mapped, a 6to4 ``2002::/16`` or a Teredo ``2001::/32`` address) is refused when
    the IPv4 address it carries would be.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return refused_address(ip.ipv4_mapped)
        carried = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        why = refused_address(carried) if carried is not None else None
        if why is not None:
            return why
        if ip.is_site_local:  # fec0::/10: deprecated, still routed inside some networks
            return "site-local"
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


def shown_url(url: str | httpx.URL) -> str:
    """``url`` fit to show in an error, event, record, reply or digest: without userinfo,
    query and fragment, which may hold credentials (a presigned URL's signature).
    """
    try:
        parts = urlsplit(str(url))
    except ValueError:  # unparseable, so nothing of it can be shown safely
        return "(unreadable URL)"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# getaddrinfo's answers that say the name does not exist, as opposed to a resolver that
# failed now (EAI_AGAIN): the first will not change on a retry.
_NO_SUCH_HOST = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives ``host``. Raises :class:`AttachmentError`
    for a name that does not exist and :class:`AttachmentUnavailableError` when resolving
    failed for now.
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_HOST:
            raise AttachmentError(f"{host}: no such host ({exc.strerror})") from None
        raise AttachmentUnavailableError(f"{host}: cannot resolve: {exc.strerror}") from None
    except OSError as exc:
        raise AttachmentUnavailableError(f"{host}: cannot resolve: {exc}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def checked_address(
    host: str,
    port: int,
    *,
    resolver: Resolver = resolve,
    allow_private: bool = False,
    setting: str = "MAILBUS_ATTACHMENT_ALLOW_PRIVATE",
) -> IPAddress:
    """The address to connect to for ``host``: its first, once every address it has passed
    :func:`refused_address` (unless ``allow_private``, the value of ``setting``, which the
    error names). Raises :class:`AttachmentError` for a refused address.
    """
    addresses = await resolver(host, port)
    if not allow_private:
        for ip in addresses:
            why = refused_address(ip)
            if why is not None:
                raise AttachmentError(
                    f"{host} resolves to {why} address {ip}, which is not allowed ({setting})"
                )
    if not addresses:
        raise AttachmentUnavailableError(f"{host}: no address")
    return addresses[0]


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Opens each connection to the checked address of the host it is for: the check and
    the connection see the same DNS answer, while everything above (the pool's key, the
    Host header, TLS's SNI and certificate check) keeps the host's name.
    """

    def __init__(self, check: Callable[[str, int], Awaitable[IPAddress]]) -> None:
        self._check = check
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A connection to a checked address of ``host``; refusals raise before any."""
        ip = await self._check(host, port)
        return await self._backend.connect_tcp(
            str(ip), port, timeout, local_address=local_address, socket_options=socket_options
        )

    async def sleep(self, seconds: float) -> None:
        """As the backend it wraps sleeps."""
        await self._backend.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a pool whose connections :class:`_CheckedBackend` opens."""

    def __init__(self, backend: _CheckedBackend, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        # httpx takes no network backend, so its pool is replaced by one that uses ours,
        # with httpx's default limits.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


def checked_client(
    check: Callable[[str, int], Awaitable[IPAddress]],
    timeout: httpx.Timeout,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """An httpx client each of whose connections goes to the address ``check`` gives its
    host (:func:`checked_address`, which refuses private ones). It follows no redirect
    (the caller checks and follows them), takes no proxy from the environment (which would
    bypass the check) and keeps no cookies. ``ssl_context``: what TLS trusts (httpx's
    default: the public authorities).
    """
    backend = _CheckedBackend(check)
    transport = _CheckedTransport(backend, ssl_context or httpx.create_ssl_context())
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers=headers,
        # One client serves every job: a cookie one server set would go with another
        # producer's requests, and a jar would grow without end.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


def filename_of(url: httpx.URL, disposition: str | None = None) -> str | None:
    """The name the server gives the body: its ``Content-Disposition`` filename, else the
    last segment of the URL's (decoded) path. Raw: a server may put anything in either,
    so it is cleaned before use (:func:`consumer.mail.attachments.clean_filename`).
    """
    if disposition:
        header = Message()
        header["Content-Disposition"] = disposition
        named = header.get_filename()
        if named:
            return str(named)
    return PurePosixPath(url.path).name or None


class Inflater:
    """Undoes a response's ``Content-Encoding`` a piece at a time, never more than 64 KiB
    at once: a small body that inflates to gigabytes (a bomb) meets the size cap without
    ever being held whole.
    """

    def __init__(self, wbits: int | None) -> None:
        """``wbits`` as :func:`zlib.decompressobj` takes it; None: no encoding."""
        self._wbits = wbits
        self._zlib = zlib.decompressobj(wbits) if wbits is not None else None
        self._started = False

    @classmethod
    def for_encoding(cls, url: httpx.URL, encoding: str | None) -> Inflater:
        """The inflater for ``encoding``; AttachmentError for one it does not know."""
        name = (encoding or "identity").strip().lower()
        if name not in _WBITS:
            raise AttachmentError(f"{shown_url(url)}: content-encoding {name!r} is not supported")
        return cls(_WBITS[name])

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes ``data`` holds, in pieces of at most 64 KiB."""
        if self._zlib is None:
            if data:
                yield data
            return
        if not self._started and self._wbits == zlib.MAX_WBITS and data:
            self._started = True
            # "deflate" is meant to be zlib-wrapped; some servers send it raw.
            if data[0] & 0x0F != 8:
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            while True:
                out = self._zlib.decompress(data, _CHUNK)
                data = self._zlib.unconsumed_tail
                if out:
                    yield out
                if not data and len(out) < _CHUNK:
                    return
        except zlib.error as exc:
            raise AttachmentError(f"the attachment's encoded body is corrupt: {exc}") from None


class Fetcher:
    """Fetches attachment URLs within :class:`FetchLimits`; one per worker."""

    def __init__(
        self,
        limits: FetchLimits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        """``ssl_context`` is what TLS trusts (httpx's default: the public authorities);
        ``resolver`` gives a host's addresses (the system resolver).
        """
        self.limits = limits
        self._resolver = resolver
        self._client = checked_client(
            self._checked_address,
            httpx.Timeout(limits.read_timeout, connect=limits.connect_timeout),
            ssl_context=ssl_context,
            headers={"Accept-Encoding": "gzip, deflate"},
        )

    async def close(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def fetch(self, raw_url: str, max_bytes: int | None = None) -> Fetched:
        """The body at ``raw_url``, following at most ``max_redirects`` redirects, refused
        beyond ``max_bytes`` (at most the limits' own).

        Raises :class:`AttachmentError` for what can never work (scheme, address, unknown
        host, size, redirect loops) and :class:`AttachmentUnavailableError` for what may
        work later (HTTP errors, timeouts, refused connections, a failing resolver). The
        whole fetch may take ``fetch_timeout`` seconds at most. Errors show URLs as
        :func:`shown_url` does.
        """
        try:
            url = httpx.URL(raw_url)
        except httpx.InvalidURL as exc:
            raise AttachmentError(f"invalid attachment URL {shown_url(raw_url)}: {exc}") from None
        cap = min(self.limits.max_bytes, max_bytes or self.limits.max_bytes)
        try:
            async with asyncio.timeout(self.limits.fetch_timeout):
                return await self._fetch(url, cap)
        except TimeoutError:
            raise AttachmentUnavailableError(
                f"{shown_url(url)}: not fetched within {self.limits.fetch_timeout:g} s"
            ) from None

    async def _fetch(self, url: httpx.URL, cap: int) -> Fetched:
        first = url
        for _ in range(self.limits.max_redirects + 1):
            if url.scheme not in _SCHEMES:
                raise AttachmentError(f"attachment URL scheme {url.scheme!r} is not http or https")
            if not url.host:
                raise AttachmentError(f"attachment URL {shown_url(url)} has no host")
            try:
                response = await self._client.send(
                    self._client.build_request("GET", url), stream=True
                )
            except httpx.TransportError as exc:
                raise AttachmentUnavailableError(
                    f"{shown_url(url)}: {type(exc).__name__}: {exc}"
                ) from None
            try:
                if response.is_redirect and "location" in response.headers:
                    url = url.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise AttachmentUnavailableError(
                        f"{shown_url(url)}: HTTP {response.status_code}"
                    )
                data = await self._read_capped(url, response, cap)
            finally:
                await response.aclose()
            name = filename_of(url, response.headers.get("content-disposition"))
            return Fetched(data, response.headers.get("content-type"), name)
        raise AttachmentError(
            f"{shown_url(first)}: more than {self.limits.max_redirects} redirects"
        )

    async def _checked_address(self, host: str, port: int) -> IPAddress:
        return await checked_address(
            host, port, resolver=self._resolver, allow_private=self.limits.allow_private
        )

    async def _read_capped(self, url: httpx.URL, response: httpx.Response, cap: int) -> bytes:
        """The body, decoded, refused as soon as it is known to exceed ``cap`` bytes."""
        shown = shown_url(url)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise AttachmentError(f"{shown}: {declared} bytes is more than the limit of {cap}")
        inflater = Inflater.for_encoding(url, response.headers.get("content-encoding"))
        try:
            # Unlinked as soon as it is made: nothing is left behind, even by a crash.
            with tempfile.TemporaryFile(dir=self.limits.tmp_dir) as spool:
                size = 0
                async for raw in response.aiter_raw(_CHUNK):
                    for chunk in inflater.feed(raw):
                        size += len(chunk)
                        if size > cap:
                            raise AttachmentError(f"{shown}: more than the limit of {cap} bytes")
                        spool.write(chunk)
                spool.seek(0)
                return spool.read()
        except httpx.TransportError as exc:
            raise AttachmentUnavailableError(f"{shown}: {type(exc).__name__}: {exc}") from None
        except OSError as exc:  # a full disk or a missing directory: may well pass later
            raise AttachmentUnavailableError(f"{shown}: cannot spool the download: {exc}") from None

"""Fetching URL attachments safely: http(s) only, public addresses only, bounded in size,
time and redirects.

The host is resolved here and every address it has is checked before connecting; the
request then goes to the checked address (``Host`` and TLS SNI keep the name), so a DNS
answer that changes between check and connect cannot reach a private address. Each
redirect is checked the same way. The body streams into an anonymous temporary file, so
nothing is left on disk whatever happens; a compressed body is inflated a piece at a
time, so the size cap holds for what it inflates to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PurePosixPath

import httpx

from consumer.errors import AttachmentError, AttachmentUnavailableError
from consumer.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
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

    Loopback, private, link-local, multicast, reserved, unspecified and shared (CGNAT)
    ranges are refused; an IPv4-mapped IPv6 address is judged as the IPv4 one it carries.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


def filename_of(url: httpx.URL, disposition: str | None = None) -> str | None:
    """The name the server gives the body: its ``Content-Disposition`` filename, else the
    last segment of the URL's (decoded) path. Raw: a server may put anything in either,
    so it is cleaned before use (:func:`consumer.attachments.clean_filename`).
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
            raise AttachmentError(f"{url}: content-encoding {name!r} is not supported")
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

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        timeout = httpx.Timeout(limits.read_timeout, connect=limits.connect_timeout)
        # trust_env off: a proxy from the environment would bypass the address check.
        self._client = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"Accept-Encoding": "gzip, deflate"},
        )

    async def close(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def fetch(self, raw_url: str, max_bytes: int | None = None) -> Fetched:
        """The body at ``raw_url``, following at most ``max_redirects`` redirects, refused
        beyond ``max_bytes`` (at most the limits' own).

        Raises :class:`AttachmentError` for what can never work (scheme, address, size,
        redirect loops) and :class:`AttachmentUnavailableError` for what may work later
        (HTTP errors, timeouts, refused connections, DNS failures). The whole fetch may
        take ``fetch_timeout`` seconds at most.
        """
        try:
            url = httpx.URL(raw_url)
        except httpx.InvalidURL as exc:
            raise AttachmentError(f"invalid attachment URL: {exc}") from None
        cap = min(self.limits.max_bytes, max_bytes or self.limits.max_bytes)
        try:
            async with asyncio.timeout(self.limits.fetch_timeout):
                return await self._fetch(url, raw_url, cap)
        except TimeoutError:
            raise AttachmentUnavailableError(
                f"{raw_url}: not fetched within {self.limits.fetch_timeout:g} s"
            ) from None

    async def _fetch(self, url: httpx.URL, raw_url: str, cap: int) -> Fetched:
        for _ in range(self.limits.max_redirects + 1):
            request = await self._pinned_request(url)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise AttachmentUnavailableError(f"{url}: {type(exc).__name__}: {exc}") from None
            try:
                if response.is_redirect and "location" in response.headers:
                    url = url.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise AttachmentUnavailableError(f"{url}: HTTP {response.status_code}")
                data = await self._read_capped(url, response, cap)
            finally:
                await response.aclose()
            name = filename_of(url, response.headers.get("content-disposition"))
            return Fetched(data, response.headers.get("content-type"), name)
        raise AttachmentError(f"{raw_url}: more than {self.limits.max_redirects} redirects")

    async def _pinned_request(self, url: httpx.URL) -> httpx.Request:
        """A request for ``url`` addressed to a checked IP address of its host."""
        if url.scheme not in _SCHEMES:
            raise AttachmentError(f"attachment URL scheme {url.scheme!r} is not http or https")
        if not url.host:
            raise AttachmentError(f"attachment URL {url} has no host")
        ip = await self._checked_address(url)
        headers = {"Host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        return self._client.build_request(
            "GET", url.copy_with(host=str(ip)), headers=headers, extensions=extensions
        )

    async def _checked_address(self, url: httpx.URL) -> IPAddress:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                url.host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise AttachmentUnavailableError(f"{url.host}: cannot resolve: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not self.limits.allow_private:
            for ip in addresses:
                why = refused_address(ip)
                if why is not None:
                    raise AttachmentError(
                        f"{url.host} resolves to {why} address {ip}, which is not allowed"
                        " (MAILBUS_ATTACHMENT_ALLOW_PRIVATE)"
                    )
        if not addresses:
            raise AttachmentUnavailableError(f"{url.host}: no address")
        return addresses[0]

    async def _read_capped(self, url: httpx.URL, response: httpx.Response, cap: int) -> bytes:
        """The body, decoded, refused as soon as it is known to exceed ``cap`` bytes."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise AttachmentError(f"{url}: {declared} bytes is more than the limit of {cap}")
        inflater = Inflater.for_encoding(url, response.headers.get("content-encoding"))
        try:
            # Unlinked as soon as it is made: nothing is left behind, even by a crash.
            with tempfile.TemporaryFile(dir=self.limits.tmp_dir) as spool:
                size = 0
                async for raw in response.aiter_raw(_CHUNK):
                    for chunk in inflater.feed(raw):
                        size += len(chunk)
                        if size > cap:
                            raise AttachmentError(f"{url}: more than the limit of {cap} bytes")
                        spool.write(chunk)
                spool.seek(0)
                return spool.read()
        except httpx.TransportError as exc:
            raise AttachmentUnavailableError(f"{url}: {type(exc).__name__}: {exc}") from None
        except OSError as exc:  # a full disk or a missing directory: may well pass later
            raise AttachmentUnavailableError(f"{url}: cannot spool the download: {exc}") from None

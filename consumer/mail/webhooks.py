"""Webhook deliveries over HTTP: one signed POST, bounded in time and in what is read back,
to public addresses only (the rules of URL attachments, :mod:`consumer.mail.fetch`).

Redirects are not followed: a receiver's URL is set by its operator, and a redirect of a
POST that carries a signed body is more likely a mistake (or an attempt to reach
elsewhere) than a move; the attempt fails, naming where it was sent.
"""

from __future__ import annotations

import asyncio
import ssl

import httpx

from consumer.core.refusals import AttachmentError
from consumer.core.webhooks import Attempt
from consumer.errors import AttachmentUnavailableError
from consumer.mail.fetch import (
    IPAddress,
    Resolver,
    checked_address,
    checked_client,
    resolve,
    shown_url,
)

# What is read of an answer, for the attempt's log: enough for an error message.
MAX_ANSWER_BYTES = 1024


class WebhookPoster:
    """POSTs events to endpoints; one per webhook service."""

    def __init__(
        self,
        timeout: float,
        *,
        allow_private: bool = False,
        resolver: Resolver = resolve,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``timeout``: one attempt's whole time; ``allow_private``: endpoints may be at
        private and loopback addresses (MAILBUS_WEBHOOK_ALLOW_PRIVATE).
        """
        self._timeout = timeout
        self._allow_private = allow_private
        self._resolver = resolver
        self._client = checked_client(
            self._checked_address,
            httpx.Timeout(timeout),
            ssl_context=ssl_context,
            # identity: the start of a failing answer is logged as text.
            headers={"user-agent": "mailbus-webhooks", "accept-encoding": "identity"},
        )

    async def close(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST ``body`` to ``url`` and say what came of it; never raises for what the
        endpoint does. Errors show the URL as :func:`shown_url` does.
        """
        shown = shown_url(url)
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            return Attempt(None, f"invalid URL {shown}: {exc}", refused=True)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            return Attempt(None, f"{shown} is not an http(s) URL with a host", refused=True)
        request = self._client.build_request("POST", parsed, content=body, headers=headers)
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client.send(request, stream=True)
                try:
                    answer = await _start_of(response)
                finally:
                    await response.aclose()
        except AttachmentError as exc:  # an address refused: it will be again
            return Attempt(None, str(exc), refused=True)
        except TimeoutError:
            return Attempt(None, f"{shown}: no answer within {self._timeout:g} s")
        except (httpx.TransportError, AttachmentUnavailableError) as exc:
            return Attempt(None, f"{shown}: {type(exc).__name__}: {exc}")
        if response.is_redirect:
            to = shown_url(response.headers.get("location", ""))
            return Attempt(response.status_code, f"redirect to {to} not followed")
        if 200 <= response.status_code < 300:
            return Attempt(response.status_code)
        return Attempt(response.status_code, f"HTTP {response.status_code}: {answer}")

    async def _checked_address(self, host: str, port: int) -> IPAddress:
        return await checked_address(
            host,
            port,
            resolver=self._resolve,
            allow_private=self._allow_private,
            setting="MAILBUS_WEBHOOK_ALLOW_PRIVATE",
        )

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """The host's addresses; a name that does not resolve is a failed attempt, retried
        like a refused connection: a receiver's DNS may be back before the event expires.
        """
        try:
            return await self._resolver(host, port)
        except AttachmentError as exc:  # no such host, now
            raise AttachmentUnavailableError(str(exc)) from None


async def _start_of(response: httpx.Response) -> str:
    """The first :data:`MAX_ANSWER_BYTES` of an answer, as text; the rest is not read."""
    read = b""
    async for chunk in response.aiter_raw(MAX_ANSWER_BYTES):
        read += chunk
        if len(read) >= MAX_ANSWER_BYTES:
            break
    return read[:MAX_ANSWER_BYTES].decode("utf-8", "replace")

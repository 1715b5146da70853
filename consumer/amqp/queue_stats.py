"""Queue depths and consumer counts, from the RabbitMQ management HTTP API when
``MAILBUS_MANAGEMENT_URL`` is set, else from passive declares over AMQP.

A passive declare only knows the messages ready for delivery; the management API also
counts those delivered and not yet acknowledged. Its figures lag by its statistics
interval (5 s by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import httpx
from aiormq.exceptions import ChannelNotFoundEntity

from consumer.core.status import Figures, QueueFigures
from consumer.errors import ManagementError
from consumer.settings import Settings, redact_url

Source = Literal["management", "amqp"]
_COLUMNS = "name,messages_ready,messages_unacknowledged,consumers"
TIMEOUT = 10.0  # seconds for the management API to answer


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def management_request(management_url: str, amqp_url: str) -> tuple[str, httpx.BasicAuth]:
    """The API's base URL without credentials, and the login: the management URL's own,
    else the AMQP URL's (usually the same RabbitMQ user).
    """
    parts = urlsplit(management_url)
    login = parts if parts.username is not None else urlsplit(amqp_url)
    user, password = unquote(login.username or "guest"), unquote(login.password or "guest")
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, netloc, path, "", "")), httpx.BasicAuth(user, password)


async def from_management(management_url: str, amqp_url: str, names: Sequence[str]) -> Figures:
    """Figures for ``names`` from ``GET /api/queues/{vhost}``."""
    base, auth = management_request(management_url, amqp_url)
    where = f"{base}api/queues/{quote(vhost_of(amqp_url), safe='')}"
    try:
        async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT, trust_env=False) as client:
            response = await client.get(where, params={"columns": _COLUMNS})
    except httpx.HTTPError as exc:
        raise ManagementError(
            f"management API {redact_url(base)}: {type(exc).__name__}: {exc}"
        ) from exc
    if response.status_code != httpx.codes.OK:
        raise ManagementError(
            f"management API {redact_url(base)} answered {response.status_code} "
            f"{response.reason_phrase}"
        )
    try:
        listed = {row["name"]: row for row in response.json()}
    except (ValueError, TypeError, KeyError) as exc:
        raise ManagementError(f"management API {redact_url(base)}: not a queue list") from exc
    figures: Figures = dict.fromkeys(names)
    for name in names:
        row = listed.get(name)
        if row is not None:
            figures[name] = QueueFigures(
                int(row.get("messages_ready") or 0),
                int(row.get("messages_unacknowledged") or 0),
                int(row.get("consumers") or 0),
            )
    return figures


async def from_amqp(amqp_url: str, names: Sequence[str]) -> Figures:
    """Figures for ``names`` from passive declares (``unacked`` unknown)."""
    figures: Figures = dict.fromkeys(names)
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        for name in names:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                # The broker closes a channel that asked for a missing queue.
                channel = await connection.channel()
                continue
            found = queue.declaration_result
            figures[name] = QueueFigures(found.message_count or 0, None, found.consumer_count or 0)
    return figures


async def queue_figures(settings: Settings, names: Sequence[str]) -> tuple[Source, Figures]:
    """Figures for ``names`` from the best source configured, and which one it was."""
    amqp_url = settings.amqp_url.get_secret_value()
    if settings.management_url is not None:
        management_url = settings.management_url.get_secret_value()
        return "management", await from_management(management_url, amqp_url, names)
    return "amqp", await from_amqp(amqp_url, names)

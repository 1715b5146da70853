"""One-click unsubscribe (RFC 8058): the signed token in a mail's link, and its headers.

A token names one recipient of one domain's list (and the job that carried it), with an
expiry, signed with ``MAILBUS_SECRET_KEY``. The signature covers a purpose line of its
own, so no other value mailbus signs (a copy's seal) passes for a token, nor a token for
one. The token is readable by whoever holds the link (the recipient's address is in it,
base64): it grants nothing but leaving that list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from consumer.core.message import MAX_HEADER_WORD, Job
from consumer.core.refusals import InvalidJobError
from consumer.core.suppression import Scope
from consumer.vault import Vault

# What the signature covers first: a token signed for nothing else.
_PURPOSE = b"mailbus unsubscribe v1\0"
# A link's path under the gateway's public URL: /unsubscribe/TOKEN.
LINK_PATH = "/unsubscribe/"
# No token mailbus makes is longer (see :func:`link_headers`): a longer one is refused
# before it is decoded.
MAX_TOKEN = MAX_HEADER_WORD
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}")
ONE_CLICK = "List-Unsubscribe=One-Click"
# What a mailto: URI's address may hold as it is (RFC 6068 qchar, less ','): an address's
# '?', '#', '%', '&', '=' or '/' is percent-encoded, never read as the URI's own syntax
# ('?bcc=...' would add a recipient to every unsubscribe request).
_MAILTO_SAFE = "!$'()*+;:@"


class TokenRefused(ValueError):
    """A token that is not one mailbus signed, was altered, or has expired."""


@dataclass(frozen=True)
class Unsubscribe:
    """What a token says: ``recipient`` leaves ``list_name`` of ``domain``."""

    domain: str
    list_name: str
    recipient: str
    job_id: str | None
    expires: datetime

    @property
    def scope(self) -> Scope:
        """Where the recipient's suppression applies: this list of this domain."""
        return Scope(self.domain, self.list_name)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(request: Unsubscribe, vault: Vault) -> str:
    """``request`` as a URL-safe token, signed with the vault's first key."""
    expires = int(request.expires.timestamp())
    fields = [request.domain, request.list_name, request.recipient, request.job_id, expires]
    payload = _b64(json.dumps(fields, separators=(",", ":")).encode())
    signature = bytes.fromhex(vault.sign(_PURPOSE + payload.encode()))
    return f"{payload}.{_b64(signature)}"


def read_token(token: str, vault: Vault, now: datetime) -> Unsubscribe:
    """What ``token`` says, when a configured key signed it and it has not expired; else
    :class:`TokenRefused`. Bounded and checked for shape before anything is decoded.
    """
    if len(token) > MAX_TOKEN or not _TOKEN.fullmatch(token):
        raise TokenRefused("not an unsubscribe link")
    payload, _, signature = token.partition(".")
    try:
        signed = _unb64(signature).hex()
    except (binascii.Error, ValueError):
        raise TokenRefused("not an unsubscribe link") from None
    if not vault.verify(_PURPOSE + payload.encode(), signed):
        raise TokenRefused("not an unsubscribe link")
    # Signed by mailbus: what follows only guards against mailbus's own bugs.
    try:
        domain, list_name, recipient, job_id, expires = json.loads(_unb64(payload))
        request = Unsubscribe(
            domain, list_name, recipient, job_id, datetime.fromtimestamp(expires, UTC)
        )
    except (ValueError, TypeError, OverflowError, OSError):
        raise TokenRefused("not an unsubscribe link") from None
    if request.expires <= now:
        raise TokenRefused("this unsubscribe link has expired")
    return request


def link_headers(
    job: Job, job_id: str, *, base_url: str, vault: Vault, expires: datetime
) -> dict[str, str]:
    """The ``List-Unsubscribe`` and ``List-Unsubscribe-Post`` headers of ``job`` (which
    asks for them and has one recipient, as its contract holds it to), the link valid
    until ``expires``. A link too long to write as one header word is
    :class:`InvalidJobError`.
    """
    asked = job.unsubscribe
    assert asked is not None  # the caller asks only for a job that wants a link
    (recipient,) = job.recipients()
    request = Unsubscribe(job.domain, asked.list_, recipient, job_id, expires)
    link = f"<{base_url}{LINK_PATH}{make_token(request, vault)}>"
    if len(link) + 1 > MAX_HEADER_WORD:  # the comma after it, when a mailto follows
        raise InvalidJobError(
            f"unsubscribe: the link would be {len(link)} characters, more than a header "
            "can carry (domain, address and job id too long together)"
        )
    if asked.mailto is None:
        value = link
    else:
        value = f"{link}, <mailto:{quote(asked.mailto, safe=_MAILTO_SAFE)}>"
    return {"List-Unsubscribe": value, "List-Unsubscribe-Post": ONE_CLICK}


def token_digest(token: str) -> str:
    """A short hash of ``token`` for logs: the token itself is never logged."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def confirmation_page(request: Unsubscribe) -> str:
    """The page a GET of the link shows: it asks, and only its form's POST unsubscribes
    (mail scanners fetch links, and must not unsubscribe anyone doing so).
    """
    what = f"{html.escape(request.list_name)} of {html.escape(request.domain)}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>Unsubscribe</title></head><body>\n<p>Stop receiving {what}?</p>\n"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>\n</body></html>\n'
    )

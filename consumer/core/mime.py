"""Building the RFC 5322 message of a job with the standard library's ``email`` package."""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime
from typing import Any

from consumer.core.content import Content
from consumer.core.message import Job
from consumer.core.refusals import DeadLetterError, InvalidJobError, MessageTooLargeError


class _CustomHeader(UnstructuredHeader, BaseHeader):
    """A header a job sets through ``headers{}``. An ASCII value is folded only at its own
    white space and never made into RFC 2047 encoded-words, which would break the URLs of
    ``List-Unsubscribe``; a long URL may make a line longer than 78 (never than 998).
    """

    def fold(self, *, policy: Policy) -> str:
        value = str(self)
        if not value.isascii():
            return super().fold(policy=policy)
        width = policy.max_line_length or 998
        lines: list[str] = []
        line = f"{self.name}:"
        pieces = re.findall(r"[ \t]*[^ \t]+|[ \t]+$", " " + value.lstrip(" \t"))
        for n, piece in enumerate(pieces):
            if n and len(line) + len(piece) > width and piece.strip():
                lines.append(line)
                line = piece
            else:
                line += piece
        lines.append(line)
        return policy.linesep.join(lines) + policy.linesep


# Parsed headers kept for reuse, and the longest value kept: bounded, as values come from
# producers (a Date or Message-ID, new for every mail, only passes through). A parsed
# header holds some 3-13 KB for a usual value and up to ~50 KB at the longest kept: at
# most ~7 MB in all.
_PARSED_HEADERS = 128
_PARSED_LENGTH = 100


def _as_text(value: Any) -> tuple[str, ...] | None:
    """What a header's value says, as the header is made from it: a string, or addresses
    (the header is parsed from their joined text either way); None for anything else or
    a value too long to keep.
    """
    if isinstance(value, str):
        return (value,) if len(value) <= _PARSED_LENGTH else None
    items = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(item, Address) for item in items):
        return None
    texts = tuple(str(item) for item in items)
    return texts if sum(map(len, texts)) <= _PARSED_LENGTH else None


class _FoldedOnce(BaseHeader):
    """A header that keeps its folded text per policy: a parsed header is shared by every
    message that sets the same text (see :class:`_Registry`), and folding it again for
    each of them would cost as much as the parse the sharing saved.
    """

    def fold(self, *, policy: Policy) -> str:
        folds: dict[Policy, str] = self.__dict__.setdefault("_folds", {})
        folded = folds.get(policy)
        if folded is None:
            folded = folds[policy] = super().fold(policy=policy)
        return folded


class _Registry(HeaderRegistry):
    """The standard header registry, except that each kind of header's class is made once
    (the standard one makes a new class for every header set, some 15% of the cost of
    building a message; cached by kind, a finite set, not by name, which jobs choose), and
    that a header set again to the same text is parsed once: the sender, the recipients of
    a campaign and the MIME framing repeat mail after mail, and parsing is most of the
    rest of the cost. A parsed header is immutable (changing a message's header makes a
    new one), so messages may share it.
    """

    def __init__(self) -> None:
        super().__init__(base_class=_FoldedOnce, default_class=_CustomHeader)
        self._made: dict[object, type[BaseHeader]] = {}
        self._parsed: OrderedDict[tuple[str, tuple[str, ...]], BaseHeader] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, name: str, value: Any) -> BaseHeader:
        text = _as_text(value)
        if text is None:
            return super().__call__(name, value)
        key = (name, text)
        with self._lock:
            found = self._parsed.get(key)
            if found is not None:
                self._parsed.move_to_end(key)
                return found
        made = super().__call__(name, value)
        with self._lock:
            self._parsed[key] = made
            if len(self._parsed) > _PARSED_HEADERS:
                self._parsed.popitem(last=False)
        return made

    def __getitem__(self, name: str) -> type[BaseHeader]:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._made.get(kind)
        if made is None:
            made = self._made[kind] = super().__getitem__(name)
        return made


# 7bit transfer encodings only (quoted-printable/base64 where needed): valid on every
# server, whether or not it offers 8BITMIME.
BUILD_POLICY = policy.default.clone(cte_type="7bit", header_factory=_Registry())
WIRE_POLICY = BUILD_POLICY.clone(linesep="\r\n")
# For servers and programs that take SMTPUTF8: addresses and headers in raw UTF-8.
UTF8_POLICY = BUILD_POLICY.clone(utf8=True)
WIRE_UTF8_POLICY = UTF8_POLICY.clone(linesep="\r\n")
# The headers that carry addresses. A non-ASCII address (an SMTPUTF8 mailbox) in any of
# them can only be written in raw UTF-8: in 7 bits it would become encoded words, which
# RFC 2047 forbids in an address, and which the standard library folds without the
# leading space, ending the header section early.
_ADDRESS_HEADERS = ("From", "To", "Cc", "Reply-To")


def message_id_for(job_id: str, domain: str) -> str:
    """A Message-ID derived from the job id, so a retried mail keeps the same one."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


def set_bodies(msg: EmailMessage, text: str | None, html: str | None, charset: str) -> None:
    """Give ``msg`` a text body, an html body, or both as multipart/alternative."""
    if text is not None:
        msg.set_content(text, charset=charset)
    if html is not None:
        if text is not None:
            msg.add_alternative(html, subtype="html", charset=charset)
        else:
            msg.set_content(html, subtype="html", charset=charset)


def build_message(
    job: Job,
    job_id: str,
    now: datetime,
    content: Content,
    charset: str = "utf-8",
    *,
    added: Mapping[str, str] | None = None,
) -> EmailMessage:
    """Return the message to send for ``job``; raises :class:`InvalidJobError` if it cannot.
    ``added``: headers mailbus writes for the job besides its own (its unsubscribe link),
    set before anything signs the message.

    Layout: text and html become multipart/alternative; inline parts (``cid``) join the
    html in multipart/related; other attachments wrap it all in multipart/mixed. Bodies
    are written in ``charset``; headers that need it are RFC 2047 encoded in UTF-8.
    """
    if job.from_ is None:
        raise InvalidJobError("a raw job's message is sent as given, not built")
    msg = EmailMessage(policy=BUILD_POLICY)
    msg["From"] = job.from_.header()
    msg["To"] = [a.header() for a in job.to]
    if job.cc:
        msg["Cc"] = [a.header() for a in job.cc]
    if job.reply_to is not None:
        msg["Reply-To"] = job.reply_to.header()
    msg["Subject"] = content.subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id_for(job_id, job.domain)
    for name, value in (*job.headers.items(), *(added or {}).items()):
        msg[name] = value
    try:
        set_bodies(msg, content.text, content.html, charset)
    except UnicodeEncodeError:
        raise InvalidJobError(f"the body cannot be written in charset {charset}") from None
    inline = [p for p in content.parts if p.cid is not None]
    if inline:
        html_part = msg.get_body(("html",))
        if html_part is None:
            raise InvalidJobError("inline attachments need an html body to refer to them")
        for part in inline:
            maintype, subtype = part.content_type.split("/", 1)
            html_part.add_related(
                part.data,
                maintype,
                subtype,
                cid=f"<{part.cid}>",
                filename=part.filename,
                disposition="inline",
            )
    for part in content.parts:
        if part.cid is None:
            maintype, subtype = part.content_type.split("/", 1)
            msg.add_attachment(part.data, maintype, subtype, filename=part.filename)
    return msg


@dataclass(frozen=True)
class Mail:
    """A built message and its bytes on the wire (CRLF line ends, 7-bit bodies): serializing
    a message is a good part of a mail's cost, so it is done once. ``utf8``: its headers
    hold a non-ASCII address and are raw UTF-8, so it needs a server that takes SMTPUTF8.
    A raw job's mail has no ``message``: its bytes are the producer's (:func:`raw_mail`).
    ``signed``: ``wire`` begins with a DKIM-Signature over those exact bytes
    (:mod:`consumer.core.dkim`), so they go as they are, never written again from
    ``message``.
    """

    message: EmailMessage | None
    wire: bytes
    utf8: bool = False
    signed: bool = False


def needs_utf8(message: EmailMessage) -> bool:
    """True when an address header of ``message`` holds a non-ASCII address."""
    for name in _ADDRESS_HEADERS:
        header = message[name]
        if header is not None and any(not a.addr_spec.isascii() for a in header.addresses):
            return True
    return False


def serialize(message: EmailMessage, limit: int) -> Mail:
    """``message`` with its bytes on the wire (raw UTF-8 headers when :func:`needs_utf8`);
    raises :class:`MessageTooLargeError` when they are more than ``limit``.
    """
    utf8 = needs_utf8(message)
    wire = message.as_bytes(policy=WIRE_UTF8_POLICY if utf8 else WIRE_POLICY)
    broken = _broken_header(message, wire)
    if broken is not None:
        raise InvalidJobError(
            f"header {broken} cannot be written safely: folded, it would end the header"
            " section early"
        )
    if len(wire) > limit:
        raise MessageTooLargeError(
            f"the message is {len(wire)} bytes, more than the limit of {limit}"
        )
    return Mail(message, wire, utf8)


def _broken_header(message: EmailMessage, wire: bytes) -> str | None:
    """The header the ``email`` package folded into an empty or blank line, if any: its
    folder does so for some display names (parentheses and quotes at a fold), and a
    receiver then reads every later header as body. None when all are whole.
    """
    written = 0  # headers begun before the header section ends (or a blank line breaks it)
    for line in wire.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if not line.strip():
            break
        if line[:1] not in (b" ", b"\t"):
            written += 1
    else:
        if written == len(message):
            return None
    names = message.keys()
    return names[max(written - 1, 0)] if names else "?"


def build_mail(
    job: Job,
    job_id: str,
    now: datetime,
    content: Content,
    *,
    charset: str,
    limit: int,
    added: Mapping[str, str] | None = None,
) -> Mail:
    """The mail of ``job`` built and serialized (:func:`build_message`, :func:`serialize`),
    with the ``added`` headers.

    Whatever building it raises is the job's doing (the ``email`` package refuses what
    it cannot write in its own ways), so it is an :class:`InvalidJobError`: the job is
    dead-lettered once rather than redelivered to fail again.
    """
    try:
        return serialize(build_message(job, job_id, now, content, charset, added=added), limit)
    except DeadLetterError:
        raise
    except Exception as exc:
        raise InvalidJobError(f"the message cannot be built: {type(exc).__name__}: {exc}") from None


def raw_mail(
    job: Job,
    job_id: str,
    now: datetime,
    *,
    limit: int,
    added_headers: Mapping[str, str] | None = None,
) -> Mail:
    """The mail of a raw job: its message's bytes as given, with ``added_headers`` (the
    unsubscribe link's, ASCII), a ``Message-ID`` (derived from the job id, as for built
    mail) and a ``Date`` (``now``) added at the top, the last two where it has none, and
    its Bcc fields left out. Raises :class:`MessageTooLargeError` when the bytes are more
    than ``limit``.
    """
    raw = job.raw_message()
    if raw is None:
        raise InvalidJobError("a built job has no raw message")
    # Each URI of List-Unsubscribe's list on a line of its own: a link and a mailto
    # together may be longer than a line can be (998 octets).
    added = [
        f"{name}: " + value.replace(", <", ",\r\n <")
        for name, value in (added_headers or {}).items()
    ]
    if not raw.has_message_id:
        added.append(f"Message-ID: {message_id_for(job_id, job.domain)}")
    if not raw.has_date:
        added.append(f"Date: {format_datetime(now)}")
    wire = raw.wire(added)
    if len(wire) > limit:
        raise MessageTooLargeError(
            f"the message is {len(wire)} bytes, more than the limit of {limit}"
        )
    return Mail(None, wire, raw.utf8)

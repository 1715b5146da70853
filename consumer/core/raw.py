"""A raw job's message: the RFC 5322 bytes a producer gives, read and checked, never rebuilt.

The ``email`` package inspects the header section (From, Subject, Message-ID, Date);
the bytes themselves are only ever cut at field boundaries, so what is sent is what was
given, body byte for byte (a DKIM signature over it stays valid), with line ends made
CRLF as SMTP sends them anyway.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import errors, policy
from email.parser import Parser

# RFC 5322 2.1.1: a line is at most 998 characters, CRLF not counted.
MAX_LINE = 998
# The Subject kept for records: the longest a built job's subject may be.
MAX_SUBJECT = 998
# A header section a submitted mail may have: far above any real one (a few KB), low
# enough that reading it costs a worker little.
MAX_HEADER_BYTES = 64 * 1024
# The author and sender fields the sender rule applies to, and how many addresses in all.
SENDER_FIELDS = ("From", "Sender", "Resent-From", "Resent-Sender")
MAX_SENDERS = 50
# Header fields a raw message may not carry out to its recipients.
_WITHHELD = frozenset({b"bcc"})
# A field begins at a line that does not start with white space (RFC 5322 2.2.3).
_FIELD_START = re.compile(rb"(?<=\n)(?=[^ \t])")


@dataclass(frozen=True)
class RawMessage:
    """A raw message, checked: its header fields (Bcc left out, CRLF line ends) and its
    body, and what its headers say that mailbus needs.
    """

    fields: tuple[bytes, ...]  # each a whole field, folded lines and final CRLF included
    body: bytes  # everything after the blank line that ends the header section
    senders: tuple[str, ...]  # the From header's addresses
    subject: str
    has_message_id: bool
    has_date: bool

    @property
    def field_names(self) -> frozenset[str]:
        """The names of the message's header fields, lower case."""
        return frozenset(
            f.partition(b":")[0].strip().decode("utf-8", "replace").lower() for f in self.fields
        )

    @property
    def utf8(self) -> bool:
        """True when a header holds raw UTF-8 (RFC 6532): the server must take SMTPUTF8."""
        return not all(f.isascii() for f in self.fields)

    def wire(self, added: Sequence[str]) -> bytes:
        """The bytes to send: ``added`` fields (``"Name: value"``, ASCII) at the top, then
        the message's own fields and body as they were.
        """
        top = b"".join(f"{field}\r\n".encode("ascii") for field in added)
        return top + b"".join(self.fields) + b"\r\n" + self.body


def decoded_size(text: str) -> int:
    """How many bytes the base64 ``text`` decodes to, counted without decoding it."""
    padding = len(text[-2:]) - len(text[-2:].rstrip("="))
    return len(text) // 4 * 3 - padding


def read_raw(text: str) -> RawMessage:
    """Decode and check the base64 message ``text``; raises ``ValueError`` saying what is
    wrong with it (a raw job that fails here is invalid, never retried).
    """
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"raw_b64 is not base64: {exc}") from None
    if b"\0" in data:
        raise ValueError("the raw message holds NUL bytes")
    if re.search(rb"\r(?!\n)", data):
        raise ValueError("the raw message holds a CR that does not end a line")
    # The header section's line ends are those of its first line, CRLF or LF, throughout.
    first = data.find(b"\n")
    crlf = first > 0 and data[first - 1 : first] == b"\r"
    head, blank, body = data.partition(b"\r\n\r\n" if crlf else b"\n\n")
    if not blank or not head:
        raise ValueError("the raw message has no blank line ending its header section")
    if len(head) > MAX_HEADER_BYTES:  # the parser's cost grows with it: bounded first
        raise ValueError(f"the raw message's header section is over {MAX_HEADER_BYTES} bytes")
    if re.search(rb"(?<!\r)\n", head) if crlf else b"\r" in head:
        raise ValueError("the raw message's header section mixes CRLF and LF line ends")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    if max(map(len, lines)) > MAX_LINE:
        raise ValueError(f"the raw message has a header line over {MAX_LINE} octets")
    try:
        head_text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the raw message's headers are neither ASCII nor UTF-8") from None
    fields = tuple(_FIELD_START.split(b"".join(line + b"\r\n" for line in lines)))
    kept = tuple(f for f in fields if f.partition(b":")[0].strip().lower() not in _WITHHELD)
    senders, subject, has_message_id, has_date = _inspect(head_text)
    body = re.sub(rb"(?<!\r)\n", b"\r\n", body)
    return RawMessage(kept, body, senders, subject, has_message_id, has_date)


def _inspect(head: str) -> tuple[tuple[str, ...], str, bool, bool]:
    """What the header section says: From's addresses, Subject, whether Message-ID and
    Date are there. Read by the ``email`` package; whatever it raises or notes as a
    defect makes the message invalid.
    """
    try:
        found = _read_headers(head)
    except ValueError:
        raise
    except Exception as exc:  # the email package's own failures on hostile headers
        raise ValueError(
            f"the raw message's headers cannot be read: {type(exc).__name__}: {exc}"
        ) from None
    return found


def _read_headers(head: str) -> tuple[tuple[str, ...], str, bool, bool]:
    msg = Parser(policy=policy.default).parsestr(head + "\r\n", headersonly=True)
    if msg.get_unixfrom() is not None:
        raise ValueError("the raw message begins with an mbox 'From ' line, not a header")
    if msg.defects:
        found = ", ".join(sorted({type(d).__name__ for d in msg.defects}))
        raise ValueError(f"the raw message's header section is malformed: {found}")
    authors = msg.get_all("From") or []
    if len(authors) != 1:
        raise ValueError(f"the raw message needs one From header, not {len(authors)}")
    # Every header naming an author or sender is held to the sender rule: one that the
    # parser read only in part (a defect) might be read otherwise by the receiver.
    senders: list[str] = []
    for name in SENDER_FIELDS:
        for field in msg.get_all(name) or []:
            if any(not isinstance(d, errors.NonASCIILocalPartDefect) for d in field.defects):
                raise ValueError(f"the raw message's {name} is malformed: {str(field)[:100]!r}")
            addresses = field.addresses
            if not all(a.username and a.domain for a in addresses) or (
                name == "From" and not addresses
            ):
                raise ValueError(
                    f"the raw message's {name} is not an address: {str(field)[:100]!r}"
                )
            senders += [a.addr_spec for a in addresses]
    if len(senders) > MAX_SENDERS:
        raise ValueError(f"the raw message names over {MAX_SENDERS} authors and senders")
    subject = str(msg.get("Subject", ""))[:MAX_SUBJECT]
    return tuple(senders), subject, "Message-ID" in msg, "Date" in msg

"""What a message coming back to a return address reports: delivery status notifications
(RFC 3464, ``multipart/report; report-type=delivery-status``), complaints in the Abuse
Reporting Format (RFC 5965, ``report-type=feedback-report``), and, failing both, the
bounces of MTAs that follow neither, as flufl.bounce's detectors read them.

Read with the standard library's ``email`` package, after the message's size (the
listener's) and its count of MIME parts (here) are bounded: a message with more parts
than any report needs is refused before it is parsed.
"""

from __future__ import annotations

import email
import re
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses

from flufl.bounce import all_failures

from consumer.core.vocabulary import BounceKind

# More parts than any report has (a report, its notice, its status, the original): a
# message past these is refused before it is parsed.
MAX_PARTS = 32
# Recipients one report may speak of; the rest are ignored.
MAX_RECIPIENTS = 50
DIAGNOSTIC_CHARS = 300
_FEEDBACK_CHARS = 32
_ADDRESS_CHARS = 320
_CONTENT_TYPE = re.compile(rb"^content-type\s*:", re.IGNORECASE | re.MULTILINE)
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_TOKEN = re.compile(r"[a-z0-9][a-z0-9._-]*")


class UnreadableReportError(ValueError):
    """The message is no report mailbus can read; its text says why."""


@dataclass(frozen=True)
class Bounce:
    """One recipient a delivery status notification reports as failed or delayed."""

    recipient: str
    kind: BounceKind
    status: str | None  # the enhanced status code, e.g. 5.1.1
    diagnostic: str | None  # the remote server's words, bounded to one line


@dataclass(frozen=True)
class Complaint:
    """A recipient's complaint (an ARF feedback report)."""

    recipient: str | None  # None when the report names nobody (redacted)
    feedback_type: str  # abuse, fraud, virus, other...


@dataclass(frozen=True)
class Report:
    """What one message reports: bounces, or a complaint."""

    bounces: tuple[Bounce, ...] = ()
    complaint: Complaint | None = None


def _one_line(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit]


def _address(value: object) -> str | None:
    """An address from a DSN field (``rfc822; a@b``) or a header: lower-cased, or None."""
    text = str(value or "")
    if ";" in text:
        text = text.split(";", 1)[1]
    text = text.strip().strip("<>").strip()
    if not text or len(text) > _ADDRESS_CHARS or "@" not in text or any(c.isspace() for c in text):
        return None
    return text.lower()


def read_report(data: bytes) -> Report:
    """The report in ``data`` (a whole message); raises :class:`UnreadableReportError`."""
    if len(_CONTENT_TYPE.findall(data)) > MAX_PARTS:
        raise UnreadableReportError(f"more than {MAX_PARTS} MIME parts")
    try:
        message = email.message_from_bytes(data)
        parts = _parts(message)
        return _read(message, parts)
    except RecursionError:
        raise UnreadableReportError("MIME parts nested too deep") from None
    except (LookupError, ValueError, TypeError, AttributeError) as exc:
        if isinstance(exc, UnreadableReportError):
            raise
        # The email package's lenient parser lets some malformations through to here.
        raise UnreadableReportError(f"malformed message: {type(exc).__name__}") from None


def _parts(message: Message) -> list[Message]:
    parts: list[Message] = []
    for part in message.walk():
        parts.append(part)
        if len(parts) > MAX_PARTS:
            raise UnreadableReportError(f"more than {MAX_PARTS} MIME parts")
    return parts


def _read(message: Message, parts: list[Message]) -> Report:
    for part in parts:
        kind = part.get_content_type()
        if kind == "message/delivery-status":
            return Report(bounces=_delivery_status(part))
        if kind == "message/feedback-report":
            return Report(complaint=_feedback(part, parts))
    return Report(bounces=_detected(message))


def _delivery_status(part: Message) -> tuple[Bounce, ...]:
    """RFC 3464: the per-message block, then one block per recipient."""
    blocks = part.get_payload()
    if not isinstance(blocks, list) or len(blocks) < 2:
        raise UnreadableReportError("delivery status without a recipient block")
    bounces: list[Bounce] = []
    for block in blocks[1 : MAX_RECIPIENTS + 1]:
        if not isinstance(block, Message):
            continue
        recipient = _address(block.get("Final-Recipient")) or _address(
            block.get("Original-Recipient")
        )
        if recipient is None:
            continue
        action = str(block.get("Action", "")).strip().lower()
        found = _STATUS.search(str(block.get("Status", "")))
        status = ".".join(found.groups()) if found else None
        kind: BounceKind
        if action == "failed" or (status or "").startswith("5"):
            kind = "hard"
        elif action == "delayed" or (status or "").startswith("4"):
            kind = "soft"
        else:  # delivered, relayed, expanded: no bounce
            continue
        said = block.get("Diagnostic-Code")
        diagnostic = None
        if said is not None:
            text = str(said)
            diagnostic = _one_line(text.split(";", 1)[-1], DIAGNOSTIC_CHARS) or None
        bounces.append(Bounce(recipient, kind, status, diagnostic))
    if not bounces and not any(isinstance(b, Message) for b in blocks[1:]):
        raise UnreadableReportError("delivery status without a recipient block")
    return tuple(bounces)


def _feedback(part: Message, parts: list[Message]) -> Complaint:
    """RFC 5965: the feedback type, and the recipient it is about: Original-Rcpt-To, or
    the To of the original message (or of its headers) the report carries.
    """
    payload = part.get_payload()
    fields = payload[0] if isinstance(payload, list) and payload else None
    if not isinstance(fields, Message):
        raise UnreadableReportError("feedback report without its fields")
    told = str(fields.get("Feedback-Type", "")).strip().lower()
    feedback = told[:_FEEDBACK_CHARS] if _TOKEN.fullmatch(told[:_FEEDBACK_CHARS]) else "other"
    recipient = _address(fields.get("Original-Rcpt-To"))
    if recipient is None:
        recipient = _original_to(parts)
    return Complaint(recipient, feedback)


def _original_to(parts: list[Message]) -> str | None:
    for part in parts:
        kind = part.get_content_type()
        if kind == "message/rfc822":
            inner = part.get_payload()
            original = inner[0] if isinstance(inner, list) and inner else None
        elif kind == "text/rfc822-headers":
            text = part.get_payload(decode=True)
            original = email.message_from_bytes(text) if isinstance(text, bytes) else None
        else:
            continue
        if isinstance(original, Message):
            pairs = getaddresses([str(v) for v in original.get_all("To", [])])
            for _name, address in pairs:
                if (found := _address(address)) is not None:
                    return found
    return None


def _detected(message: Message) -> tuple[Bounce, ...]:
    """A bounce in no standard form, as flufl.bounce's detectors read it (addresses only)."""
    temporary, permanent = all_failures(message)
    bounces: list[Bounce] = []
    found: tuple[tuple[frozenset[bytes], BounceKind], ...] = (
        (frozenset(permanent), "hard"),
        (frozenset(temporary), "soft"),
    )
    for addresses, kind in found:
        for raw in sorted(addresses):
            address = _address(raw.decode("ascii", "replace"))
            if address is not None and len(bounces) < MAX_RECIPIENTS:
                bounces.append(Bounce(address, kind, None, None))
    if not bounces:
        raise UnreadableReportError("no delivery status, feedback report or known bounce")
    return tuple(bounces)

"""The older systems' requests as v1 jobs, and their replies: pure functions, no I/O.

Two request shapes are understood, so their clients keep working unchanged:

- the REST mail server's ``PUT /api/mail`` form fields (``domain``, ``domain_key``,
  ``to_email``, ...), answered with ``{"status": "success"|"failed", "message": ...}``;
- the SMTP mailer daemon's one-line JSON requests (``{"sendMail": {...}, "auth": ...}``),
  answered with ``{"status": "success"|"error", "data": ..., "message": ...}``.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from typing import Any

from pydantic import ValidationError

from consumer.core.message import (
    LATEST_SEND_AT,
    Job,
    describe_errors,
    json_body,
    validation_context,
)
from consumer.core.vocabulary import DaemonStatus, RestStatus
from consumer.errors import GatewayRequestError

REST_TAG = "gateway:rest"
DAEMON_TAG = "gateway:daemon"
# The old REST server's checks, in its order, with its words; an API key (the
# X-API-KEY header) stands in for domain_key.
REST_REQUIRED = (
    ("domain", "Need domain"),
    ("to_email", "Need destination email address"),
    ("domain_key", "Need domain key"),
    ("subject", "Need subject text"),
    ("body", "Need email body"),
)
# The CodeIgniter REST server's answer to a wrong API key.
INVALID_API_KEY = "Invalid API Key."
DAEMON_MAIL_FIELDS = frozenset(
    {
        "to",
        "ccList",
        "bccList",
        "replyTo",
        "attachments",
        "embedded",
        "subject",
        "body",
        "useTemplate",
        "replaceContent",
        "fromEmail",
        "fromName",
        "timeout",  # an SMTP timeout: for the request's own server only (see smtp_request)
    }
)
SMTP_OVERRIDES = ("smtpHost", "smtpUser", "smtpPassword", "smtpEncryption", "smtpPort")
# Every request the daemon served, by its name (a request's first key).
DAEMON_REQUESTS = frozenset(
    {
        "ping",
        "status",
        "sendMail",
        "queueMail",
        "getQueueList",
        "getQueuedMail",
        "updateQueuedMail",
        "removeQueuedMail",
        "clearQueue",
        "getTemplateList",
        "getTemplate",
        "addTemplate",
        "updateTemplate",
        "removeTemplate",
        "clearTemplate",
    }
)
# The daemon's words for a request it could not take.
UNAUTHORIZED = "unauthorized request"
INVALID_REQUEST = "invalid request"
EMPTY_PAYLOAD = "payload cannot be empty"
INVALID_PAYLOAD = "invalid payload"
# Lists are paged as the daemon paged them: 500 items at most, pages counted from 0.
PAGE_LIMIT = 500
# The daemon's words for the rest of its answers.
SEND_FAILED = "failed to send mail"
QUEUE_FAILED = "failed to add mail to queue"
QUEUED_MAIL_NOT_FOUND = "queued mail not found"
QUEUED_MAIL_NOT_UPDATED = "unable to update queued mail"
QUEUED_MAIL_NOT_REMOVED = "unable to remove queued mail"
TEMPLATE_NOT_FOUND = "unable to get template"
TEMPLATE_NOT_REMOVED = "unable to remove template"
# A page may start this far into a list at most: beyond, nothing is listed anyway.
MAX_PAGE_START = 10**6
# PHPMailer's words for an SMTP server it could not reach: old clients look for them.
CANNOT_CONNECT = "SMTP Error: Could not connect to SMTP host."
# A queued mail's identifier as the daemon named its queue files: the (scheduled) time in
# seconds and hundredths of microseconds, and 16 random hex digits.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The bytes that frame a daemon request: a newline, and JSON's strings and nesting.
_FRAMING = re.compile(rb'[\n"\\{}\[\]]')
_HTML_TAG = re.compile(r"<(?:!doctype|!--|/?[a-z][a-z0-9]*)[\s/>]", re.IGNORECASE)


def body_fields(body: str) -> dict[str, str]:
    """``html`` when the body has markup, else ``text``: the old systems took either as is."""
    return {"html": body} if _HTML_TAG.search(body) else {"text": body}


def checked_job(job: Mapping[str, Any], *, special_use: bool = False) -> Job:
    """``job`` validated against the v1 contract, refused with a readable reason; with
    ``special_use``, addresses at special-use domains are accepted.
    """
    try:
        return Job.model_validate(job, context=validation_context(special_use=special_use))
    except ValidationError as exc:
        raise GatewayRequestError(describe_errors(exc)) from None


def _split(value: str | None, separator: str) -> list[str]:
    return [part.strip() for part in (value or "").split(separator) if part.strip()]


def _source(ref: str) -> dict[str, str]:
    """The old REST rule: a reference that is a web address is fetched, else it is a path."""
    return {"url": ref} if ref.lower().startswith(("http://", "https://")) else {"path": ref}


@dataclass(frozen=True)
class RestMail:
    """A ``PUT /api/mail`` request: the job, and whether the caller waits for the send."""

    job: dict[str, Any]
    send_now: bool


def rest_mail(fields: Mapping[str, str], *, api_key: bool = False) -> RestMail:
    """The job for the old REST server's form fields; ``body`` has its HTML entities
    decoded, ``cc``/``bcc`` are comma-separated, ``attach_list`` is pipe-separated, and
    ``from_email`` is the Reply-To too, as it was. With ``api_key`` (the request carries
    one) ``domain_key`` is neither needed nor passed on.
    """
    for name, complaint in REST_REQUIRED:
        if api_key and name == "domain_key":
            continue
        if not fields.get(name, "").strip():
            raise GatewayRequestError(complaint)
    from_email = fields.get("from_email", "").strip()
    if not from_email:
        raise GatewayRequestError("Need from email address")
    sender = {"email": from_email, "name": fields.get("from_name", "").strip() or None}
    recipient = {"email": fields["to_email"].strip(), "name": fields.get("to_name") or None}
    job: dict[str, Any] = {
        "domain": fields["domain"].strip(),
        "from": sender,
        "reply_to": sender,
        "to": [recipient],
        "cc": _split(fields.get("cc"), ","),
        "bcc": _split(fields.get("bcc"), ","),
        "subject": fields["subject"],
        **body_fields(html.unescape(fields["body"])),
        "attachments": [_source(ref) for ref in _split(fields.get("attach_list"), "|")],
        "tags": [REST_TAG],
    }
    if not api_key:
        job["domain_key"] = fields["domain_key"]
    return RestMail(job, fields.get("send_now", "").strip() == "send")


def rest_reply(status: RestStatus, message: str, job_id: str | None = None) -> dict[str, Any]:
    """The old REST server's answer; ``id`` is mailbus's own addition, for `mailbus jobs`."""
    reply: dict[str, Any] = {"status": status, "message": message}
    if job_id is not None:
        reply["id"] = job_id
    return reply


def not_sent_because(answer: Mapping[str, Any] | None, waited: float) -> str:
    """Why a "send now" answer (None: none came) is not a sent mail, in one line."""
    if answer is None:
        return f"no outcome within {waited:g} s; the mail stays queued"
    match answer.get("status"):
        case "dead":
            return f"{answer.get('error')} (not retried: {answer.get('reason')})"
        case "deferred":
            return f"{answer.get('error')}; retried at {answer.get('due_at')}"
        case _:
            return f"not sent again: {answer.get('reason')}"


def rest_send_now_reply(
    answer: Mapping[str, Any] | None, waited: float, job_id: str
) -> dict[str, Any]:
    """The old REST server's answer to ``send_now=send``, from the worker's answer."""
    if answer is not None and answer.get("status") == "sent":
        return rest_reply("success", "Message saved and sent. ", job_id)
    why = not_sent_because(answer, waited)
    return rest_reply("success", f"Message saved, failed during immediate send. {why}", job_id)


@dataclass(frozen=True)
class DaemonRequest:
    """One request to the old daemon: its name (the first key), its payload, and the whole
    object without ``auth`` (``updateQueuedMail`` and the template requests carry a
    ``content`` beside the payload).
    """

    name: str
    payload: Any
    fields: Mapping[str, Any]


def daemon_value(frame: bytes) -> Any:
    """The JSON value of one request's bytes; any JSON value is a request."""
    try:
        return json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise GatewayRequestError(INVALID_REQUEST) from None


def daemon_password(value: Any) -> str | None:
    """The password a request carries (its ``auth``), if any."""
    auth = value.get("auth") if isinstance(value, dict) else None
    return auth if isinstance(auth, str) else None


def _empty(value: Any) -> bool:
    """Empty as the daemon (PHP's ``empty()``) saw it: null, false, 0, "", "0", [], {}."""
    if isinstance(value, bool | int | float):
        return not value
    return value is None or value in ("", "0") or (isinstance(value, list | dict) and not value)


def daemon_request(value: Any, *, password: bool) -> DaemonRequest:
    """The request in ``value`` (its password checked already when ``password``), or a
    :class:`GatewayRequestError` with the daemon's words: an empty value or object
    "payload cannot be empty", anything else that names no request "invalid request".
    Without a password an ``auth`` beside a request is ignored, and alone it names none.
    """
    if _empty(value):
        raise GatewayRequestError(EMPTY_PAYLOAD)
    if not isinstance(value, dict):
        raise GatewayRequestError(INVALID_REQUEST)
    fields = dict(value)
    if password or len(fields) > 1:
        fields.pop("auth", None)
    if not fields:
        raise GatewayRequestError(EMPTY_PAYLOAD)
    name = next(iter(fields))
    if name not in DAEMON_REQUESTS:
        raise GatewayRequestError(INVALID_REQUEST)
    return DaemonRequest(name, fields[name], fields)


def _json_type(value: Any) -> str:
    if _empty(value) and not isinstance(value, list | dict):
        return "null"  # the daemon read an empty payload as none
    match value:
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
    return "null"


def payload_errors(payload: Any) -> dict[str, list[str]] | None:
    """The daemon's schema answer for a mail payload that is not an object, else None."""
    if isinstance(payload, dict):
        return None
    return {"payload": [f"The data ({_json_type(payload)}) must match the type: object"]}


# The bytes that end a short bare value (a number, true, false, null) sent with no newline.
_SHORT_VALUE = 64


class DaemonFrame:
    """One daemon request as its bytes come in, each byte looked at once: it ends at a
    newline, or where the JSON value it starts with is complete (the old clients wrote one
    value with no newline and waited for the answer): an object or array where it closes,
    a string at its closing quote, a short bare value (``null``, ``5``) once it parses.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._scanned: bool | None = None  # starts with {, [ or "; None while only blanks came
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the last byte was a backslash inside a string

    def __len__(self) -> int:
        return len(self.buffer)

    def feed(self, data: bytes) -> bytes | None:
        """Add ``data``: the whole request once it is complete, else None."""
        start = len(self.buffer)
        self.buffer += data
        if self._scanned is None and self.buffer.strip():
            self._scanned = bytes(self.buffer.lstrip()[:1]) in (b"{", b"[", b'"')
        if not self._scanned:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                return bytes(self.buffer[:end])
            if self._scanned is False and len(self.buffer) <= _SHORT_VALUE:
                with contextlib.suppress(ValueError):
                    json.loads(self.buffer)
                    return bytes(self.buffer)
            return None
        return self._scan(start)

    def _scan(self, start: int) -> bytes | None:
        skip = start + 1 if self._escaped else start  # the byte the backslash escapes
        self._escaped = False
        for match in _FRAMING.finditer(self.buffer, start):
            at = match.start()
            if at < skip:
                continue
            byte = match.group()
            if byte == b"\n":
                return bytes(self.buffer[:at])
            if self._in_string:
                if byte == b"\\":
                    skip = at + 2
                    self._escaped = skip > len(self.buffer)
                elif byte == b'"':
                    self._in_string = False
                    if self._depth == 0:
                        return bytes(self.buffer[: at + 1])
            elif byte == b'"':
                self._in_string = True
            elif byte in (b"{", b"["):
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return bytes(self.buffer[: at + 1])
        return None


def daemon_reply(status: DaemonStatus, data: Any, message: Any) -> bytes:
    """The old daemon's answer, one JSON line."""
    return json_body({"status": status, "data": data, "message": message}) + b"\n"


def daemon_status_reply(sent: int, failed: int) -> bytes:
    """The old ``status`` answer, ``{"sent", "failed"}`` (the gateway domain's today)."""
    return daemon_reply("success", {"sent": sent, "failed": failed}, None)


def daemon_sent_reply(answer: Mapping[str, Any] | None, waited: float) -> bytes:
    """The old daemon's answer to ``sendMail``, from the worker's answer: a mail that
    could not be sent now is "failed to send mail" with the reason (PHPMailer's words for
    an unreachable server), kept for its retry unless it is dead.
    """
    if answer is not None and answer.get("status") == "sent":
        return daemon_reply("success", None, "mail sent successfully")
    if answer is not None and answer.get("unreachable"):
        return daemon_reply("error", CANNOT_CONNECT, SEND_FAILED)
    why = not_sent_because(answer, waited)
    if answer is None or answer.get("status") in ("deferred", "dead"):
        return daemon_reply("error", why, SEND_FAILED)
    return daemon_reply("success", None, why)


def queue_id(when: datetime, random_hex: str) -> str:
    """A queued mail's identifier in the daemon's form (``mail_<seconds>.<fraction>_<hex>
    .json``), the job's id: old clients match it, ``mailbus jobs show`` takes it.
    """
    seconds, micros = divmod((when - _EPOCH) // timedelta(microseconds=1), 10**6)
    return f"mail_{seconds:016d}.{micros * 100:08d}_{random_hex}.json"


def page(payload: Any) -> tuple[int, int]:
    """The ``(skip, limit)`` of a list request's ``{"limit", "page"}`` (either may be
    absent or null: 500 items, page 0); out-of-range values are held to the range.
    """
    fields = payload if isinstance(payload, dict) else {}
    limit, number = fields.get("limit"), fields.get("page")
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else PAGE_LIMIT
    number = number if isinstance(number, int) and not isinstance(number, bool) else 0
    limit = min(max(limit, 1), PAGE_LIMIT)
    return min(max(number, 0) * limit, MAX_PAGE_START), limit


def listing(items: list[str], total: int, noun: str) -> bytes:
    """A page of a list as the daemon answered it: ``found N templates`` or ``found N
    mails in queue``.
    """
    return daemon_reply("success", {"items": items, "total": total}, f"found {total} {noun}")


def _mailboxes(value: Any, field: str) -> list[dict[str, Any]]:
    """The daemon's address lists: items are ``"a@b"`` or ``["a@b", "Name"]``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise GatewayRequestError(f"{field}: must be a list")
    found: list[dict[str, Any]] = []
    for item in value:
        if isinstance(item, str):
            found.append({"email": item})
        elif (
            isinstance(item, list)
            and 1 <= len(item) <= 2
            and all(isinstance(part, str) for part in item)
        ):
            found.append({"email": item[0], "name": item[1] if len(item) == 2 else None})
        else:
            raise GatewayRequestError(f"{field}: items are an address or [address, name]")
    return found


def _files(value: Any, field: str, width: int) -> list[list[str]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(item, list)
        and len(item) == width
        and all(isinstance(part, str) for part in item)
        for item in value
    ):
        shape = "[filePath, fileName]" if width == 2 else "[filePath, cid, fileName]"
        raise GatewayRequestError(f"{field}: items are {shape}")
    return value


def _sender(mail: Mapping[str, Any], default_from: str | None) -> dict[str, Any]:
    default_name, default_email = parseaddr(default_from or "")
    email = mail.get("fromEmail") or default_email
    if not email:
        raise GatewayRequestError("fromEmail: required, as MAILBUS_GATEWAY_FROM is not set")
    name = mail.get("fromName") or (None if mail.get("fromEmail") else default_name or None)
    return {"email": email, "name": name}


def daemon_job(
    mail: Any,
    *,
    domain: str,
    default_from: str | None,
    queued: bool = False,
    smtp_overrides: bool = False,
) -> dict[str, Any]:
    """The job for a ``sendMail`` (or, ``queued``, a ``queueMail``) payload, sent for
    ``domain``; a queued mail's ``scheduleTime`` becomes its ``send_at``.

    Refused: unknown fields, and per-request SMTP settings unless ``smtp_overrides``
    (then left out of the job: the gateway seals them, see
    :func:`consumer.core.smtp_request.smtp_override_url`).
    """
    if not isinstance(mail, dict):
        raise GatewayRequestError("invalid payload")
    # An empty setting is as if left out: old clients sent their defaults as "" or null.
    overrides = [name for name in SMTP_OVERRIDES if mail.get(name) not in (None, "")]
    if overrides and not smtp_overrides:
        raise GatewayRequestError(
            f"{', '.join(overrides)}: per-request SMTP settings are not supported; "
            "define an outbox for the domain instead (mailbus outbox add)"
        )
    accepted = DAEMON_MAIL_FIELDS | set(SMTP_OVERRIDES) | ({"scheduleTime"} if queued else set())
    unknown = sorted(set(mail) - accepted)
    if unknown:
        raise GatewayRequestError(f"unknown field(s): {', '.join(unknown)}")
    reply_to = _mailboxes(mail.get("replyTo"), "replyTo")
    if len(reply_to) > 1:
        raise GatewayRequestError("replyTo: mailbus sets one Reply-To address")
    if ("body" in mail) == ("useTemplate" in mail):
        raise GatewayRequestError("give either body or useTemplate")
    content: dict[str, Any]
    if "useTemplate" in mail:
        template = {"name": mail["useTemplate"], "data": mail.get("replaceContent") or {}}
        content = {"template": template}
    elif isinstance(mail["body"], str):
        content = body_fields(mail["body"])
    else:
        raise GatewayRequestError("body: must be a string")
    attachments = [
        {"path": path, "filename": name}
        for path, name in _files(mail.get("attachments"), "attachments", 2)
    ] + [
        {"path": path, "cid": cid, "filename": name, "inline": True}
        for path, cid, name in _files(mail.get("embedded"), "embedded", 3)
    ]
    job: dict[str, Any] = {
        "domain": domain,
        "from": _sender(mail, default_from),
        "to": _mailboxes(mail.get("to"), "to"),
        "cc": _mailboxes(mail.get("ccList"), "ccList"),
        "bcc": _mailboxes(mail.get("bccList"), "bccList"),
        "subject": mail.get("subject", ""),
        **content,
        "attachments": attachments,
        "tags": [DAEMON_TAG],
    }
    if reply_to:
        job["reply_to"] = reply_to[0]
    if mail.get("scheduleTime") is not None:
        job["send_at"] = schedule_time(mail["scheduleTime"]).isoformat()
    return job


def schedule_time(value: Any) -> datetime:
    """A ``scheduleTime``: whole seconds since the Unix epoch, from 1970 to before the
    year 3000 (the contract's latest send time); else :class:`GatewayRequestError`.
    """
    latest = int(LATEST_SEND_AT.timestamp())
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < latest:
        raise GatewayRequestError(
            f"scheduleTime: whole seconds since the Unix epoch, before {LATEST_SEND_AT:%Y}"
        )
    return datetime.fromtimestamp(value, UTC)


def _source_of(attachment: Mapping[str, Any]) -> str:
    """Where an attachment is read from (a job not made by the gateway may name a URL)."""
    return str(attachment.get("path") or attachment.get("url") or "")


def _old_mailboxes(value: Any) -> list[Any]:
    """v1 mailboxes (``"a@b"`` or ``{email, name}``) as the daemon's list items."""
    found: list[Any] = []
    for item in value or []:
        if isinstance(item, str):
            found.append(item)
        elif item.get("name"):
            found.append([item["email"], item["name"]])
        else:
            found.append(item["email"])
    return found


def daemon_mail(
    job: Mapping[str, Any], *, default_from: str | None, failures: int
) -> dict[str, Any]:
    """A job the daemon gateway published, as the ``queueMail`` payload it came from (what
    ``getQueuedMail`` answers), with ``failToDelivered``, its failed attempts. Per-request
    SMTP settings are never given back.
    """
    attachments = job.get("attachments") or []
    mail: dict[str, Any] = {
        "to": _old_mailboxes(job.get("to")),
        "ccList": _old_mailboxes(job.get("cc")),
        "bccList": _old_mailboxes(job.get("bcc")),
        "attachments": [
            [_source_of(a), a.get("filename")] for a in attachments if not a.get("inline")
        ],
        "embedded": [
            [_source_of(a), a.get("cid"), a.get("filename")] for a in attachments if a.get("inline")
        ],
        "subject": job.get("subject", ""),
    }
    if job.get("reply_to"):
        mail["replyTo"] = _old_mailboxes([job["reply_to"]])
    template = job.get("template")
    if template is not None:
        mail["useTemplate"] = template["name"]
        if template.get("data"):
            mail["replaceContent"] = template["data"]
    else:
        mail["body"] = job.get("html") if job.get("html") is not None else job.get("text", "")
    sender = job.get("from") or {}
    default_name, default_email = parseaddr(default_from or "")
    if sender.get("email") != default_email:
        mail["fromEmail"] = sender.get("email")
    if sender.get("name") and sender.get("name") != default_name:
        mail["fromName"] = sender["name"]
    if job.get("send_at"):
        mail["scheduleTime"] = int(datetime.fromisoformat(job["send_at"]).timestamp())
    mail["failToDelivered"] = failures
    return mail

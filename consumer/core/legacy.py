"""The older systems' requests as v1 jobs, and their replies: pure functions, no I/O.

Two request shapes are understood, so their clients keep working unchanged:

- the REST mail server's ``PUT /api/mail`` form fields (``domain``, ``domain_key``,
  ``to_email``, ...), answered with ``{"status": "success"|"failed", "message": ...}``;
- the SMTP mailer daemon's one-line JSON requests (``{"sendMail": {...}, "auth": ...}``),
  answered with ``{"status": "success"|"error", "data": ..., "message": ...}``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any

from pydantic import ValidationError

from consumer.core.message import Job, describe_errors, json_body
from consumer.core.vocabulary import DaemonStatus, RestStatus
from consumer.errors import GatewayRequestError

REST_TAG = "gateway:rest"
DAEMON_TAG = "gateway:daemon"
# The old REST server's checks, in its order, with its words.
REST_REQUIRED = (
    ("domain", "Need domain"),
    ("to_email", "Need destination email address"),
    ("domain_key", "Need domain key"),
    ("subject", "Need subject text"),
    ("body", "Need email body"),
)
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
# The daemon's other requests, and what does their work in mailbus.
DAEMON_ELSEWHERE = {
    "getQueueList": "mailbus jobs ls",
    "getQueuedMail": "mailbus jobs show",
    "updateQueuedMail": "mailbus jobs reschedule",
    "removeQueuedMail": "mailbus jobs cancel",
    "clearQueue": "mailbus jobs cancel",
    "getTemplateList": "mailbus template ls",
    "getTemplate": "mailbus template show",
    "addTemplate": "mailbus template put",
    "updateTemplate": "mailbus template put",
    "removeTemplate": "mailbus template rm",
    "clearTemplate": "mailbus template rm",
}
# The bytes that frame a daemon request: a newline, and JSON's strings and nesting.
_FRAMING = re.compile(rb'[\n"\\{}\[\]]')
_HTML_TAG = re.compile(r"<(?:!doctype|!--|/?[a-z][a-z0-9]*)[\s/>]", re.IGNORECASE)


def body_fields(body: str) -> dict[str, str]:
    """``html`` when the body has markup, else ``text``: the old systems took either as is."""
    return {"html": body} if _HTML_TAG.search(body) else {"text": body}


def checked_job(job: Mapping[str, Any]) -> Job:
    """``job`` validated against the v1 contract, refused with a readable reason."""
    try:
        return Job.model_validate(job)
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


def rest_mail(fields: Mapping[str, str]) -> RestMail:
    """The job for the old REST server's form fields; ``body`` has its HTML entities
    decoded, ``cc``/``bcc`` are comma-separated, ``attach_list`` is pipe-separated, and
    ``from_email`` is the Reply-To too, as it was.
    """
    for name, complaint in REST_REQUIRED:
        if not fields.get(name, "").strip():
            raise GatewayRequestError(complaint)
    from_email = fields.get("from_email", "").strip()
    if not from_email:
        raise GatewayRequestError("Need from email address")
    sender = {"email": from_email, "name": fields.get("from_name", "").strip() or None}
    recipient = {"email": fields["to_email"].strip(), "name": fields.get("to_name") or None}
    job = {
        "domain": fields["domain"].strip(),
        "domain_key": fields["domain_key"],
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
    """One request to the old daemon: its name (the first key), its payload, its password."""

    name: str
    payload: Any
    auth: str | None


def daemon_request(line: bytes) -> DaemonRequest:
    """Parse one request; the request is the object's first key other than ``auth``."""
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise GatewayRequestError("invalid payload") from None
    if not isinstance(raw, dict) or not raw:
        raise GatewayRequestError("payload cannot be empty")
    auth = raw.pop("auth", None)
    if not raw:
        raise GatewayRequestError("invalid payload")
    name = next(iter(raw))
    return DaemonRequest(name, raw[name], auth if isinstance(auth, str) else None)


class DaemonFrame:
    """One daemon request as its bytes come in, each byte looked at once: it ends at a
    newline, or where the JSON object it starts with closes (the old clients also wrote
    one object with no newline and waited for the answer).
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._object: bool | None = None  # starts with "{"; None while only blanks came
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the last byte was a backslash inside a string

    def __len__(self) -> int:
        return len(self.buffer)

    def feed(self, data: bytes) -> bytes | None:
        """Add ``data``: the whole request once it is complete, else None."""
        start = len(self.buffer)
        self.buffer += data
        if self._object is None and self.buffer.strip():
            self._object = self.buffer.lstrip()[:1] == b"{"
        if not self._object:
            end = self.buffer.find(b"\n", start)
            return bytes(self.buffer[:end]) if end >= 0 else None
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


def daemon_status_reply(today: Mapping[str, Any], domain: str) -> bytes:
    """The old ``status`` answer, ``{"sent", "failed"}``, for the gateway's domain since
    midnight UTC (``today`` as :func:`consumer.service.status.today_of` folds it); failed counts
    dead jobs too.
    """
    counts = today["by_domain"].get(domain, {})
    sent, failed = counts.get("sent", 0), counts.get("failed", 0) + counts.get("dead", 0)
    return daemon_reply("success", {"sent": sent, "failed": failed}, None)


def daemon_sent_reply(answer: Mapping[str, Any] | None, waited: float, job_id: str) -> bytes:
    """The old daemon's answer to ``sendMail``, from the worker's answer."""
    if answer is not None and answer.get("status") == "sent":
        return daemon_reply("success", {"id": job_id}, "mail sent successfully")
    why = not_sent_because(answer, waited)
    if answer is None or answer.get("status") == "deferred":
        return daemon_reply("error", why, "failed to send mail and added back to queue")
    if answer.get("status") == "dead":
        return daemon_reply("error", why, "failed to send mail")
    return daemon_reply("success", {"id": job_id}, why)


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
    overrides = [name for name in SMTP_OVERRIDES if name in mail]
    if overrides and not smtp_overrides:
        raise GatewayRequestError(
            f"{', '.join(overrides)}: per-request SMTP settings are not supported; "
            "define an outbox for the domain instead (mailbus outbox add)"
        )
    accepted = DAEMON_MAIL_FIELDS | set(overrides) | ({"scheduleTime"} if queued else set())
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
    schedule_time = mail.get("scheduleTime")
    if schedule_time is not None:
        if not isinstance(schedule_time, int) or isinstance(schedule_time, bool):
            raise GatewayRequestError("scheduleTime: seconds since the Unix epoch")
        job["send_at"] = datetime.fromtimestamp(schedule_time, UTC).isoformat()
    return job

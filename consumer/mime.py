"""Building the RFC 5322 message of a job with the standard library's ``email`` package."""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime

from consumer.errors import InvalidJobError, UnsupportedContentError
from consumer.message import Attachment, Job

# 7bit transfer encodings only (quoted-printable/base64 where needed): valid on every
# server, whether or not it offers 8BITMIME.
BUILD_POLICY = policy.default.clone(cte_type="7bit")


def message_id_for(job_id: str, domain: str) -> str:
    """A Message-ID derived from the job id, so a retried mail keeps the same one."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


def _decode(att: Attachment) -> tuple[bytes, str, str]:
    """The bytes and MIME type of an attachment given inline as base64."""
    if att.content_b64 is None:
        kind = "url" if att.url is not None else "path"
        raise UnsupportedContentError(f"{kind} attachments are not supported by this worker")
    try:
        data = base64.b64decode(att.content_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidJobError(f"attachment {att.filename or att.cid!r}: invalid base64") from None
    ctype = att.content_type or mimetypes.guess_type(att.filename or "")[0]
    maintype, _, subtype = (ctype or "application/octet-stream").partition("/")
    return data, maintype, subtype


def build_message(job: Job, job_id: str, now: datetime) -> EmailMessage:
    """Return the message to send for ``job``; raises a :class:`DeadLetterError` if it cannot.

    Layout: text and html become multipart/alternative; inline attachments (``cid``)
    join the html in multipart/related; other attachments wrap it all in multipart/mixed.
    """
    if job.template is not None:
        raise UnsupportedContentError("templates are not supported by this worker")
    msg = EmailMessage(policy=BUILD_POLICY)
    msg["From"] = job.from_.header()
    msg["To"] = [a.header() for a in job.to]
    if job.cc:
        msg["Cc"] = [a.header() for a in job.cc]
    if job.reply_to is not None:
        msg["Reply-To"] = job.reply_to.header()
    msg["Subject"] = job.subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id_for(job_id, job.domain)
    for name, value in job.headers.items():
        msg[name] = value

    if job.text is not None:
        msg.set_content(job.text, charset="utf-8")
    if job.html is not None:
        if job.text is not None:
            msg.add_alternative(job.html, subtype="html", charset="utf-8")
        else:
            msg.set_content(job.html, subtype="html", charset="utf-8")
    inline = [a for a in job.attachments if a.inline]
    if inline:
        if job.html is None:
            raise InvalidJobError("inline attachments need an html body to refer to them")
        html_part = msg.get_body(("html",))
        assert html_part is not None  # set just above
        for att in inline:
            data, maintype, subtype = _decode(att)
            html_part.add_related(
                data,
                maintype,
                subtype,
                cid=f"<{att.cid}>",
                filename=att.filename,
                disposition="inline",
            )
    for att in job.attachments:
        if att.inline:
            continue
        data, maintype, subtype = _decode(att)
        msg.add_attachment(data, maintype, subtype, filename=att.filename)
    return msg

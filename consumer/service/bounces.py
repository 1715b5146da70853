"""The bounce listener: the bounce domains' MX, part of the gateway (``--bounces``).

It takes mail only for valid return addresses (:mod:`consumer.core.returns`), at
MAILBUS_BOUNCE_DOMAIN or at a registered domain's own bounce domain: any other recipient,
a forged MAC or an address moved to another bounce domain among them, is refused ``550``
at RCPT, so nothing is read for it. No list of the bounce domains is needed: each
address's MAC covers the domain it is at. A message is bounded
(MAILBUS_BOUNCE_MAX_MESSAGE_BYTES, refused ``552`` past it) and its MIME parts counted
before it is parsed, off the event loop. Then, for the job each return address names,
each recipient of that job it reports on is recorded on the job's record (once: a report
sent again is recognised), a hard bounce or a complaint suppresses the recipient for the
job's domain, and ``mail.bounced`` or ``mail.complained`` is published.

A message that is no readable report (an autoresponder's, a malformed one) is answered
``250`` and dropped, its reason logged: refused, it would come back as a bounce of the
bounce, or be tried again for days. Only MongoDB or the broker being away is answered
``451``, so that the sender tries again later.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from consumer.clock import utcnow
from consumer.core.events import Event, bounced_event, complained_event
from consumer.core.reports import Report, UnreadableReportError, read_report
from consumer.core.returns import JobRef, ReturnPaths
from consumer.core.suppression import Scope
from consumer.core.vocabulary import FeedbackKind, SuppressionSource, tally_of
from consumer.logging import get_logger
from consumer.service.smtp_intake import (
    TOO_MANY_RECIPIENTS,
    UNAVAILABLE,
    SubmissionServer,
    take_sender,
)
from consumer.store.documents import Document
from consumer.store.jobs import JobRecord

if TYPE_CHECKING:
    from consumer.service.gateway import Gateway

log = get_logger(__name__)
# A report goes to one return address; a few more allow for an MTA that batches.
MAX_RECIPIENTS = 10
# Addresses a session may try that are no return address: past them it is closed, so
# that one connection cannot probe for ever.
MAX_REFUSED = 20
NO_SUCH_ADDRESS = "550 5.1.1 No such return address"
TOO_MANY_REFUSED = "421 4.7.0 Too many unknown recipients, closing"
ACCEPTED = "250 2.0.0 OK"
DROPPED = "250 2.0.0 Accepted and dropped: not a report mailbus reads"


class BounceHandler:
    """The aiosmtpd handler of the bounce listener."""

    def __init__(self, gateway: Gateway, returns: ReturnPaths) -> None:
        self.gateway = gateway
        self.returns = returns
        self.days = gateway.settings.bounce_suppression_days

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Any sender, the null one (``<>``, every bounce's) first."""
        return take_sender(envelope, address, mail_options)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """A valid return address (at the bounce domain it was made for), or 550."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return TOO_MANY_RECIPIENTS
        if self.returns.read(address) is None:
            log.warning("bounce.refused", reason="no such return address", rcpt=address[:100])
            assert isinstance(server, BounceServer)  # this handler serves no other
            server.unknown += 1
            if server.unknown >= MAX_REFUSED:
                server.close_after_reply()
                return TOO_MANY_REFUSED
            return NO_SUCH_ADDRESS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Read the report and record it for each job its return addresses name."""
        content = envelope.content
        assert isinstance(content, bytes)  # decode_data is off
        refs = [ref for a in envelope.rcpt_tos if (ref := self.returns.read(a)) is not None]
        try:
            report = await asyncio.to_thread(read_report, content)
        except UnreadableReportError as exc:
            log.warning("bounce.dropped", reason=str(exc), size=len(content))
            return DROPPED
        except Exception as exc:  # a parser's bug is one message's fault, never the listener's
            log.warning("bounce.dropped", reason=f"parser failed: {type(exc).__name__}")
            return DROPPED
        # The same report sent again (its 250 lost) has the same bytes: recorded once.
        digest = hashlib.sha256(content).hexdigest()[:24]
        try:
            for ref in refs:
                await self._apply(ref, report, digest)
        except Exception as exc:
            # MongoDB's and the broker's failures come in many types; each means: later.
            log.warning("bounce.unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
            return UNAVAILABLE
        return ACCEPTED

    async def _apply(self, ref: JobRef, report: Report, digest: str) -> None:
        gateway = self.gateway
        record = await gateway.jobs.returned(ref)
        if record is None:
            log.warning("bounce.dropped", reason="no such job (expired, or never recorded)")
            return
        job_id = record["_id"]
        recipients = {k[3:] for k in record.get("search", []) if k.startswith("to:")}
        kept = {entry.get("key") for entry in record.get("feedback", [])}
        for bounce in report.bounces:
            key = f"{digest}:{bounce.kind}:{bounce.recipient}"
            if bounce.recipient not in recipients:
                log.warning("bounce.dropped", reason="not a recipient of the job", id=job_id)
            elif key not in kept:
                reason = f"bounced {bounce.status or ''} {bounce.diagnostic or ''}".strip()
                suppress = bounce.kind == "hard" and self.days > 0
                await self._record(
                    record,
                    bounce.recipient,
                    bounce.kind,
                    {"status": bounce.status, "diagnostic": bounce.diagnostic},
                    key,
                    event=bounced_event(job_id, record, bounce),
                    suppression=(reason, "bounce", self.days) if suppress else None,
                )
        complaint = report.complaint
        if complaint is not None:
            who = complaint.recipient
            key = f"{digest}:complaint:{who}"
            if who is None or who not in recipients:
                log.warning("bounce.dropped", reason="complaint names no recipient", id=job_id)
            elif key not in kept:
                await self._record(
                    record,
                    who,
                    "complaint",
                    {"feedback_type": complaint.feedback_type},
                    key,
                    event=complained_event(job_id, record, complaint, who),
                    suppression=(f"complaint ({complaint.feedback_type})", "complaint", None),
                )

    async def _record(
        self,
        record: JobRecord,
        recipient: str,
        kind: FeedbackKind,
        fields: Document,
        key: str,
        *,
        event: Event,
        suppression: tuple[str, SuppressionSource, float | None] | None,
    ) -> None:
        """Suppress, publish, then keep on the record: a failure midway is answered 451,
        and the report sent again redoes what the record does not hold yet (a suppression
        is idempotent; the event may then go out twice, never not at all).
        """
        gateway, job_id, now = self.gateway, record["_id"], utcnow()
        domain = record.get("domain")
        # A sandboxed job's mail went nowhere real (or to a catch-all): nothing to hold.
        if suppression is not None and domain and not record.get("sandbox"):
            reason, source, days = suppression
            await gateway.suppressions.add_automatic(
                {recipient: reason[:200]}, scope=Scope(domain), source=source, days=days
            )
        await gateway.outgoing.event(*event)
        entry = {"at": now, "kind": kind, "recipient": recipient, "key": key, **fields}
        if await gateway.jobs.add_feedback(job_id, entry):
            await gateway.feedback.add(tally_of(kind), now)
            log.info("bounce.recorded", id=job_id, kind=kind, suppressed=bool(suppression))


class BounceServer(SubmissionServer):
    """One session of the bounce listener: no AUTH; a message to valid return addresses
    is being answered, not let go for room, until its answer is given.
    """

    unknown = 0  # recipients refused in this session: no return address

    def taking(self) -> bool:
        """Its recipients are valid return addresses: the DATA about to come is taken in."""
        return bool(self.envelope and self.envelope.rcpt_tos)

    def close_after_reply(self) -> None:
        """Close the connection once the reply being given is written."""
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is not None:
            # The reply is written before the loop runs this (no await between them), and
            # closing flushes it.
            asyncio.get_running_loop().call_soon(transport.close)


def bounce_factory(
    gateway: Gateway, returns: ReturnPaths, tls: ssl.SSLContext | None
) -> Callable[[], BounceServer]:
    """The protocol factory of the bounce listener: STARTTLS offered with ``tls`` (the
    gateway's certificate; senders use it when they can), never required; no AUTH.
    """
    settings = gateway.settings
    handler = BounceHandler(gateway, returns)

    def factory() -> BounceServer:
        return BounceServer(
            handler,
            ident="mailbus",
            data_size_limit=settings.bounce_max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls,
            require_starttls=False,
            timeout=settings.gateway_read_timeout,
            auth_required=False,
            auth_require_tls=True,
            # Nobody logs in to an MX: no mechanism is offered, even over TLS.
            auth_exclude_mechanism=["PLAIN", "LOGIN", "CRAM-MD5"],
        )

    return factory

"""Bounces and complaints as MTAs and mailbox providers write them, made for the tests:
Postfix's DSN (RFC 3464), Exim's, a Gmail-like DSN, a delayed (soft) one, an ARF
complaint as SES and Yahoo send them (RFC 5965), a qmail bounce (QSBMF, which only
flufl.bounce reads), and malformed ones.
"""

from __future__ import annotations

import uuid

_ORIGINAL = (
    "Message-ID: <{mid}@sender.example>\r\n"
    "From: Shop <news@shop.example>\r\n"
    "To: {rcpt}\r\n"
    "Subject: Your order\r\n"
    "\r\n"
)


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def _mid() -> str:
    return uuid.uuid4().hex


def postfix_dsn(
    to: str,
    recipient: str,
    *,
    action: str = "failed",
    status: str = "5.1.1",
    diagnostic: str = "smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
) -> bytes:
    """Postfix's non-delivery report (``action`` delayed and a 4.x.x status: its delay
    notice).
    """
    boundary = f"{_mid()}.1700000000/mx.receiver.example"
    said = diagnostic.format(rcpt=recipient)
    return _crlf(
        f"Return-Path: <>\n"
        f"From: MAILER-DAEMON@mx.receiver.example (Mail Delivery System)\n"
        f"Subject: Undelivered Mail Returned to Sender\n"
        f"To: {to}\n"
        f"Message-ID: <{_mid()}@mx.receiver.example>\n"
        f"Auto-Submitted: auto-replied\n"
        f"MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n boundary="{boundary}"\n'
        f"\n"
        f"This is a MIME-encapsulated message.\n"
        f"\n--{boundary}\n"
        f"Content-Description: Notification\n"
        f"Content-Type: text/plain; charset=us-ascii\n"
        f"\n"
        f"This is the mail system at host mx.receiver.example.\n\n"
        f"I'm sorry to have to inform you that your message could not\n"
        f"be delivered to one or more recipients.\n\n"
        f"<{recipient}>: host mx said: {said}\n"
        f"\n--{boundary}\n"
        f"Content-Description: Delivery report\n"
        f"Content-Type: message/delivery-status\n"
        f"\n"
        f"Reporting-MTA: dns; mx.receiver.example\n"
        f"X-Postfix-Queue-ID: 4F1A21C0A1\n"
        f"Arrival-Date: Mon,  7 Dec 2026 06:00:00 +0000 (UTC)\n"
        f"\n"
        f"Final-Recipient: rfc822; {recipient}\n"
        f"Original-Recipient: rfc822;{recipient}\n"
        f"Action: {action}\n"
        f"Status: {status}\n"
        f"Remote-MTA: dns; mx.receiver.example\n"
        f"Diagnostic-Code: {said}\n"
        f"\n--{boundary}\n"
        f"Content-Description: Undelivered Message Headers\n"
        f"Content-Type: text/rfc822-headers\n"
        f"\n" + _ORIGINAL.format(mid=_mid(), rcpt=recipient) + f"--{boundary}--\n"
    )


def delayed_dsn(to: str, recipient: str) -> bytes:
    """Postfix's 'delayed mail' notice: a soft bounce."""
    return postfix_dsn(
        to,
        recipient,
        action="delayed",
        status="4.4.1",
        diagnostic="X-Postfix; connect to mx.receiver.example: Connection timed out",
    )


def gmail_dsn(to: str, recipient: str) -> bytes:
    """A DSN as Gmail's servers send it: multipart/report, the diagnostic folded."""
    boundary = f"000000000000{_mid()[:16]}"
    return _crlf(
        f"Return-Path: <>\n"
        f"From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\n"
        f"To: {to}\n"
        f"Auto-Submitted: auto-replied\n"
        f"Message-ID: <{_mid()}@mx.google.com>\n"
        f"Subject: Delivery Status Notification (Failure)\n"
        f"MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; boundary="{boundary}"; report-type=delivery-status\n'
        f"\n--{boundary}\n"
        f'Content-Type: multipart/related; boundary="{boundary}r"\n'
        f"\n--{boundary}r\n"
        f'Content-Type: text/html; charset="UTF-8"\n'
        f"\n<html><body>Address not found</body></html>\n"
        f"\n--{boundary}r--\n"
        f"\n--{boundary}\n"
        f"Content-Type: message/delivery-status\n"
        f"\n"
        f"Reporting-MTA: dns; googlemail.com\n"
        f"Received-From-MTA: dns; out.sender.example\n"
        f"Arrival-Date: Mon, 07 Dec 2026 06:00:00 -0800 (PST)\n"
        f"X-Original-Message-ID: <{_mid()}@sender.example>\n"
        f"\n"
        f"Final-Recipient: rfc822; {recipient}\n"
        f"Action: failed\n"
        f"Status: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach does\n"
        f" not exist. Please try double-checking the recipient's email address for\n"
        f" typos or unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser\n"
        f" a1si123.456 - gsmtp\n"
        f"Last-Attempt-Date: Mon, 07 Dec 2026 06:00:01 -0800 (PST)\n"
        f"\n--{boundary}\n"
        f"Content-Type: message/rfc822\n"
        f"\n" + _ORIGINAL.format(mid=_mid(), rcpt=recipient) + "Hello\n" + f"\n--{boundary}--\n"
    )


def exim_bounce(to: str, recipient: str) -> bytes:
    """Exim's plain-text bounce, naming the address in X-Failed-Recipients."""
    return _crlf(
        f"Return-path: <>\n"
        f"X-Failed-Recipients: {recipient}\n"
        f"Auto-Submitted: auto-replied\n"
        f"From: Mail Delivery System <Mailer-Daemon@mx.receiver.example>\n"
        f"To: {to}\n"
        f"Subject: Mail delivery failed: returning message to sender\n"
        f"Message-Id: <E1abc-{_mid()[:12]}@mx.receiver.example>\n"
        f"\n"
        f"This message was created automatically by mail delivery software.\n\n"
        f"A message that you sent could not be delivered to one or more of its\n"
        f"recipients. This is a permanent error. The following address(es) failed:\n\n"
        f"  {recipient}\n"
        f"    SMTP error from remote mail server after RCPT TO:<{recipient}>:\n"
        f"    550 5.1.1 User unknown\n\n"
        f"------ This is a copy of the message, including all the headers. ------\n\n"
        + _ORIGINAL.format(mid=_mid(), rcpt=recipient)
    )


def qmail_bounce(to: str, recipient: str) -> bytes:
    """qmail's bounce (QSBMF): no DSN, no header naming the address."""
    return _crlf(
        f"From: MAILER-DAEMON@mail.receiver.example\n"
        f"To: {to}\n"
        f"Subject: failure notice\n"
        f"Message-ID: <{_mid()}@mail.receiver.example>\n"
        f"\n"
        f"Hi. This is the qmail-send program at mail.receiver.example.\n"
        f"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        f"This is a permanent error; I've given up. Sorry it didn't work out.\n"
        f"\n"
        f"<{recipient}>:\n"
        f"Sorry, no mailbox here by that name. (#5.1.1)\n"
        f"\n"
        f"--- Below this line is a copy of the message.\n\n"
        + _ORIGINAL.format(mid=_mid(), rcpt=recipient)
    )


def arf_complaint(
    to: str, recipient: str, *, feedback: str = "abuse", rcpt_field: bool = True
) -> bytes:
    """An ARF complaint as SES and Yahoo forward them; without ``rcpt_field`` (Yahoo's
    often lack it) the recipient is only in the original message's To.
    """
    boundary = f"feedback_{_mid()}"
    rcpt = f"Original-Rcpt-To: {recipient}\n" if rcpt_field else ""
    return _crlf(
        f"From: complaints@email-abuse.amazonses.com\n"
        f"To: {to}\n"
        f"Subject: Complaint about message\n"
        f"Message-ID: <{_mid()}@email-abuse.amazonses.com>\n"
        f"MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"\n'
        f"\n--{boundary}\n"
        f"Content-Type: text/plain; charset=us-ascii\n"
        f"\nThis is an email abuse report for an email message received from IP 192.0.2.1\n"
        f"\n--{boundary}\n"
        f"Content-Type: message/feedback-report\n"
        f"\n"
        f"Feedback-Type: {feedback}\n"
        f"User-Agent: Yahoo!-Mail-Feedback/2.0\n"
        f"Version: 1\n"
        f"Original-Mail-From: <{to}>\n"
        f"{rcpt}"
        f"Arrival-Date: Mon, 07 Dec 2026 06:00:00 +0000\n"
        f"Source-IP: 192.0.2.1\n"
        f"\n--{boundary}\n"
        f"Content-Type: message/rfc822\n"
        f"\n" + _ORIGINAL.format(mid=_mid(), rcpt=recipient) + "Hello\n" + f"\n--{boundary}--\n"
    )


def report_without_status(to: str) -> bytes:
    """A multipart/report whose delivery-status part names no recipient."""
    return _crlf(
        f"From: MAILER-DAEMON@mx.receiver.example\nTo: {to}\nSubject: x\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n'
        f"\n--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n--b--\n"
    )


def mime_bomb(to: str, depth: int = 400) -> bytes:
    """Multiparts nested ``depth`` deep."""
    head = "".join(
        f'--b{i}\nContent-Type: multipart/mixed; boundary="b{i + 1}"\n\n' for i in range(depth)
    )
    return _crlf(
        f"From: x@y.example\nTo: {to}\nSubject: bomb\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/mixed; boundary="b0"\n\n{head}'
    )


def plain_mail(to: str) -> bytes:
    """Mail that is no report at all (an autoresponder's, say)."""
    return _crlf(
        f"From: someone@else.example\nTo: {to}\nSubject: Out of office\n\nI am away until Monday.\n"
    )

"""An SMTP server that keeps what it receives (aiosmtpd), with fault injection.

Faults are scripted per recipient (RCPT replies) and per message (DATA replies, slow
replies, dropped connections, silence after DATA), so tests can make a server that is
unhappy on cue.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser, Parser

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from deploy.devstack.ports import free_port


@dataclass(frozen=True)
class Captured:
    """One accepted message, as the server saw it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    received_at: float
    tls: bool = False  # the session had switched to TLS (STARTTLS)
    login: str | None = None  # the user it authenticated as

    def message(self) -> EmailMessage:
        """The message parsed with the standard library (policy ``default``).

        Wire CRLF line ends become ``\n`` first, as the ``email`` parser expects. Data that
        is UTF-8 (an SMTPUTF8 mail's raw headers) is read as text: the bytes parser would
        keep non-ASCII header bytes as surrogates.
        """
        data = self.data.replace(b"\r\n", b"\n")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return BytesParser(policy=policy.default).parsebytes(data)
        return Parser(policy=policy.default).parsestr(text)


@dataclass
class Faults:
    """Scripted misbehaviour; each queued reply is used once, in order."""

    rcpt: dict[str, deque[str]] = field(default_factory=dict)
    data: deque[str] = field(default_factory=deque)
    drop_on_data: int = 0
    data_delay: float = 0.0
    # Messages after whose DATA the server says nothing for hang_seconds, then hangs up
    # without keeping them (a client's timeout must fire first).
    hang_on_data: int = 0
    hang_seconds: float = 0.0

    def refuse_rcpt(self, address: str, *replies: str) -> None:
        """Answer RCPT TO for ``address`` with these replies, one per attempt."""
        self.rcpt.setdefault(address.lower(), deque()).extend(replies)

    def refuse_data(self, *replies: str) -> None:
        """Answer the next DATA commands with these replies, one per message."""
        self.data.extend(replies)


class _Handler:
    def __init__(self, server: CaptureServer) -> None:
        self.server = server

    async def handle_RCPT(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self.server.lock:
            queued = self.server.faults.rcpt.get(address.lower())
            reply = queued.popleft() if queued else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        with self.server.lock:
            self.server.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_QUIT(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        with self.server.lock:
            self.server.quits += 1
        return "221 Bye"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        faults = self.server.faults
        if faults.data_delay:
            await asyncio.sleep(faults.data_delay)
        hang = drop = False
        reply = None
        with self.server.lock:
            if faults.hang_on_data > 0:
                faults.hang_on_data -= 1
                hang = True
            elif faults.drop_on_data > 0:
                faults.drop_on_data -= 1
                drop = True
            elif faults.data:
                reply = faults.data.popleft()
        if hang:
            await asyncio.sleep(faults.hang_seconds)
        if hang or drop:
            assert smtp.transport is not None
            smtp.transport.close()
            return "421 closing"
        if reply is not None:
            return reply
        content = envelope.original_content or b""
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        item = Captured(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=content,
            received_at=time.time(),
            tls=session.ssl is not None,
            login=login.decode() if login is not None else None,
        )
        with self.server.lock:
            self.server.messages.append(item)
        if self.server.on_message is not None:
            self.server.on_message(item)
        return "250 2.0.0 Ok: queued"


class _Authenticator:
    """Checks AUTH PLAIN/LOGIN credentials against a table."""

    def __init__(self, logins: dict[str, str]) -> None:
        self.logins = logins

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: object
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        wanted = self.logins.get(data.login.decode())
        if wanted is None or wanted != data.password.decode():
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=data)


class CaptureServer:
    """An in-process SMTP server on a free loopback port, running in its own thread."""

    def __init__(
        self,
        on_message: Callable[[Captured], None] | None = None,
        idle_timeout: float = 300.0,
        tls: ssl.SSLContext | None = None,
        logins: dict[str, str] | None = None,
        smtputf8: bool = True,
    ) -> None:
        """``tls`` offers (and requires) STARTTLS; ``logins`` (user to password) requires
        AUTH, over TLS only; ``smtputf8`` offers SMTPUTF8 (non-ASCII addresses).
        """
        self.port = free_port()
        self.lock = threading.Lock()
        self.messages: list[Captured] = []
        self.faults = Faults()
        self.on_message = on_message
        # Client connections seen (EHLO) and closed politely (QUIT).
        self.sessions = 0
        self.quits = 0
        self._controller = Controller(
            _Handler(self),
            hostname="127.0.0.1",
            port=self.port,
            enable_SMTPUTF8=smtputf8,
            data_size_limit=64 * 1024 * 1024,
            timeout=idle_timeout,
            tls_context=tls,
            require_starttls=tls is not None,
            auth_required=logins is not None,
            auth_require_tls=True,
            authenticator=_Authenticator(logins) if logins is not None else None,
        )

    @property
    def url(self) -> str:
        """An ``MAILBUS_DEFAULT_SMTP_URL`` pointing at this server (no TLS)."""
        return f"smtp://127.0.0.1:{self.port}?security=none"

    def start(self) -> None:
        """Start listening."""
        self._controller.start()

    def stop(self) -> None:
        """Stop listening."""
        self._controller.stop()

    def reset(self) -> None:
        """Forget captured messages, counters and scripted faults."""
        with self.lock:
            self.messages.clear()
            self.faults = Faults()
            self.sessions = 0
            self.quits = 0

    def received(self) -> list[Captured]:
        """A snapshot of the captured messages."""
        with self.lock:
            return list(self.messages)

    async def wait_for(self, count: int) -> list[Captured]:
        """Wait until at least ``count`` messages arrived (bound it with ``asyncio.timeout``)."""
        # Messages arrive on the server thread, so poll rather than await an Event.
        while len(got := self.received()) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return got

"""The Celery peer ``make bench`` measures mailbus against: what a user would write with
Celery and the standard library, a task that builds the mail with ``EmailMessage`` and
sends it with ``smtplib`` over a connection each worker process keeps open.

Loaded by ``celery -A deploy.bench.celery_app worker`` (the broker comes from the command
line) and by the benchmark to publish its tasks.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from celery import Celery

app = Celery("mailbus-peer")
app.conf.task_serializer = "json"
app.conf.accept_content = ["json"]
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True

# One SMTP connection per worker process, kept between tasks as a careful user would.
_connections: dict[tuple[str, int], smtplib.SMTP] = {}


def _connection(host: str, port: int) -> smtplib.SMTP:
    found = _connections.get((host, port))
    if found is None:
        found = _connections[host, port] = smtplib.SMTP(host, port, timeout=30)
    return found


@app.task(name="peer.send")  # type: ignore[untyped-decorator]
def send(job: dict[str, Any], host: str, port: int) -> None:
    """Build ``job``'s mail and hand it to the SMTP server at ``host``:``port``."""
    message = EmailMessage()
    message["From"] = job["from"]
    message["To"] = ", ".join(job["to"])
    message["Subject"] = job["subject"]
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=job["domain"])
    message.set_content(job["text"])
    try:
        _connection(host, port).send_message(message)
    except smtplib.SMTPServerDisconnected:
        del _connections[host, port]
        _connection(host, port).send_message(message)

"""The compatibility gateways, driven the way the older systems' clients drove them: curl
with the REST server's form fields, and the daemon's one-line JSON through nc, against a
real broker, a running worker and the capture SMTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.service.gateway import TOO_MANY_FAILURES
from consumer.settings import Settings
from consumer.store.domains import DomainStore, hash_key, key_matches
from consumer.store.jobs import JobStore
from consumer.vault import new_key
from deploy.devstack.processes import mailbus, run_with
from deploy.devstack.smtp_capture import Captured, CaptureServer
from tests.conftest import RunningWorker, settled_record
from tests.secret_watch import watched
from tests.serving import ANY_PORT, announced_port, gateway_command, gateways

DOMAIN_KEY = "bad horse"
PASSWORD = "old password"  # as in the migration guide's examples
PASSWORD_HASH = hash_key(PASSWORD)


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings, with the daemon gateway's password, domain and sender, a
    directory attachments may be read from, and the secret key that seals the jobs of
    REST requests authorized by an API key.
    """
    return settings.model_copy(
        update={
            "secret_key": SecretStr(watched(new_key())),
            "gateway_password_hash": SecretStr(PASSWORD_HASH),
            "gateway_domain": "daemon.example",
            "gateway_from": "Old Daemon <daemon@daemon.example>",
            "gateway_max_request_bytes": 64 * 1024,
            "gateway_unauthenticated_bytes": 16 * 1024,
            "gateway_wait_seconds": 20.0,
            "gateway_max_connections": 8,
            "gateway_header_timeout": 1.0,
            "gateway_read_timeout": 2.0,
            "gateway_auth_failures": 5,
            "attachment_dirs": [tmp_path],
        }
    )


@pytest.fixture
async def ports(
    settings: Settings, store: JobStore, worker: RunningWorker
) -> AsyncIterator[dict[str, int]]:
    """Both gateways serving on free loopback ports, a worker behind them, and the REST
    domain registered with its key.
    """
    await DomainStore(store.database).put("rest.example", hash_key(DOMAIN_KEY), [], True)
    async with gateways(settings, rest=ANY_PORT, daemon=ANY_PORT) as bound:
        yield bound


@dataclass(frozen=True)
class Answer:
    """A REST answer as curl saw it."""

    status: int
    content_type: str
    text: str


async def curl_rest(
    settings: Settings, port: int, *options: str, path: str = "/api/mail", **changes: str | None
) -> Answer:
    """``curl -X PUT`` to ``path`` with ``REST_MAIL``'s form fields changed by ``changes``
    (None drops one) and curl's ``options`` (a header, say), as the old REST clients sent
    them.
    """
    fields = {k: v for k, v in {**REST_MAIL, **changes}.items() if v is not None}
    data = [arg for k, v in fields.items() for arg in ("--data-urlencode", f"{k}={v}")]
    url = f"http://127.0.0.1:{port}{path}"
    written = "\\n%{content_type}\\n%{http_code}"
    done = await run_with(
        settings, "curl", "-sS", "-w", written, "-X", "PUT", *options, *data, url, kill_after=60
    )
    assert done.returncode == 0, done.stderr
    text, content_type, status = done.stdout.rsplit("\n", 2)
    return Answer(int(status), content_type, text)


async def curl_put(settings: Settings, port: int, **changes: str | None) -> dict[str, Any]:
    """:func:`curl_rest` to ``/api/mail``; the JSON answer."""
    answer: dict[str, Any] = json.loads((await curl_rest(settings, port, **changes)).text)
    return answer


async def nc(settings: Settings, port: int, request: str) -> dict[str, Any]:
    """``echo REQUEST | nc localhost PORT``, the old daemon's one-liner; the JSON answer."""
    done = await run_with(
        settings, "sh", "-c", f"echo '{request}' | nc localhost {port}", kill_after=60
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


async def rest_mail_arrived(smtp: CaptureServer) -> Captured:
    """The one mail ``REST_MAIL`` made, once it has arrived with the old REST server's
    headers and envelope (Bcc by envelope only).
    """
    async with asyncio.timeout(30):
        [mail] = await smtp.wait_for(1)
    message = mail.message()
    assert message["Subject"] == "Mail service test"
    assert message["From"] == "Mail Server <address@rest.example>"
    assert message["To"] == "John Doe <johndoe@example.org>"
    assert message["Cc"] == "someone@example.org, other@example.org"
    assert message["Reply-To"] == "Mail Server <address@rest.example>"
    assert "Bcc" not in message
    assert sorted(mail.rcpt_tos) == [
        "hidden@example.org",
        "johndoe@example.org",
        "other@example.org",
        "someone@example.org",
    ]
    return mail


REST_MAIL = {
    "domain": "rest.example",
    "domain_key": DOMAIN_KEY,
    "to_name": "John Doe",
    "to_email": "johndoe@example.org",
    "subject": "Mail service test",
    "body": "&lt;html&gt;&lt;body&gt;&lt;p&gt;Caf&eacute; &amp; more&lt;/p&gt;"
    "&lt;/body&gt;&lt;/html&gt;",
    "from_name": "Mail Server",
    "from_email": "address@rest.example",
    "cc": "someone@example.org,other@example.org",
    "bcc": "hidden@example.org",
}


async def test_rest_put_saves_the_mail_and_it_goes_out(
    settings: Settings, smtp: CaptureServer, store: JobStore, ports: dict[str, int]
) -> None:
    report = Path(settings.attachment_dirs[0]) / "report.txt"
    report.write_text("quarterly figures\n")
    answer = await curl_put(settings, ports["rest"], attach_list=str(report))
    assert (answer["status"], answer["message"]) == ("success", "Message saved")
    mail = await rest_mail_arrived(smtp)
    message = mail.message()
    body = message.get_body(("html",))
    assert body is not None
    assert body.get_content().strip() == "<html><body><p>Café & more</p></body></html>"
    [attached] = list(message.iter_attachments())
    assert attached.get_filename() == "report.txt"
    assert attached.get_content() == "quarterly figures\n"
    record = await settled_record(store, answer["id"])
    assert record["status"] == "sent"


async def test_rest_send_now_answers_after_the_send(
    settings: Settings, smtp: CaptureServer, ports: dict[str, int]
) -> None:
    sent = await curl_put(settings, ports["rest"], send_now="send")
    assert (sent["status"], sent["message"]) == ("success", "Message saved and sent. ")
    assert len(smtp.received()) == 1  # already there when the answer came

    smtp.faults.refuse_data("554 5.7.1 rejected by policy")
    refused = await curl_put(settings, ports["rest"], send_now="send")
    assert refused["status"] == "success"  # saved, as the old server said
    assert refused["message"].startswith("Message saved, failed during immediate send. ")
    assert "554" in refused["message"]


async def test_rest_refuses_without_the_domain_key(
    settings: Settings, smtp: CaptureServer, store: JobStore, ports: dict[str, int]
) -> None:
    port = ports["rest"]
    wrong = await curl_put(settings, port, domain_key="good horse")
    assert wrong == {"status": "failed", "message": "invalid domain key"}
    missing = await curl_put(settings, port, domain_key=None)
    assert missing == {"status": "failed", "message": "Need domain key"}
    unknown = await curl_put(settings, port, domain="elsewhere.example")
    assert unknown == {"status": "failed", "message": "Invalid Domain"}
    no_subject = await curl_put(settings, port, subject="")
    assert no_subject == {"status": "failed", "message": "Need subject text"}
    bad_address = await curl_put(settings, port, cc="not an address")
    assert bad_address["status"] == "failed"
    assert "cc.0" in bad_address["message"]
    too_big = await run_with(
        settings,
        *("curl", "-sS", "-w", "\\n%{http_code}", "-X", "PUT", "--data-binary", "@-"),
        f"http://127.0.0.1:{port}/api/mail",
        input="body=" + "x" * (settings.gateway_max_request_bytes + 1),
    )
    answer, status = too_big.stdout.rsplit("\n", 1)
    assert status == "413"
    assert json.loads(answer)["status"] == "failed"
    await asyncio.sleep(0.5)
    assert smtp.received() == []
    assert await store.find(limit=10) == []


def daemon_request(name: str, mail: dict[str, Any], auth: str | None = PASSWORD) -> str:
    request: dict[str, Any] = {name: mail}
    if auth is not None:
        request["auth"] = auth
    return json.dumps(request)


async def test_daemon_one_liner_sends_the_mail(
    settings: Settings, smtp: CaptureServer, ports: dict[str, int]
) -> None:
    logo = Path(settings.attachment_dirs[0]) / "logo.png"
    logo.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    mail = {
        "to": ["example@example.org"],
        "ccList": [],
        "bccList": [["name@example.org", "Person Name"]],
        "attachments": [],
        "embedded": [[str(logo), "logo", "logo.png"]],
        "subject": "Test Email",
        "body": '<html>Test Email Body <img src="cid:logo"></html>',
        "fromName": "Test System",
    }
    answer = await nc(settings, ports["daemon"], daemon_request("sendMail", mail))
    assert (answer["status"], answer["message"]) == ("success", "mail sent successfully")
    [received] = smtp.received()  # sent before the answer came back
    message = received.message()
    assert message["From"] == "Test System <daemon@daemon.example>"
    assert message["Subject"] == "Test Email"
    assert sorted(received.rcpt_tos) == ["example@example.org", "name@example.org"]
    related = [part for part in message.walk() if part.get("Content-ID") == "<logo>"]
    assert [part.get_content_type() for part in related] == ["image/png"]
    status = await nc(settings, ports["daemon"], json.dumps({"status": None, "auth": PASSWORD}))
    assert status == {"status": "success", "data": {"sent": 1, "failed": 0}, "message": None}


async def test_daemon_queue_mail_waits_for_its_schedule_time(
    settings: Settings, smtp: CaptureServer, ports: dict[str, int]
) -> None:
    asked = time.time()
    mail = {
        "scheduleTime": int(asked) + 3,
        "to": ["later@example.org"],
        "subject": "Scheduled",
        "body": "plain text",
        "fromEmail": "app@daemon.example",
    }
    answer = await nc(settings, ports["daemon"], daemon_request("queueMail", mail))
    assert (answer["status"], answer["message"]) == ("success", "mail added to queue")
    async with asyncio.timeout(30):
        [received] = await smtp.wait_for(1)
    assert received.received_at >= int(asked) + 3 - 0.1
    message = received.message()
    assert message["From"] == "app@daemon.example"
    assert message.get_content_type() == "text/plain"


async def test_daemon_clients_without_a_newline_get_their_answer(
    settings: Settings, ports: dict[str, int]
) -> None:
    # The old PHP and Node clients wrote the JSON with no newline and waited.
    reader, writer = await asyncio.open_connection("127.0.0.1", ports["daemon"])
    writer.write(json.dumps({"ping": None, "auth": PASSWORD}).encode())
    await writer.drain()
    async with asyncio.timeout(10):
        answer = json.loads(await reader.read())  # and the connection is closed after it
    writer.close()
    assert answer == {"status": "success", "data": None, "message": "pong"}


async def test_daemon_refuses_what_it_should(
    settings: Settings, smtp: CaptureServer, store: JobStore, ports: dict[str, int]
) -> None:
    port = ports["daemon"]
    mail = {"to": ["a@example.org"], "subject": "s", "body": "b"}
    for auth in (None, "wrong password"):
        refused = await nc(settings, port, daemon_request("sendMail", mail, auth=auth))
        assert refused == {"status": "error", "data": None, "message": "unauthorized request"}
    smtp_override = await nc(settings, port, daemon_request("sendMail", {**mail, "smtpHost": "x"}))
    assert (smtp_override["status"], smtp_override["message"]) == ("error", "invalid payload")
    assert "smtpHost" in smtp_override["data"]["payload"][0]
    no_to = await nc(settings, port, daemon_request("queueMail", {**mail, "to": []}))
    assert (no_to["status"], no_to["message"]) == ("error", "invalid payload")
    unknown = await nc(settings, port, daemon_request("getQueue", {}))
    assert unknown == {"status": "error", "data": None, "message": "invalid request"}

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"{" + b" " * (settings.gateway_max_request_bytes + 1))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    async with asyncio.timeout(10):
        answer = json.loads(await reader.readline())
    writer.close()
    assert (answer["status"], answer["message"]) == ("error", "invalid payload")
    await asyncio.sleep(0.5)
    assert smtp.received() == []
    assert await store.find(limit=10) == []


async def ask(port: int, request: str, *, source: str = "127.0.0.1") -> dict[str, Any]:
    """One daemon request from the loopback address ``source``; the JSON answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(request.encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(20):
            answer: dict[str, Any] = json.loads(await reader.read())
        return answer
    finally:
        writer.close()


async def drip(port: int, at_once: bytes, dripped: bytes) -> tuple[bytes, float]:
    """Send ``at_once``, then ``dripped`` a byte every 50 ms until the server answers or
    closes; its answer and how many seconds after connecting it came.
    """
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()
    answer = b""
    try:
        writer.write(at_once)
        for byte in dripped:
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), 0.05)
                break  # answered, or closed (b"")
            writer.write(bytes([byte]))
    except ConnectionError:  # closed while we were still sending
        pass
    finally:
        writer.close()
    return answer, loop.time() - started


async def test_rest_lets_go_of_idle_and_dripping_clients(
    settings: Settings, smtp: CaptureServer, ports: dict[str, int]
) -> None:
    port = ports["rest"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
    head = b"PUT /api/mail HTTP/1.1\r\nHost: x\r\n"
    form = b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 400\r\n\r\n"
    headers = asyncio.create_task(drip(port, head, b"X-Slow: " + b"a" * 200))
    body = asyncio.create_task(drip(port, head + form, b"body=" + b"a" * 395))
    answer = await curl_put(settings, port)  # meanwhile, a client that behaves
    assert answer["status"] == "success"
    async with asyncio.timeout(10):
        assert await idle_reader.read() == b""
    idle_for = loop.time() - started
    idle.close()
    assert idle_for < settings.gateway_header_timeout + 1.0
    answer, dripped_for = await headers
    assert answer == b""  # closed before its headers were whole
    assert dripped_for < settings.gateway_header_timeout + 1.0
    answer, dripped_for = await body
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["status"] == "failed"
    assert dripped_for < settings.gateway_read_timeout + 1.0
    await asyncio.sleep(0.5)
    assert len(smtp.received()) == 1


async def test_daemon_lets_go_of_silent_clients_and_serves_the_others(
    settings: Settings, ports: dict[str, int]
) -> None:
    port = ports["daemon"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    # More than the 8 connections the gateway holds: the oldest make room.
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
    answer = await ask(port, json.dumps({"ping": None, "auth": PASSWORD}))
    assert answer["message"] == "pong"
    async with asyncio.timeout(10):
        for reader, writer in silent:
            assert await reader.read() == b""
            writer.close()
    assert loop.time() - started < settings.gateway_header_timeout + 1.0


async def test_daemon_holds_small_requests_until_an_address_has_authenticated(
    settings: Settings, smtp: CaptureServer, ports: dict[str, int]
) -> None:
    port = ports["daemon"]
    mail = {"to": ["big@example.org"], "subject": "big", "body": "x" * (20 * 1024)}
    big = daemon_request("queueMail", mail)
    for source in ("127.0.0.2", "127.0.0.3"):
        refused = await ask(port, big, source=source)
        assert (refused["status"], refused["message"]) == ("error", "invalid payload")
        assert "until a request from this address has authenticated" in refused["data"]
    ping = await ask(port, json.dumps({"ping": None, "auth": PASSWORD}), source="127.0.0.2")
    assert ping["message"] == "pong"
    queued = await ask(port, big, source="127.0.0.2")
    assert queued["message"] == "mail added to queue"
    refused = await ask(port, big, source="127.0.0.3")  # still unknown
    assert refused["message"] == "invalid payload"
    async with asyncio.timeout(30):
        [received] = await smtp.wait_for(1)
    assert received.message()["Subject"] == "big"


async def test_failed_authentications_are_limited_per_address(
    settings: Settings, store: JobStore, ports: dict[str, int]
) -> None:
    ping, wrong = ({"ping": None, "auth": auth} for auth in (PASSWORD, "wrong password"))
    for _ in range(settings.gateway_auth_failures):
        refused = await ask(ports["daemon"], json.dumps(wrong), source="127.0.0.3")
        assert refused == {"status": "error", "data": None, "message": "unauthorized request"}
    for request in (wrong, ping):  # the right password too: it is not even looked at
        throttled = await ask(ports["daemon"], json.dumps(request), source="127.0.0.3")
        assert (throttled["message"], throttled["data"]) == (
            "unauthorized request",
            TOO_MANY_FAILURES,
        )
    other = await ask(ports["daemon"], json.dumps(ping), source="127.0.0.4")
    assert other["message"] == "pong"

    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.5")
    url = f"http://127.0.0.1:{ports['rest']}/api/mail"
    async with httpx.AsyncClient(transport=transport, timeout=20) as client:
        for _ in range(settings.gateway_auth_failures):
            answer = await client.put(url, data={**REST_MAIL, "domain_key": "good horse"})
            assert answer.json() == {"status": "failed", "message": "invalid domain key"}
        throttled = await client.put(url, data=REST_MAIL)
        assert throttled.status_code == 429
        assert throttled.json() == {"status": "failed", "message": TOO_MANY_FAILURES}
    assert await store.find(limit=10) == []


async def test_hash_password_and_an_open_daemon_only_on_loopback(settings: Settings) -> None:
    made = await mailbus(settings, "gateway", "hash-password", input=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert key_matches(PASSWORD, made.stdout.strip())
    assert PASSWORD not in made.stdout
    unset = settings.model_copy(update={"gateway_password_hash": None})
    refused = await mailbus(unset, "gateway", "serve", "--daemon", "0.0.0.0:0")
    assert refused.returncode == 2
    assert "MAILBUS_GATEWAY_PASSWORD_HASH" in refused.stderr
    assert "MAILBUS_GATEWAY_OPEN_BEYOND_LOOPBACK" in refused.stderr
    no_domain = unset.model_copy(update={"gateway_domain": None})
    refused = await mailbus(no_domain, "gateway", "serve", "--daemon", "0")
    assert refused.returncode == 2
    assert "MAILBUS_GATEWAY_DOMAIN" in refused.stderr


async def test_gateway_command_serves_until_sigterm(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    async with gateway_command(settings, "--daemon", "127.0.0.1:0") as (_, [line]):
        assert line.startswith("daemon gateway: tcp://127.0.0.1:"), line
        mail = {"to": ["cli@example.org"], "subject": "via the command", "body": "hello"}
        answer = await nc(settings, announced_port(line), daemon_request("sendMail", mail))
        assert answer["message"] == "mail sent successfully"
        assert [m.message()["Subject"] for m in smtp.received()] == ["via the command"]


def readme_blocks(readme: str) -> list[tuple[str, list[str]]]:
    """A Markdown file's fenced blocks: (language, lines)."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    return [(lang, body.splitlines()) for lang, body in blocks]


async def test_the_readme_one_liners_get_the_answers_it_shows(
    settings: Settings,
    smtp: CaptureServer,
    store: JobStore,
    ports: dict[str, int],
    repo_root: Path,
) -> None:
    await DomainStore(store.database).put("example.com", hash_key(DOMAIN_KEY), [], True)
    blocks = readme_blocks((repo_root / "deploy" / "MIGRATING.md").read_text())
    at = next(i for i, (_, lines) in enumerate(blocks) if "nc localhost 3000" in lines[-1])
    [(_, commands), (shown_lang, shown)] = blocks[at : at + 2]
    assert shown_lang == "json"
    answers = []
    for command in commands:
        local = command.replace("localhost:8000", f"127.0.0.1:{ports['rest']}").replace(
            "nc localhost 3000", f"nc 127.0.0.1 {ports['daemon']}"
        )
        done = await run_with(settings, "sh", "-c", local, kill_after=60)
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout))
    expected = [json.loads(line.replace("…", "")) for line in shown]
    assert [(a["status"], a["message"]) for a in answers] == [
        (e["status"], e["message"]) for e in expected
    ]
    async with asyncio.timeout(30):
        mails = await smtp.wait_for(2)
    assert sorted(m.message()["Subject"] for m in mails) == ["Mail service test", "Test Email"]


async def test_the_gateways_serve_probes_and_metrics(settings: Settings) -> None:
    """With MAILBUS_HTTP_PORT, ``gateway serve`` answers /healthz, /readyz (listening, on
    a live RabbitMQ connection, with MongoDB answering) and /metrics (the connections its
    gateways hold); without MongoDB it is alive but not ready.
    """
    probed = settings.model_copy(update={"http_port": 0})
    async with gateways(probed, rest=ANY_PORT) as bound, httpx.AsyncClient(timeout=10) as http:
        base = f"http://127.0.0.1:{bound['http']}"
        assert (await http.get(f"{base}/healthz")).status_code == 200
        ready = await http.get(f"{base}/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        # An idle REST client holds one of the gateways' connections.
        _, idle = await asyncio.open_connection("127.0.0.1", bound["rest"])
        try:
            await asyncio.sleep(0.2)
            metrics = (await http.get(f"{base}/metrics")).text
        finally:
            idle.close()
        assert "mailbus_gateway_connections 1.0" in metrics
        assert "mailbus_gateway_max_connections 8.0" in metrics

    # Nothing listens at this address: the port of a server stopped at once.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    away = probed.model_copy(
        update={"mongo_url": SecretStr(f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=500")}
    )
    async with gateways(away, rest=ANY_PORT) as bound, httpx.AsyncClient(timeout=10) as http:
        base = f"http://127.0.0.1:{bound['http']}"
        assert (await http.get(f"{base}/healthz")).status_code == 200
        down = await http.get(f"{base}/readyz")
        assert (down.status_code, down.text) == (503, "MongoDB does not answer\n")


async def test_an_address_taken_is_said_in_one_line(settings: Settings) -> None:
    """A listener's port that another process holds stops ``gateway serve`` with one line
    naming the option and the address, exit status 2, for a gateway and for the probes.
    """
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        taken = await mailbus(settings, "gateway", "serve", "--rest", f"127.0.0.1:{port}")
        probes = settings.model_copy(update={"http_port": port})
        probes_taken = await mailbus(probes, "gateway", "serve", "--rest", "127.0.0.1:0")
    finally:
        holder.close()
    for done, what in ((taken, "--rest"), (probes_taken, "MAILBUS_HTTP_PORT")):
        assert done.returncode == 2, done.stderr
        assert done.stderr == (
            f"mailbus: {what}: cannot listen on 127.0.0.1:{port}: Address already in use\n"
        )

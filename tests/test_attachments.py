"""Reading attachments: allowed directories, size caps, content types, and safe URL fetches
from a real loopback HTTP server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from consumer.amqp import dead_letters
from consumer.core.message import Attachment, Job, header_problem
from consumer.core.names import Names
from consumer.core.refusals import AttachmentError
from consumer.errors import AttachmentUnavailableError
from consumer.mail.attachments import (
    AttachmentLoader,
    allowed_path,
    attachment_budget,
    clean_filename,
    decode_inline,
    mime_type,
    read_local,
)
from consumer.mail.fetch import Fetcher, FetchLimits, IPAddress, refused_address, shown_url
from consumer.service.compose import Composer
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.templates import TemplateStore
from deploy.devstack.smtp_capture import CaptureServer
from deploy.devstack.tls import server_context, signed_by_test_authority
from tests.broker import depth, drain_events, encode, job, listen_events, until
from tests.conftest import RunningWorker
from tests.http_files import FileServer, Route
from tests.secret_watch import watched

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 64


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    """An allowed directory with a file, and a secret file outside it."""
    root = tmp_path / "allowed"
    (root / "invoices").mkdir(parents=True)
    (root / "invoices" / "2030-05.pdf").write_bytes(PDF)
    (tmp_path / "secret.txt").write_text("do not read")
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_paths_inside_the_allowed_directories_resolve(allowed: Path) -> None:
    inside = allowed / "invoices" / "2030-05.pdf"
    assert allowed_path(str(inside), [allowed]) == inside.resolve()
    assert allowed_path("invoices/2030-05.pdf", [allowed]) == inside.resolve()
    # A symlink that stays inside is fine.
    (allowed / "latest.pdf").symlink_to(inside)
    assert allowed_path("latest.pdf", [allowed]) == inside.resolve()


@pytest.mark.parametrize(
    "raw",
    [
        "../../etc/passwd",
        "../secret.txt",
        "invoices/../../secret.txt",
        "/etc/passwd",
        "link-out",
        "link-dir/secret.txt",
    ],
)
def test_paths_leading_outside_are_refused_before_anything_is_read(allowed: Path, raw: str) -> None:
    (allowed / "link-out").symlink_to(allowed.parent / "secret.txt")
    (allowed / "link-dir").symlink_to(allowed.parent)
    with pytest.raises(AttachmentError, match="outside MAILBUS_ATTACHMENT_DIRS"):
        allowed_path(raw, [allowed])


def test_path_attachments_are_off_without_directories_and_missing_files_named() -> None:
    with pytest.raises(AttachmentError, match="off"):
        allowed_path("/tmp/x.pdf", [])


def test_missing_file_inside_is_refused(allowed: Path) -> None:
    with pytest.raises(AttachmentError, match="no such file"):
        allowed_path("invoices/nope.pdf", [allowed])


async def test_loader_reads_a_local_file_within_the_size_cap(allowed: Path) -> None:
    fetcher = Fetcher(FetchLimits(max_bytes=len(PDF)))
    loader = AttachmentLoader([allowed], len(PDF), fetcher)
    part = await loader.load(Attachment(path="invoices/2030-05.pdf"))
    assert (part.filename, part.content_type, sha(part.data)) == (
        "2030-05.pdf",
        "application/pdf",
        sha(PDF),
    )
    small = AttachmentLoader([allowed], len(PDF) - 1, fetcher)
    with pytest.raises(AttachmentError, match="more than the limit"):
        await small.load(Attachment(path="invoices/2030-05.pdf"))
    os.mkfifo(allowed / "pipe")  # not a regular file: never opened for reading
    with pytest.raises(AttachmentError, match="not a regular file"):
        await loader.load(Attachment(path="pipe"))
    await fetcher.close()


def test_a_directory_swapped_for_a_symlink_after_the_check_is_not_followed(
    allowed: Path,
) -> None:
    checked = allowed_path("invoices/2030-05.pdf", [allowed])
    outside = allowed.parent / "outside"
    outside.mkdir()
    (outside / "2030-05.pdf").write_text("do not read")
    (allowed / "invoices").rename(allowed / "moved")
    (allowed / "invoices").symlink_to(outside)
    with pytest.raises(AttachmentError, match="changed after it was checked"):
        read_local(checked, [allowed], len(PDF))
    # A real path inside, symlinks resolved by the check, still reads.
    (allowed / "latest.pdf").symlink_to(allowed / "moved" / "2030-05.pdf")
    assert read_local(allowed_path("latest.pdf", [allowed]), [allowed], len(PDF)) == PDF


def test_inline_data_is_decoded_and_capped() -> None:
    att = Attachment(filename="a.bin", content_b64=base64.b64encode(b"x" * 100).decode())
    assert decode_inline(att, 100) == b"x" * 100
    with pytest.raises(AttachmentError, match="limit of 99"):
        decode_inline(att, 99)
    with pytest.raises(AttachmentError, match="invalid base64"):
        decode_inline(Attachment(filename="a.bin", content_b64="not base64!"), 100)


def test_content_types_are_declared_served_or_guessed() -> None:
    assert mime_type("Image/PNG", "x.pdf") == "image/png"
    assert mime_type(None, "x.pdf", "image/jpeg; charset=binary") == "image/jpeg"
    assert mime_type(None, "report.pdf", "application/octet-stream") == "application/pdf"
    assert mime_type(None, "notes.unknownext") == "application/octet-stream"
    assert mime_type(None, None) == "application/octet-stream"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.8", "private"),
        ("192.168.1.1", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104
        ("100.64.0.1", "non-global"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        # 6to4 and Teredo addresses lead on to the IPv4 address they carry.
        ("2002:7f00:1::1", "loopback"),
        ("2002:a00:8::1", "private"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo client 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fff7", "private"),  # Teredo client 10.0.0.8
    ],
)
def test_non_public_addresses_are_refused(address: str, kind: str) -> None:
    assert refused_address(ipaddress.ip_address(address)) == kind


def test_public_addresses_are_allowed() -> None:
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert refused_address(ipaddress.ip_address(address)) is None


async def test_no_cookie_goes_from_one_fetch_to_another(
    files: FileServer, open_fetcher: Fetcher
) -> None:
    """One client fetches for every job: a cookie an attachment server sets is refused, so
    it never rides along with another producer's fetch (nor piles up).
    """
    first = files.route("/set.pdf", Route(body=PDF, cookie="session=s3cret; Path=/"))
    second = files.route("/other.pdf", Route(body=PDF))
    for url in (first, second, first):
        assert (await open_fetcher.fetch(url)).data == PDF
    assert files.cookies == [None, None, None]


@pytest.fixture
async def open_fetcher(tmp_path: Path) -> AsyncIterator[Fetcher]:
    fetcher = Fetcher(
        FetchLimits(
            max_bytes=len(PDF),
            read_timeout=1.0,
            max_redirects=2,
            allow_private=True,
            tmp_dir=tmp_path,
        )
    )
    yield fetcher
    await fetcher.close()


async def test_fetch_follows_redirects_and_leaves_no_file(
    files: FileServer, open_fetcher: Fetcher, tmp_path: Path
) -> None:
    url = files.route("/files/report.pdf", Route(body=PDF, content_type="application/pdf"))
    files.route("/go", Route(status=302, location="/files/report.pdf"))
    fetched = await open_fetcher.fetch(files.url("/go"))
    assert sha(fetched.data) == sha(PDF)
    assert (fetched.filename, fetched.content_type) == ("report.pdf", "application/pdf")
    assert files.hits == ["/go", "/files/report.pdf"]
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240
    assert sha((await open_fetcher.fetch(url)).data) == sha(PDF)


async def test_fetch_refusals_and_transient_failures(
    files: FileServer, open_fetcher: Fetcher
) -> None:
    files.route("/loop", Route(status=302, location="/loop"))
    with pytest.raises(AttachmentError, match="more than 2 redirects"):
        await open_fetcher.fetch(files.url("/loop"))
    # Too big: refused from Content-Length, and while streaming when there is none.
    files.route("/big", Route(body=PDF + b"!"))
    with pytest.raises(AttachmentError, match="limit"):
        await open_fetcher.fetch(files.url("/big"))
    files.route("/big-stream", Route(body=PDF + b"!", declare_length=False))
    with pytest.raises(AttachmentError, match="limit"):
        await open_fetcher.fetch(files.url("/big-stream"))
    for scheme_url in ("ftp://example.com/a.pdf", "file:///etc/passwd"):
        with pytest.raises(AttachmentError, match="scheme"):
            await open_fetcher.fetch(scheme_url)
    # Worth a retry: not there yet, a server error, too slow.
    with pytest.raises(AttachmentUnavailableError, match="HTTP 404"):
        await open_fetcher.fetch(files.url("/not-yet"))
    files.route("/broken", Route(status=503))
    with pytest.raises(AttachmentUnavailableError, match="HTTP 503"):
        await open_fetcher.fetch(files.url("/broken"))
    files.route("/slow", Route(body=b"x", delay=2.0))
    with pytest.raises(AttachmentUnavailableError, match="Timeout"):
        await open_fetcher.fetch(files.url("/slow"))


async def test_private_addresses_are_refused_by_default_before_connecting(
    files: FileServer,
) -> None:
    fetcher = Fetcher(FetchLimits(max_bytes=1000))
    try:
        with pytest.raises(AttachmentError, match=r"loopback address 127\.0\.0\.1"):
            await fetcher.fetch(files.url("/anything"))
        with pytest.raises(AttachmentError, match="loopback"):
            await fetcher.fetch("http://localhost:1/secret")
    finally:
        await fetcher.close()
    assert files.hits == []  # refused before connecting


async def test_a_host_that_does_not_exist_can_never_be_fetched() -> None:
    fetcher = Fetcher(FetchLimits(max_bytes=1000))
    try:
        with pytest.raises(AttachmentError, match=r"nowhere\.invalid: no such host"):
            await fetcher.fetch("https://nowhere.invalid/report.pdf")
    finally:
        await fetcher.close()


def test_urls_are_shown_without_userinfo_query_and_fragment() -> None:
    presigned = "https://key:s3cr3t@bucket.example:8443/a/b.pdf?X-Amz-Signature=abc&x=1#top"
    assert shown_url(presigned) == "https://bucket.example:8443/a/b.pdf"
    assert shown_url("http://[::1/x?token=t") == "(unreadable URL)"


async def _loopback(host: str, port: int) -> list[IPAddress]:
    """Every name is this machine (as a.test and b.test are in the TLS test)."""
    return [ipaddress.ip_address("127.0.0.1")]


@pytest.fixture
def a_test_server(tmp_path: Path) -> Iterator[tuple[FileServer, ssl.SSLContext]]:
    """An HTTPS server with a certificate for a.test only, keeping connections open, and
    a client context that trusts its authority.
    """
    made = signed_by_test_authority(tmp_path / "tls", "a.test")
    server = FileServer(tls=server_context(made.cert, made.key), keep_alive=True)
    server.start()
    yield server, ssl.create_default_context(cafile=made.ca)
    server.stop()


async def test_tls_checks_each_host_even_when_they_share_an_address(
    a_test_server: tuple[FileServer, ssl.SSLContext],
) -> None:
    """a.test and b.test both resolve to 127.0.0.1; the certificate is for a.test only. A
    connection opened for a.test is never reused for b.test: b.test gets its own, whose
    certificate check fails, and the server is never asked for b.test's file.
    """
    server, trusted = a_test_server
    server.route("/report.pdf", Route(body=PDF, content_type="application/pdf"))
    limits = FetchLimits(max_bytes=len(PDF), allow_private=True)
    fetcher = Fetcher(limits, ssl_context=trusted, resolver=_loopback)
    try:
        for _ in range(2):  # the second over the first's pooled connection
            fetched = await fetcher.fetch(server.url("/report.pdf", host="a.test"))
            assert sha(fetched.data) == sha(PDF)
        with pytest.raises(AttachmentUnavailableError, match="certificate verify failed"):
            await fetcher.fetch(server.url("/report.pdf", host="b.test"))
    finally:
        await fetcher.close()
    port = server.url("/").rsplit(":", 1)[1].rstrip("/")
    assert server.hosts == [f"a.test:{port}"] * 2
    assert server.connections == 1


# A presigned URL's signature and a URL's password are credentials: watched over the whole
# run's output too.
SIGNATURE = watched("sig-5d41402abc4b2a76b9719d911017c592")
URL_PASSWORD = watched("pw-urlinfo-Q9v7")


async def test_attachment_urls_are_shown_without_credentials(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    files: FileServer,
) -> None:
    """A URL attachment that fails now and again (HTTP 404, retried until the attempts run
    out) and one that can never work (an encoding mailbus cannot bound): neither URL's
    password nor query reaches the dead letter, the events, the job record, the reply or
    the admin digest, while the host and path still say which attachment it was.
    """
    names = Names(settings.prefix)
    replies_prefix = f"{settings.prefix}.replies."
    running_settings = settings.model_copy(
        update={
            "attachment_allow_private": True,
            "max_attempts": 2,
            "reply_queue_prefix": replies_prefix,
            "admin_email": "ops@example.net",
            "admin_digest_seconds": 1.0,
        }
    )
    query = f"?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature={SIGNATURE}"
    files.route(f"/never.pdf{query}", Route(body=b"x", encoding="br"))
    base = files.url("/").removeprefix("http://").rstrip("/")
    urls = {
        "url-missing": f"http://reader:{URL_PASSWORD}@{base}/missing.pdf{query}#page=2",
        "url-never": f"http://reader:{URL_PASSWORD}@{base}/never.pdf{query}",
    }
    replies = await channel.declare_queue(f"{replies_prefix}app", auto_delete=True)
    events = await listen_events(channel, names)
    exchange = await channel.get_exchange(names.exchange)
    for job_id, url in urls.items():
        body = job(id=job_id, subject=job_id, attachments=[{"url": url}])
        message = aio_pika.Message(encode(body), reply_to=replies.name, correlation_id=job_id)
        await exchange.publish(message, routing_key="send")
    running = RunningWorker(running_settings)
    try:
        await until(lambda: _depth_is(channel, names.dead, 2), 30)
        [digest] = await asyncio.wait_for(smtp.wait_for(1), 30)
        answers = [await replies.get(timeout=10) for _ in urls]
    finally:
        await running.shutdown()
    letters = [m async for m in _taken(channel, names.dead)]
    shown: dict[str, str] = {
        "dead letters": repr([(m.headers, dead_letters.read(m)) for m in letters]),
        "events": repr(await drain_events(channel, events)),
        "records": repr([await store.get(job_id) for job_id in urls]),
        "replies": repr([json.loads(answer.body) for answer in answers]),
        "digest": digest.message().get_content(),
    }
    for where, text in shown.items():
        for secret in (SIGNATURE, URL_PASSWORD, "X-Amz-Credential", "reader", "page=2"):
            assert secret not in text, f"{secret} in the {where}"
        for what in ("/missing.pdf: HTTP 404", "/never.pdf: content-encoding 'br'"):
            assert f"{base}{what}" in text, f"{what} not in the {where}"


async def _depth_is(channel: AbstractChannel, queue: str, count: int) -> bool:
    return await depth(channel, queue) >= count


async def _taken(channel: AbstractChannel, name: str) -> AsyncIterator[AbstractIncomingMessage]:
    """Every message of the queue, taken off it."""
    queue = await channel.get_queue(name, ensure=False)
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        yield message


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("report.pdf", "report.pdf"),
        ("re\x0bport\x00.pdf", "re_port_.pdf"),
        ("a\x0c\x1c\x1d\x1e\x85b.pdf", "a_____b.pdf"),
        ("line\u2028para\u2029.txt", "line_para_.txt"),
        ("right\u202eto-left.pdf", "right_to-left.pdf"),  # a format character
        ("lone\udc80.txt", "lone_.txt"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("dir\\name.txt", "dir_name.txt"),
        ("Grüße ☀.pdf", "Grüße ☀.pdf"),
        ("  . ", None),
        ("", None),
        (None, None),
    ],
)
def test_names_from_servers_and_disks_are_cleaned(raw: str | None, clean: str | None) -> None:
    assert clean_filename(raw) == clean
    if clean is not None:
        assert header_problem(clean) is None


def test_long_names_are_cut_to_255_bytes_keeping_the_extension() -> None:
    cut = clean_filename("ü" * 300 + ".pdf")
    assert cut is not None
    assert cut.endswith(".pdf")
    assert len(cut.encode()) <= 255
    assert cut == "ü" * 125 + ".pdf"


async def test_url_names_come_from_the_server_and_are_cleaned(
    files: FileServer, open_fetcher: Fetcher
) -> None:
    """A name a server chooses (its Content-Disposition, raw or RFC 2231 encoded, or the
    path it redirects to) labels the part only once cleaned.
    """
    loader = AttachmentLoader([], len(PDF), open_fetcher)
    routes = {
        "/files/re%0Bport%00.pdf": (Route(body=PDF), "re_port_.pdf"),
        "/d1": (Route(body=PDF, disposition='attachment; filename="a\x85b.pdf"'), "a_b.pdf"),
        "/d2": (
            Route(body=PDF, disposition="attachment; filename*=UTF-8''x%E2%80%A8y%00.pdf"),
            "x_y_.pdf",
        ),
        "/d3": (Route(body=PDF, disposition="attachment; filename*=UTF-8''" + "a" * 400), None),
        "/go": (Route(status=302, location="/files/re%0Bport%00.pdf"), "re_port_.pdf"),
    }
    for path, (route, _) in routes.items():
        files.route(path, route)
    for path, (_, name) in routes.items():
        part = await loader.load(Attachment(url=files.url(path)))
        if name is None:
            assert part.filename is not None
            assert len(part.filename.encode()) == 255
        else:
            assert part.filename == name, path
        assert sha(part.data) == sha(PDF)
    # The job's own name wins, and was checked when the job was.
    named = await loader.load(Attachment(url=files.url("/d1"), filename="mine.pdf"))
    assert named.filename == "mine.pdf"


async def test_disk_names_are_cleaned_and_long_components_refused(allowed: Path) -> None:
    # The job names a link; the part is labelled with the name of the file it leads to.
    (allowed / "re\x0bport\x1c.pdf").write_bytes(PDF)
    (allowed / "latest.pdf").symlink_to(allowed / "re\x0bport\x1c.pdf")
    fetcher = Fetcher(FetchLimits(max_bytes=len(PDF)))
    loader = AttachmentLoader([allowed], len(PDF), fetcher)
    part = await loader.load(Attachment(path="latest.pdf"))
    assert (part.filename, sha(part.data)) == ("re_port_.pdf", sha(PDF))
    with pytest.raises(AttachmentError, match="File name too long"):
        await loader.load(Attachment(path="a" * 300))
    with pytest.raises(AttachmentError, match="File name too long"):
        await loader.load_all([Attachment(path=f"invoices/{'b' * 256}/x.pdf")])
    await fetcher.close()


async def test_count_and_declared_sizes_are_checked_before_anything_is_read(
    allowed: Path, files: FileServer, open_fetcher: Fetcher
) -> None:
    url = files.route("/one.pdf", Route(body=PDF))
    loader = AttachmentLoader(
        [allowed], len(PDF), open_fetcher, max_count=3, max_total=2 * len(PDF)
    )
    with pytest.raises(AttachmentError, match="4 attachments, more than the limit of 3"):
        await loader.load_all([Attachment(url=url)] * 4)
    # Three files on disk declare more than two files' worth: refused from their sizes.
    on_disk = Attachment(path="invoices/2030-05.pdf")
    over = f"declare {3 * len(PDF)} bytes, more than the limit of {2 * len(PDF)}"
    with pytest.raises(AttachmentError, match=over):
        await loader.load_all([on_disk, on_disk, on_disk])
    assert files.hits == []
    # Within the declared total, a running total still holds: URLs declare nothing.
    with pytest.raises(AttachmentError, match=f"more than the limit of {2 * len(PDF)} bytes"):
        await loader.load_all([on_disk, Attachment(url=url), Attachment(url=url)])
    parts = await loader.load_all([on_disk, Attachment(url=url)])
    assert [sha(p.data) for p in parts] == [sha(PDF)] * 2


def test_attachments_may_hold_what_base64_fits_in_a_message() -> None:
    assert attachment_budget(4000) == 3000
    assert attachment_budget(25 * 2**20) == 19_660_800  # 18.75 MiB


async def test_url_fetches_run_a_few_at_a_time(files: FileServer, open_fetcher: Fetcher) -> None:
    url = files.route("/slow.pdf", Route(body=PDF, delay=0.4))
    loader = AttachmentLoader([], len(PDF), open_fetcher, concurrency=4)
    started = time.monotonic()
    parts = await loader.load_all([Attachment(url=url)] * 8)
    took = time.monotonic() - started
    assert len(parts) == 8
    # Two rounds of four: not one of eight, not eight of one.
    assert 0.8 <= took < 2.4, took


async def test_a_message_has_one_deadline_for_all_its_content(
    files: FileServer, open_fetcher: Fetcher, store: JobStore
) -> None:
    url = files.route("/drip.pdf", Route(body=PDF[:200], drip=0.02))
    loader = AttachmentLoader([], len(PDF), open_fetcher, concurrency=1)
    composer = Composer(TemplateStore(store.database), loader, 10_000, timeout=1.0)
    slow = Job.model_validate(job(attachments=[{"url": url}] * 3))
    started = time.monotonic()
    with pytest.raises(AttachmentUnavailableError, match="not gathered within 1 s"):
        await composer.compose(slow)
    assert time.monotonic() - started < 2

"""Building messages: structure, encodings, and round trips through the ``email`` parser."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser, Parser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.content import Content, Part
from consumer.core.message import Job
from consumer.core.mime import (
    BUILD_POLICY,
    WIRE_POLICY,
    WIRE_UTF8_POLICY,
    build_mail,
    build_message,
    needs_utf8,
    serialize,
)
from consumer.core.refusals import InvalidJobError, MessageTooLargeError
from tests.broker import job

NOW = datetime(2030, 5, 17, 12, 0, tzinfo=UTC)
PDF = b"%PDF-1.4 binary \x00\xff\xfe" * 50
PNG = b"\x89PNG\r\n\x1a\n fake image"


def wire(message: EmailMessage) -> EmailMessage:
    """The message as a receiving server would parse it."""
    data = message.as_bytes(policy=policy.SMTP)
    parsed = BytesParser(policy=policy.default).parsebytes(data.replace(b"\r\n", b"\n"))
    assert isinstance(parsed, EmailMessage)
    return parsed


def built(body: dict[str, object], *parts: Part, charset: str = "utf-8") -> EmailMessage:
    """The job's message as it leaves the worker, parsed back."""
    parsed = Job.model_validate(body)
    return wire(build_message(parsed, "j1", NOW, Content.of(parsed, parts), charset))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_html_with_inline_image_and_attachment() -> None:
    msg = built(
        job(text="see the logo", html='<img src="cid:logo">'),
        Part(PNG, "image/png", "logo.png", cid="logo"),
        Part(PDF, "application/pdf", "Rechnung März.pdf"),
    )
    assert msg.get_content_type() == "multipart/mixed"
    alternative, attachment = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, related = alternative.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html, logo = related.iter_parts()
    assert html.get_content_type() == "text/html"
    assert (logo["Content-ID"], logo.get_content_type()) == ("<logo>", "image/png")
    assert logo.get_content_disposition() == "inline"
    assert sha(logo.get_content()) == sha(PNG)
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_filename() == "Rechnung März.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert sha(attachment.get_content()) == sha(PDF)


def test_non_ascii_filenames_travel_per_rfc_2231() -> None:
    parsed = Job.model_validate(job())
    part = Part(PDF, "application/pdf", "Rechnung März.pdf")
    raw = build_message(parsed, "j", NOW, Content.of(parsed, [part])).as_bytes()
    assert b"filename*=utf-8''Rechnung%20M%C3%A4rz.pdf" in raw


def test_text_and_html_alone_are_an_alternative_and_nothing_more() -> None:
    msg = built(job(text="plain", html="<p>rich</p>"))
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    only_html = built(job(text=None, html="<p>rich</p>"))
    assert only_html.get_content_type() == "text/html"


def test_inline_image_without_html_is_refused() -> None:
    with pytest.raises(InvalidJobError, match="html"):
        built(job(text="no html"), Part(PNG, "image/png", None, cid="logo"))


def test_custom_headers_pass_through_folded_but_never_encoded_when_ascii() -> None:
    headers = {
        "List-Unsubscribe": "<https://example.com/unsubscribe/" + "x" * 120 + ">, "
        "<mailto:unsubscribe@example.com?subject=" + "y" * 60 + ">",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "X-Words": " ".join(["word"] * 40),
        "X-Campaign": " ".join(["Frühling"] * 20),
    }
    parsed = Job.model_validate(job(headers=headers))
    raw = build_message(parsed, "j", NOW, Content.of(parsed)).as_bytes(policy=policy.SMTP)
    msg = wire(build_message(parsed, "j", NOW, Content.of(parsed)))
    for name, value in headers.items():
        assert msg[name] == value
    lines = raw.split(b"\r\n")
    unsubscribe = next(line for line in lines if line.startswith(b"List-Unsubscribe:"))
    assert b"=?" not in unsubscribe  # URLs stay URLs: a client must be able to use them
    assert b"<https://example.com/unsubscribe/" + b"x" * 120 + b">," in unsubscribe
    assert max(len(line) for line in lines) <= 998
    assert len(next(line for line in lines if line.startswith(b"X-Words:"))) <= 78


def test_long_body_lines_are_encoded_to_fit() -> None:
    text = "word " * 400 + "\n" + "ü" * 2000
    msg = built(job(text=text))
    assert msg.get_content().rstrip("\n") == text
    parsed = Job.model_validate(job(text=text))
    raw = build_message(parsed, "j", NOW, Content.of(parsed))
    assert max(len(line) for line in raw.as_bytes().split(b"\n")) <= 78


def test_charset_is_honoured_and_unencodable_text_refused() -> None:
    msg = built(job(text="Grüße", html="<p>Grüße</p>"), charset="iso-8859-1")
    plain, html = msg.iter_parts()
    assert plain.get_content_charset() == "iso-8859-1"
    assert (plain.get_content().strip(), html.get_content().strip()) == ("Grüße", "<p>Grüße</p>")
    with pytest.raises(InvalidJobError, match="iso-8859-1"):
        built(job(text="price: 5 €"), charset="iso-8859-1")


def test_size_limit_counts_the_encoded_message() -> None:
    parsed = Job.model_validate(job())
    message = build_message(
        parsed, "j", NOW, Content.of(parsed, [Part(b"\0" * 30_000, OCTET, "blob.bin")])
    )
    mail = serialize(message, 50_000)
    assert len(mail.wire) > 40_000  # base64 makes 30,000 bytes into about 40,500
    assert mail.wire.count(b"\r\n") == mail.wire.count(b"\n")  # SMTP line ends throughout
    with pytest.raises(MessageTooLargeError, match="limit of 40000"):
        serialize(message, 40_000)


@pytest.mark.parametrize(
    "content",
    [
        # What the email package refuses, should anything let it through validation.
        Content("vertical\x0btab", "t", None),
        Content("s", "t", None, (Part(b"x", "text/plain", "form\x0cfeed.txt"),)),
        Content("s", "t", None, (Part(b"x", "text/plain", "surrogate\udc80.txt"),)),
    ],
    ids=["subject", "filename", "surrogate"],
)
def test_whatever_building_a_mail_raises_is_an_invalid_job(content: Content) -> None:
    parsed = Job.model_validate(job())
    with pytest.raises(InvalidJobError, match="the message cannot be built") as err:
        build_mail(parsed, "j", NOW, content, charset="utf-8", limit=1_000_000)
    assert err.value.reason == "invalid"
    with pytest.raises(MessageTooLargeError):  # the job's own refusals keep their reason
        build_mail(parsed, "j", NOW, Content.of(parsed), charset="utf-8", limit=10)


# The email package folds this display name (found by the coverage-guided fuzz run)
# with an empty line after "n)", which would end the header section there.
BREAKING_NAME = (
    "Sennnnnnnnnnnn                    cccccccccccccccccccccccccccccc  n)   n nnnnnnnnn"
    + "%" * 30
    + "n" * 30
    + ",nnnnnder"
)


def test_a_header_the_email_package_folds_into_a_blank_line_is_refused() -> None:
    body = job(**{"from": {"email": "sender@example.com", "name": BREAKING_NAME}})
    parsed = Job.model_validate(body)
    with pytest.raises(InvalidJobError, match="header From cannot be written safely") as err:
        build_mail(parsed, "j", NOW, Content.of(parsed), charset="utf-8", limit=1_000_000)
    assert err.value.reason == "invalid"
    # Short of the fold, the same characters go out whole, every header in its place.
    fine = Job.model_validate(job(**{"from": {"email": "a@example.com", "name": "n) n,%"}}))
    mail = build_mail(fine, "j", NOW, Content.of(fine), charset="utf-8", limit=1_000_000)
    head = mail.wire.partition(b"\r\n\r\n")[0]
    assert b"\r\nTo: " in head
    assert b"\r\nSubject: " in head


OCTET = "application/octet-stream"
header_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=120).map(str.strip)


@settings(max_examples=150, deadline=None)
@given(
    subject=header_text,
    name=header_text,
    text=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=500
    ),
)
def test_unicode_round_trip(subject: str, name: str, text: str) -> None:
    body = job(
        subject=subject,
        text=text,
        html=f"<p>{text}</p>",
        headers={"X-Note": subject},
        **{"from": {"email": "a@example.com", "name": name}},
    )
    msg = built(body)
    assert msg["Subject"] == subject
    assert msg["X-Note"] == subject
    # White space aside, the name is intact. (A run of white space in a display name means
    # one space per RFC 5322, and the policy-default parser puts a space between adjacent
    # RFC 2047 encoded-words where RFC 2047 says there is none.)
    shown = msg["From"].addresses[0].display_name
    assert "".join(shown.split()) == "".join(name.split())
    plain, html = msg.iter_parts()
    assert plain.get_content().rstrip("\n") == text.rstrip("\n")
    assert html.get_content().rstrip("\n") == f"<p>{text}</p>".rstrip("\n")


def test_a_non_ascii_address_in_any_header_makes_the_headers_raw_utf8() -> None:
    # Found by the atheris run: written in 7 bits, such an address became encoded words,
    # folded without the leading space, and the header section ended at the fold.
    address = "ü@bü" + "l" * 30 + "cher.example"
    parsed = Job.model_validate(job(reply_to={"email": address, "name": "\\" * 16 + "Ü"}))
    mail = serialize(build_message(parsed, "j1", NOW, Content.of(parsed), "utf-8"), 10**6)
    assert mail.utf8
    assert needs_utf8(mail.message)
    received = Parser(policy=policy.default).parsestr(mail.wire.decode())
    assert received["Reply-To"].addresses[0].addr_spec == address
    assert received["Subject"] == "Hello"
    assert received.get_content().strip() == "Hello there"
    plain = Job.model_validate(job(reply_to="r@example.com"))
    ascii_mail = serialize(build_message(plain, "j1", NOW, Content.of(plain), "utf-8"), 10**6)
    assert not ascii_mail.utf8
    assert ascii_mail.wire.isascii()


def test_a_header_set_again_to_the_same_text_is_parsed_once_and_stays_its_own() -> None:
    """Messages share the parse of a repeated header (the sender and recipient of every
    mail of a campaign); replacing it in one message leaves the others' alone.
    """

    def made(subject: str) -> EmailMessage:
        body = job(subject=subject, **{"from": {"email": "news@example.com", "name": "Néws"}})
        parsed = Job.model_validate(body)
        return build_message(parsed, subject, NOW, Content.of(parsed))

    first, second = made("One"), made("Two")
    assert first["From"] is second["From"]
    assert first["To"] is second["To"]
    assert first["Subject"] is not second["Subject"]
    second.replace_header("From", "Other <other@example.com>")
    assert str(first["From"]) == "Néws <news@example.com>"
    assert first["From"].addresses[0].addr_spec == "news@example.com"
    assert str(wire(first)["From"]) == "Néws <news@example.com>"
    assert str(wire(second)["From"]) == "Other <other@example.com>"


def test_a_shared_header_is_folded_once_for_each_policy() -> None:
    """The fold kept on a shared header belongs to the policy it was made for: the same
    long header is written with LF for one policy and CRLF for another, and raw UTF-8
    only where the policy allows it.
    """
    body = job(to=["Ünïcode Récipient <r@example.org>"], subject="Ünïcode " * 12)
    parsed = Job.model_validate(body)
    first = build_message(parsed, "a", NOW, Content.of(parsed))
    second = build_message(parsed, "b", NOW, Content.of(parsed))
    assert first["To"] is second["To"]
    header = first["To"]
    crlf = header.fold(policy=WIRE_POLICY)
    lf = header.fold(policy=BUILD_POLICY)
    raw = header.fold(policy=WIRE_UTF8_POLICY)
    assert crlf.endswith("\r\n")
    assert "\r\n" not in lf
    assert lf.endswith("\n")
    assert crlf.isascii()
    assert "=?utf-8?" in crlf
    assert "Ünïcode" in raw
    assert raw.endswith("\r\n")
    # Asked again, each policy gets back what it got the first time.
    assert header.fold(policy=WIRE_POLICY) is crlf
    assert header.fold(policy=BUILD_POLICY) is lf

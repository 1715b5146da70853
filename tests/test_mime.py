"""Building messages: structure, encodings, and round trips through the ``email`` parser."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.errors import UnsupportedContentError
from consumer.message import Job
from consumer.mime import build_message
from tests.broker import job

NOW = datetime(2030, 5, 17, 12, 0, tzinfo=UTC)
PDF = b"%PDF-1.4 binary \x00\xff\xfe" * 50


def wire(message: EmailMessage) -> EmailMessage:
    """The message as a receiving server would parse it."""
    data = message.as_bytes(policy=policy.SMTP)
    parsed = BytesParser(policy=policy.default).parsebytes(data.replace(b"\r\n", b"\n"))
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_html_with_inline_image_and_attachment() -> None:
    body = job(
        text="see the logo",
        html='<img src="cid:logo">',
        attachments=[
            {
                "content_b64": base64.b64encode(b"\x89PNG..").decode(),
                "inline": True,
                "cid": "logo",
                "content_type": "image/png",
            },
            {"filename": "Rechnung März.pdf", "content_b64": base64.b64encode(PDF).decode()},
        ],
    )
    msg = wire(build_message(Job.model_validate(body), "j1", NOW))
    assert msg.get_content_type() == "multipart/mixed"
    alternative, attachment = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, related = alternative.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html, logo = related.iter_parts()
    assert html.get_content_type() == "text/html"
    assert (logo["Content-ID"], logo.get_content_type()) == ("<logo>", "image/png")
    assert attachment.get_filename() == "Rechnung März.pdf"
    assert attachment.get_content_type() == "application/pdf"  # guessed from the name
    payload = attachment.get_content()
    assert hashlib.sha256(payload).digest() == hashlib.sha256(PDF).digest()


@pytest.mark.parametrize(
    "fields",
    [
        {"template": {"name": "welcome"}},
        {"attachments": [{"url": "https://example.com/a.pdf"}]},
        {"attachments": [{"path": "/srv/files/a.pdf"}]},
    ],
)
def test_content_this_worker_cannot_build_is_refused_clearly(fields: dict[str, object]) -> None:
    with pytest.raises(UnsupportedContentError):
        build_message(Job.model_validate(job(**fields)), "j1", NOW)


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
    body = job(subject=subject, text=text, **{"from": {"email": "a@example.com", "name": name}})
    msg = wire(build_message(Job.model_validate(body), "j1", NOW))
    assert msg["Subject"] == subject
    # White space aside, the name is intact. (A run of white space in a display name means
    # one space per RFC 5322, and the policy-default parser puts a space between adjacent
    # RFC 2047 encoded-words where RFC 2047 says there is none.)
    shown = msg["From"].addresses[0].display_name
    assert "".join(shown.split()) == "".join(name.split())
    content = msg.get_content()
    assert content.rstrip("\n") == text.rstrip("\n")

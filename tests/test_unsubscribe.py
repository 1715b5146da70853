"""One-click unsubscribe, the pure parts: the job's field, the signed token, the headers."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from typing import Any

import pytest
from pydantic import ValidationError

from consumer.core.content import Content
from consumer.core.message import Job, parse_job
from consumer.core.mime import build_mail
from consumer.core.outcomes import Later
from consumer.core.refusals import InvalidJobError
from consumer.core.unsubscribe import (
    ONE_CLICK,
    TokenRefused,
    Unsubscribe,
    confirmation_page,
    link_headers,
    make_token,
    read_token,
)
from consumer.settings import Settings
from consumer.vault import Vault, new_key
from tests.broker import encode, job
from tests.doubles import Rig

NOW = datetime(2035, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=180)
KEY = new_key()
VAULT = Vault([KEY])
BASE = "https://mail.example.com"
REQUEST = Unsubscribe("example.com", "news", "rcpt@example.org", "j1", LATER)


def unsubscribing(**fields: Any) -> Job:
    """A parsed job that asks for a link to leave the list ``news``."""
    parsed, _ = parse_job(encode(job(**{"unsubscribe": {"list": "news"}, **fields})), "j1")
    return parsed


def test_a_token_says_who_leaves_which_list_until_when() -> None:
    token = make_token(REQUEST, VAULT)
    assert token.isascii()
    assert "/" not in token
    assert "=" not in token
    assert read_token(token, VAULT, NOW) == REQUEST
    assert read_token(token, VAULT, NOW).scope.describe() == "example.com list news"
    # A new key first, the old one kept: links already sent still work.
    assert read_token(token, Vault([new_key(), KEY]), NOW) == REQUEST


def test_forged_altered_expired_and_foreign_tokens_are_refused() -> None:
    token = make_token(REQUEST, VAULT)
    payload, _, signature = token.partition(".")
    other = dict(REQUEST.__dict__, recipient="someone@example.org")
    altered = make_token(Unsubscribe(**other), VAULT).partition(".")[0] + "." + signature
    # Signed by mailbus with this key, but not as a token: a seal's signature never passes.
    unpurposed = bytes.fromhex(VAULT.sign(payload.encode()))
    seal_like = f"{payload}.{base64.urlsafe_b64encode(unpurposed).rstrip(b'=').decode()}"
    refused = {
        "another key": make_token(REQUEST, Vault([new_key()])),
        "altered": altered,
        "seal": seal_like,
        "garbage": "not-a-token",
        "empty signature": payload + ".",
        "too long": "A" * 2000 + "." + signature,
    }
    for bad in refused.values():
        with pytest.raises(TokenRefused, match="not an unsubscribe link"):
            read_token(bad, VAULT, NOW)
    with pytest.raises(TokenRefused, match="expired"):
        read_token(token, VAULT, LATER)


def test_the_headers_are_a_one_click_link_and_a_mailto() -> None:
    parsed = unsubscribing()
    headers = link_headers(parsed, "j1", base_url=BASE, vault=VAULT, expires=LATER)
    assert headers["List-Unsubscribe-Post"] == ONE_CLICK == "List-Unsubscribe=One-Click"
    link = headers["List-Unsubscribe"]
    assert link.startswith(f"<{BASE}/unsubscribe/")
    assert link.endswith(">")
    token = link[len(BASE) + len("/unsubscribe/") + 1 : -1]
    assert read_token(token, VAULT, NOW) == REQUEST
    mailto = unsubscribing(unsubscribe={"list": "news", "mailto": "unsub@example.com"})
    both = link_headers(mailto, "j1", base_url=BASE, vault=VAULT, expires=LATER)
    assert both["List-Unsubscribe"] == f"{link}, <mailto:unsub@example.com>"
    # An address's '?', '=', '%' or '#' is not the URI's: no header fields, no escapes.
    odd = unsubscribing(unsubscribe={"list": "news", "mailto": "u?bcc=v%41#w@example.com"})
    encoded = link_headers(odd, "j1", base_url=BASE, vault=VAULT, expires=LATER)
    assert encoded["List-Unsubscribe"] == f"{link}, <mailto:u%3Fbcc%3Dv%2541%23w@example.com>"


def test_the_built_mail_carries_the_headers_unbroken() -> None:
    parsed = unsubscribing(unsubscribe={"list": "news", "mailto": "unsub@example.com"})
    headers = link_headers(parsed, "j1", base_url=BASE, vault=VAULT, expires=LATER)
    mail = build_mail(
        parsed, "j1", NOW, Content.of(parsed), charset="utf-8", limit=10**6, added=headers
    )
    arrived = message_from_bytes(mail.wire, policy=policy.SMTP)
    assert " ".join(str(arrived["List-Unsubscribe"]).split()) == headers["List-Unsubscribe"]
    assert arrived["List-Unsubscribe-Post"] == ONE_CLICK
    assert b"=?" not in mail.wire.partition(b"\r\n\r\n")[0]  # never encoded words


def test_a_link_too_long_for_a_header_is_refused() -> None:
    domain = ".".join(["d" * 60] * 3) + ".example.com"
    body = job(
        domain=domain,
        to=["r" * 50 + "@" + ".".join(["e" * 60] * 3) + ".example.org"],
        unsubscribe={"list": "n" * 64},
        **{"from": "a@" + domain},
    )
    parsed, job_id = parse_job(encode(body), "x" * 200)
    with pytest.raises(InvalidJobError, match="more than a header can carry"):
        link_headers(parsed, job_id, base_url=BASE, vault=VAULT, expires=LATER)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"cc": ["other@example.org"]}, "exactly one recipient"),
        ({"to": ["a@example.org", "b@example.org"]}, "exactly one recipient"),
        ({"unsubscribe": {"list": "news letter"}}, "unsubscribe.list"),
        ({"unsubscribe": {"list": "news", "mailto": "ünsub@example.com"}}, "ASCII"),
        ({"unsubscribe": {"list": "news", "mailto": "nobody"}}, "mailto"),
        ({"unsubscribe": {"list": "news", "topic": "x"}}, "topic"),
        ({"headers": {"List-Unsubscribe": "<https://x.example/u>"}}, "writes these headers"),
    ],
)
def test_the_field_is_refused_where_a_link_would_be_wrong(fields: dict[str, Any], why: str) -> None:
    body = job(unsubscribe={"list": "news"})
    body.update(fields)
    with pytest.raises(InvalidJobError, match=why):
        parse_job(encode(body), "j")


def test_without_the_field_a_job_may_set_its_own_list_unsubscribe() -> None:
    own = {"List-Unsubscribe": "<mailto:u@example.com>"}
    parsed, _ = parse_job(encode(job(headers=own)), "j")
    assert parsed.unsubscribe is None


def test_the_page_asks_and_escapes() -> None:
    page = confirmation_page(Unsubscribe("example.com", "a<b", "r@example.org", None, LATER))
    assert 'method="post"' in page
    assert "a&lt;b" in page
    assert "a<b" not in page
    assert "r@example.org" not in page


def test_the_base_url_is_https() -> None:
    assert Settings(unsubscribe_url=BASE + "/", _env_file=None).unsubscribe_url == BASE
    for bad in ("http://mail.example.com", "https://mail.example.com/?a=b", "https://x y"):
        with pytest.raises(ValidationError):
            Settings(unsubscribe_url=bad, _env_file=None)
    for credentials in ("https://proxy:pw@mail.example.com", "https://user@mail.example.com"):
        with pytest.raises(ValidationError, match="without a user name or password"):
            Settings(unsubscribe_url=credentials, _env_file=None)


async def test_without_the_url_a_job_asking_for_a_link_waits_and_says_why() -> None:
    rig = Rig()
    outcome = await rig.process(encode(job(unsubscribe={"list": "news"})))
    assert isinstance(outcome, Later)
    assert outcome.why == "retry"
    assert outcome.failure is not None
    assert "MAILBUS_UNSUBSCRIBE_URL" in outcome.failure.describe()
    assert rig.sender.handed == []
    # The job's list is held against the suppressions with its domain.
    assert rig.suppressions.asked == [("example.com", "news")]

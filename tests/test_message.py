"""The v1 contract: what is accepted, what is refused, and the shipped JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.core.control import parse_request
from consumer.core.message import header_problem, job_json_schema, parse_job
from consumer.core.refusals import InvalidJobError, JobTooLargeError
from tests.broker import encode, job


def test_shipped_schema_matches_the_model(repo_root: Path) -> None:
    shipped = json.loads((repo_root / "consumer" / "schemas" / "job-v1.json").read_text())
    assert shipped == job_json_schema(), "run `make schema` and commit the result"


def test_schema_forbids_unknown_fields_and_requires_the_essentials() -> None:
    schema = job_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"domain"}
    built, raw = schema["oneOf"]
    assert set(built["required"]) == {"from", "to"}
    assert set(raw["required"]) == {"raw_b64", "mail_from", "rcpt_to"}
    # Each form rules out the other's fields.
    assert {"required": ["raw_b64"]} in built["not"]["anyOf"]
    assert {"required": ["from"]} in raw["not"]["anyOf"]
    assert "from" in schema["properties"]
    assert "from_" not in schema["properties"]


def test_address_forms_are_equivalent() -> None:
    parsed, _ = parse_job(
        encode(job(to=["Zoë <zoe@example.org>", {"email": "zoe@example.org", "name": "Zoë"}])), None
    )
    assert parsed.to[0] == parsed.to[1]
    assert parsed.recipients() == ["zoe@example.org"]


def test_an_address_with_deeply_nested_comments_is_refused_not_crashed() -> None:
    """The standard library's address parser recurses into each comment: too deep, it is
    an invalid job (dead-lettered once), never an exception the worker retries.
    """
    nested = "(" * 5_000 + ")" * 5_000
    with pytest.raises(InvalidJobError, match="nested too deeply"):
        parse_job(encode(job(reply_to=f"a{nested}b@example.com")), None)


def test_special_use_domains_only_when_the_setting_allows_them() -> None:
    staging = ["qa@staging.test", "dev@box.localhost", "ops@Mail.Example.test"]
    body = encode(job(to=staging, cc=["a@example.com"]))
    for address in staging:
        with pytest.raises(InvalidJobError, match="special-use or reserved"):
            parse_job(encode(job(to=[address])), None)
    parsed, _ = parse_job(body, None, special_use=True)
    assert parsed.recipients() == [*staging[:2], "ops@mail.example.test", "a@example.com"]
    for refused in ("x@box.invalid", "x@10.in-addr.arpa", "x@bad..localhost"):
        with pytest.raises(InvalidJobError, match="invalid email address"):
            parse_job(encode(job(to=[refused])), None, special_use=True)


def test_id_precedence_body_then_message_id_then_content_hash() -> None:
    body = encode(job(id="from-body"))
    assert parse_job(body, "from-property")[1] == "from-body"
    plain = encode(job())
    assert parse_job(plain, "from-property")[1] == "from-property"
    hashed = parse_job(plain, None)[1]
    assert hashed.startswith("sha256:")
    assert hashed == parse_job(plain, None)[1]


@pytest.mark.parametrize(
    "fields",
    [
        {"text": None, "html": None},
        {"to": []},
        {"domain": "exa mple.com"},
        {"headers": {"Message-ID": "<x@y>"}},
        {"headers": {"Content-Type": "text/plain"}},
        {"headers": {"Bad Name": "x"}},
        {"reply_to": "a@example.com, b@example.com"},
        {"send_at": "2030-01-01T00:00:00"},  # no timezone: ambiguous, refused
        {"attachments": [{"filename": "a.txt", "content_b64": "YQ==", "url": "http://x"}]},
        {"attachments": [{"content_b64": "YQ==", "inline": True}]},
        {"max_attempts": 0},
        {"from": "a@example.com\r\nBcc: x@example.com"},
        # Header injection: through a custom header's value, a display name, the subject.
        {"headers": {"X-Campaign": "spring\r\nBcc: victim@example.net"}},
        {"headers": {"List-Unsubscribe": "<https://x.example/u>\nBcc: v@example.net"}},
        {"to": [{"email": "rcpt@example.org", "name": "Ann\r\nBcc: v@example.net"}]},
        {"reply_to": '"Ann\nBcc: v@example.net" <a@example.com>'},
        {"subject": "hi\nBcc: v@example.net"},
        # Headers mailbus writes itself, whatever their case.
        {"headers": {"from": "x@example.net"}},
        {"headers": {"BCC": "x@example.net"}},
        {"headers": {"Date": "Mon, 1 Jan 2024 00:00:00 +0000"}},
        {"headers": {"MIME-Version": "1.0"}},
        {"headers": {"Resent-To": "x@example.net"}},
        {"headers": {"Content-Transfer-Encoding": "8bit"}},
        {"headers": {"X-Token": "x" * 901}},  # cannot be folded within 998 characters
        {"charset": "no-such-charset"},
        {"charset": "utf-16"},  # writes ASCII as two bytes: not a mail charset
        {"template": {"name": "welcome"}, "text": "both"},
        {"template": {"name": "../etc"}, "text": None},
        # What is stored with the record and echoed in every event stays small and storable.
        {"metadata": {"blob": "x" * 16 * 1024}},
        {"metadata": {"nested": [{"bad\0key": 1}]}},
        {"metadata": {"$where": "1"}},
        {"tags": [f"t{i}" for i in range(51)]},
        # A schedule past what a date (and the seal on its waiting copy) can hold.
        {"send_at": "9999-12-20T00:00:00Z"},
    ],
)
def test_refused(fields: dict[str, object]) -> None:
    body = {k: v for k, v in job(**fields).items() if v is not None}
    with pytest.raises(InvalidJobError):
        parse_job(encode(body), None)


def test_metadata_up_to_its_bound_is_kept() -> None:
    fields = {"metadata": {"blob": "é" * 8000, "order": {"id": 42}}, "tags": ["t"] * 50}
    parsed, _ = parse_job(encode(job(**fields)), None)
    assert parsed.metadata == fields["metadata"]
    assert len(parsed.tags) == 50


def test_list_unsubscribe_and_other_custom_headers_are_accepted() -> None:
    headers = {
        "List-Unsubscribe": "<https://example.com/u/1>, <mailto:u@example.com>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "X-Campaign": "spring 2030 ☀",
    }
    parsed, _ = parse_job(encode(job(headers=headers, charset="ISO-8859-1")), None)
    assert parsed.headers == headers
    assert parsed.charset == "iso-8859-1"


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidJobError, match="JSON object"):
        parse_job(b"[1, 2]", None)


# Everything str.splitlines() breaks a line at, which the email package refuses in a
# header, and a lone surrogate, which no charset can write.
LINE_BREAKERS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", [*LINE_BREAKERS, "\ud800"], ids=ascii)
@pytest.mark.parametrize("where", ["subject", "header", "name", "filename"])
def test_header_bound_text_is_one_line_by_the_email_packages_rule(where: str, char: str) -> None:
    value = f"a{char}b"
    fields: dict[str, object] = {
        "subject": {"subject": value},
        "header": {"headers": {"X-Note": value}},
        "name": {"from": {"email": "sender@example.com", "name": value}},
        "filename": {"attachments": [{"content_b64": "aGk=", "filename": value}]},
    }[where]
    # ensure_ascii: JSON spells the lone surrogate as an escape, as producers send it.
    body = json.dumps(job(**fields)).encode()
    with pytest.raises(InvalidJobError, match=r"not allowed in header values|unicode string"):
        parse_job(body, None)
    assert header_problem(value) is not None


def test_header_problem_takes_one_line_of_anything_else() -> None:
    for fine in ("", "Hello", "Grüße ☀ \t tab", "\x1f\x7f unit separator and DEL"):
        assert header_problem(fine) is None, fine


def test_a_body_over_the_job_limit_is_refused_before_it_is_decoded() -> None:
    body = encode(job(text="x" * 2000))
    assert parse_job(body, None, max_bytes=len(body))[0].text == "x" * 2000
    with pytest.raises(JobTooLargeError, match=f"{len(body)} bytes, more than the limit") as err:
        parse_job(body, None, max_bytes=len(body) - 1)
    assert err.value.reason == "too_large"
    with pytest.raises(JobTooLargeError):  # not even JSON: never looked at
        parse_job(b"\xff" * 4096, None, max_bytes=1024)
    with pytest.raises(JobTooLargeError, match="the control message is 4096 bytes"):
        parse_request(b"{}" + b" " * 4094, max_bytes=1024)

"""The v1 contract: what is accepted, what is refused, and the shipped JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.errors import InvalidJobError
from consumer.message import job_json_schema, parse_job
from tests.broker import encode, job


def test_shipped_schema_matches_the_model(repo_root: Path) -> None:
    shipped = json.loads((repo_root / "consumer" / "schemas" / "job-v1.json").read_text())
    assert shipped == job_json_schema(), "run `make schema` and commit the result"


def test_schema_forbids_unknown_fields_and_requires_the_essentials() -> None:
    schema = job_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"domain", "from", "to"}
    assert "from" in schema["properties"]
    assert "from_" not in schema["properties"]


def test_address_forms_are_equivalent() -> None:
    parsed, _ = parse_job(
        encode(job(to=["Zoë <zoe@example.org>", {"email": "zoe@example.org", "name": "Zoë"}])), None
    )
    assert parsed.to[0] == parsed.to[1]
    assert parsed.recipients() == ["zoe@example.org"]


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
    ],
)
def test_refused(fields: dict[str, object]) -> None:
    body = {k: v for k, v in job(**fields).items() if v is not None}
    with pytest.raises(InvalidJobError):
        parse_job(encode(body), None)


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidJobError, match="JSON object"):
        parse_job(b"[1, 2]", None)

"""The REST gateway's API keys (the old CodeIgniter REST server's ``X-API-KEY`` header) and
its XML answers, driven with curl against a real broker, a running worker and the capture
SMTP server; and the ``mailbus domain api-key`` commands that manage the keys.
"""

from __future__ import annotations

import asyncio
import json
from xml.etree import ElementTree

import pytest

from consumer.core import legacy
from consumer.core.api_keys import MAX_API_KEYS, api_key_problem, next_key_name
from consumer.core.rest_formats import Refused, answer_format, rest_xml
from consumer.errors import GatewayRequestError
from consumer.service.gateway import TOO_MANY_FAILURES
from consumer.settings import Settings
from consumer.store.domains import DomainStore, hash_key, key_matches
from consumer.store.jobs import JobStore
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.conftest import settled_record
from tests.secret_watch import watched
from tests.test_gateways import (
    DOMAIN_KEY,
    REST_MAIL,
    Answer,
    curl_put,
    curl_rest,
    rest_mail_arrived,
)
from tests.test_gateways import ports as ports
from tests.test_gateways import settings as settings

INVALID = {"status": "failed", "message": "Invalid API Key."}
WRONG_KEY = "wrong-key-but-long-enough-0042"
XML_START = '<?xml version="1.0" encoding="utf-8"?>\n<xml>'


async def api_key(settings: Settings, domain: str, *options: str) -> str:
    """A new API key for ``domain``, made with ``mailbus domain api-key add``."""
    added = await mailbus(settings, "domain", "api-key", "add", domain, *options)
    assert added.returncode == 0, added.stderr
    return watched(added.stdout.strip())


def with_key(key: str) -> tuple[str, str]:
    """curl's option for the ``X-API-KEY`` header."""
    return ("-H", f"X-API-KEY: {key}")


def parsed(xml: str | bytes) -> ElementTree.Element:
    """An XML answer parsed: the gateway's own output, under test, with no DTD to expand."""
    return ElementTree.fromstring(xml)  # noqa: S314  (mailbus's own answer, not a client's)


def as_xml(answer: Answer) -> dict[str, str]:
    """An XML answer's fields, checked to be in the CodeIgniter shape."""
    assert answer.content_type == "application/xml; charset=utf-8"
    assert answer.text.startswith(XML_START), answer.text
    root = parsed(answer.text)
    assert root.tag == "xml"
    return {child.tag: child.text or "" for child in root}


async def test_an_api_key_stands_in_for_the_domain_key(
    settings: Settings, smtp: CaptureServer, store: JobStore, ports: dict[str, int]
) -> None:
    port = ports["rest"]
    neither = await curl_put(settings, port, domain_key=None)
    assert neither == {"status": "failed", "message": "Need domain key"}
    key = await api_key(settings, "rest.example")
    sent = await curl_rest(settings, port, *with_key(key), domain_key=None)
    assert sent.status == 200
    answer = json.loads(sent.text)
    assert (answer["status"], answer["message"]) == ("success", "Message saved")
    await rest_mail_arrived(smtp)
    record = await settled_record(store, answer["id"])
    assert record["status"] == "sent"
    assert record["tags"] == [legacy.REST_TAG]


async def test_wrong_and_foreign_keys_are_refused_and_counted(
    settings: Settings, smtp: CaptureServer, store: JobStore, ports: dict[str, int]
) -> None:
    port = ports["rest"]
    await DomainStore(store.database).put("other.example", hash_key(DOMAIN_KEY), [], True)
    right, foreign = (
        await api_key(settings, "rest.example"),
        await api_key(settings, "other.example"),
    )
    # The foreign key is good for its own domain, with a From that domain may send as ...
    own = await curl_rest(
        settings, port, *with_key(foreign), domain="other.example", from_email="a@other.example"
    )
    assert json.loads(own.text)["message"] == "Message saved"
    not_its_sender = await curl_rest(settings, port, *with_key(foreign), domain="other.example")
    assert json.loads(not_its_sender.text)["message"] == (
        "sender domain rest.example is not one other.example may send as"
    )
    # ... and for no other: refused as a wrong key is, with the old server's words.
    for key in (WRONG_KEY, foreign, "short", right + "x"):
        refused = await curl_rest(settings, port, *with_key(key))  # domain_key beside it
        assert (refused.status, json.loads(refused.text)) == (403, INVALID)
    assert settings.gateway_auth_failures == 5
    wrong_domain_key = await curl_put(settings, port, domain_key="good horse")
    assert wrong_domain_key == {"status": "failed", "message": "invalid domain key"}
    for changes in ({"domain_key": None}, {}):  # five failures: right keys are not looked at
        throttled = await curl_rest(settings, port, *with_key(right), **changes)
        assert (throttled.status, json.loads(throttled.text)) == (
            429,
            {"status": "failed", "message": TOO_MANY_FAILURES},
        )
    throttled_key = await curl_put(settings, port)
    assert throttled_key["message"] == TOO_MANY_FAILURES
    async with asyncio.timeout(30):
        [mail] = await smtp.wait_for(1)
    assert mail.message()["From"] == "Mail Server <a@other.example>"
    await asyncio.sleep(0.5)
    assert len(smtp.received()) == 1
    assert len(await store.find(limit=10)) == 1


async def test_answers_in_xml_when_asked_and_refuses_other_formats(
    settings: Settings, smtp: CaptureServer, ports: dict[str, int]
) -> None:
    port = ports["rest"]
    key = await api_key(settings, "rest.example")
    suffixed = as_xml(await curl_rest(settings, port, *with_key(key), path="/api/mail.xml"))
    assert list(suffixed) == ["status", "message", "id"]
    assert (suffixed["status"], suffixed["message"]) == ("success", "Message saved")
    accepted = await curl_rest(
        settings, port, "-H", "Accept: application/xml", path="/api/mail/new"
    )
    assert as_xml(accepted)["message"] == "Message saved"
    segment = await curl_rest(settings, port, *with_key(WRONG_KEY), path="/api/mail/format/xml")
    assert segment.status == 403
    assert as_xml(segment) == INVALID
    query = await curl_rest(settings, port, path="/api/mail?format=xml", domain_key=None)
    assert as_xml(query) == {"status": "failed", "message": "Need domain key"}
    escaped = as_xml(await curl_rest(settings, port, path="/api/mail.xml", cc="<a&b>"))
    assert escaped["status"] == "failed"
    assert "cc.0" in escaped["message"]
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    json_still = await curl_rest(settings, port, "-H", f"Accept: {browser}", domain_key=None)
    assert json_still.content_type == "application/json; charset=utf-8"
    assert json.loads(json_still.text)["message"] == "Need domain key"
    for path in ("/api/mail.csv", "/api/mail/format/php", "/api/mail?format=html"):
        refused = await curl_rest(settings, port, path=path)
        assert (refused.status, refused.content_type) == (406, "application/json; charset=utf-8")
        assert json.loads(refused.text)["message"].endswith(
            "is not served: ask for json or xml (JSON is the default)"
        )
    async with asyncio.timeout(30):
        mails = await smtp.wait_for(2)
    await asyncio.sleep(0.5)
    assert len(mails) == len(smtp.received()) == 2


async def test_api_key_commands(settings: Settings, store: JobStore) -> None:
    unregistered = await mailbus(settings, "domain", "api-key", "add", "keys.example")
    assert unregistered.returncode == 1
    assert "not registered" in unregistered.stderr
    registered = await mailbus(
        settings, "domain", "add", "keys.example", "--key-stdin", input=DOMAIN_KEY + "\n"
    )
    assert registered.returncode == 0, registered.stderr
    made = await mailbus(settings, "domain", "api-key", "add", "Keys.example")
    assert made.returncode == 0, made.stderr
    generated = watched(made.stdout.strip())
    assert made.stdout == generated + "\n"
    assert len(generated) == 43
    assert "API key '1' added" in made.stderr
    assert generated not in made.stderr
    old_key = watched("an-old-codeigniter-key-0123456789abcdef")
    given = await mailbus(
        settings, *("domain", "api-key", "add", "keys.example", "--name", "ci", "--key-stdin"),
        input=old_key + "\n",
    )  # fmt: skip
    assert given.returncode == 0, given.stderr
    assert old_key not in given.stdout + given.stderr
    again = await mailbus(settings, "domain", "api-key", "add", "keys.example", "--name", "ci")
    assert (again.returncode, "named 'ci'" in again.stderr) == (1, True)
    for refused in (
        await mailbus(
            settings, "domain", "api-key", "add", "keys.example", "--key-stdin", input="short\n"
        ),
        await mailbus(settings, "domain", "api-key", "add", "keys.example", "--name", "a b"),
    ):
        assert refused.returncode == 2, refused.stderr
    # Registered again with --replace: the API keys stay.
    replaced = await mailbus(
        settings, "domain", "add", "keys.example", "--key-stdin", "--replace", input="k2\n"
    )
    assert replaced.returncode == 0, replaced.stderr

    listed = await mailbus(settings, "domain", "api-key", "ls", "keys.example")
    shown = await mailbus(settings, "domain", "show", "keys.example")
    for output in (listed.stdout, shown.stdout):
        for secret in (generated, old_key, "scrypt"):
            assert secret not in output
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "1", "ci"]
    assert json.loads(shown.stdout)["api_keys"] == ["1", "ci"]
    raw = await store.database["domains"].find_one({"_id": "keys.example"})
    assert raw is not None
    stored = {entry["name"]: entry["key_hash"] for entry in raw["api_keys"]}
    assert key_matches(generated, stored["1"])
    assert key_matches(old_key, stored["ci"])
    assert key_matches("k2", raw["key_hash"])

    removed = await mailbus(settings, "domain", "api-key", "rm", "keys.example", "1")
    assert removed.returncode == 0, removed.stderr
    gone = await mailbus(settings, "domain", "api-key", "rm", "keys.example", "1")
    assert (gone.returncode, "no API key named '1'" in gone.stderr) == (1, True)
    listed = await mailbus(settings, "domain", "api-key", "ls", "keys.example")
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "ci"]
    numbered = await api_key(settings, "keys.example")
    raw = await store.database["domains"].find_one({"_id": "keys.example"})
    assert raw is not None
    assert [entry["name"] for entry in raw["api_keys"]] == ["ci", "1"]
    assert key_matches(numbered, raw["api_keys"][1]["key_hash"])

    domains = DomainStore(store.database)
    for number in range(2, MAX_API_KEYS):
        assert await domains.add_api_key("keys.example", str(number), "x", MAX_API_KEYS) == "added"
    full = await mailbus(settings, "domain", "api-key", "add", "keys.example")
    assert (full.returncode, f"has {MAX_API_KEYS} API keys" in full.stderr) == (1, True)
    unkeyed = settings.model_copy(update={"secret_key": None})
    refused = await mailbus(unkeyed, "domain", "api-key", "add", "keys.example")
    assert (refused.returncode, "MAILBUS_SECRET_KEY" in refused.stderr) == (2, True)


@pytest.mark.parametrize(
    ("suffix", "query", "accept", "chosen"),
    [
        (None, None, None, "json"),
        (None, None, "*/*", "json"),
        ("xml", "json", "application/json", "xml"),  # the address first
        ("XML", None, None, "xml"),
        (None, "xml", "application/json", "xml"),  # then the format parameter
        (None, "bogus", "application/xml", "xml"),  # one the old server ignored
        (None, None, "text/xml", "xml"),
        (None, None, "application/json, text/plain", "json"),
        (None, None, "text/html,application/xhtml+xml,application/xml;q=0.9", "json"),
        (None, None, "application/csv", "json"),  # only preferred: the mail still goes
        (None, None, "text/html", "json"),
        ("jsonp", None, None, Refused("jsonp")),
        ("anything", None, None, Refused("anything")),
        (None, "php", None, Refused("php")),
    ],
)
def test_the_answer_format_is_chosen_as_codeigniter_chose_it(
    suffix: str | None, query: str | None, accept: str | None, chosen: object
) -> None:
    assert answer_format(suffix, query, accept) == chosen


def test_xml_answers_escape_what_they_carry() -> None:
    xml = rest_xml({"status": "failed", "message": 'a <b> & "c"\x00\x1b\ud800 ok'})
    assert xml.startswith(XML_START.encode())
    root = parsed(xml)
    assert [(child.tag, child.text) for child in root] == [
        ("status", "failed"),
        ("message", 'a <b> & "c"\ufffd\ufffd\ufffd ok'),
    ]
    assert "x" * 40 not in Refused("x" * 1000).reason()


def test_api_key_bounds_and_names() -> None:
    assert api_key_problem("k" * 16) is None
    for bad in ("k" * 15, "k" * 257, "sixteen chars ok", "sixteen-chars-ok\n", "clé-de-seize-car"):
        assert api_key_problem(bad) is not None, bad
    assert next_key_name([]) == "1"
    assert next_key_name(["ci", "2", "7", "old"]) == "8"


def test_an_api_key_request_needs_no_domain_key_and_passes_none_on() -> None:
    fields = {k: v for k, v in REST_MAIL.items() if k != "domain_key"}
    with pytest.raises(GatewayRequestError, match=r"^Need domain key$"):
        legacy.rest_mail(fields)
    assert "domain_key" not in legacy.rest_mail(fields, api_key=True).job
    assert "domain_key" not in legacy.rest_mail(REST_MAIL, api_key=True).job
    assert legacy.rest_mail(REST_MAIL).job["domain_key"] == DOMAIN_KEY

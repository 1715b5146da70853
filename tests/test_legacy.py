"""The older systems' requests as v1 jobs, and their answers: pure functions."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from consumer.core import legacy
from consumer.errors import GatewayRequestError

REST = {
    "domain": "example.com",
    "domain_key": "bad horse",
    "to_email": "johndoe@example.org",
    "subject": "Mail service test",
    "body": "This is a test.",
    "from_email": "address@example.com",
}


def test_rest_fields_become_a_job() -> None:
    mail = legacy.rest_mail(
        {
            **REST,
            "to_name": "John Doe",
            "from_name": "Mail Server",
            "body": "&lt;p&gt;Caf&eacute; &amp; co&lt;/p&gt;",
            "cc": "someone@example.org, other@example.org,",
            "bcc": "hidden@example.org",
            "attach_list": "http://www.example.com/file/a.pdf|/home/example/files/b.ext",
            "send_now": "send",
        }
    )
    assert mail.send_now
    job = legacy.checked_job(mail.job)
    assert job.html == "<p>Café & co</p>"
    assert job.text is None
    assert [(a.email, a.name) for a in job.to] == [("johndoe@example.org", "John Doe")]
    assert [a.email for a in job.cc] == ["someone@example.org", "other@example.org"]
    assert [a.email for a in job.bcc] == ["hidden@example.org"]
    assert job.reply_to == job.from_
    assert job.domain_key is not None
    assert job.domain_key.get_secret_value() == "bad horse"
    assert [(a.url, a.path) for a in job.attachments] == [
        ("http://www.example.com/file/a.pdf", None),
        (None, "/home/example/files/b.ext"),
    ]
    assert job.tags == [legacy.REST_TAG]


def test_rest_plain_body_is_text_and_send_now_needs_its_word() -> None:
    mail = legacy.rest_mail({**REST, "send_now": "yes"})
    assert not mail.send_now
    job = legacy.checked_job(mail.job)
    assert (job.text, job.html) == ("This is a test.", None)


@pytest.mark.parametrize(
    ("missing", "complaint"),
    [
        ("domain", "Need domain"),
        ("to_email", "Need destination email address"),
        ("domain_key", "Need domain key"),
        ("subject", "Need subject text"),
        ("body", "Need email body"),
        ("from_email", "Need from email address"),
    ],
)
def test_rest_required_fields_in_the_old_words(missing: str, complaint: str) -> None:
    fields = {k: v for k, v in REST.items() if k != missing}
    with pytest.raises(GatewayRequestError, match=f"^{complaint}$"):
        legacy.rest_mail(fields)
    with pytest.raises(GatewayRequestError, match=f"^{complaint}$"):
        legacy.rest_mail({**fields, missing: "  "})


def test_an_invalid_job_is_refused_with_the_field_named() -> None:
    mail = legacy.rest_mail({**REST, "subject": "two\nlines"})
    with pytest.raises(GatewayRequestError, match=r"^subject: "):
        legacy.checked_job(mail.job)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"status": "sent", "id": "j"}, "Message saved and sent. "),
        (
            {"status": "dead", "reason": "permanent", "error": "550 no"},
            "Message saved, failed during immediate send. 550 no (not retried: permanent)",
        ),
        (
            {"status": "deferred", "due_at": "T", "error": "451 later"},
            "Message saved, failed during immediate send. 451 later; retried at T",
        ),
        (
            None,
            "Message saved, failed during immediate send. no outcome within 5 s; "
            "the mail stays queued",
        ),
    ],
)
def test_rest_send_now_answers(answer: dict[str, str] | None, message: str) -> None:
    assert legacy.rest_send_now_reply(answer, 5.0, "j") == {
        "status": "success",
        "message": message,
        "id": "j",
    }


def daemon(**mail: object) -> dict[str, object]:
    return legacy.daemon_job(
        {"to": ["user@example.org"], "subject": "s", "body": "b", **mail},
        domain="example.com",
        default_from="Mailer <mailer@example.com>",
    )


def test_daemon_mail_becomes_a_job() -> None:
    job = legacy.checked_job(
        daemon(
            ccList=[],
            bccList=[["name@example.org", "Person Name"], "plain@example.org"],
            replyTo=[["help@example.com", "Help"]],
            attachments=[["/srv/files/doc", "doc.pdf"]],
            embedded=[["/srv/img/logo", "logo", "logo.png"]],
            body="<html>This is content</html>",
            timeout=10,
        )
    )
    assert (job.from_.email, job.from_.name) == ("mailer@example.com", "Mailer")
    assert [(a.email, a.name) for a in job.bcc] == [
        ("name@example.org", "Person Name"),
        ("plain@example.org", None),
    ]
    assert job.reply_to is not None
    assert (job.reply_to.email, job.reply_to.name) == ("help@example.com", "Help")
    assert job.html == "<html>This is content</html>"
    [doc, logo] = job.attachments
    assert (doc.path, doc.filename, doc.inline) == ("/srv/files/doc", "doc.pdf", False)
    assert (logo.path, logo.cid, logo.filename, logo.inline) == (
        "/srv/img/logo",
        "logo",
        "logo.png",
        True,
    )
    assert job.send_at is None


def test_daemon_sender_and_template() -> None:
    own = legacy.checked_job(daemon(fromEmail="app@example.com"))
    assert (own.from_.email, own.from_.name) == ("app@example.com", None)
    named = legacy.checked_job(daemon(fromName="App"))
    assert (named.from_.email, named.from_.name) == ("mailer@example.com", "App")
    templated = legacy.daemon_job(
        {"to": ["u@example.org"], "useTemplate": "welcome.html", "replaceContent": {"N": "A"}},
        domain="example.com",
        default_from="m@example.com",
    )
    job = legacy.checked_job(templated)
    assert job.template is not None
    assert (job.template.name, job.template.data) == ("welcome.html", {"N": "A"})
    with pytest.raises(GatewayRequestError, match="MAILBUS_GATEWAY_FROM"):
        legacy.daemon_job({"to": [], "body": "b"}, domain="example.com", default_from=None)


def test_queue_mail_schedule_time_is_send_at() -> None:
    job = legacy.checked_job(
        legacy.daemon_job(
            {"to": ["u@example.org"], "body": "b", "scheduleTime": 1651596430},
            domain="example.com",
            default_from="m@example.com",
            queued=True,
        )
    )
    assert job.send_at is not None
    assert job.send_at.isoformat() == "2022-05-03T16:47:10+00:00"


@pytest.mark.parametrize(
    ("mail", "complaint"),
    [
        ({"smtpHost": "smtp.example.com", "smtpPassword": "x"}, "smtpHost, smtpPassword: "),
        ({"scheduleTime": 1}, "unknown field"),
        ({"priority": 1}, "unknown field"),
        ({"useTemplate": "t.html"}, "either body or useTemplate"),
        ({"to": "user@example.org"}, "to: must be a list"),
        ({"bccList": [["a@example.org", "A", "x"]]}, "bccList: items are"),
        ({"attachments": [["/only/path"]]}, r"attachments: items are \[filePath, fileName\]"),
        ({"replyTo": ["a@example.org", "b@example.org"]}, "one Reply-To"),
    ],
)
def test_daemon_mail_refusals(mail: dict[str, object], complaint: str) -> None:
    with pytest.raises(GatewayRequestError, match=complaint):
        daemon(**mail)


def request(line: bytes, *, password: bool = False) -> legacy.DaemonRequest:
    return legacy.daemon_request(legacy.daemon_value(line), password=password)


@pytest.mark.parametrize(
    ("line", "password", "complaint"),
    [
        # The old suites' cases, with and without a password set (checked before this).
        (b"null", False, "payload cannot be empty"),
        (b"[]", False, "payload cannot be empty"),
        (b'""', False, "payload cannot be empty"),
        (b"0", False, "payload cannot be empty"),
        (b"{}", False, "payload cannot be empty"),
        (b'{"auth": "pw"}', False, "invalid request"),  # no password: auth names no request
        (b'{"auth": "pw"}', True, "payload cannot be empty"),
        (b'{"": null, "auth": "pw"}', True, "invalid request"),
        (b'{"": [], "auth": "pw"}', True, "invalid request"),
        (b'{"getQueue": null}', False, "invalid request"),
        (b'["ping"]', False, "invalid request"),
        (b"5", False, "invalid request"),
        (b"{", False, "invalid request"),
    ],
)
def test_daemon_requests_refused_with_the_old_words(
    line: bytes, password: bool, complaint: str
) -> None:
    with pytest.raises(GatewayRequestError, match=f"^{complaint}$"):
        request(line, password=password)


def test_daemon_requests_and_framing() -> None:
    found = request(b'{"auth": "pw", "sendMail": {"to": []}, "x": 1}', password=True)
    assert (found.name, found.payload) == ("sendMail", {"to": []})
    assert request(b'{"sendMail": {}, "auth": "pw"}').name == "sendMail"  # auth ignored
    update = request(b'{"updateQueuedMail": "m", "content": {"subject": "s"}}')
    assert update.fields["content"] == {"subject": "s"}
    assert legacy.daemon_password({"auth": "pw"}) == "pw"
    assert legacy.daemon_password(None) is legacy.daemon_password({"auth": 5}) is None
    deep = b'{"ping": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(GatewayRequestError, match="invalid request"):
        legacy.daemon_value(deep)  # nesting the JSON decoder gives up on
    assert frame(deep) == deep  # framed all the same, and answered "invalid request"

    assert frame(b'{"ping": null}\n{"next"') == b'{"ping": null}'
    assert frame(b'{"ping": null}') == b'{"ping": null}'
    assert frame(b'{"ping": null} {"next"') == b'{"ping": null}'
    assert frame(b'{"sendMail": {"body": "}"}') is None
    assert frame(b'{"sendMail": {"body": "\\"}"}') is None
    assert frame(b'{"sendMail": {"body": "\\\\"}}') == b'{"sendMail": {"body": "\\\\"}}'
    assert frame(b'{"ping": nu') is None
    # Any JSON value is a request, answered without waiting for a newline.
    assert frame(b'  ["not", "an object"]') == b'  ["not", "an object"]'
    assert frame(b"null") == b"null"
    assert frame(b"[]") == b"[]"
    assert frame(b'""') == b'""'
    assert frame(b'"a \\" b"') == b'"a \\" b"'
    # A bare number is whole once what came parses: the old clients wrote it at once.
    assert legacy.DaemonFrame().feed(b"12") == b"12"
    assert frame(b"nul") is None
    long = legacy.DaemonFrame()
    assert long.feed(b"1" * 100) is None  # a long bare value waits for its newline
    assert long.feed(b"\n") == b"1" * 100


def frame(data: bytes) -> bytes | None:
    """Frame ``data`` fed a byte at a time and whole: both ways must agree."""
    whole = legacy.DaemonFrame().feed(data)
    dripped = legacy.DaemonFrame()
    for i in range(len(data)):
        done = dripped.feed(data[i : i + 1])
        if done is not None:
            assert done == whole
            return done
    assert whole is None
    return None


def test_daemon_answers() -> None:
    def read(line: bytes) -> object:
        assert line.endswith(b"\n")
        return json.loads(line)

    assert read(legacy.daemon_sent_reply({"status": "sent"}, 5)) == {
        "status": "success",
        "data": None,
        "message": "mail sent successfully",
    }
    dead = {"status": "dead", "reason": "permanent", "error": "550 no"}
    assert read(legacy.daemon_sent_reply(dead, 5)) == {
        "status": "error",
        "data": "550 no (not retried: permanent)",
        "message": "failed to send mail",
    }
    later = read(legacy.daemon_sent_reply(None, 5))
    assert later == {
        "status": "error",
        "data": "no outcome within 5 s; the mail stays queued",
        "message": "failed to send mail",
    }
    unreachable = {"status": "deferred", "error": "SMTPConnectError: refused", "unreachable": True}
    assert read(legacy.daemon_sent_reply(unreachable, 5)) == {
        "status": "error",
        "data": "SMTP Error: Could not connect to SMTP host.",
        "message": "failed to send mail",
    }
    skipped = read(legacy.daemon_sent_reply({"status": "skipped", "reason": "x"}, 5))
    assert skipped == {"status": "success", "data": None, "message": "not sent again: x"}
    assert json.loads(legacy.daemon_status_reply(4, 3)) == {
        "status": "success",
        "data": {"sent": 4, "failed": 3},
        "message": None,
    }
    assert legacy.payload_errors("") == {"payload": ["The data (null) must match the type: object"]}
    assert legacy.payload_errors(["x"]) == {
        "payload": ["The data (array) must match the type: object"]
    }
    assert legacy.payload_errors({}) is None


def test_queue_ids_and_pages() -> None:
    when = datetime(2022, 7, 15, 2, 51, 59, 478556, tzinfo=UTC)
    name = legacy.queue_id(when, "5775eb2a32b09b0d")
    assert name == "mail_0000001657853519.47855600_5775eb2a32b09b0d.json"
    # The pattern the old clients (and their test suites) match queue files with.
    assert re.match(r"^mail_([0-9]+)\.([0-9]+)_([a-z0-9]+)\.json", name)
    assert legacy.page(None) == (0, 500)
    assert legacy.page({"limit": 1, "page": 1}) == (1, 1)
    assert legacy.page({"limit": 10_000, "page": -3}) == (0, 500)
    assert legacy.page({"limit": "9", "page": True}) == (0, 500)
    assert json.loads(legacy.listing(["a"], 2, "templates")) == {
        "status": "success",
        "data": {"items": ["a"], "total": 2},
        "message": "found 2 templates",
    }


def test_a_queued_mail_reads_back_as_the_request_it_came_from() -> None:
    mail = {
        "to": ["user@example.org", ["named@example.org", "Named"]],
        "ccList": [],
        "bccList": [["hidden@example.org", "Hidden"]],
        "replyTo": ["reply@example.org"],
        "attachments": [["/srv/files/doc.pdf", "doc.pdf"]],
        "embedded": [["/srv/files/logo.png", "logo", "logo.png"]],
        "subject": "This is subject",
        "body": "<html>This is content</html>",
        "scheduleTime": 1651596430,
        "fromName": "App",
    }
    job = legacy.daemon_job(
        mail, domain="example.com", default_from="Mailer <m@example.com>", queued=True
    )
    back = legacy.daemon_mail(job, default_from="Mailer <m@example.com>", failures=2)
    assert back == {**mail, "failToDelivered": 2}
    templated = legacy.daemon_job(
        {"to": ["u@example.org"], "useTemplate": "t.html", "replaceContent": {"N": "A"}},
        domain="example.com",
        default_from="m@example.com",
    )
    again = legacy.daemon_mail(templated, default_from="m@example.com", failures=0)
    assert (again["useTemplate"], again["replaceContent"]) == ("t.html", {"N": "A"})
    assert "body" not in again
    assert "fromEmail" not in again


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("<html><body>x</body></html>", "html"),
        ("<!DOCTYPE html><p>x", "html"),
        ("Hello <b>you</b>", "html"),
        ("1 < 2 and 3 > 2", "text"),
        ("mail me at <a@b.example>", "text"),
        ("plain", "text"),
    ],
)
def test_body_kind(body: str, kind: str) -> None:
    assert legacy.body_fields(body) == {kind: body}

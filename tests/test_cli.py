"""The ``mailbus`` command line, run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel

from consumer.cli.app import _parser
from consumer.core.names import Names
from consumer.settings import Settings
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import encode, job, publish_raw
from tests.conftest import RunningWorker

SEND = ("send", "--domain", "example.com", "--from", "a@example.com")


async def test_send_publishes_and_prints_the_job_id(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    result = await mailbus(
        settings,
        *SEND,
        *[
            "--to",
            "b@example.org",
            "--subject",
            "Hi",
            "--text",
            "Hello",
            "--header",
            "X-Source: cli",
        ],
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    msg = mail.message()
    assert (msg["Subject"], msg["X-Source"], msg.get_content()) == ("Hi", "cli", "Hello\n")
    assert mail.rcpt_tos == ("b@example.org",)
    assert len(job_id) == 36


async def test_send_wait_reports_the_smtp_outcome(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    ok = await mailbus(
        settings,
        *SEND,
        *["--to", "b@example.org", "--text", "now", "--wait", "20"],
    )
    assert ok.returncode == 0, ok.stderr
    answer = json.loads(ok.stdout)
    assert answer["status"] == "sent"
    assert answer["smtp"]["code"] == 250

    smtp.faults.refuse_rcpt("gone@example.org", "550 5.1.1 user unknown")
    refused = await mailbus(
        settings,
        *SEND,
        *["--to", "gone@example.org", "--text", "x", "--wait", "20"],
    )
    assert refused.returncode == 1
    answer = json.loads(refused.stdout)
    assert (answer["status"], answer["reason"], answer["smtp"]["code"]) == (
        "dead",
        "permanent",
        550,
    )


async def test_send_json_file(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    tmp_path: Path,
) -> None:
    path = tmp_path / "job.json"
    path.write_text(
        json.dumps(
            {
                "id": "from-file",
                "domain": "example.com",
                "from": "a@example.com",
                "to": ["b@example.org"],
                "subject": "file",
                "text": "from a file",
            }
        )
    )
    result = await mailbus(settings, "send", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from-file"
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert mail.message()["Subject"] == "file"


async def test_send_refuses_an_invalid_job_before_publishing(settings: Settings) -> None:
    result = await mailbus(
        settings,
        *SEND,
        *["--to", "b@example.org", "--subject", "a\nb", "--text", "x"],
    )
    assert result.returncode == 2
    assert "line breaks" in result.stderr


async def test_topology_declare_is_idempotent(settings: Settings) -> None:
    for _ in range(2):
        result = await mailbus(settings, "topology", "declare")
        assert result.returncode == 0, result.stderr
    assert f"{settings.prefix}.send" in result.stdout


async def test_unreachable_broker_is_a_clear_error_without_the_password(
    settings: Settings,
) -> None:
    bad = settings.model_copy(update={"amqp_url": "amqp://u:hunter2@127.0.0.1:1/"})
    result = await mailbus(bad, "topology", "declare")
    assert result.returncode == 1
    assert "cannot reach RabbitMQ at amqp://u:***@127.0.0.1:1/" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


HELP = [
    [],
    ["worker"],
    ["send"],
    ["topology"],
    ["topology", "declare"],
    ["jobs"],
    ["jobs", "ls"],
    ["jobs", "show"],
    ["jobs", "cancel"],
    ["jobs", "reschedule"],
    ["outbox"],
    ["outbox", "add"],
    ["outbox", "ls"],
    ["outbox", "show"],
    ["outbox", "test"],
    ["outbox", "disable"],
    ["outbox", "rotate-key"],
    ["provider"],
    ["provider", "set"],
    ["provider", "replies"],
    ["provider", "ls"],
    ["provider", "show"],
    ["provider", "rm"],
    ["domain"],
    ["domain", "add"],
    ["domain", "ls"],
    ["domain", "show"],
    ["domain", "rm"],
    ["domain", "sandbox"],
    ["domain", "api-key"],
    ["domain", "api-key", "add"],
    ["domain", "api-key", "ls"],
    ["domain", "api-key", "rm"],
    ["domain", "dkim"],
    ["domain", "dkim", "generate"],
    ["domain", "dkim", "import"],
    ["domain", "dkim", "show"],
    ["domain", "dkim", "activate"],
    ["domain", "dkim", "rm"],
    ["config"],
    ["config", "import"],
    ["config", "export"],
    ["template"],
    ["template", "put"],
    ["template", "ls"],
    ["template", "show"],
    ["template", "render"],
    ["template", "rm"],
    ["suppress"],
    ["suppress", "add"],
    ["suppress", "rm"],
    ["suppress", "ls"],
    ["dead"],
    ["dead", "ls"],
    ["dead", "show"],
    ["dead", "replay"],
    ["dead", "purge"],
    ["status"],
    ["gateway"],
    ["gateway", "serve"],
    ["gateway", "hash-password"],
    ["webhook"],
    ["webhook", "add"],
    ["webhook", "ls"],
    ["webhook", "rm"],
    ["webhook", "log"],
    ["webhook", "serve"],
    ["webhook", "dead"],
    ["webhook", "replay"],
]


@pytest.mark.parametrize("verb", HELP)
def test_every_command_has_help(verb: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args([*verb, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "usage: mailbus" in shown
    assert len(shown.splitlines()) > 3


def test_the_installed_command_answers_help() -> None:
    """``python -m consumer`` is the ``mailbus`` command, help and all."""
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: mailbus" in result.stdout
    assert "worker" in result.stdout


async def test_send_before_any_topology_is_a_clear_error(settings: Settings) -> None:
    result = await mailbus(settings, *SEND, *["--to", "b@example.org", "--text", "x"])
    assert result.returncode == 1
    assert f"exchange {settings.prefix!r} does not exist" in result.stderr
    assert "mailbus topology declare" in result.stderr
    assert "Traceback" not in result.stderr


async def test_jobs_ls_show_cancel_and_reschedule(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    recipients = ["--to", "b@example.org", "--cc", "c@example.org", "--text", "x"]
    kept = await mailbus(settings, *SEND, *recipients, "--subject", "Kept", "--delay", "600")
    dropped = await mailbus(settings, *SEND, *recipients, "--subject", "Dropped", "--delay", "600")
    kept_id, dropped_id = kept.stdout.strip(), dropped.stdout.strip()
    for _ in range(100):
        listing = await mailbus(settings, "jobs", "ls", "--status", "scheduled")
        if kept_id in listing.stdout and dropped_id in listing.stdout:
            break
        await asyncio.sleep(0.1)
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "DUE", "(UTC)", "DOMAIN", "RCPTS", "SUBJECT"]
    row = next(r for r in rows if r.startswith(kept_id)).split()
    assert row[1] == "scheduled"
    assert row[4:] == ["example.com", "2", "Kept"]  # the due time is two words

    cancelled = await mailbus(settings, "jobs", "cancel", dropped_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    shown = await mailbus(settings, "jobs", "show", dropped_id)
    record = json.loads(shown.stdout)
    assert record["status"] == "cancelled"
    assert [h["event"] for h in record["history"]] == ["scheduled", "cancelled"]
    again = await mailbus(settings, "jobs", "cancel", dropped_id)
    assert again.returncode == 1
    assert "job is cancelled" in json.loads(again.stdout)["detail"]

    moved = await mailbus(settings, "jobs", "reschedule", kept_id, "--in", "1")
    assert moved.returncode == 0, moved.stderr
    async with asyncio.timeout(15):
        [mail] = await smtp.wait_for(1)
    assert mail.message()["Subject"] == "Kept"
    sent = await mailbus(settings, "jobs", "ls", "--status", "sent", "--json")
    assert [r["_id"] for r in json.loads(sent.stdout)] == [kept_id]

    unknown = await mailbus(settings, "jobs", "show", "no-such-job")
    assert unknown.returncode == 1
    assert "no job 'no-such-job'" in unknown.stderr
    naive = await mailbus(settings, "jobs", "reschedule", kept_id, "--at", "2030-01-01T09:00")
    assert naive.returncode == 2
    assert "timezone" in naive.stderr


async def test_listings_escape_what_a_terminal_would_act_on(
    settings: Settings, channel: AbstractChannel, worker: RunningWorker
) -> None:
    """A job id (the AMQP message id) and a subject are the producer's: printed, their
    terminal escapes and bidirectional overrides show as escapes, never act.
    """
    hostile_id = "evil\x1b]0;owned\x07\x9b2J"
    subject = "invoice \u202egpj.exe"
    body = job(subject=subject, send_at="2099-01-01T00:00:00+00:00")
    await publish_raw(channel, Names(settings.prefix), encode(body), message_id=hostile_id)
    for _ in range(100):
        listing = await mailbus(settings, "jobs", "ls", "--status", "scheduled")
        if "evil" in listing.stdout:
            break
        await asyncio.sleep(0.1)
    shown = await mailbus(settings, "jobs", "show", hostile_id)
    for output in (listing.stdout, shown.stdout):
        assert not any(c in output for c in "\x1b\x07\x9b\u202e")
    assert "evil\\x1b]0;owned\\x07\\x9b2J" in listing.stdout
    assert "invoice \\u202egpj.exe" in listing.stdout
    record = json.loads(shown.stdout)  # still JSON, with the same values
    assert (record["_id"], record["subject"]) == (hostile_id, subject)

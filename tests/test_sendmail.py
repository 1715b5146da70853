"""The sendmail transport: a local program gets each message, its exit status decides."""

from __future__ import annotations

import json
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.core.content import Content
from consumer.core.message import Job
from consumer.core.mime import build_message, serialize
from consumer.core.names import Names
from consumer.core.outboxes import Outbox
from consumer.errors import SendmailError
from consumer.mail.failures import classify
from consumer.mail.sendmail import SendmailPipe
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.processes import mailbus
from tests.broker import job, take, until
from tests.conftest import RunningWorker

# A stand-in for Postfix's sendmail: keeps each message and its arguments in a spool
# directory, and exits with the next status queued in exit-codes (0 once they run out).
FAKE_SENDMAIL = """\
import json, pathlib, sys
spool = pathlib.Path(__file__).parent / "spool"
spool.mkdir(exist_ok=True)
codes = pathlib.Path(__file__).parent / "exit-codes"
queued = codes.read_text().split() if codes.exists() else []
code = int(queued.pop(0)) if queued else 0
codes.write_text(" ".join(queued))
data = sys.stdin.buffer.read()
if code == 0:
    n = len(list(spool.glob("*.json")))
    (spool / f"{n}.json").write_text(json.dumps({"argv": sys.argv[1:], "data": data.decode()}))
else:
    print("simulated refusal", flush=True)
sys.exit(code)
"""


@pytest.fixture
def sendmail(tmp_path: Path) -> Path:
    """An executable fake sendmail program."""
    program = tmp_path / "sendmail"
    program.write_text(f"#!{sys.executable}\n{FAKE_SENDMAIL}")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return program


def spooled(program: Path) -> list[dict[str, object]]:
    """What the fake program accepted, in order."""
    spool = program.parent / "spool"
    files = sorted(spool.glob("*.json"), key=lambda f: int(f.stem)) if spool.exists() else []
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize(
    ("code", "transient"), [(75, True), (74, True), (-9, True), (67, False), (64, False)]
)
def test_exit_status_decides_retry(code: int, transient: bool) -> None:
    assert classify(SendmailError(code, "out")).transient is transient


async def test_jobs_go_through_a_sendmail_outbox(
    keyed: Settings, channel: AbstractChannel, sendmail: Path
) -> None:
    names = Names(keyed.prefix)
    added = await mailbus(
        keyed, "outbox", "add", "--domain", "example.com", "--name", "local",
        "--transport", "sendmail", "--sendmail-path", str(sendmail), "--timeout", "10",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert (await mailbus(keyed, "outbox", "test", "local")).stdout.startswith("OK local")

    exit_codes = sendmail.parent / "exit-codes"
    exit_codes.write_text("75")
    running = RunningWorker(keyed)
    try:
        body = job(id="piped", subject="Piped", to=["a@example.org"], bcc=["hidden@example.org"])
        await publish_job(channel, body, names=names)
        await until(lambda: _sent(keyed, "piped"), seconds=20)
        exit_codes.write_text("67")
        await publish_job(channel, job(id="refused", subject="Refused"), names=names)
        [dead] = await take(channel, names.dead, 1)
    finally:
        await running.shutdown()

    [accepted] = spooled(sendmail)
    assert accepted["argv"] == [
        "-i",
        "-f",
        "sender@example.com",
        "--",
        "a@example.org",
        "hidden@example.org",
    ]
    data = str(accepted["data"])
    assert "Subject: Piped\n" in data
    assert "hidden@example.org" not in data  # Bcc goes on the command line only
    assert "\r\n" not in data  # a local program gets local line ends
    assert dead.headers["x-mailbus-reason"] == "permanent"
    assert str(dead.headers["x-mailbus-error"]).startswith("sendmail exited with status 67")
    async with JobStore.connect(keyed) as jobs:
        record = await jobs.get("piped")
    assert record is not None
    assert (record["attempts"], record["outbox"]) == (2, "local")  # 75 first: retried


async def _sent(settings: Settings, job_id: str) -> bool:
    async with JobStore.connect(settings) as jobs:
        record = await jobs.get(job_id)
    return record is not None and record["status"] == "sent"


async def test_outbox_test_reports_a_missing_program(keyed: Settings, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-sendmail")
    await mailbus(
        keyed, "outbox", "add", "--domain", "example.com", "--name", "gone",
        "--transport", "sendmail", "--sendmail-path", missing,
    )  # fmt: skip
    tested = await mailbus(keyed, "outbox", "test", "gone")
    assert tested.returncode == 1
    assert f"FAILED gone: {missing} is not an executable program" in tested.stdout
    nohost = await mailbus(keyed, "outbox", "add", "--domain", "example.com", "--name", "x")
    assert nohost.returncode == 2
    assert "needs --host" in nohost.stderr


async def test_non_ascii_addresses_reach_the_program_in_utf8(sendmail: Path) -> None:
    outbox = Outbox("local", "", 0, transport="sendmail", command=str(sendmail), timeout=10)
    parsed = Job.model_validate(job(to=["Zoë <zoë@example.org>"], subject="Grüße"))
    message = build_message(parsed, "utf8", datetime.now(UTC), Content.of(parsed))
    mail = serialize(message, 10**6)
    await SendmailPipe(outbox, 1).send(mail, "sender@example.com", ["zoë@example.org"])
    [accepted] = spooled(sendmail)
    assert accepted["argv"] == ["-i", "-f", "sender@example.com", "--", "zoë@example.org"]
    data = str(accepted["data"])
    assert "To: Zoë <zoë@example.org>\n" in data  # as SMTPUTF8 has it: no encoded-words
    assert "Subject: Grüße\n" in data

"""The old SMTP mailer daemon's own end-to-end PHPUnit suites (basic, auth, ssl, auth-ssl),
run by phpunit against the daemon gateway and a worker, as they ran against the daemon.

The suites are the old project's: they are read from its folder beside the checkout
(``../shared/seeds/smtp-mailer``, or the folder ``SMTP_MAILER_SEEDS`` names), never copied
into this repository. Without that folder the test is skipped; a variable naming a folder
that does not exist fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest
from pydantic import SecretStr

from consumer.service.gateway import Listen
from consumer.settings import Settings
from consumer.vault import new_key
from deploy.devstack.ports import free_port
from deploy.devstack.processes import run_with
from deploy.devstack.tls import self_signed
from tests.conftest import RunningWorker
from tests.secret_watch import watched
from tests.serving import gateways

SEEDS_VARIABLE = "SMTP_MAILER_SEEDS"
BESIDE = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "smtp-mailer"
# Where the suites connect: fixed in their code.
LISTEN = Listen("127.0.0.1", 3333)
# A send's outcome must come before the suites' 3 s read timeout gives up on the answer.
WAIT_SECONDS = 2.0
# One suite's whole run: about 30 cases, each reading its answer for 3 s at most, most
# answered at once.
PHPUNIT_SECONDS = 40
# How much of a failure the report shows: its first lines, or of a diff, its headline and
# this many of the expected lines and of the actual ones.
SHOWN_LINES = 6

_QUEUE_FILES = "it reads the old daemon's own queue files on disk"
_QUEUE_LISTED = (
    "it expects the queue the old daemon's files make, after the suite deleted the queued "
    "mails' files behind the daemon's back; mailbus's queue is the domain's waiting jobs"
)
_FROM_LISTED = "it takes its queued mail's identifier from the old daemon's queue files on disk"
# Cases that cannot pass against mailbus whatever the gateway answers, by test method
# (the README's migration guide names them with the same reasons).
INAPPLICABLE = {
    "testCanMoveFailedSmtpEmailToQueue": _QUEUE_FILES,
    "testVerifyQueuedMailIsValid": _QUEUE_FILES,
    "testVerifyScheduledMailIsValid": _QUEUE_FILES,
    "testCanGetQueueList": _QUEUE_LISTED,
    "testCanGetQueuedListWithPagination": _QUEUE_LISTED,
    "testCanGetQueuedMail": _FROM_LISTED,
    "testCanUpdateQueuedMail": _FROM_LISTED,
    "testCanRemoveQueuedMail": _FROM_LISTED,
    "testCanClearAllQueuedMail": _QUEUE_LISTED,
    "testStatusResponseIsValid": (
        "the old daemon tried queued mail at its next queue scan (QUEUE_SCAN_INTERVAL = 60 "
        "s), after the suite asks; mailbus sends queued mail at once, so the failure of the "
        "queued mail to the unreachable SMTP host is counted as well (3 failed, not 2)"
    ),
}


@dataclass(frozen=True)
class Suite:
    """One suite: its PHPUnit file in test/e2e, and the daemon configuration (test/env) it
    ran against.
    """

    test: str
    env: str


SUITES = {
    "basic": Suite("ServiceBasicTest.php", "service-basic.env"),
    "auth": Suite("ServiceAuthTest.php", "service-auth.env"),
    "ssl": Suite("ServiceSslTest.php", "service-ssl.env"),
    "auth-ssl": Suite("ServiceAuthSslTest.php", "service-auth-ssl.env"),
}


def seeds_folder() -> Path | None:
    """The old project's folder: the one the variable names, else the one beside the
    checkout; None when neither is set or there.
    """
    named = os.environ.get(SEEDS_VARIABLE)
    if named:
        return Path(named)
    return BESIDE if BESIDE.is_dir() else None


SEEDS = seeds_folder()
pytestmark = pytest.mark.skipif(
    SEEDS is None,
    reason=f"the old SMTP mailer's suites are not at {BESIDE} ({SEEDS_VARIABLE} unset)",
)


@pytest.fixture
def seeds() -> Path:
    """The old project's folder, which must exist once named."""
    assert SEEDS is not None  # skipped otherwise
    if not SEEDS.is_dir():
        pytest.fail(f"{SEEDS_VARIABLE} names {SEEDS}, which is not a folder", pytrace=False)
    return SEEDS


def daemon_config(path: Path) -> dict[str, str]:
    """The ``KEY = value`` lines of one of the daemon's env files (values "quoted" or
    bare, ``;`` comments dropped).
    """
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r'\s*([A-Z][A-Z0-9_]*)\s*=\s*(?:"([^"]*)"|([^;]*))', line)
        if match:
            found[match[1]] = match[2] if match[2] is not None else match[3].strip()
    return found


@pytest.fixture
def settings(settings: Settings, seeds: Path, suite: str, tmp_path: Path) -> Settings:
    """The gateway configured as the suite's daemon was: its sender, its password hash (an
    open gateway without one), TLS with a self-signed certificate for ``ssl``; the domain's
    outbox unreachable, as the env files' SMTP host was.
    """
    config = daemon_config(seeds / "test" / "env" / SUITES[suite].env)
    sender = config["MAIL_FROM_ADDR"]
    auth = config["MAILER_AUTH"] == "true"
    update: dict[str, object] = {
        "gateway_domain": sender.rpartition("@")[2],
        "gateway_from": f"{config['MAIL_FROM_NAME']} <{sender}>",
        "gateway_password_hash": SecretStr(config["MAILER_AUTH_HASH"]) if auth else None,
        "gateway_wait_seconds": WAIT_SECONDS,
        "default_smtp_url": SecretStr(f"smtp://127.0.0.1:{free_port()}"),
        # The suites' addresses are at example.test, and their requests may name an SMTP
        # server of their own (whose password is sealed with the secret key).
        "allow_special_use_domains": True,
        "gateway_smtp_overrides": True,
        "secret_key": settings.secret_key or SecretStr(watched(new_key())),
    }
    # The suite writes its templates to the old template folder, in its copy.
    update["gateway_template_dir"] = suite_copy_of(tmp_path) / "test" / "env" / "Template" / "html"
    if config["MAILER_PROTO"] == "ssl":
        (tmp_path / "tls").mkdir()
        update["gateway_tls_cert"], update["gateway_tls_key"] = self_signed(tmp_path / "tls")
    return settings.model_copy(update=update)


def suite_copy_of(into: Path) -> Path:
    """Where :func:`suite_copy` copies the old project's folder."""
    return into / "smtp-mailer"


def suite_copy(seeds: Path, into: Path) -> Path:
    """A copy of the old project's folder with the directories the suites write to."""
    copy = shutil.copytree(seeds, suite_copy_of(into))
    for directory in ("Queue/mail", "Queue/temp", "Template/html"):
        (copy / "test" / "env" / directory).mkdir(parents=True, exist_ok=True)
    return copy


async def phpunit(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``phpunit ARGS`` without the seeds' configuration (it wants their vendor/ autoload
    and stops at the first failure); killed when it runs over its time.
    """
    command = ("phpunit", "--no-configuration", "--do-not-cache-result", *args)
    try:
        return await run_with(settings, *command, kill_after=PHPUNIT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"phpunit ran over {PHPUNIT_SECONDS} s and was killed:\n{exc.stdout}", pytrace=False
        )


def case_name(method: str, data_set: str | None) -> str:
    """A case as phpunit's JUnit report names it: a data-provider case is one case."""
    if data_set is None:
        return method
    shown = data_set if data_set.startswith("#") else f'"{data_set}"'
    return f"{method} with data set {shown}"


def declared_cases(listing: Path) -> list[str]:
    """The cases in phpunit's ``--list-tests-xml`` listing, data sets apart."""
    root = ElementTree.parse(listing).getroot()  # noqa: S314 (phpunit wrote it, here)
    return [
        case_name(method.attrib["name"], method.get("dataSet"))
        for method in root.iter("testCaseMethod")
    ]


def failure_lines(text: str) -> list[str]:
    """The telling lines of a JUnit failure: not the case's name, nor the stack; of a
    diff, its headline and the changed lines.
    """
    lines = [line for line in text.strip().splitlines()[1:] if line.strip()]
    lines = [line for line in lines if not re.fullmatch(r"/\S+:\d+", line)]
    if "--- Expected" not in lines:
        return lines[:SHOWN_LINES]
    diff = lines[lines.index("--- Expected") + 2 :]
    expected = [line for line in diff if line.startswith("-")][:SHOWN_LINES]
    actual = [line for line in diff if line.startswith("+")][:SHOWN_LINES]
    return [*lines[: lines.index("--- Expected")], *expected, *actual]


# What a JUnit case holds when it did not pass (beside any system-out it printed).
OUTCOMES = frozenset({"failure", "error", "warning", "skipped"})


def run_cases(report: Path) -> dict[str, list[str] | None]:
    """Each case in phpunit's JUnit report: None when it passed, else why not."""
    root = ElementTree.parse(report).getroot()  # noqa: S314 (phpunit wrote it, here)
    cases: dict[str, list[str] | None] = {}
    for case in root.iter("testcase"):
        outcome = next((child for child in case if child.tag in OUTCOMES), None)
        if outcome is None:
            cases[case.attrib["name"]] = None
        elif outcome.tag == "skipped":
            cases[case.attrib["name"]] = ["skipped (a case it depends on did not pass)"]
        else:
            cases[case.attrib["name"]] = failure_lines(outcome.text or outcome.tag)
    return cases


@pytest.mark.parametrize("suite", SUITES)
async def test_the_old_daemon_suite_passes_against_the_gateway(
    suite: str, seeds: Path, settings: Settings, worker: RunningWorker, tmp_path: Path
) -> None:
    assert shutil.which("phpunit"), "phpunit is missing: deploy/devstack/bootstrap.sh installs it"
    copy = suite_copy(seeds, tmp_path)
    test_file = str(copy / "test" / "e2e" / SUITES[suite].test)
    listing, report = tmp_path / "declared.xml", tmp_path / "junit.xml"
    listed = await phpunit(settings, "--list-tests-xml", str(listing), test_file)
    assert listing.is_file(), f"phpunit listed no cases:\n{listed.stdout}{listed.stderr}"
    declared = declared_cases(listing)
    assert declared, f"{SUITES[suite].test} declares no case"
    async with gateways(settings, daemon=LISTEN):
        ran = await phpunit(settings, "--log-junit", str(report), test_file)
    assert report.is_file(), f"phpunit wrote no report:\n{ran.stdout}{ran.stderr}"
    cases = run_cases(report)
    assert sorted(cases) == sorted(declared), (
        f"phpunit ran {len(cases)} of the {len(declared)} cases {SUITES[suite].test} declares:"
        f"\n{ran.stdout}{ran.stderr}"
    )
    applicable = {
        name: why
        for name, why in cases.items()
        if name.partition(" with data set ")[0] not in INAPPLICABLE
    }
    failing = {name: why for name, why in applicable.items() if why is not None}
    if failing:
        listed = "".join(
            f"\n  {name}" + "".join(f"\n      {line}" for line in why)
            for name, why in failing.items()
        )
        pytest.fail(
            f"{SUITES[suite].test}: {len(failing)} of {len(applicable)} cases failed (not "
            f"counted, as inapplicable: {', '.join(INAPPLICABLE)}):{listed}",
            pytrace=False,
        )

"""The README's two commands: ``make run`` shows a mail go through; CI runs ``make test``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest


@pytest.mark.stack
def test_make_run_starts_the_stack_and_delivers_the_demo_mail(
    repo_root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "devstack"
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "run", f"STATE={state}"],
            cwd=repo_root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while b"SMTP capture received" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        env_file = state / "mailbus.env"
        sent = subprocess.run(
            [
                str(repo_root / ".venv/bin/mailbus"),
                "--env-file",
                str(env_file),
                "send",
                "--domain",
                "example.com",
                "--from",
                "you@example.com",
                "--to",
                "someone@example.org",
                "--subject",
                "Hi",
                "--text",
                "Hello",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        while len(list((state / "mail").glob("*.eml"))) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    output = log.read_text()
    assert "Subject 'Hello from mailbus ✉'" in output
    assert "Subject 'Hi'" in output
    assert "dev stack stopped" in output
    assert "worker.stopped" in output
    # make itself reports Ctrl-C as death by SIGINT; the stack below it stopped cleanly.
    assert proc.returncode in (0, -signal.SIGINT), output
    # Nothing of the stack outlives it.
    leftovers = subprocess.run(
        ["pgrep", "-f", str(state)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == ""


def test_readme_commands_are_the_ones_ci_and_users_run(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    ci = (repo_root / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
    assert "\nmake run\n" in readme
    assert "\nmake test\n" in readme

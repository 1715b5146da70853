"""Running ``mailbus`` as a real process (tests, benchmarks), configured by its environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from consumer.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``MAILBUS_*`` environment equivalent to ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBUS_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(str(v) for v in value) if value else "[]"
        env[f"MAILBUS_{name.upper()}"] = str(value)
    return env


def spawn_worker(
    settings: Settings, log: Path, extra_env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``mailbus worker`` with ``settings`` (and ``extra_env``, for a test that
    fakes its clock, say); its output goes to ``log``.
    """
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "consumer", "--env-file", os.devnull, "worker"],
            env={**settings_env(settings), **(extra_env or {})},
            stdout=out,
            stderr=out,
        )


async def run_with(
    settings: Settings,
    *command: str,
    input: str | None = None,
    cwd: Path | None = None,
    kill_after: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with ``settings`` as its ``MAILBUS_*`` environment, output captured;
    killed after ``kill_after`` seconds."""
    return await asyncio.to_thread(
        subprocess.run,
        command,
        env=settings_env(settings),
        input=input,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=kill_after,
        check=False,
    )


async def mailbus(
    settings: Settings, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``mailbus ARGS`` with ``settings`` in its environment (and ``input`` on stdin)."""
    return await run_with(settings, sys.executable, "-m", "consumer", *args, input=input)


async def stop_workers(*workers: subprocess.Popen[bytes]) -> None:
    """SIGTERM every worker at once (each drains), then wait for all of them."""
    for process in workers:
        process.terminate()
    for process in workers:
        await asyncio.to_thread(process.wait, 30)

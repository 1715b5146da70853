"""Postfix's ``smtp-sink`` (C) as the benchmarks' SMTP server, so the sink is never the
bottleneck, and ``smtp-source`` as the machine's C ceiling.

Both come with Debian's ``postfix`` package; the MTA itself is never configured or run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time

from deploy.devstack.ports import free_port

_COUNTER = re.compile(rb"mesg=(\d+)")


def postfix_tool(name: str) -> str:
    """The path of ``smtp-sink`` or ``smtp-source``; raises when postfix is not installed."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FileNotFoundError(
            f"{name} is not installed: run `bash deploy/devstack/bootstrap.sh bench` "
            "(Debian's postfix package; the MTA is not started)"
        )
    return found


class SmtpSink:
    """``smtp-sink`` on a free loopback port, counting the mails it has accepted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self._changed = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The sink's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        """An outbox URL for the sink (plain SMTP: it offers STARTTLS but cannot do it)."""
        return f"smtp://127.0.0.1:{self.port}?security=none"

    async def start(self) -> None:
        """Start listening; returns once connections are accepted."""
        command = [postfix_tool("smtp-sink"), "-c"]
        if os.geteuid() == 0:  # it refuses to run as root without a user to become
            command += ["-u", "nobody"]
        command += [f"127.0.0.1:{self.port}", "1024"]
        self._process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        self._reader = asyncio.create_task(self._count(self._process))
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return

    async def _count(self, process: asyncio.subprocess.Process) -> None:
        """Follow the running counter ``-c`` prints (``... mesg=N``, carriage returns)."""
        assert process.stdout is not None
        tail = b""
        while chunk := await process.stdout.read(65536):
            tail = (tail + chunk)[-256:]
            found = _COUNTER.findall(tail)
            if found:
                self.accepted = int(found[-1])
                self._changed.set()

    async def wait_for(self, count: int, seconds: float) -> float:
        """Wait until ``count`` mails in all were accepted; the ``time.perf_counter()``
        at which the count was seen. Raises ``TimeoutError`` after ``seconds``.
        """
        async with asyncio.timeout(seconds):
            while self.accepted < count:
                self._changed.clear()
                await self._changed.wait()
        return time.perf_counter()

    async def stop(self) -> None:
        """Stop the sink and its reader."""
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()
        if self._reader is not None:
            await self._reader


async def smtp_source(port: int, count: int, sessions: int, size: int) -> float:
    """Mails per second ``smtp-source`` sends to 127.0.0.1:``port`` over ``sessions``
    persistent connections, ``size`` bytes of body each.
    """
    command = [postfix_tool("smtp-source"), "-d", "-s", str(sessions), "-m", str(count)]
    command += ["-l", str(size), f"127.0.0.1:{port}"]
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(300):
        _, errors = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {errors.decode(errors='replace')}")
    return count / (time.perf_counter() - started)

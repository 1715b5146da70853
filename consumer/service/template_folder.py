"""The old daemon's template directory (its ``EMAIL_TEMPLATE_DIR``), kept by the daemon
gateway when ``MAILBUS_GATEWAY_TEMPLATE_DIR`` names it: each file is the current version of
the gateway domain's template of that name in the template store, which workers render
from. Operators who deployed templates by copying files there keep doing so; the
gateway's template requests write and remove the files, as the daemon's did.

The folder is read again before each template request and each mail that uses a template,
so what a client or a deploy wrote is what the next mail renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from consumer.core.legacy import body_fields
from consumer.core.message import TEMPLATE_NAME_PATTERN
from consumer.core.refusals import TemplateError
from consumer.core.templates import Template
from consumer.logging import get_logger
from consumer.store.templates import TemplateStore

log = get_logger(__name__)
# What one folder may cost a read: its files, each file's bytes.
MAX_FILES = 1000
MAX_FILE_BYTES = 1024 * 1024
# A file name that is a template name (no path, no hidden or special file).
_NAME = re.compile(TEMPLATE_NAME_PATTERN)


def template_file_name(value: object) -> str | None:
    """``value`` if it can name a template file in the folder, else None."""
    if isinstance(value, str) and _NAME.fullmatch(value) and not value.startswith("."):
        return value
    return None


@dataclass(frozen=True)
class _Read:
    """The folder's template files: their contents by name, and the names skipped."""

    contents: dict[str, str]
    skipped: dict[str, str]


def _read(folder: Path) -> _Read:
    contents: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = template_file_name(entry.name)
            if name is None or not entry.is_file(follow_symlinks=False):
                continue
            if len(contents) >= MAX_FILES:
                skipped[name] = f"over {MAX_FILES} template files"
                continue
            if entry.stat(follow_symlinks=False).st_size > MAX_FILE_BYTES:
                skipped[name] = f"larger than {MAX_FILE_BYTES} bytes"
                continue
            try:
                contents[name] = Path(entry.path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                skipped[name] = str(exc)
    return _Read(contents, skipped)


def _body(template: Template) -> str | None:
    return template.html if template.html is not None else template.text


class TemplateFolder:
    """The gateway domain's templates as the files of one folder."""

    def __init__(self, folder: Path, store: TemplateStore, domain: str) -> None:
        self.folder = folder
        self.store = store
        self.domain = domain
        self._lock = asyncio.Lock()  # one reconciliation at a time

    async def sync(self) -> None:
        """Make the domain's stored templates what the folder holds: a changed file is a
        new version, a removed file a removed template. A file that does not compile, or
        whose name another domain's template has, is left out (and logged).
        """
        async with self._lock:
            found = await asyncio.to_thread(_read, self.folder)
            for name, why in found.skipped.items():
                log.warning("gateway.template_file_skipped", name=name, error=why)
            stored, _ = await self.store.names(self.domain, 0, MAX_FILES + 1)
            for name in set(stored) - found.contents.keys():
                await self.store.remove(name, domain=self.domain)
            for name, content in found.contents.items():
                await self._keep(name, content)

    async def _keep(self, name: str, content: str) -> None:
        current = await self.store.owned(name, self.domain)
        if current is not None and _body(current) == content:
            return
        if current is None and await self.store.get(name) is not None:
            log.warning("gateway.template_file_skipped", name=name, error="name taken")
            return
        parts = body_fields(content)
        try:
            await self.store.put(name, "", parts.get("text"), parts.get("html"), domain=self.domain)
        except TemplateError as exc:
            log.warning("gateway.template_file_skipped", name=name, error=str(exc))

    async def write(self, name: str, content: str) -> None:
        """Write ``name``'s file (the name checked by :func:`template_file_name`)."""
        path = self.folder / name
        await asyncio.to_thread(path.write_text, content, encoding="utf-8")

    async def delete(self, name: str) -> bool:
        """Remove ``name``'s file; False if there was none."""
        try:
            await asyncio.to_thread((self.folder / name).unlink)
        except FileNotFoundError:
            return False
        return True

    async def clear(self) -> int:
        """Remove every template file; returns how many there were."""
        found = await asyncio.to_thread(_read, self.folder)
        removed = 0
        for name in (*found.contents, *found.skipped):
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread((self.folder / name).unlink)
                removed += 1
        return removed

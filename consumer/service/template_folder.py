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
import tempfile
from dataclasses import dataclass
from pathlib import Path

from consumer.core.legacy import body_fields
from consumer.core.message import TEMPLATE_NAME_PATTERN
from consumer.core.refusals import TemplateError
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


# What identifies a file's content without reading it: unchanged, it is not read again.
_Stamp = tuple[int, int, int]  # inode, size, modification time (ns)


@dataclass(frozen=True)
class _Listing:
    """The folder's template files by name with their stamps, and the names skipped."""

    files: dict[str, _Stamp]
    skipped: dict[str, str]


def _list(folder: Path) -> _Listing:
    files: dict[str, _Stamp] = {}
    skipped: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = template_file_name(entry.name)
            if name is None or not entry.is_file(follow_symlinks=False):
                continue  # links are not followed: a file here is a file here
            stat = entry.stat(follow_symlinks=False)
            if len(files) >= MAX_FILES:
                skipped[name] = f"over {MAX_FILES} template files"
            elif stat.st_size > MAX_FILE_BYTES:
                skipped[name] = f"larger than {MAX_FILE_BYTES} bytes"
            else:
                files[name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return _Listing(files, skipped)


def _write(path: Path, content: str) -> None:
    """Write ``path`` whole or not at all, replacing it (a link is replaced, never
    followed): a reader sees the old file or the new one.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


class TemplateFolder:
    """The gateway domain's templates as the files of one folder."""

    def __init__(self, folder: Path, store: TemplateStore, domain: str) -> None:
        self.folder = folder
        self.store = store
        self.domain = domain
        self._lock = asyncio.Lock()  # one reconciliation at a time
        self._synced: dict[str, _Stamp] = {}  # the files as last taken up

    async def sync(self) -> None:
        """Make the domain's stored templates what the folder holds: a changed file is a
        new version, a removed file a removed template. A file that cannot be taken (too
        large, unreadable, not compiling, its name another's) is left out and logged, its
        stored template kept; a folder that cannot be read changes nothing.
        """
        async with self._lock:
            try:
                found = await asyncio.to_thread(_list, self.folder)
            except OSError as exc:
                log.warning("gateway.template_folder_unreadable", error=str(exc))
                return
            for name, why in found.skipped.items():
                log.warning("gateway.template_file_skipped", name=name, error=why)
            stored, _ = await self.store.names(self.domain, 0, MAX_FILES + 1)
            for name in set(stored) - found.files.keys() - found.skipped.keys():
                await self.store.remove(name, domain=self.domain)
            self._synced = {
                name: stamp for name, stamp in self._synced.items() if name in found.files
            }
            for name, stamp in found.files.items():
                if self._synced.get(name) != stamp:
                    await self._take(name, stamp)

    async def _take(self, name: str, stamp: _Stamp) -> None:
        """Make the file ``name`` the current version of its template."""
        try:
            content = await asyncio.to_thread((self.folder / name).read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("gateway.template_file_skipped", name=name, error=str(exc))
            return
        current = await self.store.owned(name, self.domain)
        if current is None and await self.store.get(name) is not None:
            log.warning("gateway.template_file_skipped", name=name, error="name taken")
            return
        if current is None or current.body != content:
            parts = body_fields(content)
            try:
                await self.store.put(
                    name, "", parts.get("text"), parts.get("html"), domain=self.domain
                )
            except TemplateError as exc:
                log.warning("gateway.template_file_skipped", name=name, error=str(exc))
                return
        self._synced[name] = stamp

    async def write(self, name: str, content: str) -> None:
        """Write ``name``'s file (the name checked by :func:`template_file_name`), whole."""
        await asyncio.to_thread(_write, self.folder / name, content)

    async def delete(self, name: str) -> None:
        """Remove ``name``'s file, if there is one."""
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread((self.folder / name).unlink)

    async def clear(self) -> None:
        """Remove every template file."""
        found = await asyncio.to_thread(_list, self.folder)
        for name in (*found.files, *found.skipped):
            await self.delete(name)

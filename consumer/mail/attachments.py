"""A job's attachments read into memory: inline base64, a local file inside the allowed
directories, or a URL (see :mod:`consumer.mail.fetch`). Every refusal is an
:class:`~consumer.core.refusals.AttachmentError` naming the attachment.

What a job may make a worker hold is bounded before it is spent: the number of
attachments and the sizes they declare (inline data, files on disk) are checked before
any is read, a running total holds while they load, and URLs are fetched a few at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import mimetypes
import os
import stat
import unicodedata
from collections.abc import Sequence
from pathlib import Path, PurePath, PurePosixPath

from consumer.core.content import Part
from consumer.core.message import Attachment
from consumer.core.refusals import AttachmentError, DeadLetterError
from consumer.errors import AttachmentUnavailableError, StoreUnavailableError
from consumer.mail.fetch import Fetcher, shown_url

OCTET_STREAM = "application/octet-stream"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Non-blocking: a FIFO swapped in must not hang the open (it is refused after fstat).
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What opening beneath a directory meets where a symlink or a file replaced a directory.
_SWAPPED = frozenset({errno.ELOOP, errno.ENOTDIR})
# Base64 writes 3 bytes as 4: attachments beyond this share of the message limit can
# never make a message that fits in it.
BASE64_SHARE = (3, 4)
# The longest file name most file systems take, in bytes of UTF-8.
MAX_FILENAME_BYTES = 255
# Control and format characters, line and paragraph separators, surrogates: none belongs
# in a file name that becomes a header parameter.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def mime_type(declared: str | None, filename: str | None, served: str | None = None) -> str:
    """The content type to label a part with: the job's, else the server's (unless it is
    only octet-stream), else a guess from the filename, else octet-stream.
    """
    if declared:
        return declared.lower()
    served_type = (served or "").split(";", 1)[0].strip().lower()
    if served_type.count("/") == 1 and served_type != OCTET_STREAM:
        return served_type
    guessed = mimetypes.guess_type(filename or "", strict=False)[0]
    return guessed or OCTET_STREAM


def attachment_budget(max_message_bytes: int) -> int:
    """The most bytes a job's attachments may hold together: what base64 can fit in a
    message of ``max_message_bytes``. Checked before reading (a message built from more
    would be refused ``too_large`` only after costing several times its size).
    """
    kept, written = BASE64_SHARE
    return max_message_bytes * kept // written


def clean_filename(raw: str | None) -> str | None:
    """A file name from outside the job (a server's, a file's on disk) made safe to label
    a part with: control and format characters, separators and surrogates become ``_``,
    path separators too, and a name over 255 bytes is shortened (keeping a short
    extension). None when nothing is left.
    """
    if not raw:
        return None
    name = "".join(
        "_" if c in "/\\" or unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in raw
    ).strip(" .")
    if len(name.encode()) > MAX_FILENAME_BYTES:
        suffix = PurePosixPath(name).suffix
        suffix = suffix if len(suffix.encode()) <= 16 else ""
        room = MAX_FILENAME_BYTES - len(suffix.encode())
        stem = name[: len(name) - len(suffix)] if suffix else name
        name = stem.encode()[:room].decode(errors="ignore") + suffix
    return name or None


def inline_size(att: Attachment) -> int:
    """The most bytes a ``content_b64`` attachment decodes to, known without decoding."""
    return len(att.content_b64 or "") // 4 * 3


def decode_inline(att: Attachment, max_bytes: int) -> bytes:
    """The bytes of a ``content_b64`` attachment, refused beyond ``max_bytes``."""
    encoded = att.content_b64 or ""
    if inline_size(att) > max_bytes + 2:  # refuse before decoding a huge string
        raise AttachmentError(f"attachment {_label(att)}: more than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise AttachmentError(f"attachment {_label(att)}: invalid base64") from None
    if len(data) > max_bytes:
        raise AttachmentError(f"attachment {_label(att)}: more than the limit of {max_bytes} bytes")
    return data


def allowed_path(raw: str, dirs: Sequence[Path]) -> Path:
    """The real path of ``raw`` if it lies inside one of ``dirs``; raises otherwise.

    Symlinks and ``..`` are resolved before the check, so neither can lead outside. A
    relative path is looked up in each directory in turn. Nothing outside is opened.
    """
    if not dirs:
        raise AttachmentError(f"path {raw!r}: path attachments are off (MAILBUS_ATTACHMENT_DIRS)")
    try:
        roots = [d.resolve() for d in dirs]
        given = Path(raw)
        candidates = [given] if given.is_absolute() else [root / given for root in roots]
        inside = [
            real
            for real in (candidate.resolve() for candidate in candidates)
            if any(real.is_relative_to(root) for root in roots)
        ]
        if not inside:
            raise AttachmentError(f"path {raw!r} is outside MAILBUS_ATTACHMENT_DIRS")
        for real in inside:
            if real.exists():
                return real
    # A name too long, a loop of links, a symlink removed while it was resolved: nothing
    # a retry changes.
    except OSError as exc:
        raise AttachmentError(f"path {raw!r}: {exc.strerror or exc}") from None
    raise AttachmentError(f"path {raw!r}: no such file")


def file_size(path: Path) -> int:
    """The size of the file at ``path`` as it is now, before it is read."""
    try:
        return path.stat().st_size
    except OSError as exc:
        raise AttachmentError(f"path {str(path)!r}: {exc.strerror or exc}") from None


def open_beneath(root: Path, relative: PurePath) -> int:
    """A read-only descriptor for ``relative`` beneath the directory ``root``, opened one
    component at a time from the directory before it and following no symlink: a
    directory or file swapped for a symlink after the path was checked makes the open
    fail rather than lead outside (what Linux's ``openat2`` with ``RESOLVE_BENEATH`` does;
    Python does not offer it). ``root`` itself, the operator's, may be a symlink.
    Raises OSError.
    """
    if ".." in relative.parts:
        raise ValueError(f"{relative} leads upwards")
    *directories, name = relative.parts or (".",)
    dir_fd = os.open(root, _DIRECTORY)
    try:
        for part in directories:
            inner = os.open(part, _DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = inner
        return os.open(name, _FILE, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def read_local(path: Path, dirs: Sequence[Path], max_bytes: int) -> bytes:
    """Read the regular file at ``path``, a real path :func:`allowed_path` found inside
    one of ``dirs``, opened beneath that directory (see :func:`open_beneath`); oversize
    files are refused.
    """
    root = next(real for real in (d.resolve() for d in dirs) if path.is_relative_to(real))
    try:
        fd = open_beneath(root, path.relative_to(root))
    except OSError as exc:
        changed = " (it changed after it was checked)" if exc.errno in _SWAPPED else ""
        raise AttachmentError(f"path {str(path)!r}: {exc.strerror}{changed}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AttachmentError(f"path {str(path)!r} is not a regular file")
        if info.st_size > max_bytes:
            raise AttachmentError(
                f"path {str(path)!r}: {info.st_size} bytes is more than the limit of {max_bytes}"
            )
        # A byte past what it said tells a file that is growing; no more is read.
        data = file.read(info.st_size + 1)
    if len(data) > info.st_size:
        raise AttachmentUnavailableError(f"path {str(path)!r}: the file grew while it was read")
    return data


def _label(att: Attachment) -> str:
    return repr(att.filename or att.cid or (att.url and shown_url(att.url)) or att.path or "")


class _Tally:
    """The running total of the bytes a job's attachments have taken so far."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)

    def add(self, size: int, label: str) -> None:
        self.used += size
        if self.used > self.limit:
            raise AttachmentError(
                f"attachment {label}: the attachments are more than the limit of {self.limit}"
                " bytes together (their base64 must fit in MAILBUS_MAX_MESSAGE_BYTES)"
            )


class AttachmentLoader:
    """Reads each attachment of a job from wherever it says it is, within bounds: at most
    ``max_count`` attachments, ``max_bytes`` each, ``max_total`` together, ``concurrency``
    URL fetches at once.
    """

    def __init__(
        self,
        dirs: Sequence[Path],
        max_bytes: int,
        fetcher: Fetcher,
        *,
        max_count: int = 100,
        max_total: int | None = None,
        concurrency: int = 4,
    ) -> None:
        self.dirs = tuple(dirs)
        self.max_bytes = max_bytes
        self.fetcher = fetcher
        self.max_count = max_count
        self.max_total = max_total if max_total is not None else max_bytes * max_count
        self._fetching = asyncio.Semaphore(concurrency)

    def _declared(self, att: Attachment) -> tuple[Path | None, int]:
        """Where a path attachment is and how big, and the size inline data declares;
        a URL's is not known before it is fetched.
        """
        if att.content_b64 is not None:
            return None, inline_size(att)
        if att.path is not None:
            path = allowed_path(att.path, self.dirs)
            return path, file_size(path)
        return None, 0

    async def load(
        self, att: Attachment, path: Path | None = None, tally: _Tally | None = None
    ) -> Part:
        """One attachment's bytes and labels; raises ``AttachmentError`` or, for a URL that
        may work later, ``AttachmentUnavailableError``. ``path``: where a path attachment
        was found already; ``tally``: the job's running total, which it counts against.
        """
        tally = tally or _Tally(self.max_total)
        label = _label(att)
        try:
            part = await self._load(att, path, tally)
        except (DeadLetterError, AttachmentUnavailableError, StoreUnavailableError):
            raise
        except Exception as exc:  # whatever reading it raises, the job is at fault
            raise AttachmentError(f"attachment {label}: {type(exc).__name__}: {exc}") from None
        tally.add(len(part.data), label)
        return part

    async def _load(self, att: Attachment, path: Path | None, tally: _Tally) -> Part:
        served = None
        cap = min(self.max_bytes, tally.remaining)
        if att.content_b64 is not None:
            data, filename = decode_inline(att, self.max_bytes), att.filename
        elif att.path is not None:
            path = path or allowed_path(att.path, self.dirs)
            # Refused when larger than what the total still allows; read to its size only.
            data = await asyncio.to_thread(read_local, path, self.dirs, cap)
            filename = att.filename or clean_filename(path.name)
        else:
            assert att.url is not None  # the model requires exactly one source
            async with self._fetching:
                fetched = await self.fetcher.fetch(att.url, max(tally.remaining, 1))
            data, served = fetched.data, fetched.content_type
            filename = att.filename or clean_filename(fetched.filename)
        content_type = mime_type(att.content_type, filename, served)
        return Part(data, content_type, filename, att.cid if att.inline else None)

    async def load_all(self, attachments: Sequence[Attachment]) -> list[Part]:
        """Every attachment, in order; URLs fetched ``concurrency`` at a time. The count
        and the declared sizes are checked before anything is read.
        """
        if len(attachments) > self.max_count:
            raise AttachmentError(
                f"{len(attachments)} attachments, more than the limit of {self.max_count}"
                " (MAILBUS_MAX_ATTACHMENTS)"
            )
        declared = [self._declared(att) for att in attachments]
        total = sum(size for _, size in declared)
        if total > self.max_total:
            raise AttachmentError(
                f"the attachments declare {total} bytes, more than the limit of"
                f" {self.max_total} together (their base64 must fit in MAILBUS_MAX_MESSAGE_BYTES)"
            )
        tally = _Tally(self.max_total)
        tasks = [
            asyncio.create_task(self.load(att, path, tally))
            for att, (path, _) in zip(attachments, declared, strict=True)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # One refused: the others stop, and nothing is left running behind the job.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

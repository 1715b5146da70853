"""A job's attachments read into memory: inline base64, a local file inside the allowed
directories, or a URL (see :mod:`consumer.fetch`). Every refusal is an
:class:`~consumer.errors.AttachmentError` naming the attachment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import mimetypes
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from consumer.errors import AttachmentError
from consumer.fetch import Fetcher, shown_url
from consumer.message import Attachment

OCTET_STREAM = "application/octet-stream"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Non-blocking: a FIFO swapped in must not hang the open (it is refused after fstat).
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What opening beneath a directory meets where a symlink or a file replaced a directory.
_SWAPPED = frozenset({errno.ELOOP, errno.ENOTDIR})


@dataclass(frozen=True)
class Part:
    """An attachment's bytes and how to label them; ``cid`` is set for inline images."""

    data: bytes
    content_type: str
    filename: str | None
    cid: str | None = None


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


def decode_inline(att: Attachment, max_bytes: int) -> bytes:
    """The bytes of a ``content_b64`` attachment, refused beyond ``max_bytes``."""
    encoded = att.content_b64 or ""
    if len(encoded) // 4 * 3 > max_bytes + 2:  # refuse before decoding a huge string
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
    roots = [d.resolve() for d in dirs]
    given = Path(raw)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    try:
        reals = [candidate.resolve() for candidate in candidates]
    except OSError as exc:  # a symlink removed while it was being resolved
        raise AttachmentError(f"path {raw!r}: {exc.strerror} (it changed while checked)") from None
    inside = [real for real in reals if any(real.is_relative_to(root) for root in roots)]
    if not inside:
        raise AttachmentError(f"path {raw!r} is outside MAILBUS_ATTACHMENT_DIRS")
    for real in inside:
        if real.exists():
            return real
    raise AttachmentError(f"path {raw!r}: no such file")


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
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise AttachmentError(f"path {str(path)!r}: more than the limit of {max_bytes} bytes")
    return data


def _label(att: Attachment) -> str:
    return repr(att.filename or att.cid or (att.url and shown_url(att.url)) or att.path or "")


class AttachmentLoader:
    """Reads each attachment of a job from wherever it says it is."""

    def __init__(self, dirs: Sequence[Path], max_bytes: int, fetcher: Fetcher) -> None:
        self.dirs = tuple(dirs)
        self.max_bytes = max_bytes
        self.fetcher = fetcher

    async def load(self, att: Attachment) -> Part:
        """One attachment's bytes and labels; raises ``AttachmentError`` or, for a URL that
        may work later, ``AttachmentUnavailableError``.
        """
        served = None
        if att.content_b64 is not None:
            data, filename = decode_inline(att, self.max_bytes), att.filename
        elif att.path is not None:
            path = allowed_path(att.path, self.dirs)
            data = await asyncio.to_thread(read_local, path, self.dirs, self.max_bytes)
            filename = att.filename or path.name
        else:
            assert att.url is not None  # the model requires exactly one source
            fetched = await self.fetcher.fetch(att.url)
            data, served = fetched.data, fetched.content_type
            filename = att.filename or fetched.filename
        content_type = mime_type(att.content_type, filename, served)
        return Part(data, content_type, filename, att.cid if att.inline else None)

    async def load_all(self, attachments: Sequence[Attachment]) -> list[Part]:
        """Every attachment, in order."""
        return [await self.load(att) for att in attachments]

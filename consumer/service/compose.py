"""What a job's mail says: its subject and bodies (from the job or a stored template) and
its attachments, gathered before the message is built.
"""

from __future__ import annotations

import asyncio

from consumer.core.content import Content
from consumer.core.message import Job
from consumer.core.refusals import DeadLetterError, TemplateError
from consumer.core.templates import render
from consumer.errors import AttachmentUnavailableError, StoreUnavailableError
from consumer.mail.attachments import AttachmentLoader
from consumer.store.templates import TemplateStore


class Composer:
    """Renders templates and loads attachments for a job, all within one deadline."""

    def __init__(
        self,
        templates: TemplateStore,
        loader: AttachmentLoader,
        max_chars: int,
        *,
        timeout: float = 180.0,
    ) -> None:
        self.templates = templates
        self.loader = loader
        self.max_chars = max_chars
        self.timeout = timeout

    async def compose(self, job: Job) -> Content:
        """The job's content; raises a ``DeadLetterError`` (``template``, ``attachment``)
        or, for a URL worth retrying or a message not gathered within ``timeout`` seconds
        (slow servers, say), ``AttachmentUnavailableError``.
        """
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                return await self._compose(job)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise AttachmentUnavailableError(
                f"the message's content was not gathered within {self.timeout:g} s"
                " (MAILBUS_COMPOSE_TIMEOUT)"
            ) from None

    async def _compose(self, job: Job) -> Content:
        ref = job.template
        if ref is None:
            return Content.of(job, await self.loader.load_all(job.attachments))
        try:
            template = await self.templates.get(ref.name, ref.version)
        except (DeadLetterError, StoreUnavailableError):
            raise
        except Exception as exc:  # a stored document that is not a template
            raise TemplateError(f"template {ref.name!r}: {type(exc).__name__}: {exc}") from None
        if template is None or not template.usable_by(job.domain):  # another's: as if none
            version = f" version {ref.version}" if ref.version is not None else ""
            raise TemplateError(f"no template named {ref.name!r}{version}")
        # Off the event loop: a render may take up to its deadline per part.
        rendered = await asyncio.to_thread(render, template, ref.data, self.max_chars)
        parts = await self.loader.load_all(job.attachments)
        return Content(
            job.subject or rendered.subject,
            rendered.text,
            rendered.html,
            tuple(parts),
            (template.name, template.version),
        )

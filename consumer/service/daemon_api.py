"""The old daemon's requests served by mailbus: mail to send or queue, the gateway
domain's waiting jobs as its queue, the domain's stored templates as its template files,
and its counts.

What a request means and the words of each answer come from :mod:`consumer.core.legacy`;
this module reads and changes the job and template stores, and publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from consumer.amqp.outgoing import Outgoing
from consumer.clock import utcnow
from consumer.core import legacy
from consumer.core.legacy import INVALID_PAYLOAD, DaemonRequest, daemon_reply
from consumer.core.message import Job
from consumer.core.refusals import TemplateError
from consumer.core.smtp_request import sealed_text, smtp_override_url
from consumer.core.status import start_of_day
from consumer.core.vocabulary import WAITING
from consumer.errors import GatewayRequestError
from consumer.service import control
from consumer.service.template_folder import TemplateFolder, template_file_name
from consumer.settings import Settings
from consumer.store.jobs import JobRecord, JobStore
from consumer.store.templates import TemplateStore
from consumer.vault import Vault

# A queued mail whose content changes is replaced by a new job, published first and held
# this long at least, so that cancelling the old one settles which of the two is sent.
UPDATE_HOLD = timedelta(seconds=5)
_RECORD_POLL = 0.02

# Publishes a job (``now``: and waits for its outcome): its id and the worker's answer.
Publish = Callable[..., Awaitable[tuple[str, Any]]]
# Why the gateway may not send a job for its domain, or None when it may.
Refusal = Callable[[Job], Awaitable[str | None]]
Handler = Callable[[DaemonRequest], Awaitable[bytes]]


def _failures(record: JobRecord) -> int:
    """The attempts a waiting job has failed: each one it made, as it still waits."""
    return int(record.get("attempts") or 0)


class DaemonApi:
    """Answers the daemon's requests for the gateway's one domain."""

    def __init__(
        self,
        *,
        settings: Settings,
        jobs: JobStore,
        templates: TemplateStore,
        outgoing: Outgoing,
        publish: Publish,
        refusal: Refusal,
    ) -> None:
        assert settings.gateway_domain is not None  # check_settings refuses to serve without
        self.domain = settings.gateway_domain
        self.default_from = settings.gateway_from
        self.waited = settings.gateway_wait_seconds
        self.special_use = settings.allow_special_use_domains
        self.jobs = jobs
        self.templates = templates
        self.outgoing = outgoing
        self.publish = publish
        self.refusal = refusal
        self.vault = Vault.optional(settings)
        self.smtp_overrides = settings.gateway_smtp_overrides
        default = settings.default_smtp_url
        self.default_smtp_url = default.get_secret_value() if default is not None else None
        folder = settings.gateway_template_dir
        self.folder = None if folder is None else TemplateFolder(folder, templates, self.domain)
        self.seal_days = settings.seal_days
        self._handlers: dict[str, Handler] = {
            "ping": self._ping,
            "status": self._status,
            "sendMail": self._send,
            "queueMail": self._queue,
            "getQueueList": self._queue_list,
            "getQueuedMail": self._queued_mail,
            "updateQueuedMail": self._update_queued_mail,
            "removeQueuedMail": self._remove_queued_mail,
            "clearQueue": self._clear_queue,
            "getTemplateList": self._template_list,
            "getTemplate": self._get_template,
            "addTemplate": self._add_template,
            "updateTemplate": self._update_template,
            "removeTemplate": self._remove_template,
            "clearTemplate": self._clear_templates,
        }
        assert self._handlers.keys() == legacy.DAEMON_REQUESTS

    async def answer(self, request: DaemonRequest) -> bytes:
        """The answer to one authorized request."""
        return await self._handlers[request.name](request)

    async def _ping(self, request: DaemonRequest) -> bytes:
        return daemon_reply("success", None, "pong")

    async def _status(self, request: DaemonRequest) -> bytes:
        sent, failed = await self.jobs.sent_and_failed_since(self.domain, start_of_day(utcnow()))
        return legacy.daemon_status_reply(sent, failed)

    # Mail.

    def _job(self, mail: Any, *, queued: bool) -> dict[str, Any]:
        """The v1 job of a mail payload, with an id in the daemon's queue form; raises
        :class:`GatewayRequestError` when it is not one.
        """
        raw = legacy.daemon_job(
            mail,
            domain=self.domain,
            default_from=self.default_from,
            queued=queued,
            smtp_overrides=self.smtp_overrides,
        )
        if self.smtp_overrides:
            raw.update(self._sealed_server(mail))
        when = datetime.fromisoformat(raw["send_at"]) if "send_at" in raw else utcnow()
        raw["id"] = legacy.queue_id(when, secrets.token_hex(8))
        return raw

    def _sealed_server(self, mail: Mapping[str, Any]) -> dict[str, str]:
        """The job's ``smtp_sealed`` for the SMTP server ``mail`` names, if it names one:
        its URL sealed whole with the domain, so that only this gateway's key can name a
        server, for this domain's mail only.
        """
        assert self.vault is not None  # check_settings refuses the setting without a key
        url = smtp_override_url(mail, default_url=self.default_smtp_url)
        return (
            {}
            if url is None
            else {"smtp_sealed": self.vault.encrypt(sealed_text(self.domain, url))}
        )

    async def _checked(self, raw: Mapping[str, Any], failed: str) -> bytes | None:
        """The refusal of a job the gateway may not publish, or None."""
        try:
            job = legacy.checked_job(raw, special_use=self.special_use)
        except GatewayRequestError as exc:
            return daemon_reply("error", {"payload": [str(exc)]}, INVALID_PAYLOAD)
        refused = await self.refusal(job)
        return None if refused is None else daemon_reply("error", refused, failed)

    async def _mail(self, request: DaemonRequest, *, queued: bool) -> bytes:
        failed = "failed to add mail to queue" if queued else "failed to send mail"
        errors = legacy.payload_errors(request.payload)
        if errors is not None:
            return daemon_reply("error", errors, INVALID_PAYLOAD)
        if "useTemplate" in request.payload:
            await self._refresh()  # the file a client just wrote is the one it means
        try:
            raw = self._job(request.payload, queued=queued)
        except GatewayRequestError as exc:
            return daemon_reply("error", {"payload": [str(exc)]}, INVALID_PAYLOAD)
        refused = await self._checked(raw, failed)
        if refused is not None:
            return refused
        job_id, answer = await self.publish(raw, now=not queued)
        if queued:
            await self._recorded(job_id)
            return daemon_reply("success", job_id, "mail added to queue")
        return legacy.daemon_sent_reply(answer, self.waited)

    async def _send(self, request: DaemonRequest) -> bytes:
        return await self._mail(request, queued=False)

    async def _queue(self, request: DaemonRequest) -> bytes:
        return await self._mail(request, queued=True)

    # The queue: the domain's waiting jobs.

    async def _recorded(self, job_id: str) -> None:
        """Wait until a worker has recorded a job just published (up to the gateway's
        wait): the daemon listed a queued mail at once, and its clients ask right after.
        Past the wait the job is still safe in the broker, and listed once a worker runs.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.waited):
                while await self.jobs.get(job_id) is None:  # noqa: ASYNC110 (another process writes it)
                    await asyncio.sleep(_RECORD_POLL)

    async def _waiting(self, job_id: Any) -> tuple[JobRecord, dict[str, Any]] | None:
        """The record and job of one of the domain's waiting jobs, or None."""
        if not isinstance(job_id, str) or not 0 < len(job_id) <= 200:
            return None
        record = await self.jobs.get(job_id)
        if (
            record is None
            or record.get("domain") != self.domain
            or record.get("status") not in WAITING
            or not record.get("body")
        ):
            return None
        job: dict[str, Any] = json.loads(record["body"])
        return record, job

    def _old_mail(self, job: Mapping[str, Any], failures: int) -> dict[str, Any]:
        return legacy.daemon_mail(job, default_from=self.default_from, failures=failures)

    async def _queue_list(self, request: DaemonRequest) -> bytes:
        skip, limit = legacy.page(request.payload)
        ids, total = await self.jobs.waiting_ids(self.domain, skip, limit)
        return legacy.listing(ids, total, "mails in queue")

    async def _queued_mail(self, request: DaemonRequest) -> bytes:
        found = await self._waiting(request.payload)
        if found is None:
            return daemon_reply("error", None, "queued mail not found")
        record, job = found
        return daemon_reply("success", self._old_mail(job, _failures(record)), request.payload)

    async def _update_queued_mail(self, request: DaemonRequest) -> bytes:
        original, content = request.payload, request.fields.get("content")
        if not isinstance(content, dict) or not content:
            return daemon_reply("error", legacy.payload_errors(content), INVALID_PAYLOAD)
        found = await self._waiting(original)
        if found is None:
            return daemon_reply("error", None, "queued mail not found")
        record, job = found
        mail = self._old_mail(job, _failures(record))
        merged = {**mail, **content}
        if content.keys() == {"scheduleTime"}:
            return await self._reschedule(original, merged)
        if legacy.DAEMON_TAG not in (job.get("tags") or []):
            why = "only mail queued through the gateway can have its content changed here"
            return daemon_reply("error", why, "unable to update queued mail")
        merged.pop("failToDelivered")
        return await self._replace(original, merged, mail["failToDelivered"])

    async def _reschedule(self, job_id: str, merged: dict[str, Any]) -> bytes:
        when = merged["scheduleTime"]
        if not isinstance(when, int) or isinstance(when, bool):
            errors = {"scheduleTime": ["seconds since the Unix epoch"]}
            return daemon_reply("error", errors, INVALID_PAYLOAD)
        due = datetime.fromtimestamp(when, UTC)
        result = await control.reschedule(
            self.jobs,
            self.outgoing,
            job_id,
            due,
            utcnow(),
            vault=self.vault,
            seal_days=self.seal_days,
        )
        if not result.applied:
            return daemon_reply("error", result.detail, "unable to update queued mail")
        return daemon_reply("success", merged, {"original": job_id, "updated": job_id})

    async def _replace(self, job_id: str, merged: dict[str, Any], failures: int) -> bytes:
        """Publish the changed mail as a new job, then cancel the old one; if the old one
        can no longer be cancelled (a worker took it), the new one is cancelled instead.
        """
        try:
            raw = self._job(merged, queued=True)
        except GatewayRequestError as exc:
            return daemon_reply("error", {"payload": [str(exc)]}, INVALID_PAYLOAD)
        held = utcnow() + UPDATE_HOLD
        if "send_at" not in raw or datetime.fromisoformat(raw["send_at"]) < held:
            raw["send_at"] = held.isoformat()
        refused = await self._checked(raw, "unable to update queued mail")
        if refused is not None:
            return refused
        new_id, _ = await self.publish(raw, now=False)
        await self._recorded(new_id)
        result = await control.cancel(self.jobs, self.outgoing, job_id, self.domain)
        if not result.applied:
            await control.cancel(self.jobs, self.outgoing, new_id, self.domain)
            return daemon_reply("error", result.detail, "unable to update queued mail")
        updated = {**merged, "failToDelivered": failures}
        return daemon_reply("success", updated, {"original": job_id, "updated": new_id})

    async def _remove_queued_mail(self, request: DaemonRequest) -> bytes:
        if await self._waiting(request.payload) is None:
            return daemon_reply("error", None, "queued mail not found")
        result = await control.cancel(self.jobs, self.outgoing, request.payload, self.domain)
        if not result.applied:
            return daemon_reply("error", result.detail, "unable to remove queued mail")
        return daemon_reply("success", request.payload, "queued mail removed")

    async def _clear_queue(self, request: DaemonRequest) -> bytes:
        # Bounded by the jobs waiting when asked: mail queued meanwhile may stay.
        ids, total = await self.jobs.waiting_ids(self.domain, 0, legacy.PAGE_LIMIT)
        removed = seen = 0
        while ids and seen < total:
            for job_id in ids:
                result = await control.cancel(self.jobs, self.outgoing, job_id, self.domain)
                removed += result.applied
            seen += len(ids)
            ids, _ = await self.jobs.waiting_ids(self.domain, 0, legacy.PAGE_LIMIT)
        return daemon_reply("success", {"removed": removed}, f"removed {removed} mails in queue")

    # Templates: the domain's stored ones (kept as the files of its folder, when set).

    async def _refresh(self) -> None:
        """Take up what was written to the template folder since the last request."""
        if self.folder is not None:
            await self.folder.sync()

    async def _template_list(self, request: DaemonRequest) -> bytes:
        await self._refresh()
        skip, limit = legacy.page(request.payload)
        names, total = await self.templates.names(self.domain, skip, limit)
        return legacy.listing(names, total, "templates")

    async def _get_template(self, request: DaemonRequest) -> bytes:
        await self._refresh()
        name = template_file_name(request.payload)
        template = await self.templates.owned(name, self.domain) if name else None
        if template is None:
            return daemon_reply("error", None, "unable to get template")
        body = template.html if template.html is not None else template.text
        return daemon_reply("success", body, "template found")

    async def _store_template(self, request: DaemonRequest, *, new: bool) -> bytes:
        verb = "add" if new else "update"
        name, content = template_file_name(request.payload), request.fields.get("content")
        if name is None or not isinstance(content, str) or not content:
            why = "a template name (letters, digits, '.', '_', '-') and a content string"
            return daemon_reply("error", {"payload": [why]}, INVALID_PAYLOAD)
        await self._refresh()
        if new and await self.templates.get(name) is not None:
            return daemon_reply("error", "template exists", f"unable to {verb} template")
        if not new and await self.templates.owned(name, self.domain) is None:
            return daemon_reply("error", None, f"unable to {verb} template")
        parts = legacy.body_fields(content)
        try:
            await self.templates.put(
                name, "", parts.get("text"), parts.get("html"), domain=self.domain
            )
        except TemplateError as exc:
            return daemon_reply("error", str(exc), f"unable to {verb} template")
        if self.folder is not None:
            await self.folder.write(name, content)
        return daemon_reply("success", name, "template added" if new else "template updated")

    async def _add_template(self, request: DaemonRequest) -> bytes:
        return await self._store_template(request, new=True)

    async def _update_template(self, request: DaemonRequest) -> bytes:
        return await self._store_template(request, new=False)

    async def _remove_template(self, request: DaemonRequest) -> bytes:
        await self._refresh()
        name = template_file_name(request.payload)
        if name is None or not await self.templates.remove(name, domain=self.domain):
            return daemon_reply("error", None, "unable to remove template")
        if self.folder is not None:
            await self.folder.delete(name)
        return daemon_reply("success", name, "template removed")

    async def _clear_templates(self, request: DaemonRequest) -> bytes:
        await self._refresh()
        if self.folder is not None:
            await self.folder.clear()
        removed = await self.templates.clear(self.domain)
        return daemon_reply("success", {"removed": removed}, f"removed {removed} templates")

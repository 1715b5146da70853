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
from datetime import datetime, timedelta
from typing import Any

from consumer.amqp.outgoing import Outgoing
from consumer.clock import utcnow
from consumer.core import legacy
from consumer.core.control import Result
from consumer.core.legacy import INVALID_PAYLOAD, DaemonRequest, daemon_reply
from consumer.core.message import Job
from consumer.core.refusals import InvalidJobError, TemplateError
from consumer.core.smtp_request import sealed_text, smtp_override_url, url_sealed_for
from consumer.core.status import start_of_day
from consumer.core.templates import check_syntax
from consumer.core.vocabulary import WAITING
from consumer.errors import ConfigurationError, GatewayRequestError
from consumer.service import control
from consumer.service.template_folder import (
    MAX_FILE_BYTES,
    MAX_FILES,
    TemplateFolder,
    template_file_name,
)
from consumer.settings import Settings
from consumer.store.jobs import JobRecord, JobStore
from consumer.store.templates import TemplateStore
from consumer.vault import Vault

# A queued mail whose content changes is replaced by a new job, published first and held
# this long at least, so that cancelling the old one settles which of the two is sent.
UPDATE_HOLD = timedelta(seconds=5)
# Asking whether a worker has recorded a queued job: soon, then less and less often.
_RECORD_POLL = 0.02
_RECORD_POLL_MAX = 0.5
PAGE = legacy.PAGE_LIMIT

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
        self.smtp_hosts = settings.gateway_smtp_hosts
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

    def _job(
        self, mail: Mapping[str, Any], *, queued: bool, sealed: str | None = None
    ) -> dict[str, Any]:
        """The v1 job of a mail payload, with an id in the daemon's queue form and the SMTP
        server it names (else ``sealed``, the URL of one named before) sealed for that id;
        raises :class:`GatewayRequestError` when it is not one.
        """
        raw = legacy.daemon_job(
            mail,
            domain=self.domain,
            default_from=self.default_from,
            queued=queued,
            smtp_overrides=self.smtp_overrides,
        )
        when = datetime.fromisoformat(raw["send_at"]) if "send_at" in raw else utcnow()
        raw["id"] = legacy.queue_id(when, secrets.token_hex(8))
        url = self._server_url(mail) if self.smtp_overrides else None
        if url or sealed:
            assert self.vault is not None  # check_settings refuses the setting without a key
            text = sealed_text(self.domain, raw["id"], url or sealed or "")
            raw["smtp_sealed"] = self.vault.encrypt(text)
        return raw

    def _server_url(self, mail: Mapping[str, Any]) -> str | None:
        """The URL of the SMTP server ``mail`` names, if it names one."""
        return smtp_override_url(mail, default_url=self.default_smtp_url, hosts=self.smtp_hosts)

    def _opened_server(self, job_id: str, job: Mapping[str, Any]) -> str | None:
        """The URL of the server a job of the gateway's brings sealed, if any."""
        token = job.get("smtp_sealed")
        if not isinstance(token, str) or self.vault is None:
            return None
        try:
            return url_sealed_for(self.vault.decrypt(token), self.domain, job_id)
        except (ConfigurationError, InvalidJobError):
            return None  # a worker will dead-letter it: nothing to carry over

    async def _checked(self, raw: Mapping[str, Any], failed: str) -> bytes | None:
        """The refusal of a job the gateway may not publish, or None."""
        try:
            job = legacy.checked_job(raw, special_use=self.special_use)
        except GatewayRequestError as exc:
            return daemon_reply("error", {"payload": [str(exc)]}, INVALID_PAYLOAD)
        refused = await self.refusal(job)
        return None if refused is None else daemon_reply("error", refused, failed)

    async def _mail(self, request: DaemonRequest, *, queued: bool) -> bytes:
        failed = legacy.QUEUE_FAILED if queued else legacy.SEND_FAILED
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

    # The queue: the mail the gateway queued for its domain that waits.

    async def _recorded(self, job_id: str) -> None:
        """Wait until a worker has recorded a job just published (up to the gateway's
        wait, asking less and less often): the daemon listed a queued mail at once, and its
        clients ask right after. Past the wait the job is still safe in the broker, and
        listed once a worker runs.
        """
        pause = _RECORD_POLL
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.waited):
                while await self.jobs.get(job_id) is None:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RECORD_POLL_MAX)

    async def _waiting(self, job_id: Any) -> tuple[JobRecord, dict[str, Any]] | None:
        """The record and job of a waiting job the gateway queued for its domain, or None
        (mail other producers publish for the domain is not the daemon clients' to see).
        """
        if not isinstance(job_id, str) or not 0 < len(job_id) <= 200:
            return None
        record = await self.jobs.get(job_id)
        if (
            record is None
            or record.get("domain") != self.domain
            or record.get("status") not in WAITING
            or legacy.DAEMON_TAG not in (record.get("tags") or [])
            or not record.get("body")
        ):
            return None
        try:
            job = json.loads(record["body"])
        except ValueError:
            return None
        return (record, job) if isinstance(job, dict) else None

    def _old_mail(self, job: Mapping[str, Any], failures: int) -> dict[str, Any]:
        return legacy.daemon_mail(job, default_from=self.default_from, failures=failures)

    async def _queue_list(self, request: DaemonRequest) -> bytes:
        skip, limit = legacy.page(request.payload)
        ids, total = await self.jobs.waiting_ids(self.domain, legacy.DAEMON_TAG, skip, limit)
        return legacy.listing(ids, total, "mails in queue")

    async def _queued_mail(self, request: DaemonRequest) -> bytes:
        found = await self._waiting(request.payload)
        if found is None:
            return daemon_reply("error", None, legacy.QUEUED_MAIL_NOT_FOUND)
        record, job = found
        return daemon_reply("success", self._old_mail(job, _failures(record)), request.payload)

    async def _update_queued_mail(self, request: DaemonRequest) -> bytes:
        original, content = request.payload, request.fields.get("content")
        if not isinstance(content, dict) or not content:
            return daemon_reply("error", legacy.payload_errors(content), INVALID_PAYLOAD)
        found = await self._waiting(original)
        if found is None:
            return daemon_reply("error", None, legacy.QUEUED_MAIL_NOT_FOUND)
        record, job = found
        mail = self._old_mail(job, _failures(record))
        merged = {**mail, **content}
        if content.keys() == {"scheduleTime"}:
            return await self._reschedule(original, merged)
        failures = merged.pop("failToDelivered")
        sealed = None if self._server_named(content) else self._opened_server(original, job)
        return await self._replace(original, merged, failures, sealed)

    def _server_named(self, content: Mapping[str, Any]) -> bool:
        return any(content.get(name) not in (None, "") for name in legacy.SMTP_OVERRIDES)

    async def _reschedule(self, job_id: str, merged: dict[str, Any]) -> bytes:
        try:
            due = legacy.schedule_time(merged["scheduleTime"])
        except GatewayRequestError as exc:
            return daemon_reply("error", {"payload": [str(exc)]}, INVALID_PAYLOAD)
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
            return daemon_reply("error", result.detail, legacy.QUEUED_MAIL_NOT_UPDATED)
        return daemon_reply("success", merged, {"original": job_id, "updated": job_id})

    async def _replace(
        self, job_id: str, merged: dict[str, Any], failures: int, sealed: str | None
    ) -> bytes:
        """Publish the changed mail as a new job (through the server the old one named,
        ``sealed``, unless the change names another), then cancel the old one; if the old
        one can no longer be cancelled (a worker took it), the new one is cancelled instead.
        """
        try:
            raw = self._job(merged, queued=True, sealed=sealed)
        except GatewayRequestError as exc:
            return daemon_reply("error", {"payload": [str(exc)]}, INVALID_PAYLOAD)
        held = utcnow() + UPDATE_HOLD
        if "send_at" not in raw or datetime.fromisoformat(raw["send_at"]) < held:
            raw["send_at"] = held.isoformat()
        refused = await self._checked(raw, legacy.QUEUED_MAIL_NOT_UPDATED)
        if refused is not None:
            return refused
        new_id, _ = await self.publish(raw, now=False)
        await self._recorded(new_id)
        result: Result | None = None
        try:
            result = await control.cancel(self.jobs, self.outgoing, job_id, self.domain)
        finally:
            if result is None or not result.applied:  # the old one goes (or may): not the new
                await control.cancel(self.jobs, self.outgoing, new_id, self.domain)
        if not result.applied:
            return daemon_reply("error", result.detail, legacy.QUEUED_MAIL_NOT_UPDATED)
        shown = {k: v for k, v in merged.items() if k not in legacy.SMTP_OVERRIDES}
        updated = {**shown, "failToDelivered": failures}
        return daemon_reply("success", updated, {"original": job_id, "updated": new_id})

    async def _remove_queued_mail(self, request: DaemonRequest) -> bytes:
        if await self._waiting(request.payload) is None:
            return daemon_reply("error", None, legacy.QUEUED_MAIL_NOT_FOUND)
        result = await control.cancel(self.jobs, self.outgoing, request.payload, self.domain)
        if not result.applied:
            return daemon_reply("error", result.detail, legacy.QUEUED_MAIL_NOT_REMOVED)
        return daemon_reply("success", request.payload, "queued mail removed")

    async def _clear_queue(self, request: DaemonRequest) -> bytes:
        # The mail waiting when asked, a page at a time: mail queued meanwhile may stay.
        ids, total = await self.jobs.waiting_ids(self.domain, legacy.DAEMON_TAG, 0, PAGE)
        removed = seen = 0
        while ids and seen < total:
            for job_id in ids:
                result = await control.cancel(self.jobs, self.outgoing, job_id, self.domain)
                removed += result.applied
            seen += len(ids)
            skip = seen - removed  # those still waiting (a worker took them) stay ahead
            ids, _ = await self.jobs.waiting_ids(self.domain, legacy.DAEMON_TAG, skip, PAGE)
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
            return daemon_reply("error", None, legacy.TEMPLATE_NOT_FOUND)
        return daemon_reply("success", template.body, "template found")

    async def _store_template(self, request: DaemonRequest, *, new: bool) -> bytes:
        failed = "unable to add template" if new else "unable to update template"
        name, content = template_file_name(request.payload), request.fields.get("content")
        if name is None or not isinstance(content, str) or not content:
            why = "a template name (letters, digits, '.', '_', '-') and a content string"
            return daemon_reply("error", {"payload": [why]}, INVALID_PAYLOAD)
        if len(content.encode()) > MAX_FILE_BYTES:
            return daemon_reply("error", f"larger than {MAX_FILE_BYTES} bytes", failed)
        await self._refresh()
        if new and await self.templates.get(name) is not None:
            return daemon_reply("error", "template exists", failed)
        if new and (await self.templates.names(self.domain, 0, 1))[1] >= MAX_FILES:
            return daemon_reply("error", f"the domain has {MAX_FILES} templates", failed)
        if not new and await self.templates.owned(name, self.domain) is None:
            return daemon_reply("error", None, failed)
        parts = legacy.body_fields(content)
        try:
            check_syntax(content, "html" in parts)  # before the file is written
            if self.folder is not None:  # the file first: the folder is the source
                await self.folder.write(name, content)
            await self.templates.put(
                name, "", parts.get("text"), parts.get("html"), domain=self.domain
            )
        except (TemplateError, OSError) as exc:
            return daemon_reply("error", str(exc), failed)
        return daemon_reply("success", name, "template added" if new else "template updated")

    async def _add_template(self, request: DaemonRequest) -> bytes:
        return await self._store_template(request, new=True)

    async def _update_template(self, request: DaemonRequest) -> bytes:
        return await self._store_template(request, new=False)

    async def _remove_template(self, request: DaemonRequest) -> bytes:
        await self._refresh()
        name = template_file_name(request.payload)
        if name is None or await self.templates.owned(name, self.domain) is None:
            return daemon_reply("error", None, legacy.TEMPLATE_NOT_REMOVED)
        if self.folder is not None:
            await self.folder.delete(name)
        await self.templates.remove(name, domain=self.domain)
        return daemon_reply("success", name, "template removed")

    async def _clear_templates(self, request: DaemonRequest) -> bytes:
        await self._refresh()
        if self.folder is not None:
            await self.folder.clear()
        removed = await self.templates.clear(self.domain)
        return daemon_reply("success", {"removed": removed}, f"removed {removed} templates")

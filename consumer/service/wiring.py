"""The composition root: a worker and its collaborators, built from ``Settings``."""

from __future__ import annotations

import os
import socket
import uuid

from consumer.clock import StoreClock
from consumer.core.outboxes import outbox_from_url
from consumer.core.returns import ReturnPaths
from consumer.mail.attachments import AttachmentLoader, attachment_budget
from consumer.mail.fetch import Fetcher, fetch_limits
from consumer.service.authorization import Authorizer
from consumer.service.compose import Composer
from consumer.service.dkim import DkimSigner
from consumer.service.picker import OutboxPicker
from consumer.service.pipeline import Pipeline
from consumer.service.requested import RequestedServers
from consumer.service.worker import Worker
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.vault import Vault


def build_worker(settings: Settings) -> Worker:
    """A worker on ``settings``: its stores read the time on MongoDB's clock, as the
    worker measures it, which every worker shares.
    """
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    clock = StoreClock()
    mongo = Mongo.connect(settings, clock=clock.now)
    vault = Vault.optional(settings)
    default = None
    if settings.default_smtp_url is not None:
        default = outbox_from_url(
            settings.default_smtp_url.get_secret_value(), timeout=settings.smtp_timeout
        )
    picker = OutboxPicker(
        outboxes=mongo.outboxes,
        providers=mongo.providers,
        vault=vault,
        default=default,
        pool_size=settings.smtp_pool_size,
        idle_seconds=settings.smtp_idle_seconds,
        requested=RequestedServers(
            vault,
            timeout=settings.smtp_timeout,
            pool_size=settings.smtp_pool_size,
            idle_seconds=settings.smtp_idle_seconds,
        ),
        clock=clock.now,
    )
    authorizer = Authorizer(mongo.domains, open_domains=settings.open_domains)
    fetcher = Fetcher(fetch_limits(settings))
    loader = AttachmentLoader(
        settings.attachment_dirs,
        settings.max_attachment_bytes,
        fetcher,
        max_count=settings.max_attachments,
        max_total=attachment_budget(settings.max_message_bytes),
        concurrency=settings.attachment_concurrency,
    )
    composer = Composer(
        mongo.templates, loader, settings.max_message_bytes, timeout=settings.compose_timeout
    )
    pipeline = Pipeline(
        settings=settings,
        store=mongo.jobs,
        picker=picker,
        authorizer=authorizer,
        composer=composer,
        suppressions=mongo.suppressions,
        signer=DkimSigner(mongo.domains, vault),
        worker_id=worker_id,
        vault=vault,
        clock=clock.now,
        returns=ReturnPaths.configured(settings),
    )
    return Worker(
        settings=settings,
        worker_id=worker_id,
        clock=clock,
        mongo=mongo,
        vault=vault,
        picker=picker,
        authorizer=authorizer,
        fetcher=fetcher,
        pipeline=pipeline,
    )

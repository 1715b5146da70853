"""One MongoDB connection, and the store of each collection on it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from consumer.clock import utcnow
from consumer.settings import Settings
from consumer.store.alerts import AlertStore
from consumer.store.domains import DomainStore
from consumer.store.feedback import FeedbackCounts
from consumer.store.jobs import JobStore
from consumer.store.outboxes import OutboxStore
from consumer.store.providers import ProviderStore
from consumer.store.suppressions import SuppressionStore
from consumer.store.templates import TemplateStore
from consumer.store.webhooks import WebhookStore


class Mongo:
    """The job store's connection, shared by the stores of the other collections."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        database = jobs.database
        self.outboxes = OutboxStore(database)
        self.providers = ProviderStore(database)
        self.domains = DomainStore(database)
        self.templates = TemplateStore(database)
        self.suppressions = SuppressionStore(database)
        self.alerts = AlertStore(database)
        self.feedback = FeedbackCounts(database)
        self.webhooks = WebhookStore(database)

    @classmethod
    def connect(cls, settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> Mongo:
        """A connection to ``settings``' database whose job store reads the time on ``clock``."""
        return cls(JobStore.connect(settings, clock=clock))

    async def __aenter__(self) -> Mongo:
        """The connection itself, for ``async with Mongo.connect(settings) as mongo:``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the connection when the ``async with`` block ends, however it ends."""
        await self.close()

    async def ensure_indexes(self, *, alerts: bool) -> None:
        """Create the indexes the worker's queries need (``alerts``: the digest's too)."""
        await self.jobs.ensure_indexes()
        await self.outboxes.ensure_indexes()
        await self.suppressions.ensure_indexes()
        await self.feedback.ensure_indexes()
        if alerts:
            await self.alerts.ensure_indexes()

    async def close(self) -> None:
        """Close the connection."""
        await self.jobs.close()

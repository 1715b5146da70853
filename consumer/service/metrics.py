"""Prometheus metrics of one worker, derived from outcomes as they are settled, of one
webhook delivery service, and of the gateways of one ``gateway serve``.

Each has its own registry (several may share a process in tests). Labels are bounded:
outbox, provider, outcome and reason, never a domain, a job id or a webhook (every server
a request named is the one outbox ``request:*``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, assert_never

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from consumer.clock import utcnow
from consumer.core.headers import DUE_HEADER
from consumer.core.outcomes import Crashed, Dead, Later, Outcome, Sent, Skip
from consumer.core.smtp_request import metrics_label
from consumer.core.vocabulary import (
    FAILED_REASONS,
    FEEDBACK_TALLIES,
    FeedbackTally,
    WebhookDeadReason,
    WebhookOutcome,
)
from consumer.store.documents import Document
from consumer.store.providers import tokens_of

# Seconds: an SMTP hand-over, and a mail's whole way (publish or due time to acceptance).
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Seconds: one webhook POST, up to MAILBUS_WEBHOOK_TIMEOUT (10 s by default).
WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Pools(Collector):
    """SMTP connections per outbox, read at scrape time."""

    def __init__(self, sizes: Callable[[], Mapping[str, int]]) -> None:
        self.sizes = sizes

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mailbus_smtp_connections", "Open SMTP connections per outbox", labels=["outbox"]
        )
        for outbox, count in sorted(self.sizes().items()):
            family.add_metric([outbox], count)
        yield family


class _Tokens(Collector):
    """Tokens left per provider limit, and each provider's slowdown, read from MongoDB at
    scrape time.
    """

    def __init__(self, providers: Callable[[], list[Document] | None]) -> None:
        self.providers = providers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mailbus_provider_tokens",
            "Sends each provider limit allows now (absent while MongoDB does not answer)",
            labels=["provider", "limit"],
        )
        slowed = GaugeMetricFamily(
            "mailbus_provider_slowdown",
            "How many times longer each provider's intervals are now: 1, or 2 while it is "
            "slowed after throttling replies",
            labels=["provider"],
        )
        now = utcnow()
        for doc in self.providers() or []:
            tokens = tokens_of(doc, now)
            for limit in tokens["limits"]:
                family.add_metric([doc["_id"], limit["limit"]], limit["tokens"])
            slowed.add_metric([doc["_id"]], tokens["slowdown"])
        yield family
        yield slowed


class _Commands(Collector):
    """MongoDB commands sent, by name, read at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "mailbus_mongo_commands", "MongoDB commands sent, by name", labels=["command"]
        )
        for name, count in sorted(self.counts().items()):
            family.add_metric([name], count)
        yield family


class _Feedback(Collector):
    """Bounces and complaints of the last 24 hours, read from MongoDB at scrape time: the
    whole installation's (the gateway's bounce listener records them), so a gauge, the
    same on every worker.
    """

    def __init__(self, counts: Callable[[], Mapping[FeedbackTally, int] | None]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mailbus_feedback_last_day",
            "Bounces (hard, soft) and complaints that came back in the last 24 hours "
            "(absent while MongoDB does not answer)",
            labels=["kind"],
        )
        counts = self.counts()
        if counts is not None:
            for kind in FEEDBACK_TALLIES:
                family.add_metric([kind], counts.get(kind, 0))
        yield family


class Metrics:
    """The counters, histograms and gauges ``/metrics`` shows."""

    def __init__(
        self,
        in_flight: Callable[[], int],
        pool_sizes: Callable[[], Mapping[str, int]],
        store_commands: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry = r = CollectorRegistry()
        outbox = ["outbox", "provider"]
        self.received = Counter(
            "mailbus_jobs_received", "Deliveries taken from the queues", registry=r
        )
        self.sent = Counter(
            "mailbus_jobs_sent", "Mails the SMTP server accepted", outbox, registry=r
        )
        self.sandboxed = Counter(
            "mailbus_jobs_sandboxed",
            "Sandboxed mails sent: not delivered (no outbox), or to the sandbox outbox; "
            "never counted in mailbus_jobs_sent",
            outbox,
            registry=r,
        )
        self.deferred = Counter(
            "mailbus_jobs_deferred",
            "Jobs put off: retry, rate_limited",
            ["reason", *outbox],
            registry=r,
        )
        self.failed = Counter(
            "mailbus_jobs_failed",
            "Jobs the SMTP side refused for good",
            ["reason", *outbox],
            registry=r,
        )
        self.throttled = Counter(
            "mailbus_smtp_throttled",
            "Attempts put off after a throttling reply (421, 4.7.x, a reply rule's throttle)",
            outbox,
            registry=r,
        )
        self.dead = Counter(
            "mailbus_jobs_dead",
            "Jobs dead-lettered, by reason (failed ones too)",
            ["reason"],
            registry=r,
        )
        self.send_seconds = Histogram(
            "mailbus_send_seconds",
            "SMTP hand-over time",
            ["outbox"],
            buckets=SEND_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "mailbus_delivery_seconds",
            "From publish (AMQP timestamp, 1 s resolution) or due time to SMTP acceptance",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.lateness_seconds = Histogram(
            "mailbus_scheduled_lateness_seconds",
            "Scheduled mail: SMTP acceptance minus due time",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        Gauge("mailbus_in_flight", "Deliveries being worked on", registry=r).set_function(
            lambda: float(in_flight())
        )
        r.register(_Pools(pool_sizes))
        r.register(_Commands(store_commands))

    def watch_providers(self, providers: Callable[[], list[Document] | None]) -> None:
        """Show ``mailbus_provider_tokens``, reading the providers with ``providers``
        (called from the HTTP thread at each scrape).
        """
        self.registry.register(_Tokens(providers))

    def watch_feedback(self, counts: Callable[[], Mapping[FeedbackTally, int] | None]) -> None:
        """Show ``mailbus_feedback_last_day``, reading the counts with ``counts`` (called
        from the HTTP thread at each scrape).
        """
        self.registry.register(_Feedback(counts))

    def observe(
        self,
        outcome: Outcome,
        headers: Mapping[str, Any],
        published: datetime | None,
        now: datetime,
    ) -> None:
        """Count one settled outcome; ``headers`` and ``published`` are the delivery's."""
        ctx = outcome.ctx
        outbox = [metrics_label(ctx.outbox), ctx.provider or ""]
        match outcome:
            case Sent() if ctx.sandbox:  # kept out of production's figures and latencies
                self.sandboxed.labels(*outbox).inc()
            case Sent(seconds=seconds):
                self.sent.labels(*outbox).inc()
                self.send_seconds.labels(outbox[0]).observe(seconds)
                due_ms = headers.get(DUE_HEADER)
                if isinstance(due_ms, int):
                    late = now.timestamp() - due_ms / 1000
                    self.lateness_seconds.observe(max(late, 0.0))
                    self.delivery_seconds.observe(max(late, 0.0))
                elif published is not None:
                    self.delivery_seconds.observe(max(now.timestamp() - published.timestamp(), 0.0))
            case Dead(reason=reason):
                if reason in FAILED_REASONS:
                    self.failed.labels(reason, *outbox).inc()
                self.dead.labels(reason).inc()
            case Later(why=why, failure=failure):
                if failure is not None and failure.throttle:
                    self.throttled.labels(*outbox).inc()
                match why:
                    case "retry" | "rate_limited":
                        self.deferred.labels(why, *outbox).inc()
                    case "scheduled" | "waiting" | "leased" | "store":
                        pass
                    case _:
                        assert_never(why)
            case Skip() | Crashed():
                pass
            case _:
                assert_never(outcome)


class WebhookMetrics:
    """What ``/metrics`` shows of ``mailbus webhook serve``."""

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self.deliveries = Counter(
            "mailbus_webhook_deliveries",
            "Webhook deliveries, by outcome: delivered (2xx), failed (tried again), given_up "
            "(reason: expired, refused, gone, invalid)",
            ["outcome", "reason"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "mailbus_webhook_attempt_seconds",
            "One webhook POST, connecting to reading the answer",
            buckets=WEBHOOK_BUCKETS,
            registry=r,
        )
        Gauge(
            "mailbus_webhook_in_flight", "Events being delivered to their endpoints", registry=r
        ).set_function(lambda: float(in_flight()))

    def count(self, outcome: WebhookOutcome, reason: WebhookDeadReason | None = None) -> None:
        """Count one delivery's outcome (``reason``: why one was given up)."""
        self.deliveries.labels(outcome, reason or "").inc()


class GatewayMetrics:
    """What ``/metrics`` shows of ``mailbus gateway serve``."""

    def __init__(self, connections: Callable[[], int], limit: int) -> None:
        self.registry = r = CollectorRegistry()
        Gauge(
            "mailbus_gateway_connections",
            "Client connections the gateways hold, REST, daemon and SMTP together",
            registry=r,
        ).set_function(lambda: float(connections()))
        Gauge(
            "mailbus_gateway_max_connections",
            "The connections they may hold at once (MAILBUS_GATEWAY_MAX_CONNECTIONS)",
            registry=r,
        ).set(limit)

"""Names of exchanges, queues and routing keys, and the arguments of the queues."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumer.core import ladder


@dataclass(frozen=True)
class Names:
    """Every exchange, queue and routing key, derived from one prefix."""

    prefix: str = "mailbus"

    @property
    def exchange(self) -> str:
        """Topic exchange producers publish jobs to."""
        return self.prefix

    @property
    def send_queue(self) -> str:
        """Queue of ordinary jobs (routing key ``send``)."""
        return f"{self.prefix}.send"

    @property
    def send_now_queue(self) -> str:
        """Queue of urgent jobs (routing key ``send.now``), consumed alongside ``send``."""
        return f"{self.prefix}.send.now"

    @property
    def due_queue(self) -> str:
        """Queue the delay ladder brings waiting jobs back to (routing key ``send.due``,
        bound at the ladder's foot only), consumed alongside ``send``: a job back at its
        time never waits behind the intake of new ones.
        """
        return f"{self.prefix}.send.due"

    @property
    def dead(self) -> str:
        """Fanout exchange and quorum queue of dead letters."""
        return f"{self.prefix}.dead"

    @property
    def events(self) -> str:
        """Topic exchange of ``mail.*`` events; no queue is bound by default."""
        return f"{self.prefix}.events"

    @property
    def control_queue(self) -> str:
        """Queue of control messages (routing key ``control``): cancel, reschedule."""
        return f"{self.prefix}.control"

    def delay(self, level: int) -> str:
        """Exchange and quorum queue of delay-ladder level ``level`` (TTL 2^level s)."""
        return f"{self.prefix}.delay.{level}"

    @property
    def deliver(self) -> str:
        """Topic exchange at the foot of the ladder; routes to the send queues."""
        return f"{self.prefix}.deliver"

    @property
    def webhooks_queue(self) -> str:
        """Quorum queue of the events webhooks deliver (``mailbus webhook serve``), bound
        to the events exchange and, for retries, at the ladder's foot; declared by that
        command alone, so that nothing gathers there on an install without webhooks.
        """
        return f"{self.prefix}.webhooks"

    @property
    def webhooks_dead(self) -> str:
        """Quorum queue of webhook deliveries given up on (not job dead letters)."""
        return f"{self.prefix}.webhooks.dead"

    def queues(self) -> tuple[str, ...]:
        """Every queue the topology declares."""
        ladder_queues = tuple(self.delay(level) for level in range(ladder.LEVELS))
        return (
            self.send_queue,
            self.send_now_queue,
            self.due_queue,
            self.control_queue,
            self.dead,
            *ladder_queues,
        )

    def exchanges(self) -> tuple[str, ...]:
        """Every exchange the topology declares."""
        ladder_exchanges = tuple(self.delay(level) for level in range(ladder.LEVELS))
        return (self.exchange, self.dead, self.events, self.deliver, *ladder_exchanges)


SEND_KEY = "send"
SEND_NOW_KEY = "send.now"
DUE_KEY = "send.due"
CONTROL_KEY = "control"


# RabbitMQ's direct reply-to: a caller publishes with this reply_to, and the broker hands
# the worker a name under it that reaches only that caller's channel.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def is_reply_queue(name: str, prefix: str | None = None) -> bool:
    """Whether ``name`` may receive replies: the direct reply-to pseudo-queue, or a queue
    named with the operator's ``prefix`` (``MAILBUS_REPLY_QUEUE_PREFIX``).
    """
    if name == DIRECT_REPLY_TO or name.startswith(DIRECT_REPLY_TO + "."):
        return True
    return prefix is not None and name.startswith(prefix)


def consumed_queue_arguments(names: Names, delivery_limit: int) -> dict[str, Any]:
    """Arguments of the queues workers consume: quorum, at-least-once dead-lettering,
    bounded redelivery.
    """
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": names.dead,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": delivery_limit,
    }


def ladder_queue_arguments(names: Names, level: int) -> dict[str, Any]:
    """Arguments of ladder level ``level``: its TTL, and where its messages fall when it expires."""
    below = names.delay(level - 1) if level > 0 else names.deliver
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": ladder.level_ttl_ms(level),
        "x-dead-letter-exchange": below,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def webhooks_queue_arguments(names: Names, delivery_limit: int) -> dict[str, Any]:
    """Arguments of the webhooks queue: as a consumed queue's, but what the broker gives up
    on (past the delivery limit) goes to the webhooks' own dead-letter queue, never among
    the jobs' dead letters.
    """
    return {
        **consumed_queue_arguments(names, delivery_limit),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.webhooks_dead,
    }

"""Every AMQP header of the mailbus contract, named once."""

from __future__ import annotations

USER_HEADER = "x-mailbus-user"
DOMAIN_HEADER = "x-mailbus-authorized-domain"
SEAL_HEADER = "x-mailbus-seal"
OWN_PREFIX = "x-mailbus-"
RELEASED_BY_HEADER = "x-mailbus-released-by"
RELEASED_AT_HEADER = "x-mailbus-released-at"
REASON_HEADER = "x-mailbus-reason"
ERROR_HEADER = "x-mailbus-error"
ATTEMPTS_HEADER = "x-mailbus-attempts"
CODE_HEADER = "x-mailbus-smtp-code"
DEAD_AT_HEADER = "x-mailbus-dead-at"  # epoch milliseconds, for `mailbus dead purge`


DELAY_HEADER = "x-delay"


# Set by workers when a job first passes through: absolute due time in epoch milliseconds,
# so holds, hops and retries never accumulate drift.
DUE_HEADER = "x-mailbus-due"


# Headers the broker adds as a message walks the ladder or is redelivered; a copy the worker
# publishes starts without them so they never pile up across hops and retries.
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


# What a seal covers; without a valid seal a delivery carries none of these.
SEALED_HEADERS = (USER_HEADER, DOMAIN_HEADER, RELEASED_BY_HEADER, RELEASED_AT_HEADER)


# The one x-mailbus-* header a producer may set: an absolute due time gives no authority.
PRODUCER_HEADERS = frozenset({DUE_HEADER})


# On a webhook retry's copy of an event (``consumer.service.webhooks``): the endpoint it is
# for, the attempt it is, when the first attempt was (epoch ms), and a seal over those
# with MAILBUS_SECRET_KEY; a copy without a valid seal is not delivered.
WEBHOOK_HEADER = "x-mailbus-webhook"
WEBHOOK_ATTEMPT_HEADER = "x-mailbus-webhook-attempt"
WEBHOOK_SINCE_HEADER = "x-mailbus-webhook-since"
WEBHOOK_SEAL_HEADER = "x-mailbus-webhook-seal"

# On every event a worker, gateway or command publishes while MAILBUS_SECRET_KEY is set: a
# seal over its message id and body. Anyone allowed to publish to the events exchange could
# write an event; the webhook service POSTs, signed with a domain's secret, only those
# whose seal holds.
EVENT_SEAL_HEADER = "x-mailbus-event-seal"

"""The exceptions that end a job in a dead letter, each with the reason operators see."""

from __future__ import annotations

from consumer.core.vocabulary import DeadReason
from consumer.errors import MailbusError


class DeadLetterError(MailbusError):
    """A job that can never be sent as it is; ``reason`` becomes ``x-mailbus-reason``."""

    reason: DeadReason = "permanent"


class InvalidJobError(DeadLetterError, ValueError):
    """The message is not a valid v1 job (bad JSON, schema violation, header injection)."""

    reason: DeadReason = "invalid"


class JobTooLargeError(InvalidJobError):
    """The job's body is bigger than ``MAILBUS_MAX_JOB_BYTES``, or its raw message than
    ``MAILBUS_MAX_MESSAGE_BYTES``; refused before decoding.
    """

    reason: DeadReason = "too_large"


class AttachmentError(DeadLetterError):
    """An attachment that can never be read: a refused path, scheme or address, or too big."""

    reason: DeadReason = "attachment"


class TemplateError(DeadLetterError):
    """A stored template is missing, fails to render, or uses an undefined variable."""

    reason: DeadReason = "template"


class MessageTooLargeError(DeadLetterError):
    """The built message is bigger than ``MAILBUS_MAX_MESSAGE_BYTES``."""

    reason: DeadReason = "too_large"

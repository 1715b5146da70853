"""mailbus's own exceptions. Each dead-letter cause carries the reason operators see."""

from __future__ import annotations


class MailbusError(Exception):
    """Base of every error mailbus raises on purpose."""


class DeadLetterError(MailbusError):
    """A job that can never be sent as it is; ``reason`` becomes ``x-mailbus-reason``."""

    reason = "permanent"


class InvalidJobError(DeadLetterError, ValueError):
    """The message is not a valid v1 job (bad JSON, schema violation, header injection)."""

    reason = "invalid"


class UnsupportedContentError(DeadLetterError):
    """The job asks for content this worker cannot build (yet): a clear refusal, never a guess."""

    reason = "unsupported"


class ConfigurationError(MailbusError, ValueError):
    """A setting or outbox definition is unusable."""


class StoreUnavailableError(MailbusError, ConnectionError):
    """MongoDB did not answer in time; no mail is sent without its claim."""

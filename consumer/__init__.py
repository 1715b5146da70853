"""mailbus: a mail sending and scheduling service built as a RabbitMQ consumer."""

__version__ = "0.1.0"

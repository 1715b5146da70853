"""The embedded default stack: a private RabbitMQ, a MongoDB-compatible server and an SMTP
capture server, for ``make run`` and for the test suite. Not imported by ``consumer``."""

"""RabbitMQ, through aio-pika: topology, publishing, outgoing copies, dead letters,
queue statistics.
"""

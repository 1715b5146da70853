"""The long-running processes: the worker and its pipeline, outbox picking,
authorization, control messages, metrics, health, admin digests and the gateways.
"""

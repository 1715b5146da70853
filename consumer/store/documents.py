"""What every store shares: the type of a MongoDB document, and the one translation of
"MongoDB is away" into :class:`~consumer.errors.StoreUnavailableError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pymongo.errors import ConnectionFailure, PyMongoError

from consumer.errors import StoreUnavailableError, connection_failure

Document = dict[str, Any]


@asynccontextmanager
async def answering() -> AsyncIterator[None]:
    """Turn "MongoDB is unreachable or slow" into :class:`StoreUnavailableError`."""
    try:
        yield
    except ConnectionFailure as exc:
        raise StoreUnavailableError(f"MongoDB unavailable: {connection_failure(exc)}") from exc
    except PyMongoError as exc:
        if exc.timeout:
            raise StoreUnavailableError(f"MongoDB timed out: {connection_failure(exc)}") from exc
        raise

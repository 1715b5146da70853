"""Stored templates in MongoDB, versioned.

``template_versions`` keeps every version (``_id`` ``name@version``, written once);
``templates`` holds the latest version of each name (``_id`` the name), so rendering the
current template is one read by ``_id``. A job may pin a version; the version used is
recorded on the job. Templates the daemon gateway stores carry its ``domain``: its clients
see and change only those.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from consumer.clock import utcnow
from consumer.core.refusals import TemplateError
from consumer.core.templates import Template, check_syntax
from consumer.store.documents import Document, answering


def _template(doc: Document) -> Template:
    return Template(
        doc["name"],
        doc["version"],
        doc["subject"],
        doc.get("text"),
        doc.get("html"),
        doc.get("domain"),
    )


class TemplateStore:
    """The ``templates`` and ``template_versions`` collections."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.latest = database["templates"]
        self.versions = database["template_versions"]

    async def put(
        self,
        name: str,
        subject: str,
        text: str | None,
        html: str | None,
        *,
        domain: str | None = None,
    ) -> int:
        """Store a new version of ``name`` and make it the current one; returns its number.
        ``domain``: the gateway domain it belongs to.

        Raises :class:`TemplateError` when a part does not compile or there is no body.
        """
        if text is None and html is None:
            raise TemplateError("a template needs a text or an html body")
        for source, html_part in ((subject, False), (text, False), (html, True)):
            if source is not None:
                check_syntax(source, html_part)
        async with answering():
            while True:
                current = await self.latest.find_one({"_id": name}, {"version": 1})
                version = (current["version"] if current else 0) + 1
                doc = _document(name, version, subject, text, html, utcnow())
                if domain is not None:
                    doc["domain"] = domain
                try:
                    await self.versions.insert_one({**doc, "_id": f"{name}@{version}"})
                except DuplicateKeyError:
                    continue  # another put took this number: take the next
                break
            with contextlib.suppress(DuplicateKeyError):  # a newer version is already current
                await self.latest.update_one(
                    {"_id": name, "version": {"$lt": version}}, {"$set": doc}, upsert=True
                )
        return version

    async def get(self, name: str, version: int | None = None) -> Template | None:
        """The current version of ``name``, or the given one; None if there is none."""
        async with answering():
            if version is None:
                doc = await self.latest.find_one({"_id": name})
            else:
                doc = await self.versions.find_one({"_id": f"{name}@{version}"})
        return _template(doc) if doc is not None else None

    async def find(self) -> list[Document]:
        """The current version of every template, by name."""
        async with answering():
            return [doc async for doc in self.latest.find({}).sort("_id", 1)]

    async def owned(self, name: str, domain: str) -> Template | None:
        """The current version of ``name`` if it belongs to ``domain``, else None."""
        async with answering():
            doc = await self.latest.find_one({"_id": name, "domain": domain})
        return _template(doc) if doc is not None else None

    async def names(self, domain: str, skip: int, limit: int) -> tuple[list[str], int]:
        """A page of the names of ``domain``'s templates, in order, and how many there are."""
        query = {"domain": domain}
        async with answering():
            total = await self.latest.count_documents(query)
            cursor = self.latest.find(query, {"_id": 1}).sort("_id", 1).skip(skip).limit(limit)
            return [str(doc["_id"]) async for doc in cursor], total

    async def history(self, name: str) -> list[Document]:
        """Every stored version of ``name``, oldest first (bodies left out)."""
        async with answering():
            cursor = self.versions.find({"name": name}, {"text": 0, "html": 0})
            return sorted([doc async for doc in cursor], key=lambda d: int(d["version"]))

    async def remove(self, name: str, *, domain: str | None = None) -> bool:
        """Remove ``name`` (only if it belongs to ``domain``, when given) and all its
        versions; False if there was no such template.
        """
        query: Document = {"_id": name} if domain is None else {"_id": name, "domain": domain}
        async with answering():
            result = await self.latest.delete_one(query)
            if result.deleted_count == 1:
                await self.versions.delete_many({"name": name})
        return result.deleted_count == 1

    async def clear(self, domain: str) -> int:
        """Remove every template of ``domain``; returns how many there were."""
        async with answering():
            names = [str(doc["_id"]) async for doc in self.latest.find({"domain": domain})]
        return sum([await self.remove(name, domain=domain) for name in names])


def _document(
    name: str, version: int, subject: str, text: str | None, html: str | None, now: datetime
) -> Document:
    return {
        "name": name,
        "version": version,
        "subject": subject,
        "text": text,
        "html": html,
        "created_at": now,
    }

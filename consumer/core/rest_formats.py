"""The format of a REST gateway answer, chosen as the old CodeIgniter REST server chose
it, and the answer in CodeIgniter's XML: pure functions, no I/O.

The old server looked, in this order, at a suffix of the address (``/api/mail.xml``,
``/api/mail/format/xml``), a ``format`` query parameter and the ``Accept`` header, and
fell back to its default. mailbus answers JSON (the default) or XML; a client that asks
for one of the old server's other formats is refused rather than sent what it cannot read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from consumer.core.vocabulary import REST_FORMATS, RestFormat

# Every output format the CodeIgniter REST server knew, in the order it scanned Accept.
CODEIGNITER_FORMATS = ("xml", "json", "jsonp", "serialized", "php", "html", "csv")
XML_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>\n'
# What XML 1.0 cannot carry at all, escaped or not: most control characters, lone
# surrogates and U+FFFE/U+FFFF. A message that holds one gets U+FFFD in its place.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_LONGEST_NAME = 32  # format names are short; a longer one is named cut in the refusal


@dataclass(frozen=True)
class Refused:
    """A format asked for that mailbus does not answer in."""

    asked: str

    def reason(self) -> str:
        """The refusal's message, naming the formats served."""
        asked = self.asked[:_LONGEST_NAME]
        served = " or ".join(REST_FORMATS)
        return f"format {asked!r} is not served: ask for {served} (JSON is the default)"


def _served(name: str) -> RestFormat | Refused:
    lowered = name.lower()
    for served in REST_FORMATS:
        if lowered == served:
            return served
    return Refused(name)


def _accepted(accept: str) -> str | None:
    """The format CodeIgniter read in an ``Accept`` header: the first of its formats named
    anywhere in it, except that ``xml`` and ``html`` both named mean a browser (neither).
    """
    accept = accept.lower()
    browser = "xml" in accept and "html" in accept
    for name in CODEIGNITER_FORMATS:
        if name in accept and not (browser and name in ("xml", "html")):
            return name
    return None


def answer_format(
    suffix: str | None, query: str | None, accept: str | None
) -> RestFormat | Refused:
    """The format to answer in: the address's ``suffix`` (``xml`` of ``/api/mail.xml``) if
    any, else the ``format`` ``query`` parameter when it names one of the old server's
    formats, else the ``Accept`` header's, else JSON. A format other than JSON or XML asked
    for by the address or the parameter is :class:`Refused`; one the ``Accept`` header
    prefers is answered in JSON (HTTP libraries send ``text/html`` unasked, and their mail
    must not go unsent for it).
    """
    if suffix is not None:
        return _served(suffix)
    if query is not None and query.lower() in CODEIGNITER_FORMATS:
        return _served(query)
    accepted = _served(_accepted(accept or "") or "json")
    return "json" if isinstance(accepted, Refused) else accepted


def rest_xml(reply: Mapping[str, Any]) -> bytes:
    """``reply`` as the CodeIgniter REST server wrote XML: the declaration, then
    ``<xml><status>..</status><message>..</message></xml>``, one element a field (the
    names are mailbus's own; the values are escaped by ElementTree, and characters XML
    cannot carry are replaced).
    """
    root = ElementTree.Element("xml")
    for name, value in reply.items():
        ElementTree.SubElement(root, name).text = _NOT_XML.sub("\ufffd", str(value))
    return (XML_DECLARATION + ElementTree.tostring(root, encoding="unicode") + "\n").encode()

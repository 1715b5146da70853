"""Rendering stored templates with Jinja2's sandbox.

Templates are written by operators but rendered with data from jobs, so rendering runs in
Jinja2's immutable sandbox (no attribute escapes, no mutation of the data), undefined
variables are errors rather than empty strings, and HTML is autoescaped. A subject is
rendered like text and may not contain line breaks. Output is capped while it is produced.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from consumer.errors import TemplateError


@dataclass(frozen=True)
class Template:
    """One version of a stored template: a subject and a text and/or HTML body."""

    name: str
    version: int
    subject: str
    text: str | None
    html: str | None


@dataclass(frozen=True)
class Rendered:
    """A template rendered with a job's data."""

    subject: str
    text: str | None
    html: str | None


def _environment(autoescape: bool) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=autoescape, keep_trailing_newline=True
    )


_TEXT = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


@functools.lru_cache(maxsize=256)
def _compiled(source: str, html: bool) -> jinja2.Template:
    return (_HTML if html else _TEXT).from_string(source)


def check_syntax(source: str, html: bool) -> None:
    """Raise :class:`TemplateError` if ``source`` is not a valid template."""
    try:
        _compiled(source, html)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"line {exc.lineno}: {exc.message}") from None


def _render(source: str, html: bool, data: Mapping[str, Any], limit: int) -> str:
    out: list[str] = []
    size = 0
    chunks: Iterator[str] = _compiled(source, html).generate(data)
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise TemplateError(f"rendered output is more than {limit} characters")
        out.append(chunk)
    return "".join(out)


def render(template: Template, data: Mapping[str, Any], limit: int) -> Rendered:
    """Render every part of ``template`` with ``data``; each part at most ``limit`` characters.

    Raises :class:`TemplateError` with the reason (an undefined variable, an unsafe
    attribute, a syntax error, a subject with a line break, output over ``limit``).
    """
    try:
        subject = _render(template.subject, False, data, 998)
        text = _render(template.text, False, data, limit) if template.text is not None else None
        html = _render(template.html, True, data, limit) if template.html is not None else None
    except TemplateError:
        raise
    except Exception as exc:  # data from the job may make any expression fail
        where = f"template {template.name!r} version {template.version}"
        raise TemplateError(f"{where}: {type(exc).__name__}: {exc}") from None
    if any(c in subject for c in "\r\n\0"):
        raise TemplateError(f"template {template.name!r}: the rendered subject has a line break")
    return Rendered(subject, text, html)

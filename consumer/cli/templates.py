"""``mailbus template``: stored, versioned Jinja2 templates jobs render by name."""

from __future__ import annotations

import argparse
import json
import re
import sys
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from consumer.cli.output import fail, pretty_json, table
from consumer.cli.parsing import Subparsers
from consumer.core.message import TEMPLATE_NAME_PATTERN
from consumer.core.mime import set_bodies
from consumer.core.refusals import TemplateError
from consumer.core.templates import Rendered, render
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.store.mongo import Mongo

# Rendered output shown as written: 8-bit and UTF-8, not encoded for the wire.
_READABLE = policy.default.clone(cte_type="8bit", utf8=True)


def _name(value: str) -> str:
    if not re.fullmatch(TEMPLATE_NAME_PATTERN, value):
        raise argparse.ArgumentTypeError("letters, digits, '.', '_' and '-' only (1-200)")
    return value


def _read(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None


async def _put(args: argparse.Namespace, settings: Settings) -> int:
    text, html = _read(args.text_file), _read(args.html_file)
    async with Mongo.connect(settings) as mongo:
        try:
            version = await mongo.templates.put(args.name, args.subject, text, html)
        except TemplateError as exc:
            return fail("template put", str(exc))
    print(f"template {args.name!r} version {version} stored")
    return 0


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        docs = await mongo.templates.find()
    rows = [("NAME", "VERSION", "PARTS", "CREATED", "SUBJECT")]
    rows += [
        (
            str(d["_id"]),
            str(d["version"]),
            "+".join(p for p in ("text", "html") if d.get(p) is not None),
            d["created_at"].isoformat(timespec="seconds"),
            str(d["subject"]),
        )
        for d in docs
    ]
    print(table(rows))
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        template = await mongo.templates.get(args.name, args.version)
        history = await mongo.templates.history(args.name) if template is not None else []
    if template is None:
        return fail("template show", _missing(args))
    shown: dict[str, Any] = {
        "name": template.name,
        "version": template.version,
        "subject": template.subject,
        "text": template.text,
        "html": template.html,
        "versions": [{"version": d["version"], "created_at": d["created_at"]} for d in history],
    }
    print(pretty_json(shown))
    return 0


async def _rm(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        found = await mongo.templates.remove(args.name)
    if not found:
        return fail("template rm", f"no template {args.name!r}")
    print(f"template {args.name!r} and all its versions removed")
    return 0


async def _render(args: argparse.Namespace, settings: Settings) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--data is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError("--data must be a JSON object")
    async with Mongo.connect(settings) as mongo:
        template = await mongo.templates.get(args.name, args.version)
    if template is None:
        return fail("template render", _missing(args))
    try:
        rendered = render(template, data, settings.max_message_bytes)
    except TemplateError as exc:
        return fail("template render", str(exc))
    sys.stdout.write(_as_message(rendered, template.version).as_string(policy=_READABLE))
    return 0


def _as_message(rendered: Rendered, version: int) -> EmailMessage:
    """The rendered parts laid out as the mail's body will be (text, html alternative)."""
    msg = EmailMessage(policy=_READABLE)
    msg["Subject"] = rendered.subject
    msg["X-Mailbus-Template-Version"] = str(version)
    set_bodies(msg, rendered.text, rendered.html, "utf-8")
    return msg


def _missing(args: argparse.Namespace) -> str:
    version = f" version {args.version}" if args.version is not None else ""
    return f"no template {args.name!r}{version}"


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus template`` and its actions on the top-level subparsers."""
    template = verbs.add_parser(
        "template",
        help="manage stored mail templates",
        description="Templates are Jinja2, rendered in a sandbox with a job's template.data: "
        "HTML is autoescaped and an undefined variable is an error (the job is dead-lettered "
        "'template'). Every put makes a new version; jobs use the latest unless they name "
        "one, and the version used is recorded on the job and in its mail.sent event.",
    )
    actions = template.add_subparsers(dest="template_verb", required=True, metavar="ACTION")

    put = actions.add_parser(
        "put",
        help="store a new version of a template",
        description="Store a new version of a template (checked for syntax first). Give a "
        "text body, an html body, or both; '-' reads one of them from standard input.",
    )
    put.add_argument("name", type=_name, help="the template name jobs refer to")
    put.add_argument("--subject", required=True, help="the subject (a template too)")
    put.add_argument("--text-file", type=Path, metavar="FILE", help="the plain text body")
    put.add_argument("--html-file", type=Path, metavar="FILE", help="the HTML body")
    put.set_defaults(handler=_put)

    ls = actions.add_parser(
        "ls", help="list templates", description="List the current version of each template."
    )
    ls.set_defaults(handler=_ls)

    show = actions.add_parser(
        "show",
        help="print a template as JSON, with its version history",
        description="Print a template (the latest version, or --version) as JSON.",
    )
    render_ = actions.add_parser(
        "render",
        help="print the message a template makes with some data, without sending",
        description="Render a template with --data and print the resulting message "
        "(subject, text and html parts). Exit 1 if it does not render.",
    )
    render_.add_argument(
        "--data", default="{}", metavar="JSON", help="the template data, a JSON object"
    )
    for action, handler in ((show, _show), (render_, _render)):
        action.add_argument("name", type=_name, help="the template name")
        action.add_argument("--version", type=int, help="a stored version (default: latest)")
        action.set_defaults(handler=handler)

    rm = actions.add_parser(
        "rm",
        help="delete a template and all its versions",
        description="Delete a template and all its versions; jobs naming it are then "
        "dead-lettered 'template'.",
    )
    rm.add_argument("name", type=_name, help="the template name")
    rm.set_defaults(handler=_rm)

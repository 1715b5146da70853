"""The v1 job contract: the JSON body producers publish, validated strictly.

Unknown fields are an error, every value that ends up in a header must be one line by
the ``email`` package's own rule (:func:`header_problem`), and addresses are checked with
``email-validator``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.utils import getaddresses
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from consumer.core.raw import RawMessage, decoded_size, read_raw
from consumer.core.refusals import InvalidJobError, JobTooLargeError
from consumer.core.suppression import LIST_NAME

# A custom header is folded at its own white space only; a longer word would not fit in the
# 998 characters RFC 5322 allows on a line.
MAX_HEADER_WORD = 900
TEMPLATE_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"
# ``tags`` and ``metadata`` are stored with the job and echoed in every event: small by
# contract, so one job can never make a record (or a batch of records) too large to write.
MAX_TAGS = 50
# No send time later than this is taken: far enough for any schedule, near enough that a
# waiting copy's seal (its due time plus MAILBUS_SEAL_DAYS) is still a date.
LATEST_SEND_AT = datetime(3000, 1, 1, tzinfo=UTC)
MAX_METADATA_BYTES = 16 * 1024
# A sealed SMTP server (a Fernet token, url-safe base64): the longest URL a gateway seals
# (see consumer.core.smtp_request) makes a token well under this.
MAX_SMTP_SEALED = 4096
# The fields of each form of job: built from parts, or a raw message with its envelope.
# A raw job takes none of the built fields (its message says them itself), and the other
# way round; every other field applies to both.
BUILT_FIELDS = (
    "from",
    "reply_to",
    "to",
    "cc",
    "bcc",
    "subject",
    "text",
    "html",
    "template",
    "attachments",
    "headers",
    "charset",
)
RAW_FIELDS = ("raw_b64", "mail_from", "rcpt_to")
# Header names the service writes itself; a job may not set them through ``headers``.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "sender",
        "return-path",
        "received",
    }
)


def header_problem(value: str) -> str | None:
    """Why ``value`` cannot go into a header, or None when it can.

    The rule is the ``email`` package's own: a header value is one line as
    :meth:`str.splitlines` sees it, so besides CR and LF it refuses VT, FF, FS, GS, RS,
    NEL and the Unicode line and paragraph separators, which would otherwise pass here
    and make building the message fail. NUL and lone surrogates (which JSON can spell
    but no charset can write) are refused as well.
    """
    if value.splitlines() not in ([], [value]) or "\0" in value:
        return "line breaks and NUL are not allowed in header values"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "lone surrogates are not allowed in header values"
    return None


def _no_crlf(value: str) -> str:
    problem = header_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


HeaderText = Annotated[str, AfterValidator(_no_crlf)]


# The validation context key that lets addresses at the special-use domains staging and
# CI setups use (``.test``, ``.localhost``; ``.example`` always passes) through:
# MAILBUS_ALLOW_SPECIAL_USE_DOMAINS.
SPECIAL_USE = "special_use_domains"
_LOCALHOST = ".localhost"


def validation_context(*, special_use: bool) -> dict[str, Any]:
    """The context :meth:`Job.model_validate` takes, for the special-use setting."""
    return {SPECIAL_USE: special_use}


def _check_email(value: str, info: ValidationInfo) -> str:
    _no_crlf(value)
    special_use = bool(info.context and info.context.get(SPECIAL_USE))
    try:
        return _normalized(value, special_use)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid email address {value!r}: {exc}") from None


# The same senders and recipients come mail after mail: each address is checked once, in a
# bounded cache (an address is at most 254 characters, and a refused one is not kept).
@functools.lru_cache(maxsize=4096)
def _normalized(value: str, special_use: bool) -> str:
    if not special_use:
        return validate_email(value, check_deliverability=False).normalized
    local, _, domain = value.rpartition("@")
    if domain.lower().endswith(_LOCALHOST):
        # email-validator can let only .test through: a .localhost name is checked as the
        # .test name beside it.
        stand_in = f"{local}@{domain[: -len(_LOCALHOST)]}.test"
        checked = validate_email(stand_in, check_deliverability=False, test_environment=True)
        return checked.normalized[: -len(".test")] + _LOCALHOST
    return validate_email(value, check_deliverability=False, test_environment=True).normalized


def charset_name(value: str) -> str:
    """A charset Python knows that writes ASCII as ASCII (so MIME headers stay readable)."""
    try:
        ascii_safe = "Aa0 -\n".encode(value) == b"Aa0 -\n"
    except LookupError:
        raise ValueError(f"unknown charset {value!r}") from None
    if not ascii_safe:
        raise ValueError(f"charset {value!r} does not write ASCII as ASCII")
    return value.lower()


Charset = Annotated[str, Field(max_length=40), AfterValidator(charset_name)]
EmailText = Annotated[str, Field(max_length=320), AfterValidator(_check_email)]


def _reachable(value: datetime) -> datetime:
    if value >= LATEST_SEND_AT:
        raise ValueError(f"send times from {LATEST_SEND_AT:%Y} on are not accepted")
    return value


SendTime = Annotated[AwareDatetime, AfterValidator(_reachable)]


def _bounded_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse metadata too large to echo, or with keys MongoDB cannot store (NUL, ``$``)."""
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON, over the {MAX_METADATA_BYTES} allowed")
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any("\0" in key or key.startswith("$") for key in item):
                raise ValueError("metadata keys cannot hold NUL or start with '$'")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def _name_and_address(value: str) -> tuple[str, str]:
    """The display name and address of ``"Name <a@b>"`` or ``"a@b"``."""
    _no_crlf(value)
    try:
        found = getaddresses([value])
    except RecursionError:  # the standard parser recurses into nested comments
        raise ValueError(f"not an address: comments nested too deeply in {value[:100]!r}") from None
    if len(found) != 1 or not found[0][1]:
        raise ValueError(f"not exactly one address: {value!r}")
    return found[0]


# Mailbox texts repeat as their addresses do: each is split once, in a bounded cache of
# those short enough to be one mailbox (a refused one is not kept).
_MAILBOX_TEXT = 600
_known_mailbox = functools.lru_cache(maxsize=4096)(_name_and_address)


def _split_name_addr(value: Any) -> Any:
    """Accept ``"Name <a@b>"`` and bare ``"a@b"`` strings as well as ``{email, name}``."""
    if isinstance(value, str):
        split = _known_mailbox if len(value) <= _MAILBOX_TEXT else _name_and_address
        name, email = split(value)
        return {"email": email, "name": name or None}
    return value


class Address(BaseModel):
    """One mailbox: an address and an optional display name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: EmailText
    name: HeaderText | None = Field(None, max_length=256)

    def header(self) -> HeaderAddress:
        """The address as an ``email`` header value (encodes non-ASCII names).

        Built from its parts: the standard library refuses to parse a non-ASCII local part,
        which SMTPUTF8 allows (the validator has checked the address already).
        """
        local, _, domain = self.email.rpartition("@")
        return HeaderAddress(display_name=self.name or "", username=local, domain=domain)


Mailbox = Annotated[Address, BeforeValidator(_split_name_addr)]


class TemplateRef(BaseModel):
    """A stored template and the data to render it with."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=TEMPLATE_NAME_PATTERN)]
    data: dict[str, Any] = {}
    version: Annotated[int, Field(ge=1)] | None = None


class Attachment(BaseModel):
    """One attachment: inline data (``content_b64``), a ``url`` or a local ``path``."""

    model_config = ConfigDict(extra="forbid")

    filename: HeaderText | None = Field(None, max_length=255)
    content_type: HeaderText | None = Field(None, pattern=r"^[\w.+-]+/[\w.+-]+$")
    content_b64: str | None = None
    url: HeaderText | None = None
    path: HeaderText | None = None
    inline: bool = False
    cid: HeaderText | None = Field(None, pattern=r"^[A-Za-z0-9._@-]{1,200}$")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Attachment:
        sources = [s for s in (self.content_b64, self.url, self.path) if s is not None]
        if len(sources) != 1:
            raise ValueError("an attachment needs exactly one of content_b64, url, path")
        if self.content_b64 is not None and not self.filename and not self.inline:
            raise ValueError("an attachment given as content_b64 needs a filename")
        if self.inline and not self.cid:
            raise ValueError("an inline attachment needs a cid")
        return self


def _ascii_address(value: str) -> str:
    if not value.isascii():
        raise ValueError("an ASCII address: a mailto: URI in a header is written as it is")
    return value


class UnsubscribeRequest(BaseModel):
    """A one-click unsubscribe link (RFC 8058) for the job's list, and a mailto: beside it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    list_: Annotated[
        str,
        Field(
            alias="list",
            pattern=f"^{LIST_NAME.pattern}$",
            description=(
                "The list (or topic) the recipient leaves: one who did is left out of the "
                "domain's later jobs for this list, not of its other mail."
            ),
        ),
    ]
    mailto: Annotated[EmailText, AfterValidator(_ascii_address)] | None = Field(
        None, description="An address that takes unsubscribe requests by mail, also listed."
    )


# Headers the service writes for a job that asks for an unsubscribe link.
UNSUBSCRIBE_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})


HeaderName = Annotated[str, Field(pattern=r"^[!-9;-~]{1,76}$")]
# Lower case from here on: records, outboxes and registrations compare domains exactly.
DomainName = Annotated[
    str,
    Field(max_length=253, pattern=r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$"),
    AfterValidator(str.lower),
]


def _either_form(schema: dict[str, Any]) -> None:
    """The two forms of a job in the JSON Schema: the model's validator says the same."""

    def any_of(names: tuple[str, ...]) -> dict[str, Any]:
        return {"anyOf": [{"required": [name]} for name in names]}

    schema["oneOf"] = [
        {
            "title": "built",
            "description": "A message mailbus builds from its parts.",
            "required": ["from", "to"],
            "properties": {"to": {"minItems": 1}},
            "not": any_of(RAW_FIELDS),
        },
        {
            "title": "raw",
            "description": "An RFC 5322 message sent as given, to the envelope named.",
            "required": list(RAW_FIELDS),
            "not": any_of(BUILT_FIELDS),
        },
    ]


class Job(BaseModel):
    """A mail job, version 1 of the mailbus AMQP contract: a message built from its parts
    (``from``, ``to``, ``subject``, ``text``...) or a raw one (``raw_b64``, ``mail_from``,
    ``rcpt_to``).
    """

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        title="mailbus job v1",
        json_schema_extra=_either_form,
    )

    id: Annotated[str, Field(pattern=r"^[!-~]{1,200}$")] | None = None
    domain: DomainName
    domain_key: SecretStr | None = None
    from_: Annotated[Mailbox | None, Field(alias="from")] = None
    reply_to: Mailbox | None = None
    to: Annotated[list[Mailbox], Field(max_length=1000)] = []
    cc: Annotated[list[Mailbox], Field(max_length=1000)] = []
    bcc: Annotated[list[Mailbox], Field(max_length=1000)] = []
    subject: HeaderText = Field("", max_length=998)
    text: str | None = None
    html: str | None = None
    template: TemplateRef | None = None
    attachments: list[Attachment] = []
    headers: dict[HeaderName, HeaderText] = {}
    charset: Charset | None = None
    send_at: SendTime | None = None
    expires_at: AwareDatetime | None = None
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None
    tags: Annotated[list[Annotated[str, Field(max_length=100)]], Field(max_length=MAX_TAGS)] = []
    metadata: Annotated[dict[str, Any], AfterValidator(_bounded_metadata)] = {}
    smtp_sealed: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=MAX_SMTP_SEALED,
                pattern=r"^[A-Za-z0-9_-]+={0,2}$",
                description=(
                    "An SMTP server to send through instead of the domain's outboxes, sealed "
                    "by the daemon gateway with MAILBUS_SECRET_KEY (only a holder of the key "
                    "can make one); a token no configured key opens is dead-lettered "
                    "'invalid'."
                ),
            ),
        ]
        | None
    ) = None
    raw_b64: str | None = Field(
        None,
        min_length=1,
        description=(
            "The RFC 5322 message, standard base64 (no line breaks); decoded, at most "
            "MAILBUS_MAX_MESSAGE_BYTES. Sent as given, with Message-ID and Date added where "
            "absent and Bcc header fields removed."
        ),
    )
    mail_from: EmailText | None = Field(None, description="The envelope sender of a raw job.")
    rcpt_to: (
        Annotated[
            list[EmailText],
            Field(
                min_length=1,
                max_length=1000,
                description="The envelope recipients of a raw job: who gets it, Bcc included.",
            ),
        ]
        | None
    ) = None
    unsubscribe: UnsubscribeRequest | None = Field(
        None,
        description=(
            "Add List-Unsubscribe (a signed one-click link to the gateway, "
            "MAILBUS_UNSUBSCRIBE_URL) and List-Unsubscribe-Post. The link names one "
            "recipient: the job must have exactly one in to, cc and bcc together (a raw "
            "job: in rcpt_to, its message carrying neither header itself)."
        ),
    )
    sandbox: bool = Field(
        False,
        description=(
            "Staging and CI: the job is authorized, rendered, recorded and announced as in "
            "production, but not delivered (or only to the catch-all outbox "
            "MAILBUS_SANDBOX_OUTBOX names); events and the record say sandbox."
        ),
    )
    version: Literal[1] = 1
    _raw: RawMessage | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_form(self) -> Job:
        raw, envelope = self.raw_b64, (self.mail_from, self.rcpt_to)
        if raw is None and envelope == (None, None):
            return self._check_built()
        if raw is None or None in envelope:
            missing = [name for name in RAW_FIELDS if getattr(self, name) is None]
            raise ValueError(
                f"a raw job needs raw_b64, mail_from and rcpt_to: no {', '.join(missing)}"
            )
        given = {"from" if name == "from_" else name for name in self.model_fields_set}
        built = [name for name in BUILT_FIELDS if name in given]
        if built:
            raise ValueError(
                f"a raw job's message says its own headers and content: {', '.join(built)} "
                "cannot be set"
            )
        self._raw = read_raw(raw)
        if self.unsubscribe is not None:
            self._check_unsubscribe()
        return self

    def _check_built(self) -> Job:
        if self.from_ is None or not self.to:
            raise ValueError(
                "a job needs from and to (or, for a raw message, raw_b64, mail_from and rcpt_to)"
            )
        if self.text is None and self.html is None and self.template is None:
            raise ValueError("a job needs text, html or a template")
        if self.template is not None and (self.text is not None or self.html is not None):
            raise ValueError("a job with a template takes its text and html from it")
        reserved = sorted(
            h
            for h in self.headers
            if h.lower() in RESERVED_HEADERS or h.lower().startswith(("content-", "resent-"))
        )
        if reserved:
            raise ValueError(f"headers owned by mailbus cannot be set: {', '.join(reserved)}")
        if self.unsubscribe is not None:
            self._check_unsubscribe()
        unfoldable = sorted(
            name
            for name, value in self.headers.items()
            if value.isascii() and max(map(len, value.split()), default=0) > MAX_HEADER_WORD
        )
        if unfoldable:
            raise ValueError(
                f"header values with a word longer than {MAX_HEADER_WORD} characters cannot "
                f"be folded: {', '.join(unfoldable)}"
            )
        return self

    def _check_unsubscribe(self) -> None:
        # The link unsubscribes one recipient: sent to several, any of them could use it
        # to unsubscribe the one it names.
        if len(self.recipients()) != 1:
            where = "rcpt_to" if self._raw is not None else "to, cc and bcc together"
            raise ValueError(
                f"a job with an unsubscribe link has exactly one recipient in {where}: the "
                "link names who it unsubscribes"
            )
        if self._raw is not None:
            own = [h for h in self._raw.field_names if h in UNSUBSCRIBE_HEADERS]
        else:
            own = [h for h in self.headers if h.lower() in UNSUBSCRIBE_HEADERS]
        if own:
            raise ValueError(
                f"unsubscribe writes these headers itself: {', '.join(sorted(set(own)))}"
            )

    def raw_message(self) -> RawMessage | None:
        """A raw job's message, read and checked; None for a built job."""
        return self._raw

    def recipients(self) -> list[str]:
        """Envelope recipients, each address once, in order: a raw job's ``rcpt_to``, else
        To, Cc and Bcc.
        """
        if self.rcpt_to is not None:
            return list(dict.fromkeys(self.rcpt_to))
        return list(dict.fromkeys(a.email for a in (*self.to, *self.cc, *self.bcc)))

    def envelope_sender(self) -> str:
        """The envelope sender (MAIL FROM): a raw job's ``mail_from``, else the From."""
        if self.mail_from is not None:
            return self.mail_from
        assert self.from_ is not None  # a built job has one: see _check_built
        return self.from_.email

    def sender_addresses(self) -> list[str]:
        """Every address the domain's sender rule applies to: a built job's From; a raw
        job's envelope sender and its message's From addresses.
        """
        if self._raw is not None:
            return [self.envelope_sender(), *self._raw.senders]
        return [self.envelope_sender()]

    def subject_line(self) -> str:
        """The subject records show: the job's, or a raw message's Subject header."""
        return self._raw.subject if self._raw is not None else self.subject


def json_object(body: bytes, what: str, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Decode a message body that must be a UTF-8 JSON object, or raise
    :class:`InvalidJobError` naming ``what`` it is; a body over ``max_bytes`` is a
    :class:`JobTooLargeError` before it is decoded (a JSON document costs several times
    its size in memory once decoded).
    """
    if max_bytes is not None and len(body) > max_bytes:
        raise JobTooLargeError(
            f"the {what} is {len(body)} bytes, more than the limit of {max_bytes}"
        )
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJobError(f"{what} is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # hostile nesting: the decoder gives up before memory does
        raise InvalidJobError(f"{what} is nested too deeply") from None
    if not isinstance(raw, dict):
        raise InvalidJobError(f"{what} must be a JSON object")
    return raw


def parse_job(
    body: bytes,
    message_id: str | None,
    *,
    max_bytes: int | None = None,
    max_message_bytes: int | None = None,
    special_use: bool = False,
) -> tuple[Job, str]:
    """Validate a message body and return the job with its id.

    The id is the body's ``id``, else the AMQP ``message_id``, else a hash of the body:
    publishing the same bytes twice without an id is still one job. The body wins because
    some clients fill ``message_id`` with a random value of their own.
    Raises :class:`InvalidJobError` with a readable reason; a body over ``max_bytes`` is
    a :class:`JobTooLargeError` before it is decoded, and so is a raw message (``raw_b64``)
    of more than ``max_message_bytes`` once decoded. With ``special_use``, addresses at
    special-use domains (``.test``, ``.localhost``) are accepted.
    """
    raw = json_object(body, "body", max_bytes=max_bytes)
    message = raw.get("raw_b64")
    if max_message_bytes is not None and isinstance(message, str):
        size = decoded_size(message)
        if size > max_message_bytes:
            raise JobTooLargeError(
                f"the raw message is {size} bytes, more than the limit of {max_message_bytes}"
            )
    try:
        job = Job.model_validate(raw, context=validation_context(special_use=special_use))
    except ValidationError as exc:
        raise InvalidJobError(describe_errors(exc)) from None
    job_id = job.id or message_id or "sha256:" + hashlib.sha256(body).hexdigest()
    if not 0 < len(job_id) <= 200:
        raise InvalidJobError("message_id must be 1 to 200 characters")
    return job, job_id


def describe_errors(exc: ValidationError) -> str:
    """A compact one-line rendering of pydantic errors: field path and message."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema of the v1 body, as shipped in ``consumer/schemas/job-v1.json``."""
    schema = Job.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://mailbus.invalid/schemas/job-v1.json"
    return schema


def json_body(value: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as every mailbus message body is encoded."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode()

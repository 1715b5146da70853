"""Rendering stored templates with Jinja2's sandbox.

Templates are written by operators but rendered with data from jobs, so rendering runs in
Jinja2's immutable sandbox (no attribute escapes, no mutation of the data), undefined
variables are errors rather than empty strings, and HTML is autoescaped. A subject is
rendered like text and must be one header line (:func:`consumer.core.message.header_problem`).

The sandbox is bounded as well (:class:`BoundedSandbox`): a value that would be larger
than the output may be is refused before it is made (``{{ name * 400000000 }}`` costs
nothing), and a render that takes longer than :data:`RENDER_SECONDS` is stopped at its
next loop step, call or filter. Output is capped while it is produced. Rendering runs in a
thread (:mod:`consumer.service.compose`), so a slow template never holds up the worker's loop.

Templates are the operators': the bounds hold what a job's data can make a template
spend for what templates do (loops, filters, formats, arithmetic); they are not a jail
for a hostile template author, who can still build a large value step by step.
"""

from __future__ import annotations

import contextvars
import functools
import math
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from consumer.core.message import header_problem
from consumer.core.refusals import TemplateError

# Wall time one template part may take to render; far above what a mail template needs.
RENDER_SECONDS = 5.0
# Checked every so many loop steps, so that a loop over a long list costs little.
_TICK_EVERY = 256
# Integers beyond this could not be printed anyway (Python prints 4300 digits at most),
# and multiplying them over and over takes seconds a step.
_MAX_INT_BITS = 16_384
# The filters and str methods whose int arguments are widths of what they make.
_WIDTHS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent"})
# The filters whose int arguments count the pieces they make.
_COUNTS = frozenset({"slice"})
# A ``%`` format's field widths and precisions, after any ``(key)``.
_PERCENT_WIDTHS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")


@dataclass
class _Budget:
    """The bounds of the render under way: its deadline and the largest value it may make."""

    deadline: float
    limit: int

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"rendering took more than {RENDER_SECONDS:g} s")

    def size(self, length: float, what: str) -> None:
        if length > self.limit:
            raise TemplateError(f"{what} would be more than {self.limit} characters")


# Set for each part while it renders; rendering is synchronous, so one at a time per task.
_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _budget() -> _Budget:
    budget = _BUDGET.get(None)
    if budget is None:  # compiled or evaluated outside render(): no data from a job
        return _Budget(math.inf, 2**62)
    return budget


def _ticking(iterable: Iterable[Any]) -> Iterator[Any]:
    """``iterable``, checking the deadline as a loop walks it."""
    budget = _budget()
    budget.tick()
    for n, item in enumerate(iterable, 1):
        if n % _TICK_EVERY == 0:
            budget.tick()
        yield item


def _checked_concat(value: Any) -> Any:
    _budget().size(len(value), "a joined string")
    return value


def _check_width(what: str, value: Any, args: Iterable[Any]) -> None:
    """Refuse a width that would make ``value`` larger than the output may be, before
    ``center``, ``ljust``, ``zfill``, ``indent`` and the like make it.
    """
    lines = value.count("\n") + 1 if isinstance(value, str) else 1
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool):
            _budget().size(arg * lines, f"{what} with width {arg}")


def _check_percent(fmt: str, what: str) -> None:
    """Refuse ``%`` field widths that together exceed the limit, and widths from data."""
    total = 0
    for width, precision in _PERCENT_WIDTHS.findall(fmt):
        for number in (width, precision):
            if number == "*":
                raise TemplateError(f"{what}: a '*' width is not allowed")
            total += int(number or 0)
    _budget().size(total, f"{what} with widths of {total} together")


class _BoundedCode(CodeGenerator):
    """Compiles loops to check the deadline as they go, and ``~`` to check its size."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        # Before the template's filters are gathered, so that ``_ticking`` is among them.
        for loop in node.find_all(nodes.For):
            if not loop.recursive:
                loop.iter = nodes.Filter(
                    loop.iter, "_ticking", [], [], None, None, lineno=loop.lineno
                )
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps jinja's pass_context/pass_eval_context marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _budget().tick()
        if name in _WIDTHS and args:
            _check_width(f"the {name} filter", args[0], [*args[1:], *kwargs.values()])
        for count in (*args[1:], *kwargs.values()) if name in _COUNTS else ():
            if isinstance(count, int):
                _budget().size(count, f"the {name} filter with {count} pieces")
        if name == "format" and args and isinstance(args[0], str):
            _check_percent(args[0], "the format filter")
        if name == "replace":
            strings = [a for a in args if isinstance(a, str)]
            if len(strings) >= 3:
                _check_replace(*strings[-3:])
        return func(*args, **kwargs)

    return guarded


def _check_bits(bits: int) -> None:
    if bits > _MAX_INT_BITS:
        raise TemplateError(f"a number of more than {_MAX_INT_BITS} bits is not allowed")


def _check_format(fmt: str) -> None:
    """Refuse ``str.format`` field widths beyond the limit, and widths taken from data."""
    total = 0
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec and "{" in spec:
            raise TemplateError("a nested format field is not allowed")
        total += sum(int(number) for number in re.findall(r"\d+", spec or ""))
    _budget().size(total, f"format fields with widths of {total} together")


def _check_replace(value: str, old: str, new: str) -> None:
    count = value.count(old) if old else len(value) + 1
    _budget().size(len(value) + count * (len(new) - len(old)), "a replaced string")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with bounds on what data from a job can make it spend:
    ``*``, ``+``, ``%``, ``**``, ``~``, ``str.replace``, width and count arguments and
    ``format`` widths are refused when their result would exceed the render's limit
    (before it is computed), and loops, calls and filters stop at the render's deadline.
    """

    code_generator_class = _BoundedCode
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _guarded_filter(name, f) for name, f in self.filters.items()}
        self.filters["_ticking"] = _ticking
        self.checked_concat = _checked_concat
        # Placeholder text in any amount, in one call the deadline cannot interrupt.
        del self.globals["lipsum"]

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        """A binary operator, refused before it makes a value beyond the limit."""
        budget = _budget()
        budget.tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    budget.size(len(seq) * times, "a repeated value")
            if isinstance(left, int) and isinstance(right, int):
                _check_bits(left.bit_length() + right.bit_length())
        elif operator == "+" and isinstance(left, str | list | tuple):
            if isinstance(right, str | list | tuple):
                budget.size(len(left) + len(right), "a joined value")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, "a % format")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            _check_bits(abs(left).bit_length() * right)
        return super().call_binop(context, operator, left, right)

    def call(
        __self,  # the sandbox's own signature: any keyword may be passed on
        __context: jinja2.runtime.Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """A call from the template, within the deadline and with sizes it may make."""
        _budget().tick()
        # The sandbox hands out str.format wrapped; the wrapper keeps the method.
        method = getattr(__obj, "__wrapped__", __obj)
        name, owner = getattr(method, "__name__", None), getattr(method, "__self__", None)
        if isinstance(owner, str) and name in ("format", "format_map"):
            _check_format(owner)
        if isinstance(owner, str) and name in _WIDTHS:
            _check_width(f"str.{name}", owner, [*args, *kwargs.values()])
        if isinstance(owner, str) and name == "replace":
            strings = [a for a in args if isinstance(a, str)]
            if len(strings) >= 2:
                _check_replace(owner, strings[0], strings[1])
        return super().call(__context, __obj, *args, **kwargs)


@dataclass(frozen=True)
class Template:
    """One version of a stored template: a subject and a text and/or HTML body; ``domain``,
    the one domain whose mail may use it (the daemon gateway's templates), else None (any).
    """

    name: str
    version: int
    subject: str
    text: str | None
    html: str | None
    domain: str | None = None

    def usable_by(self, domain: str) -> bool:
        """Whether mail of ``domain`` may render this template."""
        return self.domain is None or self.domain == domain

    @property
    def body(self) -> str | None:
        """The HTML body, else the text one: what the old daemon called the template."""
        return self.html if self.html is not None else self.text


@dataclass(frozen=True)
class Rendered:
    """A template rendered with a job's data."""

    subject: str
    text: str | None
    html: str | None


def _environment(autoescape: bool) -> BoundedSandbox:
    return BoundedSandbox(
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
    budget = _Budget(time.monotonic() + RENDER_SECONDS, limit)
    token = _BUDGET.set(budget)
    try:
        out: list[str] = []
        size = 0
        chunks: Iterator[str] = _compiled(source, html).generate(data)
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise TemplateError(f"rendered output is more than {limit} characters")
            out.append(chunk)
            budget.tick()
        return "".join(out)
    finally:
        _BUDGET.reset(token)


def render(template: Template, data: Mapping[str, Any], limit: int) -> Rendered:
    """Render every part of ``template`` with ``data``; each part at most ``limit`` characters.

    Raises :class:`TemplateError` with the reason (an undefined variable, an unsafe
    attribute, a syntax error, a subject that is not one header line, a value or output
    over ``limit``, more than :data:`RENDER_SECONDS`).
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
    problem = header_problem(subject)
    if problem is not None:
        raise TemplateError(f"template {template.name!r}: the rendered subject: {problem}")
    return Rendered(subject, text, html)

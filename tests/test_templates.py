"""Templates: sandboxed rendering, versions in MongoDB, and the ``mailbus template`` verbs."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from email import policy
from email.parser import Parser
from pathlib import Path

import pytest

from consumer.core import templates
from consumer.core.message import Job
from consumer.core.refusals import TemplateError
from consumer.core.templates import Template, render
from consumer.mail.attachments import AttachmentLoader
from consumer.mail.fetch import Fetcher, FetchLimits
from consumer.service.compose import Composer
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.templates import TemplateStore
from deploy.devstack.processes import mailbus
from tests.broker import job as job_body

WELCOME = Template(
    "welcome",
    3,
    "Welcome, {{ name }}",
    "Hello {{ name }}, your code is {{ code }}.\n",
    "<p>Hello {{ name }}</p>{% for item in items %}<li>{{ item }}</li>{% endfor %}",
)


def test_render_fills_every_part_and_escapes_html_only() -> None:
    data = {"name": "Ann & <Bob>", "code": 42, "items": ["a<b", "c"]}
    rendered = render(WELCOME, data, 10_000)
    assert rendered.subject == "Welcome, Ann & <Bob>"
    assert rendered.text == "Hello Ann & <Bob>, your code is 42.\n"
    assert rendered.html == ("<p>Hello Ann &amp; &lt;Bob&gt;</p><li>a&lt;b</li><li>c</li>")


def test_undefined_variables_are_errors_not_blanks() -> None:
    with pytest.raises(TemplateError, match="'code' is undefined"):
        render(WELCOME, {"name": "Ann", "items": []}, 10_000)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ name.__class__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ items.append(1) }}",  # the data is immutable
        "{% set x = items.pop() %}",
    ],
)
def test_sandbox_refuses_escapes(source: str) -> None:
    template = Template("evil", 1, "s", source, None)
    with pytest.raises(TemplateError, match="evil"):
        render(template, {"name": "x", "items": [1]}, 10_000)


def test_output_and_subject_are_bounded() -> None:
    huge = Template("huge", 1, "s", "{% for i in range(100000) %}xxxxxxxxxx{% endfor %}", None)
    with pytest.raises(TemplateError, match="more than 5000 characters"):
        render(huge, {}, 5_000)
    broken = Template("two-lines", 1, "{{ s }}", "t", None)
    with pytest.raises(TemplateError, match="line break"):
        render(broken, {"s": "hi\nBcc: victim@example.net"}, 5_000)


async def test_versions_are_kept_and_the_latest_is_current(store: JobStore) -> None:
    templates = TemplateStore(store.database)
    assert await templates.put("welcome", "v1 {{ n }}", "one", None) == 1
    assert await templates.put("welcome", "v2 {{ n }}", None, "<p>two</p>") == 2
    current = await templates.get("welcome")
    assert current is not None
    assert (current.version, current.subject, current.text, current.html) == (
        2,
        "v2 {{ n }}",
        None,
        "<p>two</p>",
    )
    first = await templates.get("welcome", 1)
    assert first is not None
    assert (first.version, first.text) == (1, "one")
    assert [d["version"] for d in await templates.history("welcome")] == [1, 2]
    with pytest.raises(TemplateError, match="line 1"):
        await templates.put("welcome", "ok", "{% for %}", None)
    with pytest.raises(TemplateError, match="text or an html"):
        await templates.put("welcome", "ok", None, None)
    assert await templates.remove("welcome")
    assert await templates.get("welcome") is None
    assert await templates.get("welcome", 1) is None
    assert not await templates.remove("welcome")


async def test_template_commands(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "w.html").write_text("<p>Hi {{ name }}</p>")
    (tmp_path / "w.txt").write_text("Hi {{ name }}")
    put = await mailbus(
        settings,
        *("template", "put", "welcome", "--subject", "Hello {{ name }}"),
        *("--html-file", str(tmp_path / "w.html"), "--text-file", str(tmp_path / "w.txt")),
    )
    assert put.returncode == 0, put.stderr
    assert "version 1" in put.stdout
    again = await mailbus(
        settings,
        "template",
        "put",
        "welcome",
        "--subject",
        "Hey {{ name }}",
        "--text-file",
        "-",
        input="Hey {{ name }}",
    )
    assert "version 2" in again.stdout

    rendered = await mailbus(settings, "template", "render", "welcome", "--data", '{"name": "Zoë"}')
    assert rendered.returncode == 0, rendered.stderr
    msg = Parser(policy=policy.default).parsestr(rendered.stdout)
    assert (msg["Subject"], msg.get_content().strip()) == ("Hey Zoë", "Hey Zoë")
    old = await mailbus(
        settings, "template", "render", "welcome", "--version", "1", "--data", '{"name": "<Zoë>"}'
    )
    old_msg = Parser(policy=policy.default).parsestr(old.stdout)
    html = old_msg.get_body(("html",))
    assert html is not None
    assert html.get_content().strip() == "<p>Hi &lt;Zoë&gt;</p>"
    missing = await mailbus(settings, "template", "render", "welcome", "--data", "{}")
    assert missing.returncode == 1
    assert "'name' is undefined" in missing.stderr

    listed = await mailbus(settings, "template", "ls")
    assert listed.stdout.splitlines()[1].split()[:3] == ["welcome", "2", "text"]
    shown = json.loads((await mailbus(settings, "template", "show", "welcome")).stdout)
    assert shown["version"] == 2
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    bad = await mailbus(
        settings, "template", "put", "bad", "--subject", "{{ x", "--text-file", "-", input="t"
    )
    assert bad.returncode == 1
    assert "line 1" in bad.stderr
    assert (await mailbus(settings, "template", "rm", "welcome")).returncode == 0
    gone = await mailbus(settings, "template", "show", "welcome")
    assert gone.returncode == 1
    assert "no template 'welcome'" in gone.stderr


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\ud800"])
def test_a_rendered_subject_must_be_one_header_line(char: str) -> None:
    template = Template("subject", 1, "Hi {{ s }}", "t", None)
    with pytest.raises(TemplateError, match="the rendered subject"):
        render(template, {"s": f"a{char}b"}, 5_000)


@pytest.mark.parametrize(
    ("source", "refusal"),
    [
        ("{{ name * 400000000 }}", "a repeated value"),
        ("{{ [name] * 400000000 }}", "a repeated value"),
        (
            "{% set ns = namespace(s=name) %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "a joined string",
        ),
        (
            "{% set ns = namespace(s=name) %}{% for i in range(40) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "a joined value",
        ),
        ("{{ name|center(1000000000) }}", "the center filter"),
        ("{{ name.ljust(1000000000) }}", "str.ljust"),
        ("{{ '%999999999s' % name }}", "a % format"),
        ("{{ '%999999999s'|format(name) }}", "the format filter"),
        ("{{ '{:>999999999}'.format(name) }}", "format fields with widths"),
        ("{{ (name * 1000).replace('', name * 1000) }}", "a replaced string"),
        ("{{ 7 ** 1000000000 }}", "bits is not allowed"),
        # Widths within the limit one by one, but not together; a width behind a key.
        ("{{ ('{0:>600000}' * 20).format(name) }}", "format fields with widths"),
        ("{{ ('%600000s' * 20) % ((name,) * 20) }}", "a % format"),
        ("{{ '%(a)999999999s' % {'a': name} }}", "a % format"),
        ("{{ '%(a)999999999s'|format(a=name) }}", "the format filter"),
        # A billion pieces of nothing, made one by one.
        ("{{ [name]|slice(1000000000)|list|length }}", "the slice filter"),
    ],
)
def test_values_beyond_the_limit_are_refused_before_they_are_made(
    source: str, refusal: str
) -> None:
    template = Template("growth", 1, "s", source, None)
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=refusal):
            render(template, {"name": "abcd"}, 1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak} bytes held to refuse it"


def test_rendering_stops_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.3)
    # Nested loops over the job's data, and calls: nothing is output, nothing grows.
    loops = "{% for a in items %}{% for b in items %}{% endfor %}{% endfor %}"
    calls = "{% for a in items %}{{ a|string|length * 0 }}{% endfor %}"
    for source in (loops, calls):
        started = time.monotonic()
        with pytest.raises(TemplateError, match=r"rendering took more than 0\.3 s"):
            render(Template("slow", 1, "s", source, None), {"items": [0] * 10_000_000}, 10**9)
        assert time.monotonic() - started < 2


def test_placeholder_text_is_not_offered() -> None:
    """``lipsum(n=10**8)`` would run in one call the deadline cannot interrupt."""
    with pytest.raises(TemplateError, match="lipsum"):
        render(Template("lorem", 1, "s", "{{ lipsum(n=100000000) }}", None), {}, 10**9)


async def test_a_slow_render_does_not_hold_up_the_event_loop(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(templates, "RENDER_SECONDS", 1.0)
    store_of_templates = TemplateStore(store.database)
    slow = "{% for a in items %}{% for b in items %}{% endfor %}{% endfor %}"
    await store_of_templates.put("slow", "s", slow, None)
    fetcher = Fetcher(FetchLimits(max_bytes=1024))
    composer = Composer(store_of_templates, AttachmentLoader([], 1024, fetcher), 10_000)
    data = {"items": list(range(100_000))}
    job = Job.model_validate(job_body(text=None, template={"name": "slow", "data": data}))
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            lags.append(time.monotonic() - before - 0.05)

    ticking = asyncio.create_task(ticker())
    try:
        with pytest.raises(TemplateError, match="rendering took more than 1 s"):
            await composer.compose(job)
    finally:
        ticking.cancel()
        await fetcher.close()
    assert len(lags) >= 10  # the loop went on while the template rendered
    assert max(lags) < 0.5


def test_what_templates_ordinarily_do_is_untouched() -> None:
    source = (
        "{{ '%05d'|format(order) }} {{ '{:>8}'.format(name) }} {{ name|center(12) }}"
        " {{ 'x' * 3 ~ name + '!' }} {{ 2 ** 10 }} {{ name.replace('a', 'A') }}"
        "{% for i in items %}{{ loop.index }}{% endfor %}"
    )
    rendered = render(Template("fine", 1, "s", source, None), WELCOME_DATA, 10_000)
    assert rendered.text == "12345     abcd     abcd     xxxabcd! 1024 Abcd123"


WELCOME_DATA = {"name": "abcd", "order": 12345, "items": ["a", "b", "c"]}


async def test_a_stored_document_that_is_not_a_template_is_a_template_error(
    store: JobStore,
) -> None:
    templates = TemplateStore(store.database)
    await templates.latest.insert_one({"_id": "broken", "name": "broken", "version": 1})
    fetcher = Fetcher(FetchLimits(max_bytes=1024))
    composer = Composer(templates, AttachmentLoader([], 1024, fetcher), 10_000)
    job = Job.model_validate(job_body(text=None, template={"name": "broken"}))
    with pytest.raises(TemplateError, match="template 'broken': KeyError: 'subject'"):
        await composer.compose(job)
    await fetcher.close()

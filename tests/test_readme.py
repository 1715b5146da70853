"""Every command the docs show is one that works, and every link between them leads somewhere.

Every tracked Markdown file is checked (``git ls-files '*.md'``), each on its own.
Commands that change a live system are run by the tests of their features (the quickstart
by ``test_quickstart``, the gateway one-liners by ``test_gateways``, each verb by its own
tests). Here every ``mailbus`` command in a shell block or synopsis is parsed by the real
command line, every ``make`` target and example script it names exists and takes the
options shown, and nothing else appears unaccounted for. Every relative link
(``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``) names a file or directory
of the repository and, with an anchor, a heading of that file (GitHub's slugs).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from consumer.cli.app import _parser
from consumer.settings import Settings

# Commands the docs may show that are not mailbus's own, and who answers for them.
EXTERNAL = {
    "git": "the quickstart's clone, done by hand",
    "cd": "a shell builtin",
    "export": "a shell builtin",
    "echo": "a shell builtin",
    "curl": "the REST gateway one-liner, run by test_gateways",
    "nc": "the daemon gateway one-liner, run by test_gateways",
}
SEPARATORS = {"|", "||", "&&", ";", "(", ")"}


def command_blocks(readme: str) -> list[str]:
    """Shell blocks, and unlabelled blocks that are ``mailbus`` synopses."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    return [
        body.replace("\\\n", " ")
        for lang, body in blocks
        if lang in ("sh", "console") or (lang == "" and body.startswith("mailbus "))
    ]


def segments(line: str) -> list[list[str]]:
    """A command line cut at pipes, ``;``, ``&&`` and ``$( )``, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            found.append([])
        elif not token.endswith("=$"):  # the `VAR=$` left of a `$( )`
            found[-1].append(token)
    return [words for words in found if words]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def verb_path(words: list[str]) -> list[str]:
    """The leading words of a mailbus command that name (sub)commands."""
    parser, path = _parser(), []
    for word in words:
        choices = _subcommands(parser)
        if word not in choices:
            break
        parser = choices[word]
        path.append(word)
    return path


def variants(words: list[str]) -> list[list[str]]:
    """A synopsis's concrete forms: ``[optional]`` parts left out, and put in."""
    without, within, depth = [], [], 0
    for word in words:
        if word == "...":
            continue
        opens, closes = word.startswith("["), word.endswith("]")
        bare = word.strip("[]")
        depth += opens
        if bare and bare != "...":
            within.append(bare)
            if depth == 0:
                without.append(bare)
        depth -= closes
    return [without, within]


def shown_commands(readme: str) -> list[tuple[str, list[str], str]]:
    """Every command shown, as (program, words, line): for ``mailbus`` the words after its
    global options, alternatives expanded (in ``mailbus provider ls | show NAME``, ``show
    NAME`` means ``mailbus provider show NAME``); environment assignments dropped.
    """
    found: list[tuple[str, list[str], str]] = []
    for block in command_blocks(readme):
        for line in block.splitlines():
            last: list[str] | None = None
            for words in segments(line):
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    words = words[1:]
                if not words:
                    continue
                name = Path(words[0]).name
                if name == "mailbus":
                    args = words[1:]
                    if args[:1] == ["--env-file"]:
                        args = args[2:]
                    last = verb_path(args)
                    found.append(("mailbus", args, line))
                elif last is not None and (words[0].startswith("-") or name not in EXTERNAL):
                    parent = last if words[0].startswith("-") else last[:-1]
                    found.append(("mailbus", [*parent, *words], line))
                else:
                    found.append((name, words, line))
    return found


def mailbus_commands(readme: str) -> list[list[str]]:
    """The arguments of every mailbus command shown."""
    return [words for program, words, _ in shown_commands(readme) if program == "mailbus"]


REPO_ROOT = Path(__file__).resolve().parent.parent


def markdown_files() -> list[str]:
    """Every tracked Markdown file, as a path from the repository's root."""
    listed = subprocess.run(
        ["git", "ls-files", "*.md"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return sorted(listed.split())


DOCS = markdown_files()


@pytest.fixture(scope="module")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(params=DOCS)
def doc(request: pytest.FixtureRequest) -> str:
    """One tracked Markdown file's text."""
    path: str = request.param
    return (REPO_ROOT / path).read_text()


def test_every_doc_is_checked() -> None:
    assert "README.md" in DOCS
    assert len(DOCS) > 1


def test_the_extraction_sees_the_commands() -> None:
    commands = [c for path in DOCS for c in mailbus_commands((REPO_ROOT / path).read_text())]
    assert ["outbox", "new-key"] in commands  # inside $( )
    assert ["provider", "show", "NAME"] in commands  # an alternative after |
    assert ["dead", "replay", "--all"] in commands
    assert ["gateway", "serve", "--rest", "8000", "--daemon", "3000"] in commands
    assert len(commands) > 40


def test_every_mailbus_command_shown_parses(doc: str, capsys: pytest.CaptureFixture[str]) -> None:
    refused = []
    for command in mailbus_commands(doc):
        for form in variants(command):
            try:
                _parser().parse_args(form)
            except SystemExit:
                refused.append(f"mailbus {shlex.join(form)}: {capsys.readouterr().err}")
    assert refused == []


def test_every_other_command_is_accounted_for(doc: str, repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    unknown = []
    for program, words, line in shown_commands(doc):
        if program == "make":
            assert set(words[1:]) <= targets, line
        elif program == "python":
            shown = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
            helped = subprocess.run(
                [sys.executable, str(repo_root / words[1]), "--help"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            assert shown <= set(re.findall(r"--[\w-]+", helped)), line
        elif program != "mailbus" and program not in EXTERNAL:
            unknown.append(line)
    assert unknown == []


FENCE = re.compile(r"^```.*?^```$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def prose(text: str) -> str:
    """``text`` without its fenced blocks."""
    return FENCE.sub("", text)


def links(text: str) -> list[str]:
    """The targets of every Markdown link in ``text``'s prose; brackets in code are code."""
    return LINK.findall(CODE_SPAN.sub("", prose(text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered (code spans and links reduced
    to their text), lower case, punctuation dropped, spaces turned into hyphens.
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in ``text``; a repeated one gets ``-1``, ``-2``, ... as on
    GitHub.
    """
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(text)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_the_link_checks_see_links_and_anchors() -> None:
    text = "# A `b` — c: d's\n## Two\n## Two\n[x](y.md#two-1) and [`z`](../w/) `[no](t)`\n"
    assert links(text + "```\n[in](code)\n```\n") == ["y.md#two-1", "../w/"]
    assert anchors(text) == {"a-b--c-ds", "two", "two-1"}
    assert slug("Scheduling: the delay ladder") == "scheduling-the-delay-ladder"
    assert slug("mailbus status") == "mailbus-status"


@pytest.mark.parametrize("path", DOCS)
def test_every_relative_link_leads_somewhere(path: str) -> None:
    source = REPO_ROOT / path
    broken = []
    for target in links(source.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (source.parent / file).resolve() if file else source
        if not linked.is_relative_to(REPO_ROOT) or not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.is_dir() or anchor not in anchors(linked.read_text())):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO_ROOT)}")
    assert broken == []


# Names of environment variables the docs show that are not settings: the ones `mailbus
# config export` writes for outbox passwords (`password_env`), MAILBUS_PASSWORD_<NAME>.
NOT_SETTINGS = re.compile(r"^MAILBUS_PASSWORD(_[A-Z0-9_]+)?$")


@pytest.mark.parametrize("path", DOCS)
def test_every_setting_named_is_one(path: str) -> None:
    settings = {f"MAILBUS_{name.upper()}" for name in Settings.model_fields}
    named = set(re.findall(r"\bMAILBUS_[A-Z0-9_]*[A-Z0-9]", (REPO_ROOT / path).read_text()))
    assert {name for name in named - settings if not NOT_SETTINGS.match(name)} == set()

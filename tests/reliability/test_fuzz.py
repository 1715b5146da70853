"""Hostile job bodies against the parser and the MIME builder, drawn by hypothesis, and a
short coverage-guided atheris run: whatever comes in, the answer is a message that goes
on the wire as it should, or a dead-letter error with a reason (see ``fuzz_target``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumer.core.message import job_json_schema
from tests.broker import encode, job
from tests.reliability.fuzz_target import check

ATHERIS_SECONDS = int(os.environ.get("RELIABILITY_ATHERIS_SECONDS", "10"))
# Where the atheris run starts: valid jobs using most of the contract, for libFuzzer to
# mutate into the corners.
SEEDS = [
    job(),
    job(html="<p>Hi <b>there</b></p>", cc=["cc@example.org"], reply_to="r@example.com"),
    job(charset="iso-8859-1", subject="Grüße", text="Grüße", headers={"X-Campaign": "7"}),
    job(
        to=[{"email": "ü@bücher.example", "name": "Ü"}],
        attachments=[
            {"filename": "a.txt", "content_b64": "aGVsbG8=", "content_type": "text/plain"}
        ],
    ),
    job(
        html='<img src="cid:logo">',
        attachments=[
            {"filename": "l.png", "content_b64": "iVBORw0K", "inline": True, "cid": "logo"}
        ],
        tags=["t"],
        metadata={"user": 7},
    ),
]

# Strings that tend to break mail: line breaks for header injection, NULs, lone
# surrogates' neighbours, IDN, quoted local parts, very long words.
NASTY = st.sampled_from(
    [
        "",
        "a\r\nBcc: victim@example.org",
        "a\nX-Injected: yes",
        "x\r\n\r\nbody",
        "\x00",
        "é" * 80,
        "ü@bücher.example",
        '"quoted local"@example.org',
        '"a\\"b"@example.org',
        "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 57,
        "x" * 5000,
        "=?utf-8?b?PGI+?=",
        "<script>",
        "user@[127.0.0.1]",
        "user@localhost",
        "@example.org",
        "user@",
        "Name <user@example.org>",
    ]
)
TEXT = st.one_of(NASTY, st.text(max_size=300))
ADDRESS = st.one_of(
    NASTY, st.emails(), st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=70), TEXT)
)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
JSON = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)


def job_like() -> st.SearchStrategy[dict[str, Any]]:
    """Bodies shaped like jobs, each field maybe wrong."""
    return st.fixed_dictionaries(
        {
            "domain": st.one_of(st.just("example.com"), TEXT),
            "from": st.one_of(ADDRESS, st.fixed_dictionaries({"email": ADDRESS, "name": TEXT})),
            "to": st.lists(st.one_of(ADDRESS, JSON), min_size=0, max_size=4),
        },
        optional={
            "subject": st.one_of(TEXT, JSON),
            "text": TEXT,
            "html": TEXT,
            "cc": st.lists(ADDRESS, max_size=3),
            "reply_to": ADDRESS,
            "headers": st.dictionaries(st.one_of(NASTY, st.text(max_size=20)), TEXT, max_size=3),
            "charset": st.one_of(st.sampled_from(["iso-8859-1", "us-ascii", "koi8-r"]), TEXT),
            "attachments": st.lists(JSON, max_size=2),
            "send_at": st.one_of(TEXT, st.just("2026-01-01T00:00:00Z")),
            "metadata": JSON,
            "id": TEXT,
        },
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
@example(b"\xff\xfe{}")
@example(b'{"domain": "example.com"' * 1000)
def test_random_bytes(body: bytes) -> None:
    check(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
@example([[[[[[[[[[[]]]]]]]]]]])
def test_random_json(value: Any) -> None:
    check(json.dumps(value).encode())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_like())
def test_job_shaped_bodies(body: dict[str, Any]) -> None:
    check(json.dumps(body).encode())


def test_deep_nesting_is_refused_not_a_crash() -> None:
    body = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    check(body)


def property_names(schema: Any) -> set[str]:
    """Every property name the job schema declares, at any depth."""
    if isinstance(schema, list):
        return set().union(*(property_names(item) for item in schema))
    if not isinstance(schema, dict):
        return set()
    names = set(schema.get("properties", {}))
    return names.union(*(property_names(value) for value in schema.values()))


@pytest.mark.timeout(ATHERIS_SECONDS + 90)
def test_atheris_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n, seed in enumerate(SEEDS):
        (corpus / f"seed{n}").write_bytes(encode(seed))
    # libFuzzer splices these tokens in: the contract's field names, quoted as in JSON.
    names = property_names(job_json_schema())
    dictionary = tmp_path / "job.dict"
    dictionary.write_text("".join(f'"\\"{name}\\":"\n' for name in sorted(names)))
    run = subprocess.run(
        [
            sys.executable, "-m", "tests.reliability.atheris_jobs",
            f"-max_total_time={ATHERIS_SECONDS}", f"-artifact_prefix={tmp_path}/",
            f"-dict={dictionary}", "-max_len=8192", "-rss_limit_mb=2048", str(corpus),
        ],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=ATHERIS_SECONDS + 60,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    done = re.search(r"Done (\d+) runs", run.stderr)
    assert done is not None, run.stderr[-2000:]
    assert int(done.group(1)) > 1000

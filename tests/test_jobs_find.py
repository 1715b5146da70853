"""Finding a job: ``mailbus jobs ls`` filters and pages, ``jobs show`` tells each attempt's
SMTP reply, against records the store's own writes and a real worker made.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.core.message import Job
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import REPLY_LENGTH, JobFilter, JobStore
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.conftest import RunningWorker, settled_record


async def _sent(store: JobStore, job_id: str, outbox: str = "main", **fields: Any) -> None:
    """A record made as a worker makes it: claimed, then sent through ``outbox``."""
    assert await store.claim(job_id, Job.model_validate(job(**fields)), "w1")
    assert await store.mark_sent(job_id, "w1", {"code": 250, "message": "ok"}, {}, outbox)


async def _ids(store: JobStore, **where: Any) -> list[str]:
    return [str(r["_id"]) for r in await store.find(JobFilter(**where))]


async def test_each_filter_alone_and_combined(store: JobStore) -> None:
    await _sent(store, "a", to=["Ann@Example.org"], tags=["news"], subject="Invoice 1")
    await _sent(
        store,
        "b",
        "backup",
        to=["bob@example.org"],
        cc=["ann@example.org"],
        tags=["billing"],
        subject="Your invoice",
    )
    await _sent(
        store,
        "c",
        **{"from": {"email": "Billing@Example.com"}},
        to=["bob@example.org"],
        tags=["billing", "news"],
        subject="invoice 2",
    )
    await _sent(store, "d", domain="other.example", **{"from": "x@other.example"})
    # Alone.
    assert await _ids(store, recipient="ANN@example.org") == ["b", "a"]
    assert await _ids(store, sender="billing@example.com") == ["c"]
    assert await _ids(store, tag="billing") == ["c", "b"]
    assert await _ids(store, domain="Other.Example") == ["d"]
    assert await _ids(store, subject="INVOICE") == ["c", "a"]
    assert await _ids(store, outbox="backup") == ["b"]
    assert await _ids(store, status="sent") == ["d", "c", "b", "a"]
    assert await _ids(store, status="failed") == []
    # Combined: every filter must hold.
    assert await _ids(store, recipient="bob@example.org", tag="news") == ["c"]
    assert await _ids(store, recipient="bob@example.org", sender="BILLING@example.com") == ["c"]
    assert await _ids(store, tag="news", subject="invoice") == ["c", "a"]
    assert await _ids(store, tag="news", domain="example.com", outbox="main") == ["c", "a"]
    assert await _ids(store, sender="sender@example.com", tag="news") == ["a"]
    assert await _ids(store, recipient="ann@example.org", subject="your", outbox="backup") == ["b"]
    assert await _ids(store, recipient="ann@example.org", domain="other.example") == []


async def test_time_ranges_bound_created_or_updated(store: JobStore) -> None:
    await _sent(store, "early")
    await _sent(store, "late")
    late = await store.get("late")
    assert late is not None
    created = late["created_at"]
    assert await _ids(store, since=created) == ["late"]
    assert await _ids(store, until=created - timedelta(microseconds=1)) == ["early"]
    # Sent again later: changed since, though created before.
    await store.jobs.update_one(
        {"_id": "early"}, {"$set": {"updated_at": created + timedelta(seconds=5)}}
    )
    assert await _ids(store, since=created + timedelta(seconds=1), time="updated") == ["early"]
    assert await _ids(store, until=late["updated_at"], time="updated") == ["late"]


async def test_single_keys_ride_their_index(store: JobStore) -> None:
    """What the test server can say of its plan: one search key, or a time range, walks
    its index (combined filters are planned on their first field, which its explain does
    not report: the operator guide has their measured times).
    """
    await _sent(store, "x", tags=["news"])

    async def index_of(where: JobFilter) -> str | None:
        plan = (await store.jobs.find(where.query()).explain())["queryPlanner"]["winningPlan"]
        while plan.get("stage") != "IXSCAN" and "inputStage" in plan:
            plan = plan["inputStage"]
        return plan.get("indexName")

    assert await index_of(JobFilter(recipient="rcpt@example.org")) == "search_1"
    assert await index_of(JobFilter(sender="sender@example.com")) == "search_1"
    assert await index_of(JobFilter(tag="news")) == "search_1"
    assert await index_of(JobFilter(domain="example.com")) == "search_1"
    record = await store.get("x")
    assert record is not None
    assert await index_of(JobFilter(since=record["created_at"])) == "created_at_1"
    assert await index_of(JobFilter(status="sent")) == "status_1_updated_at_-1"


async def test_pages_return_every_record_once_while_jobs_arrive(store: JobStore) -> None:
    for n in range(25):
        await _sent(store, f"old-{n:02}", tags=["paged"])
    seen: list[str] = []
    after: str | None = None
    for page in range(10):
        records = await store.find(JobFilter(tag="paged"), 4, after)
        if not records:
            break
        seen += [str(r["_id"]) for r in records]
        after = str(records[-1]["_id"])
        await _sent(store, f"new-{page}", tags=["paged"])
    assert sorted(seen) == [f"old-{n:02}" for n in range(25)]
    assert len(seen) == len(set(seen))


async def test_ties_in_one_millisecond_page_by_id(store: JobStore) -> None:
    await _sent(store, "t0")
    created = (await store.get("t0") or {}).get("created_at")
    for n in range(1, 6):
        await _sent(store, f"t{n}")
    await store.jobs.update_many({}, {"$set": {"created_at": created}})
    first = await store.find(limit=2)
    rest = await store.find(limit=10, after=str(first[-1]["_id"]))
    assert [r["_id"] for r in first + rest] == ["t5", "t4", "t3", "t2", "t1", "t0"]


async def test_ls_json_parses_and_pages(settings: Settings, store: JobStore) -> None:
    for n in range(3):
        await _sent(store, f"cli-{n}", to=["cli@example.org"])
    first = await mailbus(settings, "jobs", "ls", "--to", "CLI@example.org", "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert "next page: --after cli-1" in first.stderr
    listed = await mailbus(
        settings, "jobs", "ls", "--to", "cli@example.org", "--after", "cli-1", "--json"
    )
    assert listed.returncode == 0, listed.stderr
    assert [r["_id"] for r in json.loads(listed.stdout)] == ["cli-0"]
    bad = await mailbus(settings, "jobs", "ls", "--since", "yesterday")
    assert bad.returncode == 2
    assert "RFC 3339" in bad.stderr
    gone = await mailbus(settings, "jobs", "ls", "--after", "no-such-job")
    assert gone.returncode == 1
    assert "no job 'no-such-job'" in gone.stderr
    too_many = await mailbus(settings, "jobs", "ls", "--limit", "100000")
    assert too_many.returncode == 2


async def test_show_lists_each_attempts_reply(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, store: JobStore
) -> None:
    quick = settings.model_copy(update={"retry_base_delay": 0.5, "retry_max_delay": 0.5})
    smtp.faults.refuse_data("451 4.3.0 greylisted " + "x" * 2000)
    running = RunningWorker(quick)
    try:
        job_id = await publish_job(channel, job(), names=Names(settings.prefix))
        await smtp.wait_for(1)
        record = await settled_record(store, job_id)
        while record["status"] != "sent":
            record = await settled_record(store, job_id)
    finally:
        await running.shutdown()
    shown = await mailbus(settings, "jobs", "show", job_id)
    assert shown.returncode == 0, shown.stderr
    history = json.loads(shown.stdout)["history"]
    replies = [(h["event"], h.get("smtp")) for h in history if h["event"] != "claimed"]
    [(deferred, refused), (sent, accepted)] = replies
    assert (deferred, refused["code"], sent, accepted["code"]) == ("deferred", 451, "sent", 250)
    assert refused["message"].startswith("4.3.0 greylisted xxx")
    assert len(refused["message"]) == REPLY_LENGTH

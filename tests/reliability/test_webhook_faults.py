"""A webhook endpoint that fails for a while: sending goes on unaffected, and once the
endpoint answers, every event reaches it exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.core.webhooks import new_secret
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.mongo import Mongo
from consumer.vault import Vault, new_key
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job, until
from tests.conftest import RunningWorker
from tests.reliability.accounts import Account, dead_ids, settle
from tests.secret_watch import watched
from tests.webhook_receiver import receiving, webhook_service

MAILS = 20


async def test_a_failing_webhook_endpoint(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    ledger: list[Account],
) -> None:
    """The endpoint answers 503 until every mail is sent and every mail.sent event has
    failed twice (a retry through the ladder failed too); then 200. All mails go out
    meanwhile; each event reaches the receiver once (by webhook-id), signed; nothing is
    given up.
    """
    settings = settings.model_copy(
        update={
            "secret_key": SecretStr(watched(new_key())),
            "webhook_allow_private": True,
            "webhook_retry_base_delay": 1.0,
            "webhook_retry_max_delay": 1.0,
        }
    )
    names = Names(settings.prefix)
    secret = watched(new_secret())
    healthy = False
    async with receiving() as receiver:
        receiver.secrets["/hook"] = secret
        receiver.answer["/hook"] = lambda _: 200 if healthy else 503
        async with Mongo.connect(settings) as mongo:
            token = Vault.from_settings(settings).encrypt(secret)
            await mongo.webhooks.add("example.com", receiver.url("/hook"), ["mail.sent"], token)
        published = [f"hooked-{i:02d}" for i in range(MAILS)]
        async with webhook_service(settings):
            worker = RunningWorker(settings)
            try:
                for job_id in published:
                    await publish_job(channel, job(id=job_id, subject=job_id), names=names)

                async def sent_while_failing() -> bool:
                    failed = Counter(r.webhook_id for r in receiver.requests if r.status == 503)
                    tried_again = [n for n in failed.values() if n >= 2]
                    return len(smtp.received()) == MAILS and len(tried_again) == MAILS

                await until(sent_while_failing, 30)
                healthy = True

                async def all_delivered() -> bool:
                    return len({r.webhook_id for r in receiver.delivered("/hook")}) == MAILS

                await until(all_delivered, 30)
                await asyncio.sleep(1.5)  # time for a second copy of anything, were there one
                given_up = await depth(channel, names.webhooks_dead)
            finally:
                await worker.shutdown()
        account = await settle(
            "failing webhook endpoint",
            published,
            smtp.received(),
            await dead_ids(channel, names),
            store,
        )
    delivered = Counter(r.webhook_id for r in receiver.delivered("/hook"))
    failures = sum(1 for r in receiver.requests if r.status == 503)
    account.notes = {
        "events_delivered": len(delivered),
        "events_delivered_twice": sum(n - 1 for n in delivered.values()),
        "failed_attempts": failures,
        "given_up": given_up,
    }
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated, account.missing) == (MAILS, 0, 0, [])
    assert all(r.verified for r in receiver.requests)
    assert sorted(r.event["id"] for r in receiver.delivered("/hook")) == published
    assert account.notes["events_delivered_twice"] == 0
    assert given_up == 0
    assert failures >= 2 * MAILS

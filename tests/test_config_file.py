"""The configuration as TOML: import applies only what differs, export leaves secrets out."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.cli.config import Importer
from consumer.cli.config_file import load, password_variable
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.store.domains import key_matches
from consumer.store.jobs import JobStore
from consumer.store.mongo import Mongo
from consumer.store.outboxes import outbox_from_document
from consumer.store.providers import ProviderStore
from consumer.vault import Vault
from deploy.devstack.processes import mailbus
from tests.doubles import offline_settings

CONFIG = """
[providers.gmail]
limits = ["500/day", "20/minute"]
burst = 5
replies = ["transient: 550 5.7.1 rate limited"]

[domains."Example.com"]
key_env = "TEST_EXAMPLE_KEY"
allow_users = ["app1"]
senders = ["Shop.example", "example.com"]
bounce_domain = "Bounces.Example.com"

[outboxes.gmail-1]
domain = "example.com"
provider = "gmail"
host = "smtp.gmail.com"
port = 587
username = "mailer@example.com"
password_env = "TEST_GMAIL_1_PASSWORD"
max_connections = 4
charset = "ISO-8859-1"

[outboxes.local]
domain = "example.com"
transport = "sendmail"
sendmail_path = "/usr/sbin/sendmail"
active = false
"""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[providers.p]\nlimits = ['5/fortnight']", "provider p: a limit looks like"),
        ("[providers.p]\nlimits = []", "providers.p.limits"),
        ("[providers.p]\nlimits = ['5/s']\nreplies = ['maybe: 550']", "provider p: a reply rule"),
        ("[outboxes.o]\ndomain = 'a.example'\nhost = 'h'\nprovider = 'nope'", "not defined"),
        ("[outboxes.o]\ndomain = 'a.example'\nhots = 'h'", "outboxes.o.hots: Extra inputs"),
        ("[outboxes.o]\ndomain = 'a.example'\nsecurity = 'ssl'", "outboxes.o.security"),
        ("[outboxes.o]\ndomain = 'a.example'\ncharset = 'klingon'", "unknown charset"),
        ("[outboxes", "not valid TOML"),
        ("[domains.d]\nbounce_domain = 'no-dot'", "domains.d.bounce_domain"),
    ],
)
def test_bad_files_are_refused_clearly(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        load(text)


async def test_a_bounce_domain_is_refused_before_anything_is_written_without_a_secret_key() -> None:
    config = load('[domains."a.example"]\nbounce_domain = "bounces.a.example"')
    async with Mongo.connect(offline_settings()) as mongo:  # never reached: refused first
        with pytest.raises(ConfigurationError, match="needs MAILBUS_SECRET_KEY"):
            await Importer(mongo, None, {}, prune=False).apply(config)


def test_password_variables_are_shell_names() -> None:
    assert password_variable("gmail-1.eu") == "MAILBUS_PASSWORD_GMAIL_1_EU"


async def test_import_then_export_round_trip(
    keyed: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password, key = "app-password-7781", "domain-key-5521"
    monkeypatch.setenv("TEST_GMAIL_1_PASSWORD", password)
    monkeypatch.setenv("TEST_EXAMPLE_KEY", key)
    source = tmp_path / "mailbus.toml"
    source.write_text(CONFIG)

    first = await mailbus(keyed, "config", "import", str(source))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "provider gmail: created",
        "domain example.com: created",
        "outbox gmail-1: created",
        "outbox local: created",
    ]
    async with JobStore.connect(keyed) as jobs:
        db = jobs.database
        gmail = await db["outboxes"].find_one({"_id": "gmail-1"})
        local = await db["outboxes"].find_one({"_id": "local"})
        domain = await db["domains"].find_one({"_id": "example.com"})
        assert await ProviderStore(db).take("gmail", "try") is not None  # the buckets are in use
        buckets = await db["providers"].find_one({"_id": "gmail"})
    assert gmail is not None
    assert local is not None
    assert domain is not None
    assert buckets is not None
    opened = outbox_from_document(gmail, Vault.from_settings(keyed))
    assert opened.password is not None
    assert opened.password.get_secret_value() == password
    assert (opened.max_connections, gmail["provider"], gmail["active"]) == (4, "gmail", True)
    assert opened.charset == "iso-8859-1"
    assert (local["transport"], local["active"]) == ("sendmail", False)
    assert key_matches(key, domain["key_hash"])
    assert domain["allow_users"] == ["app1"]
    assert domain["senders"] == ["example.com", "shop.example"]
    assert domain["bounce_domain"] == "bounces.example.com"

    again = await mailbus(keyed, "config", "import", str(source))
    assert again.stdout.strip() == "nothing to change"
    async with JobStore.connect(keyed) as jobs:
        after = await jobs.database["providers"].find_one({"_id": "gmail"})
    assert after is not None
    assert after["limits"] == buckets["limits"]  # not refilled by re-applying
    assert after["replies"] == ["transient: 550 5.7.1 rate limited"]

    source.write_text(CONFIG.replace("transient: 550 5.7.1 rate limited", "throttle: 4.7"))
    ruled = await mailbus(keyed, "config", "import", str(source))
    assert ruled.stdout.strip() == "provider gmail: updated"
    async with JobStore.connect(keyed) as jobs:
        after = await jobs.database["providers"].find_one({"_id": "gmail"})
    assert after is not None
    assert (after["replies"], after["limits"]) == (["throttle: 4.7"], buckets["limits"])

    exported = await mailbus(keyed, "config", "export")
    assert password not in exported.stdout
    assert key not in exported.stdout
    reread = load(exported.stdout)
    assert reread.outboxes["gmail-1"].password_env == "MAILBUS_PASSWORD_GMAIL_1"
    assert reread.outboxes["local"].active is False
    assert reread.outboxes["gmail-1"].charset == "iso-8859-1"
    assert reread.providers["gmail"].limits == ["500/day", "20/minute"]
    assert reread.providers["gmail"].replies == ["throttle: 4.7"]
    assert reread.domains["example.com"].key_hash == domain["key_hash"]
    assert reread.domains["example.com"].bounce_domain == "bounces.example.com"
    # Re-applying the exported file keeps the domain's senders (it once cleared them).
    assert reread.domains["example.com"].senders == ["example.com", "shop.example"]

    # The exported file applies cleanly without the secrets: stored ones are kept.
    monkeypatch.delenv("TEST_GMAIL_1_PASSWORD")
    monkeypatch.delenv("TEST_EXAMPLE_KEY")
    exported_file = tmp_path / "exported.toml"
    exported_file.write_text(exported.stdout)
    reapplied = await mailbus(keyed, "config", "import", str(exported_file))
    assert reapplied.stdout.strip() == "nothing to change", reapplied.stdout

    trimmed = tmp_path / "trimmed.toml"
    trimmed.write_text(exported.stdout.split("[outboxes.local]")[0])
    pruned = await mailbus(keyed, "config", "import", "--prune", str(trimmed))
    assert pruned.stdout.strip() == "outbox local: removed"
    listed = await mailbus(keyed, "outbox", "ls")
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["gmail-1"]


async def test_import_refuses_a_missing_secret(keyed: Settings, tmp_path: Path) -> None:
    source = tmp_path / "mailbus.toml"
    source.write_text(CONFIG)
    refused = await mailbus(keyed, "config", "import", str(source))
    assert refused.returncode == 2
    assert "environment variable TEST_EXAMPLE_KEY is not set" in refused.stderr
    missing = await mailbus(keyed, "config", "import", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
    async with JobStore.connect(keyed) as jobs:  # checked before anything was written
        assert await jobs.database["providers"].count_documents({}) == 0

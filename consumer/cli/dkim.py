"""``mailbus domain dkim``: a registered domain's DKIM keys, and the DNS records that
publish them.

Private keys are encrypted with ``MAILBUS_SECRET_KEY`` before they are stored and are
never printed; what is printed is the public half, as the TXT record to publish.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from consumer.cli.output import fail, terminal_safe
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.core.dkim import (
    ALGORITHMS,
    MAX_DKIM_KEYS,
    MAX_PEM_BYTES,
    RSA_BITS,
    dns_record,
    generate_key,
    public_value,
    read_private_key,
    selector_problem,
)
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.store.domains import dkim_selectors
from consumer.store.mongo import Mongo
from consumer.vault import Vault


def _selector(args: argparse.Namespace) -> str:
    """The ``--selector`` given, checked; else one named for today (UTC)."""
    selector: str = args.selector or f"mailbus-{utcnow():%Y%m%d}"
    problem = selector_problem(selector)
    if problem is not None:
        raise ConfigurationError(f"--selector: {problem}")
    return selector


def _read_pem(path: str | None) -> bytes:
    """The PEM private key in file ``path``, or on standard input; no more is read than
    a key can be long.
    """
    if path is None:
        pem = sys.stdin.buffer.read(MAX_PEM_BYTES + 1)
    else:
        try:
            with Path(path).open("rb") as file:
                pem = file.read(MAX_PEM_BYTES + 1)
        except OSError as exc:
            raise ConfigurationError(f"--file: cannot read {path}: {exc.strerror}") from None
    if not pem.strip():
        raise ConfigurationError("no private key was given (standard input or --file)")
    return pem


async def _add(args: argparse.Namespace, settings: Settings, pem: bytes, verb: str) -> int:
    """Store ``pem`` (PKCS#8) encrypted as a DKIM key of the domain, and print its record."""
    vault = Vault.from_settings(settings)
    selector = _selector(args)
    try:
        algorithm, pkcs8 = read_private_key(pem)
    except ValueError as exc:
        return fail(f"domain dkim {verb}", str(exc))
    record = public_value(pkcs8)
    entry = {
        "selector": selector,
        "algorithm": algorithm,
        "private_key": vault.encrypt(pkcs8.decode()),
        "record": record,
    }
    domain = args.domain.lower()
    async with Mongo.connect(settings) as mongo:
        added = await mongo.domains.add_dkim_key(
            domain, entry, activate=args.activate, limit=MAX_DKIM_KEYS
        )
        doc = await mongo.domains.get(domain)
    refused = {
        "unregistered": f"{domain!r} is not registered (mailbus domain add): only a "
        "registered domain's mail is signed",
        "exists": f"{domain!r} has a DKIM key with selector {selector!r}",
        "full": f"{domain!r} has {MAX_DKIM_KEYS} DKIM keys: remove one first",
    }.get(added)
    if refused is not None:
        return fail(f"domain dkim {verb}", refused)
    signs = doc is not None and doc.get("dkim_active") == selector
    state = (
        "it signs the domain's mail from now on"
        if signs
        else f"it signs once activated (mailbus domain dkim activate {domain} "
        f"--selector {selector}), after its record is published"
    )
    # Comment lines and the record: the output goes into a zone file as it is.
    print(f"; DKIM key {selector!r} ({algorithm}) added to domain {domain!r}; {state}")
    print("; publish this DNS record:")
    print(dns_record(selector, domain, record))
    return 0


async def _generate(args: argparse.Namespace, settings: Settings) -> int:
    return await _add(args, settings, generate_key(args.algorithm), "generate")


async def _import(args: argparse.Namespace, settings: Settings) -> int:
    return await _add(args, settings, _read_pem(args.file), "import")


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    domain = args.domain.lower()
    async with Mongo.connect(settings) as mongo:
        doc = await mongo.domains.get(domain)
    if doc is None:
        return fail("domain dkim show", f"{domain!r} is not registered")
    keys = [k for k in doc.get("dkim_keys", []) if args.selector in (None, k.get("selector"))]
    if not keys:
        which = f"with selector {args.selector!r}" if args.selector else "at all"
        return fail("domain dkim show", f"{domain!r} has no DKIM key {which}")
    for key in keys:
        selector = str(key.get("selector"))
        state = "signs" if doc.get("dkim_active") == selector else "waits"
        # A comment line, so that the whole output can go into a zone file.
        print(terminal_safe(f"; selector {selector} ({key.get('algorithm')}, {state})"))
        print(terminal_safe(dns_record(selector, domain, str(key.get("record")))))
    return 0


async def _activate(args: argparse.Namespace, settings: Settings) -> int:
    domain = args.domain.lower()
    async with Mongo.connect(settings) as mongo:
        found = await mongo.domains.activate_dkim_key(domain, args.selector)
    if not found:
        return fail("domain dkim activate", f"{domain!r} has no DKIM key {args.selector!r}")
    print(f"DKIM key {args.selector!r} signs domain {domain!r}'s mail from now on")
    return 0


async def _rm(args: argparse.Namespace, settings: Settings) -> int:
    domain = args.domain.lower()
    async with Mongo.connect(settings) as mongo:
        selector = args.selector
        if selector is None:
            doc = await mongo.domains.get(domain)
            selectors = dkim_selectors(doc) if doc is not None else []
            if len(selectors) != 1:
                return fail(
                    "domain dkim rm",
                    f"{domain!r} has {len(selectors)} DKIM keys: name one with --selector",
                )
            selector = selectors[0]
        removed = await mongo.domains.remove_dkim_key(domain, selector)
    if removed == "missing":
        return fail("domain dkim rm", f"{domain!r} has no DKIM key {selector!r}")
    if removed == "active":
        return fail(
            "domain dkim rm",
            f"{selector!r} signs {domain!r}'s mail: activate another key first",
        )
    print(f"DKIM key {selector!r} of domain {domain!r} removed")
    return 0


def add_dkim_parser(actions: Subparsers) -> None:
    """Register ``mailbus domain dkim`` and its actions on ``mailbus domain``'s."""
    dkim = actions.add_parser(
        "dkim",
        help="manage a registered domain's DKIM keys, and print their DNS records",
        description=f"Workers DKIM-sign every mail of a registered domain that has a "
        "signing key, just before it is handed over (d= the job's domain, relaxed/relaxed, "
        "a fresh signature each attempt). A domain may hold several keys under their "
        f"selectors, up to {MAX_DKIM_KEYS}; one signs: its first key, or the one last "
        "activated. Private keys are stored encrypted with MAILBUS_SECRET_KEY (needed by "
        "`generate`, `import` and the workers) and never printed; `mailbus outbox "
        "rotate-key` re-encrypts them. Workers see a change within 5 seconds.",
    )
    verbs = dkim.add_subparsers(dest="dkim_verb", required=True, metavar="ACTION")
    selector_help = "the key's selector, a DNS label (default: mailbus-YYYYMMDD, today in UTC)"
    activate_help = (
        "sign with this key now (default: only a domain's first key signs at once; "
        "publish a later one's record, then activate it)"
    )

    generate = verbs.add_parser(
        "generate",
        help="make a new key for a registered domain and print its DNS record",
        description=f"Make a private key (RSA of {RSA_BITS} bits, or Ed25519), store it "
        "encrypted, and print the TXT record to publish. Ed25519 signatures (RFC 8463) are "
        "not checked by every receiver yet: add one beside an RSA key, not instead.",
    )
    generate.add_argument("--algorithm", choices=ALGORITHMS, default="rsa", help="default: rsa")
    import_ = verbs.add_parser(
        "import",
        help="store an existing PEM private key for a registered domain",
        description="Read an unencrypted PEM private key (PKCS#1 or PKCS#8; RSA of 1024 to "
        "4096 bits, or Ed25519) from standard input or --file, store it encrypted, and "
        "print its TXT record. Nothing of the private key is printed.",
    )
    import_.add_argument("--file", metavar="PATH", help="read the key from this file")
    for parser, handler in ((generate, _generate), (import_, _import)):
        parser.add_argument("domain", help="the registered sending domain")
        parser.add_argument("--selector", help=selector_help)
        parser.add_argument("--activate", action="store_true", help=activate_help)
        parser.set_defaults(handler=handler)

    show = verbs.add_parser(
        "show",
        help="print a domain's DKIM records to publish, and which key signs",
        description="Print, for each key (or the one --selector names), a comment line "
        "with its selector, algorithm and whether it signs, then its TXT record, split "
        "into strings of 255 characters as DNS needs: the output goes into a zone file as "
        "it is.",
    )
    show.add_argument("domain", help="the registered sending domain")
    show.add_argument("--selector", help="only this key")
    show.set_defaults(handler=_show)

    activate = verbs.add_parser(
        "activate",
        help="make one of a domain's keys the one that signs",
        description="Make the key --selector names sign the domain's mail (publish its "
        "record first, and give DNS time to spread it).",
    )
    activate.add_argument("domain", help="the registered sending domain")
    activate.add_argument("--selector", required=True, help="the key's selector")
    activate.set_defaults(handler=_activate)

    rm = verbs.add_parser(
        "rm",
        help="remove one of a domain's DKIM keys",
        description="Remove a key (--selector may be left out when the domain has one). "
        "The key that signs is removed only when it is the last one, and the domain's "
        "mail is then unsigned; keep its DNS record a few days, for mail on its way.",
    )
    rm.add_argument("domain", help="the registered sending domain")
    rm.add_argument("--selector", help="the key's selector")
    rm.set_defaults(handler=_rm)

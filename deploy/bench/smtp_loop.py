"""The Python SMTP client's ceiling: a bare aiosmtplib loop sending the same bytes as
mailbus over the same number of persistent connections, in a process of its own.

``python -m deploy.bench.smtp_loop --port P --count N --connections C --message FILE``
prints ``{"mails_per_second": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiosmtplib

from deploy.bench.mails import RECIPIENT, SENDER


async def send_all(port: int, message: bytes, count: int, connections: int) -> float:
    """Send ``message`` ``count`` times over ``connections`` connections; mails per second."""

    async def one_connection(share: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        for _ in range(share):
            await smtp.sendmail(SENDER, [RECIPIENT], message)
        await smtp.quit()

    shares = [count // connections + (i < count % connections) for i in range(connections)]
    started = time.perf_counter()
    async with asyncio.timeout(600):
        await asyncio.gather(*(one_connection(share) for share in shares if share))
    return count / (time.perf_counter() - started)


def main() -> int:
    """Run the loop and print its rate as JSON."""
    parser = argparse.ArgumentParser(prog="python -m deploy.bench.smtp_loop", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="the sink's port on 127.0.0.1")
    parser.add_argument("--count", type=int, required=True, help="mails to send")
    parser.add_argument("--connections", type=int, required=True, help="persistent connections")
    parser.add_argument("--message", type=Path, required=True, help="the message's bytes")
    args = parser.parse_args()
    rate = asyncio.run(send_all(args.port, args.message.read_bytes(), args.count, args.connections))
    print(json.dumps({"mails_per_second": round(rate, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

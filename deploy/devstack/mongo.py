"""A private MongoDB wire-protocol server: SecantusDB, started as a separate process.

SecantusDB is a development and test dependency only; mailbus itself speaks plain
MongoDB through PyMongo and never imports it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from deploy.devstack.ports import free_port, wait_for_port
from deploy.devstack.tls import ServerCertificate


class PrivateMongo:
    """One SecantusDB server on a free loopback port; in memory unless given a directory,
    speaking TLS only if given a certificate.
    """

    def __init__(
        self, base: Path, storage: Path | None = None, tls: ServerCertificate | None = None
    ) -> None:
        self.base = base
        self.storage = storage
        self.tls = tls
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The ``mongodb://`` URL of the server (with TLS: trusting the test CA)."""
        if self.tls is not None:
            return f"mongodb://127.0.0.1:{self.port}/?tls=true&tlsCAFile={self.tls.ca}"
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for benchmarks' CPU figures)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the server and wait until it listens."""
        exe = shutil.which("secantusd-py", path=str(Path(sys.executable).parent)) or shutil.which(
            "secantusd-py"
        )
        if exe is None:
            raise FileNotFoundError("secantusd-py not found: pip install secantusdb")
        storage = str(self.storage) if self.storage is not None else ":memory:"
        with (self.base / "secantusd.out").open("ab") as out:
            self._process = subprocess.Popen(
                [
                    exe,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--storage-path",
                    storage,
                    "--log-level",
                    "WARNING",
                    "--enable-test-commands",
                    "--standalone",
                    *self._tls_arguments(),
                ],
                stdout=out,
                stderr=out,
                cwd=self.base,
            )
        try:
            wait_for_port(self.port, 60)
        except TimeoutError:
            self.stop()
            raise

    def _tls_arguments(self) -> list[str]:
        if self.tls is None:
            return []
        return ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]

    def prune_ttl(self) -> int:
        """Run the TTL sweep now rather than on its 60 s cadence (a SecantusDB command);
        returns how many documents it removed.
        """
        client: MongoClient[dict[str, Any]]
        with MongoClient(self.url, serverSelectionTimeoutMS=10_000) as client:
            return int(client.admin.command("secantusAdmin.pruneTtl").get("pruned", 0))

    def stop(self) -> None:
        """Stop the server."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (in memory: empty again)."""
        self.stop()
        self.start()

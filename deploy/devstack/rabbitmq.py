"""A private RabbitMQ node (Debian's rabbitmq-server) in a directory of its own.

It runs as the current user on free loopback ports, with its own epmd, and the
management plugin on; nothing of the system's RabbitMQ installation is touched.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from pathlib import Path

from deploy.devstack.ports import free_ports, wait_for_port
from deploy.devstack.tls import ServerCertificate

START_TIMEOUT = 60.0


def _sbin() -> Path:
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    if not found:
        raise FileNotFoundError(
            "rabbitmq-server is not installed: run deploy/devstack/bootstrap.sh "
            "(apt-get install rabbitmq-server)"
        )
    return Path(found[-1])


# The largest message the private broker takes (RabbitMQ's own default is 128 MiB): above
# mailbus's 25 MiB message limit, so that both limits can be tested.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class PrivateRabbit:
    """One RabbitMQ node; :meth:`start`/:meth:`stop` may be called repeatedly (restarts)."""

    def __init__(
        self,
        base: Path,
        user: str = "mailbus",
        password: str = "mailbus",  # noqa: S107  (a private development broker)
        tls: ServerCertificate | None = None,
    ) -> None:
        self.base = base
        self.user = user
        self.password = password
        self.tls = tls
        self.port, self.management_port, self.dist_port, self.epmd_port, self.tls_port = free_ports(
            5
        )
        self.nodename = f"mailbus{self.port}@localhost"
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {self.management_port}\n"
            f"default_user = {user}\n"
            f"default_pass = {password}\n"
            "loopback_users = none\n"
            # Management figures every second rather than five: tests compare them.
            "collect_statistics_interval = 1000\n"
            f"max_message_size = {MAX_MESSAGE_BYTES}\n"
            "log.console = false\n"
            "log.file.level = warning\n" + (self._tls_config(tls) if tls is not None else "")
        )
        (base / "enabled_plugins").write_text("[rabbitmq_management].\n")

    @property
    def amqp_url(self) -> str:
        """URL of the node's AMQP listener."""
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/"

    @property
    def amqps_url(self) -> str:
        """URL of the node's AMQPS listener, trusting the test CA (only with ``tls``)."""
        if self.tls is None:
            raise RuntimeError("this node has no TLS listener")
        return (
            f"amqps://{self.user}:{self.password}@127.0.0.1:{self.tls_port}/?cafile={self.tls.ca}"
        )

    def _tls_config(self, tls: ServerCertificate) -> str:
        return (
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {tls.ca}\n"
            f"ssl_options.certfile = {tls.cert}\n"
            f"ssl_options.keyfile = {tls.key}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    @property
    def management_url(self) -> str:
        """Base URL of the management UI and HTTP API."""
        return f"http://127.0.0.1:{self.management_port}/"

    @property
    def pid(self) -> int | None:
        """The start script's process id while it runs (the node's VM runs below it)."""
        return self._server.pid if self._server is not None else None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            HOME=str(self.base),
        )
        return env

    def start(self) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        env = self._env()
        if self._epmd is None:
            # Our own epmd in the foreground, so that we hold its PID and can end it.
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        with (self.base / "server.out").open("ab") as out:
            self._server = subprocess.Popen(
                [str(_sbin() / "rabbitmq-server")],
                env=env,
                cwd=self.base,  # where a crash leaves its MnesiaCore dump
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        try:
            self._wait_until_up(env)
        except BaseException:
            self.close()  # nothing of a node that never came up is left running
            raise

    def _wait_until_up(self, env: dict[str, str]) -> None:
        assert self._server is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._server.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self._server.returncode}; "
                    f"see {self.base / 'server.out'} and {self.base / 'log'}"
                )
            check = subprocess.run(
                [str(_sbin() / "rabbitmq-diagnostics"), "-q", "check_port_connectivity"],
                env=env,
                capture_output=True,
                check=False,
            )
            if check.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ did not start within {START_TIMEOUT} s")
            time.sleep(0.5)
        wait_for_port(self.management_port, START_TIMEOUT)
        if self.tls is not None:
            wait_for_port(self.tls_port, START_TIMEOUT)

    def stop(self, kill: bool = False) -> None:
        """Stop the node (gracefully, or with SIGKILL); its data directory stays."""
        server, self._server = self._server, None
        if server is None or server.poll() is not None:
            return
        os.killpg(server.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    def close(self) -> None:
        """Stop the node and its epmd."""
        self.stop()
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            epmd.terminate()
            epmd.wait(timeout=10)

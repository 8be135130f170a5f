"""A PostgreSQL primary and a streaming standby of the harness's own, to fail over between.

Both servers listen on 127.0.0.1, on ports of their own, with data dirs under the harness's
workdir, and run as user postgres (the server refuses to run as root). While a standby
streams, replication is synchronous: every commit the primary acknowledged is on the
standby too, so promoting it loses nothing a client was told is stored. (With asynchronous
replication a failover may lose the last commits, whatever the clients do.) A promoted
standby runs alone, without waiting for a standby that is not there, until rebuild_standby
gives it one again.

Every wait is bounded: a server that does not come up fails the call with its log's tail.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from chaos.servers import Servers
from tests.support.tls import CertificateAuthority

_BIN = Path("/usr/lib/postgresql/15/bin")
_USER = "postgres"
_AS_USER = ["/usr/sbin/runuser", "-u", _USER, "--"]
_COMMAND_SECONDS = 120
_WAIT_SECONDS = 60
_POLL_SECONDS = 0.1
_LOG_TAIL_CHARS = 4000
# Included from each node's postgresql.conf; rewritten whenever the node's role changes.
_SETTINGS_FILE = "harness.conf"


class PostgresPair(Servers):
    """A primary and a streaming standby of the harness's own, on 127.0.0.1, own ports, own
    data dirs.

    Usable as a context manager: entering starts the pair, leaving closes it. The workdir
    must be reachable by user postgres (every directory above it searchable by others, as
    /tmp is; pytest's tmp_path is not).
    """

    def __init__(self, workdir: Path, *, ssl: bool = True) -> None:
        self._workdir = workdir
        self._ssl = ssl
        self._ports = _free_ports(2)
        self._primary = 0
        self._started = False

    @property
    def primary(self) -> int:
        """Index (0 or 1) of the current primary."""
        return self._primary

    @property
    def _standby(self) -> int:
        return 1 - self._primary

    def database_url(self, database: str = "score_ingest") -> str:
        """A URL naming both servers, which connects only to the one that takes writes."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self._ports)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def ca_file(self) -> Path:
        """The CA of the servers' certificate, for sslmode=verify-full."""
        if not self._ssl:
            raise ValueError("this pair runs without TLS")
        return self._tls_dir / "ca.pem"

    def start(self) -> None:
        """initdb the primary, start it, pg_basebackup a standby from it, start that, and
        return once the standby streams synchronously. Does nothing once started."""
        if self._started:
            return
        self._workdir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self._workdir, _USER, _USER)
        self._check_reachable()
        self._started = True  # from here on, close() has something to clean up
        if self._ssl:
            self._make_certificates()
        data = self._data_dir(self._primary)
        self._as_postgres(
            _BIN / "initdb",
            "--pgdata",
            str(data),
            "--username",
            _USER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-sync",
        )
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"include = '{_SETTINGS_FILE}'\n")
        (data / "pg_hba.conf").write_text(self._hba())
        self._write_settings(self._primary, synchronous=False)
        self._pg_ctl(self._primary, "start")
        self._attach_standby()

    def stop_primary(self) -> None:
        """Stop the current primary as a crash would (pg_ctl stop -m immediate)."""
        self._stop(self._primary)

    def promote_standby(self) -> None:
        """Promote the standby; returns once it accepts writes."""
        promoted = self._standby
        self._pg_ctl(promoted, "promote")
        self._primary = promoted
        self._wait_for(promoted, "SELECT NOT pg_is_in_recovery()", "accepting writes")

    def rebuild_standby(self) -> None:
        """Make the node that is not the primary a streaming standby of the primary again,
        from a fresh pg_basebackup, and start it."""
        self._stop(self._standby)
        self._attach_standby()

    def close(self) -> None:
        """Stop both servers and remove their data dirs."""
        if not self._started:
            return
        for node in (0, 1):
            self._stop(node)
            shutil.rmtree(self._data_dir(node), ignore_errors=True)
        self._started = False

    @property
    def _tls_dir(self) -> Path:
        return self._workdir / "tls"

    def _data_dir(self, node: int) -> Path:
        return self._workdir / f"node{node}"

    def _log_file(self, node: int) -> Path:
        return self._workdir / f"node{node}.log"

    def _check_reachable(self) -> None:
        if _run([*_AS_USER, "/usr/bin/test", "-w", str(self._workdir)]).returncode != 0:
            raise RuntimeError(
                f"user {_USER} cannot write {self._workdir}: every directory above it must be "
                "searchable by others"
            )

    def _make_certificates(self) -> None:
        authority = CertificateAuthority(self._tls_dir, "ca")
        server = authority.issue_server("server")
        for path in (self._tls_dir, server.cert_file, server.key_file):
            shutil.chown(path, _USER, _USER)
        server.key_file.chmod(0o600)  # the server refuses a key others may read

    def _hba(self) -> str:
        # hostssl when TLS is on: a client that does not use it is refused, so a connection
        # that works is proof that it is encrypted.
        host = "hostssl" if self._ssl else "host"
        return (
            "local all all trust\n"
            "local replication all trust\n"
            f"{host} all all 127.0.0.1/32 trust\n"
            f"{host} replication all 127.0.0.1/32 trust\n"
        )

    def _write_settings(self, node: int, *, synchronous: bool) -> None:
        lines = [
            f"port = {self._ports[node]}",
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",
            "max_connections = 200",
            "wal_level = replica",
            "hot_standby = on",
            "max_wal_senders = 10",
            "wal_keep_size = '256MB'",
            # A stop -m immediate is a crash of the server, not of the machine: what it wrote
            # is in the page cache whatever fsync does, and fsync only slows the tests.
            "fsync = off",
            f"synchronous_standby_names = '{'*' if synchronous else ''}'",
        ]
        if self._ssl:
            lines += [
                "ssl = on",
                f"ssl_cert_file = '{self._tls_dir / 'server.pem'}'",
                f"ssl_key_file = '{self._tls_dir / 'server.key'}'",
            ]
        path = self._data_dir(node) / _SETTINGS_FILE
        path.write_text("\n".join(lines) + "\n")
        shutil.chown(path, _USER, _USER)

    def _attach_standby(self) -> None:
        """Base-back-up the primary into the standby's data dir, start it streaming, then
        make the primary wait for it on every commit."""
        standby, primary = self._standby, self._primary
        data = self._data_dir(standby)
        shutil.rmtree(data, ignore_errors=True)
        self._as_postgres(
            _BIN / "pg_basebackup",
            "--host",
            "127.0.0.1",
            "--port",
            str(self._ports[primary]),
            "--username",
            _USER,
            "--pgdata",
            str(data),
            "--write-recovery-conf",
            "--wal-method",
            "stream",
            "--checkpoint",
            "fast",
            "--no-sync",
        )
        self._write_settings(standby, synchronous=False)
        self._pg_ctl(standby, "start")
        streaming = "SELECT count(*) > 0 FROM pg_stat_replication WHERE state = 'streaming'"
        self._wait_for(primary, streaming, "a standby streaming")
        self._write_settings(primary, synchronous=True)
        self._pg_ctl(primary, "reload")
        in_sync = "SELECT count(*) > 0 FROM pg_stat_replication WHERE sync_state = 'sync'"
        self._wait_for(primary, in_sync, "a synchronous standby")

    def _stop(self, node: int) -> None:
        if self._running(node):
            self._pg_ctl(node, "stop", "--mode", "immediate")

    def _running(self, node: int) -> bool:
        if not (self._data_dir(node) / "PG_VERSION").exists():
            return False
        status = [*_AS_USER, str(_BIN / "pg_ctl"), "status", "--pgdata", str(self._data_dir(node))]
        return _run(status).returncode == 0

    def _pg_ctl(self, node: int, action: str, *options: str) -> None:
        self._as_postgres(
            _BIN / "pg_ctl",
            action,
            "--pgdata",
            str(self._data_dir(node)),
            "--log",
            str(self._log_file(node)),
            "--wait",
            "--timeout",
            str(_WAIT_SECONDS),
            *options,
            node=node,
        )

    def _as_postgres(self, program: Path, *args: str, node: int | None = None) -> None:
        command = [*_AS_USER, str(program), *args]
        done = _run(command)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
                + ("" if node is None else self._log_tail(node))
            )

    def _query(self, node: int, query: str) -> str | None:
        """The first column of the first row, or None if the server does not answer."""
        sslmode = "require" if self._ssl else "disable"
        conninfo = (
            f"host=127.0.0.1 port={self._ports[node]} user={_USER} dbname=postgres "
            f"sslmode={sslmode} connect_timeout=5"
        )
        done = _run([str(_BIN / "psql"), conninfo, "-X", "-A", "-t", "--command", query])
        return done.stdout.strip() if done.returncode == 0 else None

    def _wait_for(self, node: int, query: str, what: str) -> None:
        """Poll a query answering a boolean until it answers true."""
        deadline = time.monotonic() + _WAIT_SECONDS
        while self._query(node, query) != "t":
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"node {node} did not report {what} within {_WAIT_SECONDS}s"
                    + self._log_tail(node)
                )
            time.sleep(_POLL_SECONDS)

    def _log_tail(self, node: int) -> str:
        with contextlib.suppress(OSError):
            return f"\nits log ends:\n{self._log_file(node).read_text()[-_LOG_TAIL_CHARS:]}"
        return ""


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    # libpq reads PGHOST, PGSSLMODE and the like: the harness says everything itself.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    return subprocess.run(  # noqa: S603 - the harness's own commands, with absolute paths
        command,
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMMAND_SECONDS,
        env=environment,
    )


def _free_ports(count: int) -> tuple[int, ...]:
    """Ports on 127.0.0.1 nothing listens on right now, all different."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return tuple(sock.getsockname()[1] for sock in sockets)

"""The bench's own database, vhost and API key, and the server processes it runs and stops."""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
import asyncpg

from shared.db import with_database
from shared.settings import Settings

DATABASE = "score_ingest_bench"
VHOST = "score-ingest-bench"
ENTITY = "bench"
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_SERVER = "amqp://guest:guest@127.0.0.1:5672/"
_START_TIMEOUT_SECONDS = 30.0
# Longer than the worker's shutdown grace (30 s), so a clean stop is never cut short.
_STOP_TIMEOUT_SECONDS = 40.0


class BenchError(RuntimeError):
    """The bench cannot run or a phase went wrong; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def tool(name: str) -> str:
    """The full path of a command, the virtualenv's own first; raises BenchError if missing."""
    beside_python = Path(sys.executable).with_name(name)  # installed into the virtualenv
    path = str(beside_python) if beside_python.exists() else shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (see BENCHMARKS.md: `make bench` installs it)")
    return path


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl quietly; raises BenchError with its output when it fails."""
    result = subprocess.run(  # noqa: S603
        [tool("rabbitmqctl"), "-q", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr or result.stdout}")
    return result.stdout


def broker_pid() -> int:
    """The operating-system pid of the RabbitMQ node the bench uses, for its CPU use."""
    return int(rabbitmqctl("eval", "list_to_integer(os:getpid()).").strip())


def check_prerequisites() -> None:
    """Fail early, saying what is missing: wrk, rabbitmqctl (root), the two servers."""
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: `apt-get install -y wrk` (as root)")
    if shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        raise BenchError("the bench makes its own vhost with rabbitmqctl: run it as root")
    for port, what in ((5432, "PostgreSQL"), (5672, "RabbitMQ")):
        if not _port_open(port):
            raise BenchError(f"{what} does not listen on 127.0.0.1:{port}")


def score_ingest_command() -> list[str]:
    """The `score-ingest` console script of this virtualenv."""
    script = Path(sys.executable).with_name("score-ingest")
    if not script.exists():
        raise BenchError(f"{script} not found: run `make install` first")
    return [str(script)]


class BenchEnvironment:
    """A database and a vhost of the bench's own, made afresh and removed afterwards."""

    def __init__(self) -> None:
        self.database_url = with_database(POSTGRES_SERVER, DATABASE)
        self.amqp_url = AMQP_SERVER + VHOST
        self.api_key = ""
        self._vhost_made = False

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of a score-ingest process: README defaults, except where the bench
        must differ (its database and vhost, quieter logs)."""
        settings_names = {name.upper() for name in Settings.model_fields}
        env = {key: value for key, value in os.environ.items() if key not in settings_names}
        env.update(DATABASE_URL=self.database_url, AMQP_URL=self.amqp_url, LOG_LEVEL="WARNING")
        env.update(overrides)
        return env

    async def setup(self) -> None:
        """Drop and recreate the database and vhost, migrate, declare, create a key."""
        await self._drop_database()
        with contextlib.suppress(BenchError):
            rabbitmqctl("delete_vhost", VHOST)  # left over by an interrupted run
        rabbitmqctl("add_vhost", VHOST)
        self._vhost_made = True
        rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
        for args in (["migrate"], ["topology"]):
            await _run_cli([*score_ingest_command(), *args], self.env())
        created = await _run_cli(
            [*score_ingest_command(), "keys", "create", "--entity", ENTITY, "--name", "bench"],
            self.env(),
        )
        self.api_key = created.strip().splitlines()[-1]

    async def teardown(self) -> None:
        """Remove the vhost and the database."""
        if self._vhost_made:
            with contextlib.suppress(BenchError):
                rabbitmqctl("delete_vhost", VHOST)
        await self._drop_database()

    async def _drop_database(self) -> None:
        conn = await asyncpg.connect(POSTGRES_SERVER)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        finally:
            await conn.close()


async def _run_cli(argv: Sequence[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({process.returncode}):\n{text}")
    return text


class ServerProcess:
    """A long-running child process (an api, a worker), its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        # The repository root, so `python -m bench.serve` finds the bench package.
        self._cwd = Path(__file__).resolve().parents[1]
        self._argv = list(argv)
        self._env = env
        self.log_path = log_dir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self._process is not None, "start() first"
        return self._process.pid

    def start(self) -> None:
        """Start the process in a session of its own (Ctrl-C reaches only the bench)."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603
                self._argv,
                env=self._env,
                cwd=self._cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    async def wait_ready(self, url: str) -> None:
        """Wait until GET url answers 200; raises BenchError with the log when it does not."""
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as res:
                        if res.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise BenchError(f"{self.name} did not become ready at {url}:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, wait for a clean exit, SIGKILL past the timeout; returns the exit code."""
        process = self._process
        if process is None or process.poll() is not None:
            return process.returncode if process is not None else None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's output."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class ProcessGroup:
    """Every server the bench started; all are stopped on the way out, whatever happened."""

    def __init__(self) -> None:
        self._processes: list[ServerProcess] = []

    def start(self, process: ServerProcess) -> ServerProcess:
        """Start a process and remember it."""
        process.start()
        self._processes.append(process)
        return process

    def stop(self, process: ServerProcess) -> int | None:
        """Stop one process now."""
        code = process.stop()
        if process in self._processes:
            self._processes.remove(process)
        return code

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in reversed(self._processes):
            process.stop()
        self._processes.clear()

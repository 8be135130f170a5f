"""A RabbitMQ node of the test's own, to stop, restart or put under a resource alarm.

The machine's shared node must never be reconfigured or stopped, so tests that need the
broker itself to misbehave boot a second node beside it: its own node name, AMQP and
distribution ports, and a temporary directory for its data, logs and configuration. It
shares the machine's Erlang cookie, so `rabbitmqctl -n <node>` controls it. As root the
node runs as the `rabbitmq` user (rabbitmq-server refuses to run as anyone else), so its
directory belongs to that user.
"""

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from tests.support.processes import free_port
from tests.support.services import port_open

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQ_USER = "rabbitmq"
BOOT_TIMEOUT_SECONDS = 60.0
CTL_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
_LOG_TAIL_CHARS = 4000


class RabbitMQNodeError(AssertionError):
    """The node did not do what the test asked; the message carries its log."""


class RabbitMQNode:
    """A booted node: its AMQP URL and the few `rabbitmqctl` commands fault tests need."""

    def __init__(self, name: str, amqp_port: int, directory: Path) -> None:
        self.name = name
        self.amqp_port = amqp_port
        self.directory = directory

    @property
    def amqp_url(self) -> str:
        """The default vhost of this node, as guest (allowed from localhost only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    async def ctl(self, *args: str) -> str:
        """Run `rabbitmqctl -n <node> args` and return its output; fail if it fails."""
        process = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            "-n",
            self.name,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), CTL_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise self.failure(f"rabbitmqctl {' '.join(args)} took over {CTL_TIMEOUT_SECONDS}s")
        text = output.decode(errors="replace")
        if process.returncode != 0:
            raise self.failure(f"rabbitmqctl {' '.join(args)} exited {process.returncode}: {text}")
        return text

    async def raise_memory_alarm(self) -> None:
        """Set the memory high watermark to 0: the node blocks every publishing connection."""
        await self.ctl("set_vm_memory_high_watermark", "0")

    async def clear_memory_alarm(self) -> None:
        """Put the watermark back to RabbitMQ's default, which clears the alarm."""
        await self.ctl("set_vm_memory_high_watermark", "0.4")

    async def stop_app(self) -> None:
        """Stop the RabbitMQ application (connections drop, the port closes); data stays."""
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        """Start the application again and wait until it accepts AMQP connections."""
        await self.ctl("start_app")
        await self.wait_until_listening()

    async def wait_until_listening(self, timeout: float = BOOT_TIMEOUT_SECONDS) -> None:
        """Poll the AMQP port until it accepts connections."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await asyncio.to_thread(port_open, "127.0.0.1", self.amqp_port):
            if loop.time() > deadline:
                raise self.failure(f"not listening on {self.amqp_port} within {timeout}s")
            await asyncio.sleep(0.1)

    def failure(self, what: str) -> RabbitMQNodeError:
        """An assertion error about this node, with the tail of its logs."""
        return RabbitMQNodeError(f"RabbitMQ node {self.name}: {what}\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The last lines the node wrote, for failure messages."""
        parts = []
        for path in sorted(self.directory.glob("*.out")) + sorted(self.directory.glob("log/*")):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                parts.append(f"----- {path.name} -----\n{text[-_LOG_TAIL_CHARS:]}")
        return "\n".join(parts)


def _run_as() -> pwd.struct_passwd:
    """The account the node runs under: `rabbitmq`, which needs root (or it) to start."""
    account = pwd.getpwnam(RABBITMQ_USER)
    if os.geteuid() not in (0, account.pw_uid):
        raise RuntimeError(
            f"starting a RabbitMQ node of the test's own needs root or the {RABBITMQ_USER!r} "
            "user (rabbitmq-server runs only as that user)"
        )
    return account


def _chown_tree(directory: Path, account: pwd.struct_passwd) -> None:
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid)


def _node_environment(name: str, amqp_port: int, directory: Path, home: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
    env.update(
        {
            # The cookie that rabbitmqctl also reads, so the CLI may control the node.
            "HOME": home,
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(directory / "pid"),
            # Without the .conf suffix: rabbitmq-server adds it.
            "RABBITMQ_CONFIG_FILE": str(directory / "node"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(directory / "feature_flags"),
        }
    )
    return env


@contextlib.asynccontextmanager
async def rabbitmq_node() -> AsyncIterator[RabbitMQNode]:
    """Boot a fresh node, yield it once it accepts AMQP connections, then stop and remove it.

    The node is stopped (and, failing that, killed) and its directory removed however the
    test ends.
    """
    account = _run_as()
    name = f"score-ingest-test-{uuid.uuid4().hex[:8]}@localhost"
    amqp_port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="score-ingest-rabbitmq-"))
    node = RabbitMQNode(name, amqp_port, directory)
    process: asyncio.subprocess.Process | None = None
    try:
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "node.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n")
        _chown_tree(directory, account)
        with (directory / "server.out").open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                RABBITMQ_SERVER,
                cwd=directory,
                env=_node_environment(name, amqp_port, directory, account.pw_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
                # Its own process group, so that cleanup can end the node and nothing else.
                start_new_session=True,
            )
        await _wait_until_booted(node, process)
        yield node
    finally:
        if process is not None:
            await _stop(node, process)
        shutil.rmtree(directory, ignore_errors=True)


async def _wait_until_booted(node: RabbitMQNode, process: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOOT_TIMEOUT_SECONDS
    while not await asyncio.to_thread(port_open, "127.0.0.1", node.amqp_port):
        if process.returncode is not None:
            raise node.failure(f"rabbitmq-server exited with {process.returncode} while booting")
        if loop.time() > deadline:
            raise node.failure(f"did not accept AMQP connections within {BOOT_TIMEOUT_SECONDS}s")
        await asyncio.sleep(0.1)
    await node.ctl("await_startup")


async def _stop(node: RabbitMQNode, process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(RabbitMQNodeError):
            await node.ctl("stop")
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
    except TimeoutError:
        # The node ignored `stop`: end its process group (the group we started), by id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

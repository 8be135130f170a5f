"""A RabbitMQ node of the test's own, to stop, restart, put under a resource alarm or give
a TLS listener.

The machine's shared node must never be reconfigured or stopped, so tests that need the
broker itself to misbehave, or configured otherwise, boot a second node beside it: its own
node name, AMQP and distribution ports, and a temporary directory for its data, logs and
configuration. It shares the machine's Erlang cookie, so `rabbitmqctl -n <node>` controls
it. As root the node runs as the `rabbitmq` user (rabbitmq-server refuses to run as anyone
else), so its directory belongs to that user; certificates for its TLS listener are copied
there.
"""

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tests.support.services import free_port, port_open

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQ_USER = "rabbitmq"
BOOT_TIMEOUT_SECONDS = 60.0
CTL_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
# RabbitMQ's default vm_memory_high_watermark.
DEFAULT_MEMORY_HIGH_WATERMARK = "0.4"
ALARM_TIMEOUT_SECONDS = 10.0
MEMORY_ALARM = "Memory alarm"
_LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class NodeTls:
    """A TLS listener: the node's certificate and key, and the CAs whose client certificates
    it accepts. A client certificate is verified when a client shows one, not required."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class RabbitMQNodeError(AssertionError):
    """The node did not do what the test asked; the message carries its logs."""


class RabbitMQNode:
    """A booted node: its AMQP URL and the few `rabbitmqctl` commands fault tests need."""

    def __init__(
        self,
        name: str,
        amqp_port: int,
        directory: Path,
        vhost: str = "/",
        amqps_port: int | None = None,
    ) -> None:
        self.name = name
        self.amqp_port = amqp_port
        self.amqps_port = amqps_port
        self.directory = directory
        self.vhost = vhost
        self.memory_alarm = False
        self.running = True
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def amqp_url(self) -> str:
        """The node's one vhost, as guest (allowed from localhost only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}{self._path}"

    @property
    def amqps_url(self) -> str:
        """amqp_url, through the TLS listener."""
        assert self.amqps_port is not None, "this node has no TLS listener"
        return f"amqps://guest:guest@127.0.0.1:{self.amqps_port}{self._path}"

    @property
    def _path(self) -> str:
        return "/" if self.vhost == "/" else "/" + quote(self.vhost, safe="")

    def command(self, tool: str, *args: str) -> list[str]:
        """The argv of a RabbitMQ CLI tool (`rabbitmqctl`, `rabbitmq-diagnostics`) for this node."""
        return [tool, "-n", self.name, "-q", *args]

    async def ctl(self, *args: str) -> str:
        """Run `rabbitmqctl -n <node> args` without blocking the event loop; fail if it fails."""
        return await self._run("rabbitmqctl", *args)

    async def alarms(self) -> str:
        """The resource alarms in effect, as `rabbitmq-diagnostics alarms` lists them."""
        return await self._run("rabbitmq-diagnostics", "alarms")

    async def raise_memory_alarm(self) -> None:
        """Set the memory high watermark to 0; returns once the node reports the alarm.

        From then on the node blocks every connection that publishes.
        """
        self.memory_alarm = True
        await self.ctl("set_vm_memory_high_watermark", "0")
        await self._wait_for_alarms(lambda listed: MEMORY_ALARM in listed, "the memory alarm")

    async def clear_memory_alarm(self) -> None:
        """Put the watermark back to RabbitMQ's default; returns once the alarm is gone."""
        await self.ctl("set_vm_memory_high_watermark", DEFAULT_MEMORY_HIGH_WATERMARK)
        await self._wait_for_alarms(lambda listed: MEMORY_ALARM not in listed, "no memory alarm")
        self.memory_alarm = False

    async def stop_app(self) -> None:
        """Stop the RabbitMQ application: connections drop, the port closes, data stays."""
        self.running = False
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        """Start the application again and wait until it accepts AMQP connections."""
        await self.ctl("start_app")
        await asyncio.to_thread(self.wait_until_listening)
        self.running = True

    def wait_until_listening(self) -> None:
        """Wait for the AMQP port; fail if rabbitmq-server exits first. RabbitMQ opens its
        listeners last, once the node (or its application) has started: `rabbitmqctl
        await_startup` would say the same for a second of CPU."""
        assert self.process is not None, "the node was never started"
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
        while not port_open("127.0.0.1", self.amqp_port):
            if self.process.poll() is not None:
                raise self.failure(f"rabbitmq-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise self.failure(
                    f"did not accept AMQP connections within {BOOT_TIMEOUT_SECONDS}s"
                )
            time.sleep(0.1)

    def failure(self, what: str) -> RabbitMQNodeError:
        """An assertion error about this node, with the tail of its logs."""
        return RabbitMQNodeError(f"RabbitMQ node {self.name}: {what}\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The last lines the node wrote, for failure messages."""
        parts = []
        for path in [self.directory / "server.out", *sorted(self.directory.glob("log/*.log"))]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                parts.append(f"----- {path.name} -----\n{text[-_LOG_TAIL_CHARS:]}")
        return "\n".join(parts)

    async def _run(self, tool: str, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *self.command(tool, *args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), CTL_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            return self._checked((tool, *args), None, b"")
        return self._checked((tool, *args), process.returncode, output)

    async def _wait_for_alarms(self, condition: Callable[[str], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ALARM_TIMEOUT_SECONDS
        while not condition(listed := await self.alarms()):
            if loop.time() > deadline:
                raise self.failure(f"{what} not within {ALARM_TIMEOUT_SECONDS}s: {listed!r}")
            await asyncio.sleep(0.1)

    def _checked(self, args: tuple[str, ...], returncode: int | None, output: bytes) -> str:
        command = " ".join(args)
        if returncode is None:
            raise self.failure(f"{command} took over {CTL_TIMEOUT_SECONDS}s")
        text = output.decode(errors="replace")
        if returncode != 0:
            raise self.failure(f"{command} exited {returncode}: {text}")
        return text


@contextlib.contextmanager
def rabbitmq_node(
    tls: NodeTls | None = None,
    vhost: str = "/",
    *,
    max_message_bytes: int | None = None,
    booted: bool = True,
) -> Iterator[RabbitMQNode]:
    """Boot a fresh node, yield it once it has started, then stop it and remove its files.

    Its one vhost is `vhost` (RabbitMQ's default_vhost, where guest may do anything). With
    tls, it also listens for AMQP over TLS (`amqps_url`); max_message_bytes lowers RabbitMQ's
    max_message_size (128 MiB by default). With booted False it is yielded
    as soon as it is started, to boot while other work goes on; `wait_until_listening` waits.

    Synchronous, so that a module-scoped fixture can share one node (booting takes 5-10 s);
    the node's own methods are async, so that controlling it never stalls a test's event
    loop. The node is stopped (failing that, killed) and its directory removed however the
    test ends.
    """
    account = rabbitmq_account()
    name = f"score-ingest-test-{uuid.uuid4().hex[:8]}@localhost"
    amqp_port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="score-ingest-rabbitmq-"))
    node = RabbitMQNode(name, amqp_port, directory, vhost, None if tls is None else free_port())
    process: subprocess.Popen[bytes] | None = None
    try:
        (directory / "enabled_plugins").write_text("[].\n")
        config = f"listeners.tcp.default = 127.0.0.1:{amqp_port}\ndefault_vhost = {vhost}\n"
        if max_message_bytes is not None:
            config += f"max_message_size = {max_message_bytes}\n"
        if tls is not None:
            config += _tls_config(node, tls)
        (directory / "node.conf").write_text(config)
        chown_tree(directory, account)
        with (directory / "server.out").open("wb") as out:
            process = subprocess.Popen(
                [RABBITMQ_SERVER],
                cwd=directory,
                env=_node_environment(node, account),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
                # Its own process group, so that cleanup can end the node and nothing else.
                start_new_session=True,
            )
        node.process = process
        if booted:
            node.wait_until_listening()
        yield node
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def _tls_config(node: RabbitMQNode, tls: NodeTls) -> str:
    """The listener's lines of node.conf, its files copied where the node can read them."""
    (node.directory / "tls").mkdir()
    copies = {}
    for name, path in (("ca", tls.ca_file), ("cert", tls.cert_file), ("key", tls.key_file)):
        copies[name] = node.directory / "tls" / f"{name}.pem"
        shutil.copyfile(path, copies[name])
    return (
        f"listeners.ssl.default = 127.0.0.1:{node.amqps_port}\n"
        f"ssl_options.cacertfile = {copies['ca']}\n"
        f"ssl_options.certfile = {copies['cert']}\n"
        f"ssl_options.keyfile = {copies['key']}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )


def rabbitmq_account() -> pwd.struct_passwd:
    """The account nodes run under: `rabbitmq`, which only root (or it) can start."""
    account = pwd.getpwnam(RABBITMQ_USER)
    if os.geteuid() not in (0, account.pw_uid):
        raise RuntimeError(
            f"a RabbitMQ node of the test's own needs the tests to run as root or as "
            f"{RABBITMQ_USER!r}: rabbitmq-server runs only as that user"
        )
    return account


def chown_tree(directory: Path, account: pwd.struct_passwd) -> None:
    """Give the directory and everything in it to the account, so that a node can write there."""
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid)


def server_environment(directory: Path, name: str, extra: dict[str, str]) -> dict[str, str]:
    """rabbitmq-server's environment for a node of its own: this process's, without its
    RABBITMQ_ variables, with the node's name and its files under directory, then extra."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
    env.update(
        {
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(directory / "pid"),
            # Without the .conf suffix: rabbitmq-server adds it.
            "RABBITMQ_CONFIG_FILE": str(directory / "node"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(directory / "feature_flags"),
            **extra,
        }
    )
    return env


def _node_environment(node: RabbitMQNode, account: pwd.struct_passwd) -> dict[str, str]:
    return server_environment(
        node.directory,
        node.name,
        {
            # Where the Erlang cookie lives that rabbitmqctl also reads.
            "HOME": account.pw_dir,
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(free_port()),
        },
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, which rabbitmq-server turns into a clean stop of the node; failing that, KILL."""
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # The node ignored SIGTERM: end the process group we started for it, by its id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

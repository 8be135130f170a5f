"""Three RabbitMQ nodes clustered on this machine, each in a network namespace of its own.

A fault that matters in a cluster is a node cut off from the others while clients still reach
it, which ports on 127.0.0.1 cannot stage. So each node lives in a network namespace, its
`eth0` one end of a veth pair whose other end hangs on a bridge in the root namespace. The
bridge holds the harness's own address on the subnet: the api and the workers, in the root
namespace, reach every node by its address, and a partition is a blackhole route inside the
namespaces (node i cannot reach the others, nor they it; the bridge still reaches all).

Every node has the default ports (5672, 25672, its own epmd on 4369) in its namespace and the
long name `rabbit@<its address>`, so nothing needs /etc/hosts. The nodes form the cluster by
classic peer discovery, with `pause_minority`, `loopback_users = none` (guest may log in
from the bridge), the project's `max_message_size` and an Erlang cookie of the harness's own.

An instance takes the first free subnet 10.213.<n>.0/24 and names its links and namespaces
`sichaos<n>...`; the bridge's alias records the owning process, so that a run that died
without cleaning up is found and removed by the next one (under a lock: several may start
at once). The nodes run as the `rabbitmq` user, as tests/support/rabbitmq_node.py explains.
"""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from chaos.servers import Servers
from tests.support.rabbitmq_node import (
    RABBITMQ_SERVER,
    chown_tree,
    rabbitmq_account,
    server_environment,
)
from tests.support.services import port_open

logger = logging.getLogger(__name__)

PREFIX = "sichaos"
SUBNET = "10.213.{instance}"
INSTANCES = range(1, 255)
# The harness's own address on each subnet, held by the bridge.
BRIDGE_HOST = 254
AMQP_PORT = 5672
CREDENTIALS = "guest:guest"
LOCK_FILE = Path("/run/lock/sichaos.lock")
IP = "/usr/sbin/ip"
SETPRIV = "/usr/bin/setpriv"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
RABBITMQ_QUEUES = "/usr/lib/rabbitmq/bin/rabbitmq-queues"
# The project's (deploy/rabbitmq/rabbitmq.conf).
MAX_MESSAGE_SIZE = 134_217_728
# How long a silent peer counts as up (Erlang's default is 60 s): a node cut off from the
# others notices, and pauses, within 0.75-1.25 times this.
NET_TICKTIME_SECONDS = 20
# How often Ra's failure detector (aten) looks at the heartbeats it gets from the other nodes
# (RabbitMQ's default is 1000 ms): with 1000 the two nodes left of a partition elected a new
# quorum leader after 8.8-9.1 s here, with 250 after 1.3 s (docs/operations.md).
ATEN_POLL_INTERVAL_MS = 250
BOOT_TIMEOUT_SECONDS = 180.0
CTL_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.5
_LOG_TAIL_CHARS = 3000


class ClusterError(RuntimeError):
    """The cluster did not do what the harness asked; the message carries what it saw."""


@dataclass(frozen=True)
class _Node:
    index: int
    namespace: str
    host_link: str
    ip: str
    directory: Path

    @property
    def name(self) -> str:
        return f"rabbit@{self.ip}"


class RabbitCluster(Servers):
    """Three RabbitMQ nodes, each in its own network namespace, linked by veth pairs to a bridge
    in the root namespace (which holds the harness's address on that subnet, so processes in
    the root namespace reach every node)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self._instance: int | None = None
        self._nodes: list[_Node] = []
        self._servers: dict[int, subprocess.Popen[bytes]] = {}
        self._partitioned: set[int] = set()
        self._cookie = os.urandom(20).hex().upper()
        self._account = rabbitmq_account()

    def start(self) -> None:
        """Make the namespaces and links, boot the nodes and wait until they run clustered."""
        started = time.monotonic()
        _check_reachable(self.workdir)
        self._instance = _claim_instance()
        subnet = SUBNET.format(instance=self._instance)
        self._nodes = [
            _Node(
                index=i,
                namespace=f"{PREFIX}{self._instance}-{i + 1}",
                host_link=f"{PREFIX}{self._instance}-{i + 1}",
                ip=f"{subnet}.{i + 1}",
                directory=self.workdir / f"rabbit{i + 1}",
            )
            for i in range(self.size)
        ]
        for node in self._nodes:
            self._link(node)
            self._write_files(node)
        # The first node forms the cluster alone; the others then join it (booted all at
        # once, each could find no peer running yet and form a cluster of its own).
        self._boot(0)
        self._wait_running(0, BOOT_TIMEOUT_SECONDS)
        for i in range(1, self.size):
            self._boot(i)
        for i in range(1, self.size):
            self._wait_running(i, BOOT_TIMEOUT_SECONDS)
        self.wait_healthy(timeout=BOOT_TIMEOUT_SECONDS)
        logger.info(
            "RabbitMQ cluster of %d nodes on %s.0/24 running in %.1f s",
            self.size,
            subnet,
            time.monotonic() - started,
        )

    @property
    def amqp_url(self) -> str:
        """Every node, in the multi-host form: amqp://guest:guest@IP1:5672,IP2:5672,.../"""
        addresses = ",".join(self.node_address(i) for i in range(self.size))
        return f"amqp://{CREDENTIALS}@{addresses}/"

    def node_address(self, i: int) -> str:
        """Node i's AMQP address, "IP:5672"."""
        return f"{self._nodes[i].ip}:{AMQP_PORT}"

    def node_url(self, i: int) -> str:
        """The default vhost of node i alone, as guest."""
        return f"amqp://{CREDENTIALS}@{self.node_address(i)}/"

    def node_name(self, i: int) -> str:
        """Node i's Erlang node name, rabbit@IP."""
        return self._nodes[i].name

    def leader(self, queue: str, vhost: str = "/") -> int:
        """The index of the node that leads a quorum queue, as the cluster reports it now."""
        leaders = [
            member
            for member in self._quorum_status(queue, vhost)
            if member["Raft State"] == "leader"
        ]
        if not leaders:
            raise ClusterError(f"{queue!r} has no leader now")
        # A leader cut off from the others may still call itself one, in an older term.
        newest = max(leaders, key=lambda member: int(member["Term"]))
        return self._index_of(str(newest["Node Name"]))

    def kill(self, i: int) -> None:
        """SIGKILL node i's Erlang VM, as a crash; returns once it is gone."""
        node = self._nodes[i]
        for pid in _namespace_pids(node.namespace):
            if _command_name(pid) == "beam.smp":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._reap(i, STOP_TIMEOUT_SECONDS)

    def stop(self, i: int) -> None:
        """Stop node i gracefully (`rabbitmqctl stop`); returns once its VM has exited."""
        self._ctl(i, "stop")
        self._reap(i, STOP_TIMEOUT_SECONDS)

    def start_node(self, i: int) -> None:
        """Boot node i again on its data; returns when it runs and is clustered."""
        started = time.monotonic()
        self._boot(i)
        self._wait_running(i, BOOT_TIMEOUT_SECONDS)
        logger.info("node %s back in %.1f s", self.node_name(i), time.monotonic() - started)

    def partition(self, i: int) -> None:
        """Cut node i off from the other nodes; clients in the root namespace still reach it."""
        node = self._nodes[i]
        for other in self._others(i):
            _ip("-n", node.namespace, "route", "add", "blackhole", f"{other.ip}/32")
            _ip("-n", other.namespace, "route", "add", "blackhole", f"{node.ip}/32")
        self._partitioned.add(i)

    def heal(self, i: int) -> None:
        """Undo partition(i)."""
        node = self._nodes[i]
        for other in self._others(i):
            _ip("-n", node.namespace, "route", "del", "blackhole", f"{other.ip}/32")
            _ip("-n", other.namespace, "route", "del", "blackhole", f"{node.ip}/32")
        self._partitioned.discard(i)

    def restore(self, queues: Sequence[str] = (), vhost: str = "/", timeout: float = 60) -> None:
        """Heal every partition and boot every node that is down, then wait_healthy: the
        cluster as it started, for whatever uses it next."""
        for i in list(self._partitioned):
            self.heal(i)
        for i in range(self.size):
            if not self._running(i):
                self.start_node(i)
        self.wait_healthy(queues, vhost, timeout)

    def wait_healthy(
        self, queues: Sequence[str] = (), vhost: str = "/", timeout: float = 60
    ) -> None:
        """Wait until every node runs clustered with all others, none reports a partition,
        and each named quorum queue has every node as an online member."""
        deadline = time.monotonic() + timeout
        while (problem := self._health_problem(queues, vhost)) is not None:
            if time.monotonic() > deadline:
                raise self._failure(f"not healthy within {timeout} s: {problem}")
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        """Kill every node and its epmd, delete the namespaces, links and data directories."""
        for node in self._nodes:
            for pid in _namespace_pids(node.namespace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for i in list(self._servers):
            self._reap(i, STOP_TIMEOUT_SECONDS)
        if self._instance is not None:
            with _lock():
                _remove_instance(self._instance)
            self._instance = None
        for node in self._nodes:
            shutil.rmtree(node.directory, ignore_errors=True)
        self._partitioned.clear()

    def _link(self, node: _Node) -> None:
        _ip("netns", "add", node.namespace)
        _ip(
            "link", "add", node.host_link, "type", "veth", "peer", "name", "eth0",
            "netns", node.namespace,
        )  # fmt: skip
        _ip("link", "set", node.host_link, "master", _bridge(self._require_instance()), "up")
        _ip("-n", node.namespace, "link", "set", "lo", "up")
        _ip("-n", node.namespace, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _ip("-n", node.namespace, "link", "set", "eth0", "up")

    def _write_files(self, node: _Node) -> None:
        node.directory.mkdir(parents=True)
        home = node.directory / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(self._cookie)
        cookie.chmod(stat.S_IRUSR)
        peers = "".join(
            f"cluster_formation.classic_config.nodes.{peer.index + 1} = {peer.name}\n"
            for peer in self._nodes
        )
        (node.directory / "node.conf").write_text(
            f"listeners.tcp.default = {AMQP_PORT}\n"
            "loopback_users = none\n"
            "cluster_partition_handling = pause_minority\n"
            f"max_message_size = {MAX_MESSAGE_SIZE}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n" + peers
        )
        (node.directory / "advanced.config").write_text(
            f"[{{kernel, [{{net_ticktime, {NET_TICKTIME_SECONDS}}}]}},\n"
            f" {{aten, [{{poll_interval, {ATEN_POLL_INTERVAL_MS}}}]}}].\n"
        )
        (node.directory / "enabled_plugins").write_text("[].\n")
        # Instead of the machine's /etc/rabbitmq/rabbitmq-env.conf, which may bind epmd and
        # the distribution port to 127.0.0.1 (as the shared broker's does here).
        (node.directory / "rabbitmq-env.conf").write_text("")
        chown_tree(node.directory, self._account)

    def _boot(self, i: int) -> None:
        if (server := self._servers.get(i)) is not None and server.poll() is None:
            raise ClusterError(f"node {self.node_name(i)} is already running")
        node = self._nodes[i]
        with (node.directory / "server.out").open("ab") as out:
            self._servers[i] = subprocess.Popen(  # noqa: S603 - the harness's own commands
                [*self._in_namespace(node), RABBITMQ_SERVER],
                cwd=node.directory,
                env=self._server_environment(node),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _in_namespace(self, node: _Node) -> list[str]:
        """The argv prefix that runs a command in node's namespace as the rabbitmq user."""
        return [
            IP, "netns", "exec", node.namespace,
            SETPRIV, f"--reuid={self._account.pw_uid}", f"--regid={self._account.pw_gid}",
            "--clear-groups",
        ]  # fmt: skip

    def _server_environment(self, node: _Node) -> dict[str, str]:
        directory = node.directory
        return server_environment(
            directory,
            node.name,
            {
                "HOME": str(directory / "home"),
                "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
                "RABBITMQ_USE_LONGNAME": "true",
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
            },
        )

    def _wait_running(self, i: int, timeout: float) -> None:
        """Until node i accepts AMQP connections and runs clustered with every node that
        should be reachable from it."""
        node = self._nodes[i]
        server = self._servers[i]
        deadline = time.monotonic() + timeout
        while not port_open(node.ip, AMQP_PORT):
            if server.poll() is not None:
                raise self._failure(f"{node.name} exited with {server.returncode} while booting")
            if time.monotonic() > deadline:
                raise self._failure(f"{node.name} not listening within {timeout} s")
            time.sleep(POLL_SECONDS)
        expected = {self._nodes[j].name for j in self._reachable_from(i)}
        while not expected <= set(self._cluster_status(i).get("running_nodes", [])):
            if time.monotonic() > deadline:
                raise self._failure(f"{node.name} not clustered with {sorted(expected)}")
            time.sleep(POLL_SECONDS)

    def _reachable_from(self, i: int) -> list[int]:
        """The nodes that run and that node i can reach, itself included."""
        return [
            j
            for j in range(self.size)
            if j == i or (self._running(j) and not {i, j} & self._partitioned)
        ]

    def _running(self, i: int) -> bool:
        server = self._servers.get(i)
        return server is not None and server.poll() is None

    def _health_problem(self, queues: Sequence[str], vhost: str) -> str | None:
        everyone = {node.name for node in self._nodes}
        for i, node in enumerate(self._nodes):
            if not self._running(i):
                return f"{node.name} is not running"
            if not port_open(node.ip, AMQP_PORT):
                return f"{node.name} does not accept AMQP connections"
        # Each answer is a CLI run of a second or more (an Erlang VM starting): all at once.
        with ThreadPoolExecutor(self.size + len(queues)) as pool:
            statuses = [pool.submit(self._cluster_status, i) for i in range(self.size)]
            quorums = [pool.submit(self._quorum_status, queue, vhost) for queue in queues]
        for node, asked in zip(self._nodes, statuses, strict=True):
            if (error := asked.exception()) is not None:
                return str(error)
            status = asked.result()
            if (running := set(status.get("running_nodes", []))) != everyone:
                return f"{node.name} sees running {sorted(running)}"
            if partitions := status.get("partitions"):
                return f"{node.name} reports partitions {partitions}"
        for queue, quorum in zip(queues, quorums, strict=True):
            if (error := quorum.exception()) is not None:
                return str(error)
            members = quorum.result()
            online = {
                member["Node Name"]
                for member in members
                if member["Raft State"] in ("leader", "follower")
            }
            if online != everyone:
                return f"{queue} has members {members}"
        return None

    def _cluster_status(self, i: int) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self._ctl(i, "cluster_status", "--formatter", "json"))
        return status

    def _quorum_status(self, queue: str, vhost: str) -> list[dict[str, Any]]:
        """Each member of a quorum queue and its Raft state, from the first node that answers.

        Not `list_queues`: the nodes it asks answer the CLI directly, and its node in the root
        namespace has a name they cannot resolve.
        """
        errors = []
        for i in range(self.size):
            if not self._running(i) or i in self._partitioned:
                continue
            try:
                output = self._ctl(
                    i, "quorum_status", "-p", vhost, queue, "--formatter", "json",
                    tool=RABBITMQ_QUEUES,
                )  # fmt: skip
            except ClusterError as error:
                errors.append(str(error))
                continue
            members: list[dict[str, Any]] = json.loads(output)
            return members
        raise ClusterError(f"no node gave the members of {queue!r}: {errors}")

    def _ctl(self, i: int, *args: str, tool: str = RABBITMQCTL) -> str:
        """`rabbitmqctl` (or another CLI tool) against node i, from the root namespace (which
        reaches every node)."""
        command = [
            tool, "--longnames", "--erlang-cookie", self._cookie,
            "-n", self._nodes[i].name, "-q", *args,
        ]  # fmt: skip
        env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
        what = f"{Path(tool).name} {' '.join(args)} on node {i}"
        try:
            result = subprocess.run(  # noqa: S603 - the harness's own commands
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
                timeout=CTL_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired as error:
            raise ClusterError(f"{what} timed out") from error
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise ClusterError(f"{what} exited {result.returncode}: {output}")
        return result.stdout.decode()

    def _reap(self, i: int, timeout: float) -> None:
        """Wait for node i's rabbitmq-server to exit, then forget it."""
        server = self._servers.pop(i, None)
        if server is None:
            return
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    def _others(self, i: int) -> list[_Node]:
        return [node for node in self._nodes if node.index != i]

    def _index_of(self, name: str) -> int:
        for node in self._nodes:
            if node.name == name:
                return node.index
        raise ClusterError(f"{name!r} is no node of this cluster")

    def _require_instance(self) -> int:
        if self._instance is None:
            raise ClusterError("the cluster is not started")
        return self._instance

    def _failure(self, what: str) -> ClusterError:
        tails = []
        for node in self._nodes:
            for path in [node.directory / "server.out", *sorted(node.directory.glob("log/*.log"))]:
                with contextlib.suppress(OSError):
                    text = path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
                    tails.append(f"----- {node.name} {path.name} -----\n{text}")
        return ClusterError("\n".join([what, *tails]))


def _check_reachable(workdir: Path) -> None:
    """Make workdir; fail unless the rabbitmq user can pass through every directory above it."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    for directory in workdir.resolve().parents:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise ClusterError(
                f"the rabbitmq user cannot reach {workdir}: {directory} is closed to others "
                "(give a workdir below a directory it may pass, e.g. one made in /tmp)"
            )


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialize claiming and removing instances between harnesses on this machine."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _claim_instance() -> int:
    """Remove what harnesses that are gone left behind, then take the first free instance."""
    with _lock():
        for instance in _stale_instances():
            logger.warning("removing %s%d*, left by a harness that is gone", PREFIX, instance)
            _remove_instance(instance)
        taken = set(_instances_found())
        used = _used_subnets()
        for instance in INSTANCES:
            subnet = SUBNET.format(instance=instance)
            if instance in taken or subnet in used:
                continue
            bridge = _bridge(instance)
            _ip("link", "add", bridge, "type", "bridge")
            _ip("link", "set", bridge, "alias", _owner())
            _ip("addr", "add", f"{subnet}.{BRIDGE_HOST}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            return instance
    raise ClusterError(f"no free subnet among {SUBNET.format(instance='<n>')}.0/24")


def _instances_found() -> dict[int, dict[str, Any] | None]:
    """Every instance with a link or namespace on this machine, and its bridge if it has one.

    An instance's bridge is made first and removed last (both under the lock), so links or
    namespaces without it are leftovers.
    """
    found: dict[int, dict[str, Any] | None] = {}
    links = _links()
    namespaces = [entry["name"] for entry in json.loads(_ip("-j", "netns", "list") or "[]")]
    for name in [link["ifname"] for link in links] + namespaces:
        if (instance := _instance_of(name)) is not None:
            found.setdefault(instance, None)
    for link in links:
        instance = _instance_of(link["ifname"])
        if instance is not None and link["ifname"] == _bridge(instance):
            found[instance] = link
    return found


def _stale_instances() -> list[int]:
    return [
        instance
        for instance, bridge in _instances_found().items()
        if bridge is None or not _owner_alive(bridge)
    ]


def _instance_of(name: str) -> int | None:
    """n, from the name of instance n's bridge (sichaos<n>br), links or namespaces
    (sichaos<n>-<i>)."""
    if not name.startswith(PREFIX):
        return None
    number = name.removeprefix(PREFIX).removesuffix("br").split("-", 1)[0]
    return int(number) if number.isdigit() else None


def _remove_instance(instance: int) -> None:
    """Kill whatever runs in the instance's namespaces, delete them, its links and its bridge."""
    namespaces = [
        entry["name"]
        for entry in json.loads(_ip("-j", "netns", "list") or "[]")
        if _instance_of(entry["name"]) == instance
    ]
    for namespace in namespaces:
        for pid in _namespace_pids(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for namespace in namespaces:
        _wait_empty(namespace)
    # The host's ends of the veth pairs first: a namespace outlives its name while sockets
    # of the killed nodes linger, and its links with it.
    for link in _links():
        if _instance_of(link["ifname"]) == instance and link["ifname"] != _bridge(instance):
            _ip("link", "delete", link["ifname"])
    for namespace in namespaces:
        _ip("netns", "delete", namespace)
    if any(link["ifname"] == _bridge(instance) for link in _links()):
        _ip("link", "delete", _bridge(instance))


def _wait_empty(namespace: str) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while pids := _namespace_pids(namespace):
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {pids} outlive SIGKILL in {namespace}")
        time.sleep(0.05)


def _owner() -> str:
    """This process, as the bridge's alias records it: pid and start time (pids are reused)."""
    return f"{os.getpid()}:{psutil.Process().create_time()}"


def _owner_alive(link: dict[str, Any]) -> bool:
    pid, _, created = str(link.get("ifalias", "")).partition(":")
    if not pid.isdigit():
        # Not yet named: its creator holds the lock, or died in between (rare; left alone).
        return True
    try:
        return str(psutil.Process(int(pid)).create_time()) == created
    except psutil.NoSuchProcess:
        return False


def _used_subnets() -> set[str]:
    """The /24 prefixes ("a.b.c") of every IPv4 address in the root namespace."""
    used = set()
    for link in json.loads(_ip("-j", "-4", "addr", "show")):
        for address in link.get("addr_info", []):
            used.add(address["local"].rsplit(".", 1)[0])
    return used


def _bridge(instance: int) -> str:
    return f"{PREFIX}{instance}br"


def _links() -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = json.loads(_ip("-j", "link", "show"))
    return links


def _namespace_pids(namespace: str) -> list[int]:
    result = subprocess.run(  # noqa: S603 - the harness's own commands
        [IP, "netns", "pids", namespace], capture_output=True, check=False, timeout=30
    )
    return [int(pid) for pid in result.stdout.split()]


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ip(*args: str) -> str:
    """Run `ip args`; fail with its message if it fails."""
    result = subprocess.run(  # noqa: S603 - the harness's own commands
        [IP, *args], capture_output=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode()

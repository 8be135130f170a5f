"""The trust model's half that is the broker's: only the api's user may write to `scores.api`.

The README's `rabbitmqctl` lines, run as they are on a vhost of the test's own (names made
unique: users are the broker's, not the vhost's), with the permissions the deploy
definitions grant; then each user does what its role does, and what it must not do is
refused by the broker with ACCESS_REFUSED, which closes the channel.
"""

import contextlib
import json
import re
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelAccessRefused

from shared.dead_letters import REASON_HEADER
from shared.settings import Settings
from shared.topology import (
    API_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    QUEUE,
    ROUTING_KEY,
    declare_topology,
    persist_queues,
)
from tests.cli.test_dlq import dlq_ok
from tests.conftest import (
    ENTITY,
    PROJECT,
    basic_auth,
    client_for,
    running_app,
    score_body,
    wait_for_count,
)
from tests.support.processes import connect_broker, running_worker
from tests.support.services import VhostFactory, delete_topology
from tests.worker.test_trust_by_exchange import (
    CASE_HEADER,
    Checks,
    api_body,
    decoded_since,
    decoded_so_far,
    message,
    probe,
)

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
README = ROOT / "README.md"
DOCUMENTED_VHOST = "score-ingest"
API_USER, WORKER_USER, PUBLISHER_USER = (
    "score-ingest-api",
    "score-ingest-worker",
    "score-ingest-publisher",
)
COUNT_SCORES = "SELECT count(*) FROM scores"

# One pytest-xdist worker runs the module (`--dist loadgroup`), so its README users are made
# once (twelve `rabbitmqctl` processes, 15 s of CPU), not once in each worker it lands on.
pytestmark = pytest.mark.xdist_group("readme_users")


def readme_commands() -> list[list[str]]:
    """The `rabbitmqctl` lines of the README's trust model, split as the shell splits them."""
    return [
        shlex.split(line)
        for line in README.read_text().splitlines()
        if line.startswith("rabbitmqctl ")
    ]


def readme_permissions() -> dict[str, tuple[str, str, str]]:
    """user: (configure, write, read), as the README's set_permissions lines grant them."""
    granted = {}
    for command in readme_commands():
        if command[1] == "set_permissions":
            assert command[2:4] == ["-p", DOCUMENTED_VHOST], command
            user, configure, write, read = command[4:]
            granted[user] = (configure, write, read)
    return granted


def test_the_readme_grants_each_user_what_the_deploy_definitions_grant() -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    deployed = {
        entry["user"]: (entry["configure"], entry["write"], entry["read"])
        for entry in definitions["permissions"]
        if entry["vhost"] == DOCUMENTED_VHOST
    }
    assert readme_permissions() == deployed
    assert set(deployed) == {API_USER, WORKER_USER, PUBLISHER_USER}
    added = [command[2] for command in readme_commands() if command[1] == "add_user"]
    assert sorted(added) == sorted(deployed)


# The README's lines on a broker


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Users:
    """A vhost set up by the README's lines, and a URL per user (guest's to look on)."""

    guest: str
    api: str
    worker: str
    publisher: str


@pytest.fixture(scope="module")
def readme_users(vhosts: VhostFactory | str) -> Iterator[Users]:
    """Run the README's lines with names of this module's own; remove what they made after.

    Once per module (per pytest-xdist worker that runs its tests): each line is a
    `rabbitmqctl` process, about a second of CPU, and the users do not change between
    tests. `users` empties the vhost before each test."""
    if not isinstance(vhosts, VhostFactory):
        pytest.fail("needs rabbitmqctl on a local broker to make users (TEST_AMQP_URL is set)")
    suffix = uuid.uuid4().hex[:12]
    vhost = f"score-ingest-test-permissions-{suffix}"
    names = {user: f"{user}-test-{suffix}" for user in (API_USER, WORKER_USER, PUBLISHER_USER)}
    password = uuid.uuid4().hex
    server = urlsplit(vhosts.server_url)

    def url(user: str, secret: str) -> str:
        netloc = f"{quote(user, safe='')}:{quote(secret, safe='')}@{server.hostname}:{server.port}"
        return urlunsplit(server._replace(netloc=netloc, path="/" + quote(vhost, safe="")))

    made_vhost, made_users = False, []
    try:
        for command in readme_commands():
            args = [names.get(arg, vhost if arg == DOCUMENTED_VHOST else arg) for arg in command]
            if args[1] == "add_user":
                args[3] = password
            _rabbitmqctl(*args[1:])
            made_vhost = made_vhost or args[1] == "add_vhost"
            if args[1] == "add_user":
                made_users.append(args[2])
        assert made_vhost
        assert len(made_users) == 3
        guest = server.username or "guest"
        _rabbitmqctl("set_permissions", "-p", vhost, guest, ".*", ".*", ".*")
        yield Users(
            guest=url(guest, server.password or "guest"),
            api=url(names[API_USER], password),
            worker=url(names[WORKER_USER], password),
            publisher=url(names[PUBLISHER_USER], password),
        )
    finally:
        if made_vhost:
            _rabbitmqctl("delete_vhost", vhost)
        for user in made_users:
            _rabbitmqctl("delete_user", user)


@pytest.fixture
async def users(readme_users: Users, settings: Settings) -> Users:
    """The README's users, on a vhost without the topology an earlier test declared."""
    await delete_topology(readme_users.guest, settings)
    return readme_users


@contextlib.asynccontextmanager
async def channel_of(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    """A channel with publisher confirms, on a connection as the URL's user."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        yield await connection.channel(publisher_confirms=True, on_return_raises=True)


def score(name: str) -> aio_pika.Message:
    """A probe (stored only if trusted) named after its case."""
    return message(name, api_body(probe(prediction_id=name)))


async def assert_refused(amqp_url: str, exchange: str, routing_key: str = ROUTING_KEY) -> None:
    """Publishing to exchange as the URL's user closes the channel with ACCESS_REFUSED."""
    async with channel_of(amqp_url) as channel:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        with pytest.raises(ChannelAccessRefused) as refused:
            await target.publish(score("refused"), routing_key, mandatory=True)
        assert "ACCESS_REFUSED" in str(refused.value)
        name = exchange or "amq.default"
        assert f"exchange '{name}'" in str(refused.value)
        assert channel.is_closed


async def declare_as(amqp_url: str, settings: Settings) -> None:
    """Declare the topology as the api and the worker do at start, as the URL's user."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        await declare_topology(await connection.channel(), settings)


async def test_a_direct_publisher_may_publish_to_scores_and_nowhere_else(
    users: Users, settings: Settings
) -> None:
    await declare_as(users.api, settings)
    async with channel_of(users.publisher) as channel:
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        await exchange.publish(score("public"), ROUTING_KEY, mandatory=True)
        # A passive declaration takes no permission: a publisher may check the queue.
        queue = await channel.declare_queue(QUEUE, passive=True)
        assert queue.declaration_result.message_count == 1
    await assert_refused(users.publisher, API_EXCHANGE)
    await assert_refused(users.publisher, "", QUEUE)  # straight to the queue by its name
    async with channel_of(users.publisher) as channel:
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    async with channel_of(users.publisher) as channel:
        with pytest.raises(ChannelAccessRefused):
            await channel.exchange_delete(API_EXCHANGE)


async def test_only_the_api_may_publish_to_the_api_exchange(
    users: Users, settings: Settings
) -> None:
    for declaring in (users.api, users.worker):  # either may start first
        await declare_as(declaring, settings)
    async with channel_of(users.api) as channel:
        exchange = await channel.get_exchange(API_EXCHANGE, ensure=False)
        await exchange.publish(score("trusted"), ROUTING_KEY, mandatory=True)
    await assert_refused(users.worker, API_EXCHANGE)
    await assert_refused(users.api, EXCHANGE)  # nor need it publish anywhere else
    async with channel_of(users.guest) as channel:
        queue = await channel.get_queue(QUEUE, ensure=False)
        taken = await queue.get(no_ack=True, timeout=5)
        assert (taken.exchange, taken.headers[CASE_HEADER]) == (API_EXCHANGE, "trusted")
        assert await queue.get(no_ack=True, fail=False) is None


async def test_the_api_and_the_worker_do_their_work_as_their_own_users(
    users: Users, settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    """The api publishes as its user, the worker stores as its own and trusts what the api
    published; a direct publisher's probe is validated and dead-lettered; `dlq replay`,
    as the worker's user, publishes it anew to `scores`, where it is validated again."""
    as_api = settings.model_copy(update={"amqp_url": users.api})
    as_worker = settings.model_copy(update={"amqp_url": users.worker})
    as_guest = settings.model_copy(update={"amqp_url": users.guest})
    async with running_worker(as_worker) as worker, connect_broker(as_guest) as broker:
        before = decoded_so_far()
        async with running_app(as_api) as app, client_for(app) as client:
            response = await client.post(
                f"/v2/{ENTITY}/{PROJECT}/scores", json=score_body(), headers=basic_auth(api_key)
            )
            assert response.status_code == 200, response.text
        async with channel_of(users.publisher) as channel:
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            await exchange.publish(score("direct-probe"), ROUTING_KEY, mandatory=True)
        assert await wait_for_count(db, COUNT_SCORES, 1) == 1
        assert await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 1) == 1
        assert decoded_since(before) == Checks(api_exchange=1, validation=1)
        assert worker.persisted == 1

        before = decoded_so_far()
        replayed = await dlq_ok(as_worker, "replay")
        assert "replayed 1" in replayed.stderr, str(replayed)
        (letter,) = await broker.take_dead_letters(1)
        assert letter.headers[CASE_HEADER] == "direct-probe"
        assert letter.headers[REASON_HEADER] == "schema_violation"
        assert letter.headers["x-replay-count"] == 1
        assert decoded_since(before) == Checks(validation=1)
        await broker.assert_stays_empty(QUEUE)
    assert await db.fetchval("SELECT score_id::text FROM scores") == response.json()["score_id"]


def test_the_api_and_the_worker_may_configure_and_read_the_topology_and_nothing_else() -> None:
    """Their permissions name every exchange and queue the code declares: a name changed in
    shared/topology.py and not in the permissions fails here before it fails in production."""
    queues = persist_queues(Settings())  # scores.persist and the default shards
    names = {EXCHANGE, API_EXCHANGE, DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, *queues}
    for user in (API_USER, WORKER_USER):
        configure, _, read = readme_permissions()[user]
        for expression in (configure, read):
            assert {name for name in names if re.search(expression, name)} == names
            assert not re.search(expression, "scores.other")
            assert not re.search(expression, "amq.default")

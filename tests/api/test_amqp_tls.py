"""Broker connections over TLS (`amqps://`), against the tests' own RabbitMQ node.

The node listens for TLS with a certificate of a CA the tests make (`pki`, tests/support/tls.py)
and verifies a client certificate when one is shown. Another CA, the impostor, signs
nothing the node trusts.
"""

import ssl
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

from api.amqp import ConfirmingPublisher, MessageProperties, PublishFailed
from shared.broker import tls_context
from shared.settings import Settings
from tests.conftest import (
    ENTITY,
    PROJECT,
    TLS_CLIENT_NAME,
    basic_auth,
    score_body,
    wait_for_count,
)
from tests.support.processes import api_process, worker_process
from tests.support.rabbitmq_node import RabbitMQNode
from tests.support.tls import CertificateFiles, Pki

PROPERTIES = MessageProperties("application/json", "tls-test.v1", "tls-tests")
SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"


def context(ca_file: Path, client: CertificateFiles | None = None) -> ssl.SSLContext:
    """A client's TLS context trusting ca_file, showing client if given."""
    tls = ssl.create_default_context(cafile=ca_file)
    if client is not None:
        tls.load_cert_chain(client.cert_file, client.key_file)
    return tls


async def connect(url: str, tls: ssl.SSLContext | None) -> ConfirmingPublisher:
    return await ConfirmingPublisher.connect(
        url, connection_name="tests-amqp-tls", connect_timeout=10, publish_timeout=10, tls=tls
    )


async def tls_connections(node: RabbitMQNode) -> list[tuple[str, str]]:
    """(ssl, peer certificate subject) of every connection the node has."""
    listed = await node.ctl("list_connections", "--no-table-headers", "ssl", "peer_cert_subject")
    return [tuple(line.split("\t")) for line in listed.splitlines() if line]  # type: ignore[misc]


async def test_the_api_and_the_worker_carry_a_score_over_tls(
    settings: Settings, own_node: RabbitMQNode, pki: Pki, db: asyncpg.Connection, api_key: str
) -> None:
    # Built anew, not copied: the settings' own checks run on the TLS files.
    over_tls = Settings(
        **{
            **settings.model_dump(),
            "amqp_url": own_node.amqps_url,
            "amqp_ca_file": pki.ca.cert_file,
            "amqp_cert_file": pki.client.cert_file,
            "amqp_key_file": pki.client.key_file,
        }
    )
    async with (
        worker_process(over_tls),
        api_process(over_tls) as api,
        httpx.AsyncClient(base_url=api.base_url, timeout=10) as client,
    ):
        response = await client.post(SCORES_PATH, json=score_body(), headers=basic_auth(api_key))
        assert response.status_code == 200, response.text
        score_id = uuid.UUID(response.json()["score_id"])
        query = "SELECT count(*) FROM scores WHERE score_id = $1"
        assert await wait_for_count(db, query, 1, score_id) == 1
        # The api's publisher and the worker's connections, each with the client certificate.
        connections = await tls_connections(own_node)
    assert len(connections) >= 3, connections
    assert set(connections) == {("true", f"CN={TLS_CLIENT_NAME}")}


async def test_a_publisher_trusting_the_ca_alone_publishes_over_tls(
    own_node: RabbitMQNode, pki: Pki
) -> None:
    tls = context(pki.ca.cert_file)
    queue_name = f"tls-test-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(own_node.amqps_url, ssl_context=tls, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        publisher = await connect(own_node.amqps_url, tls)
        try:
            assert await tls_connections(own_node) == [("true", ""), ("true", "")]
            body = b'{"over": "tls"}'
            await publisher.publish(
                "", queue_name, body, PROPERTIES, message_id="tls-1", timestamp=datetime.now(UTC)
            )
        finally:
            await publisher.close()
        message = await queue.get(no_ack=True, timeout=5)
        assert message.body == body
        assert message.message_id == "tls-1"


@pytest.mark.parametrize("trusting", ["impostor", "system"])
async def test_a_broker_certificate_the_client_does_not_trust_is_refused_clearly(
    own_node: RabbitMQNode, pki: Pki, trusting: str
) -> None:
    # "system": no CA file, the system's CAs, which never signed the test's CA.
    tls = context(pki.impostor.cert_file) if trusting == "impostor" else None
    with pytest.raises(PublishFailed) as refused:
        await connect(own_node.amqps_url, tls)
    message = str(refused.value)
    assert f"broker at 127.0.0.1:{own_node.amqps_port} is not trusted" in message
    # Why, as OpenSSL says: the node sends its CA with its certificate, trusted by no one here.
    assert "(self-signed certificate in certificate chain)" in message
    assert "AMQP_CA_FILE must hold the CA that signed it" in message


async def test_the_api_says_why_it_cannot_trust_the_broker_and_is_not_ready(
    settings: Settings, own_node: RabbitMQNode, pki: Pki
) -> None:
    wrong_ca = Settings(
        **{
            **settings.model_dump(),
            "amqp_url": own_node.amqps_url,
            "amqp_ca_file": pki.impostor.cert_file,
        }
    )
    async with (
        api_process(wrong_ca, ready=False) as api,
        httpx.AsyncClient(base_url=api.base_url) as client,
    ):
        await api.process.wait_for_output(
            f"the TLS certificate of the broker at 127.0.0.1:{own_node.amqps_port} is not trusted"
            " (self-signed certificate in certificate chain): AMQP_CA_FILE must hold the CA"
        )
        assert (await client.get("/readyz")).status_code == 503


async def test_a_client_certificate_of_a_ca_the_broker_does_not_trust_is_refused(
    own_node: RabbitMQNode, pki: Pki
) -> None:
    with pytest.raises((PublishFailed, ssl.SSLError)) as refused:
        await connect(own_node.amqps_url, context(pki.ca.cert_file, pki.impostor_client))
    assert "unknown ca" in str(refused.value).lower()


def test_tls_context_reads_the_settings(pki: Pki) -> None:
    for_tls = Settings(
        amqp_url="amqps://broker.internal/",
        amqp_ca_file=pki.ca.cert_file,
        amqp_cert_file=pki.client.cert_file,
        amqp_key_file=pki.client.key_file,
    )
    tls = tls_context(for_tls)
    assert tls is not None
    assert tls.verify_mode == ssl.CERT_REQUIRED
    assert tls.check_hostname
    assert [ca["subject"] for ca in tls.get_ca_certs()] == [
        ((("commonName", "score-ingest-test-ca"),),)
    ]
    assert tls_context(Settings(amqp_url="amqp://broker.internal/")) is None
    system = tls_context(Settings(amqp_url="amqps://broker.internal/"))
    assert system is not None
    assert system.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        (
            {"amqp_url": "amqp://h/", "amqp_ca_file": "ca"},
            "AMQP_CA_FILE set, but AMQP_URL does not",
        ),
        (
            {"amqp_url": "amqp://h/", "amqp_cert_file": "cert", "amqp_key_file": "key"},
            "AMQP_CERT_FILE, AMQP_KEY_FILE set, but AMQP_URL does not use TLS",
        ),
        ({"amqp_url": "amqps://h/", "amqp_key_file": "key"}, "AMQP_KEY_FILE set without"),
        ({"amqp_url": "amqps://h/", "amqp_ca_file": "missing"}, "Path does not point to a file"),
    ],
    ids=["ca-without-tls", "client-without-tls", "key-without-cert", "missing-file"],
)
def test_settings_refuse_tls_files_they_cannot_use(
    pki: Pki, given: dict[str, str], refusal: str
) -> None:
    files = {
        "ca": pki.ca.cert_file,
        "cert": pki.client.cert_file,
        "key": pki.client.key_file,
        "missing": pki.ca.directory / "missing.pem",
    }
    values = {name: files.get(value, value) for name, value in given.items()}
    with pytest.raises(ValueError, match=refusal):
        Settings(**values)  # type: ignore[arg-type]


def test_a_file_that_holds_no_certificate_is_refused_at_start_up(pki: Pki) -> None:
    not_a_certificate = pki.ca.directory / "empty.pem"
    not_a_certificate.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="AMQP_CA_FILE holds no usable CA certificate"):
        tls_context(Settings(amqp_url="amqps://h/", amqp_ca_file=not_a_certificate))
    with pytest.raises(ValueError, match="AMQP_CERT_FILE and AMQP_KEY_FILE hold no usable"):
        tls_context(
            Settings(
                amqp_url="amqps://h/",
                amqp_cert_file=not_a_certificate,
                amqp_key_file=pki.client.key_file,
            )
        )

"""The API's /healthz, /readyz and /metrics, and its X-Request-ID, on the real broker."""

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.broker import broker_nodes, node_address
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, serving
from tests.support.tcp_proxy import TcpProxy

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SCORES_ROUTE = "/v2/{entity}/{project}/scores"
SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
OPS_PATHS = ("/healthz", "/readyz", "/metrics")


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a labelled counter not yet incremented counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> Samples:
    """GET /metrics (without credentials) and parse it."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_samples(response.text)


async def test_healthz_and_readyz_need_no_credentials(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    alive = await client.get("/healthz")
    assert alive.status_code == 200
    assert alive.json() == {"status": "ok"}

    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "broker": {"node": node_address(broker_nodes(settings.amqp_url)[0]), "connected": True},
        "database": {
            "keys": {"in_use": 0, "max": 4},
            "writes": {"in_use": 0, "max": 10},
            "reads": {"in_use": 0, "max": 5},
        },
    }

    assert (await client.get("/nope")).status_code == 404


async def test_ops_endpoints_are_not_in_openapi(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert SCORES_ROUTE in paths
    for path in OPS_PATHS:
        assert path not in paths


@pytest.fixture
async def proxied_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, TcpProxy]]:
    """A client of an app that reaches the broker only through a proxy the test can cut."""
    async with TcpProxy.for_url(settings.amqp_url) as proxy:
        proxied = settings.model_copy(update={"amqp_url": proxy.url_through(settings.amqp_url)})
        async with serving(proxied) as client:
            yield client, proxy


async def wait_for_status(
    client: httpx.AsyncClient, path: str, status: int, timeout: float
) -> httpx.Response:
    """Poll a path until it answers status; returns that response."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (response := await client.get(path)).status_code != status:
        assert loop.time() < deadline, f"{path} answered {response.status_code}, not {status}"
        await asyncio.sleep(0.05)
    return response


async def test_readyz_is_503_while_the_broker_is_unreachable(
    proxied_client: tuple[httpx.AsyncClient, TcpProxy],
) -> None:
    client, proxy = proxied_client
    await wait_for_status(client, "/readyz", 200, timeout=5)

    await proxy.cut()
    not_ready = await wait_for_status(client, "/readyz", 503, timeout=10)
    assert not_ready.json()["status"] == "broker unavailable"
    assert (await client.get("/healthz")).status_code == 200, "alive all the same"

    await proxy.restore()
    await wait_for_status(client, "/readyz", 200, timeout=15)


async def test_metrics_count_requests_by_route_template_and_status(
    client: httpx.AsyncClient, api_key: str
) -> None:
    before = await scrape(client)

    for _ in range(2):
        created = await client.post(SCORES_PATH, json=score_body(), headers=basic_auth(api_key))
        assert created.status_code == 200, created.text
    invalid = await client.post(
        SCORES_PATH, json=score_body(scorer="not a ref"), headers=basic_auth(api_key)
    )
    assert invalid.status_code == 422, invalid.text
    unauthenticated = await client.post(SCORES_PATH, json=score_body())
    assert unauthenticated.status_code == 401, unauthenticated.text
    other_project = await client.post(
        f"/v2/{ENTITY}/another-project/scores", json=score_body(), headers=basic_auth(api_key)
    )
    assert other_project.status_code == 200, other_project.text

    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "score_ingest_http_requests_total"
    for status, count in (("200", 3), ("422", 1), ("401", 1)):
        assert delta(requests, method="POST", route=SCORES_ROUTE, status=status) == count, status
    assert not any(
        name == requests and SCORES_PATH in dict(labels).get("route", "") for name, labels in after
    ), "requests are counted by route template, not by path"
    assert delta(requests, method="GET", route="/metrics", status="200") == 1
    assert delta("score_ingest_http_request_seconds_count", route=SCORES_ROUTE) == 5
    assert delta("score_ingest_scores_accepted_total") == 3
    assert delta("score_ingest_publish_confirm_seconds_count") == 3
    assert delta("score_ingest_publish_confirm_seconds_sum") > 0


async def test_request_id_is_echoed_when_sane_and_generated_otherwise(
    client: httpx.AsyncClient,
) -> None:
    given = "req-42.retry:1_a"
    echoed = await client.get("/healthz", headers={"X-Request-ID": given})
    assert echoed.headers["x-request-id"] == given

    generated = {(await client.get("/healthz")).headers["x-request-id"] for _ in range(2)}
    assert len(generated) == 2
    for unsafe in ("has spaces", "a" * 129, "new\\nline", "x;rm -rf"):
        response = await client.get("/healthz", headers={"X-Request-ID": unsafe})
        generated.add(response.headers["x-request-id"])
        assert response.headers["x-request-id"] != unsafe
    for request_id in generated:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id

    unauthenticated = await client.post(SCORES_PATH, json=score_body())
    assert unauthenticated.status_code == 401
    assert re.fullmatch(r"[0-9a-f]{32}", unauthenticated.headers["x-request-id"])

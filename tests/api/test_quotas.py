"""Quotas through the api: per key, per entity, counted per score, refused before publishing.

Every test has an entity of its own, so that no quota it sets can reach another test. The
rates are 1 score a second with bursts of 100, so that what a test expects to be refused
stays refused for tens of seconds, however slow the machine.
"""

import asyncio
import re
import secrets
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.keys import create_key, set_key_quota
from api.quotas import Quota, set_entity_quota
from shared.settings import Settings
from shared.topology import QUEUE
from tests.conftest import PROJECT, basic_auth, score_body, serving
from tests.support.processes import connect_broker

SLOW = Quota(rate=1, burst=100)
CHANGE_TIMEOUT_SECONDS = 10.0


@pytest.fixture
async def entity(db: asyncpg.Connection) -> AsyncIterator[str]:
    """An entity of the test's own; its quota row goes with the test."""
    name = f"quota-{secrets.token_hex(4)}"
    yield name
    await db.execute("DELETE FROM entity_quotas WHERE entity = $1", name)


async def _key(db: asyncpg.Connection, entity: str, quota: Quota | None = None) -> str:
    _, secret = await create_key(db, entity, quota=quota)
    return secret


async def _post(client: httpx.AsyncClient, key: str, entity: str, scores: int) -> httpx.Response:
    """A batch of `scores` scores, or a single create for 1."""
    body = score_body(scorer=f"weave:///{entity}/{PROJECT}/op/exact_match:abc123")
    if scores == 1:
        return await client.post(
            f"/v2/{entity}/{PROJECT}/scores", json=body, headers=basic_auth(key)
        )
    return await client.post(
        f"/v2/{entity}/{PROJECT}/scores/batch",
        json={"scores": [body] * scores},
        headers=basic_auth(key),
    )


async def _queued(settings: Settings) -> int:
    async with connect_broker(settings) as broker:
        return await broker.ready_count(QUEUE)


def _rate_limit(response: httpx.Response) -> dict[str, dict[str, int]]:
    """The RateLimit field's items, by policy name, with their parameters."""
    items: dict[str, dict[str, int]] = {}
    for item in response.headers["RateLimit"].split(", "):
        name, *parameters = item.split(";")
        items[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in parameters)}
    return items


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose key cache holds records briefly, so that quota changes show quickly."""
    async with serving(settings.model_copy(update={"auth_cache_ttl_seconds": 0.2})) as c:
        yield c


async def test_a_key_over_its_quota_is_answered_429_and_nothing_is_published(
    client: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings, entity: str
) -> None:
    key = await _key(db, entity, SLOW)
    assert (await _post(client, key, entity, 100)).status_code == 200
    queued = await _queued(settings)

    refused = await _post(client, key, entity, 50)

    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"] == "application/json"
    assert re.fullmatch(
        r"over the quota of this key \(1 scores/s, burst 100\): retry after \d+ s",
        refused.json()["detail"],
    )
    retry_after = int(refused.headers["Retry-After"])
    # About 50 scores short at one a second, however long the test took to get here.
    assert 20 <= retry_after <= 50
    assert refused.headers["RateLimit-Policy"] == '"key";q=1;w=1;si-burst=100'
    limit = _rate_limit(refused)["key"]
    assert limit["t"] == retry_after
    assert 0 <= limit["r"] < 50
    assert await _queued(settings) == queued


async def test_a_single_create_counts_one_score_and_a_batch_counts_each(
    client: httpx.AsyncClient, db: asyncpg.Connection, entity: str
) -> None:
    key = await _key(db, entity, SLOW)
    assert (await _post(client, key, entity, 60)).status_code == 200
    assert (await _post(client, key, entity, 60)).status_code == 429
    # The refused 60 took nothing: the 40 left (and what came back since) are there.
    assert (await _post(client, key, entity, 39)).status_code == 200
    assert (await _post(client, key, entity, 1)).status_code == 200
    assert (await _post(client, key, entity, 30)).status_code == 429


async def test_a_batch_larger_than_the_burst_is_a_413_that_says_to_split_it(
    client: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings, entity: str
) -> None:
    key = await _key(db, entity, SLOW)
    queued = await _queued(settings)

    refused = await _post(client, key, entity, 101)

    assert refused.status_code == 413, refused.text
    assert refused.json() == {
        "detail": "101 scores in one request is more than the key quota's burst of 100: "
        "split the batch"
    }
    assert "Retry-After" not in refused.headers
    assert refused.headers["RateLimit-Policy"] == '"key";q=1;w=1;si-burst=100'
    assert await _queued(settings) == queued
    # It took nothing either.
    assert (await _post(client, key, entity, 100)).status_code == 200


async def test_the_keys_of_an_entity_share_its_quota(
    client: httpx.AsyncClient, db: asyncpg.Connection, entity: str
) -> None:
    await set_entity_quota(db, entity, SLOW)
    first, second = await _key(db, entity), await _key(db, entity)
    other_entity = f"{entity}-other"
    stranger = await _key(db, other_entity)

    assert (await _post(client, first, entity, 100)).status_code == 200
    refused = await _post(client, second, entity, 50)

    assert refused.status_code == 429, refused.text
    assert "this entity (1 scores/s, burst 100)" in refused.json()["detail"]
    assert refused.headers["RateLimit-Policy"] == '"entity";q=1;w=1;si-burst=100'
    assert set(_rate_limit(refused)) == {"entity"}
    assert (await _post(client, stranger, other_entity, 100)).status_code == 200


async def test_a_key_is_held_to_its_own_quota_and_its_entitys_both(
    client: httpx.AsyncClient, db: asyncpg.Connection, entity: str
) -> None:
    await set_entity_quota(db, entity, Quota(rate=1, burst=150))
    key = await _key(db, entity, SLOW)
    another = await _key(db, entity)

    assert (await _post(client, key, entity, 100)).status_code == 200
    refused = await _post(client, key, entity, 10)
    assert refused.status_code == 429
    assert refused.headers["RateLimit-Policy"] == (
        '"key";q=1;w=1;si-burst=100, "entity";q=1;w=1;si-burst=150'
    )
    assert set(_rate_limit(refused)) == {"key", "entity"}
    assert "t" in _rate_limit(refused)["key"]
    assert "t" not in _rate_limit(refused)["entity"]
    # The entity has about 50 left for its other keys.
    assert (await _post(client, another, entity, 40)).status_code == 200
    assert (await _post(client, another, entity, 40)).status_code == 429


async def test_the_default_quotas_hold_keys_and_entities_the_database_sets_none_for(
    settings: Settings, db: asyncpg.Connection, entity: str
) -> None:
    defaults = settings.model_copy(update={"quota_key_rate": 1, "quota_key_burst": 100})
    plain = await _key(db, entity)
    own = await _key(db, entity, Quota(rate=1000, burst=1000))
    async with serving(defaults) as client:
        assert (await _post(client, plain, entity, 100)).status_code == 200
        assert (await _post(client, plain, entity, 10)).status_code == 429
        assert (await _post(client, own, entity, 1000)).status_code == 200

    defaults = settings.model_copy(update={"quota_entity_rate": 1})
    async with serving(defaults) as client:
        # The default burst: one full batch.
        assert (await _post(client, plain, entity, 1000)).status_code == 200
        refused = await _post(client, own, entity, 10)
        assert refused.status_code == 429
        assert '"entity";q=1;w=1;si-burst=1000' in refused.headers["RateLimit-Policy"]


async def _answer_within_a_while(
    client: httpx.AsyncClient, key: str, entity: str, scores: int, status: int
) -> None:
    """Post until the answer is `status`: a quota change reaches the api with the key's next
    lookup, one AUTH_CACHE_TTL_SECONDS (0.2 s here) after the last."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CHANGE_TIMEOUT_SECONDS
    answers = [(await _post(client, key, entity, scores)).status_code]
    while answers[-1] != status:
        assert loop.time() < deadline, f"{scores} scores never answered {status}: {answers}"
        await asyncio.sleep(0.05)
        answers.append((await _post(client, key, entity, scores)).status_code)


async def test_a_changed_quota_takes_effect_within_the_key_cache_ttl(
    client: httpx.AsyncClient, db: asyncpg.Connection, entity: str
) -> None:
    key = await _key(db, entity)
    key_id = key.split("_")[1]
    assert (await _post(client, key, entity, 100)).status_code == 200

    assert await set_key_quota(db, key_id, Quota(rate=1, burst=10))
    await _answer_within_a_while(client, key, entity, 11, 413)

    assert await set_key_quota(db, key_id, None)
    await _answer_within_a_while(client, key, entity, 100, 200)

    await set_entity_quota(db, entity, Quota(rate=1, burst=20))
    await _answer_within_a_while(client, key, entity, 21, 413)
    assert await set_entity_quota(db, entity, None)
    await _answer_within_a_while(client, key, entity, 100, 200)


async def test_quota_refusals_are_counted_by_entity(
    client: httpx.AsyncClient, db: asyncpg.Connection, entity: str
) -> None:
    key = await _key(db, entity, SLOW)
    await _post(client, key, entity, 100)
    for _ in range(2):
        assert (await _post(client, key, entity, 50)).status_code == 429
    assert (await _post(client, key, entity, 101)).status_code == 413

    text = (await client.get("/metrics")).text
    counted = {
        sample.labels["entity"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "score_ingest_quota_rejections"
        for sample in family.samples
        if sample.name == "score_ingest_quota_rejections_total"
    }
    assert counted[entity] == 2


async def test_the_openapi_document_lists_the_429_of_both_creates(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/v2/{entity}/{project}/scores", "/v2/{entity}/{project}/scores/batch"):
        answer = paths[path]["post"]["responses"]["429"]
        assert answer["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorRes"
        }
        assert "Retry-After" in answer["description"]


async def test_a_create_answered_with_an_error_after_its_charge_gives_its_scores_back(
    client: httpx.AsyncClient, db: asyncpg.Connection, entity: str
) -> None:
    key = await _key(db, entity, SLOW)
    body = score_body(scorer=f"weave:///{entity}/{PROJECT}/op/exact_match:abc123")

    async def batch(scores: int, idempotency_key: str, value: float) -> httpx.Response:
        return await client.post(
            f"/v2/{entity}/{PROJECT}/scores/batch",
            json={"scores": [{**body, "value": value}] * scores},
            headers={**basic_auth(key), "Idempotency-Key": idempotency_key},
        )

    assert (await batch(50, "run-1", 0.5)).status_code == 200
    # Charged its 50, then refused: the key was used with another body.
    reused = await batch(50, "run-1", 0.7)
    assert reused.status_code == 422, reused.text
    # The 50 came back: at one score a second, they could not have refilled meanwhile.
    assert (await batch(49, "run-2", 0.5)).status_code == 200

"""Authentication and authorization of POST /v2/{entity}/{project}/scores: keys, scopes, cache."""

import asyncio
import base64
from collections.abc import Callable

import aio_pika
import asyncpg
import httpx
import pytest

from api.keys import create_key, revoke_key
from shared.settings import Settings
from shared.topology import QUEUE
from tests.conftest import ENTITY, PROJECT, basic_auth, bearer_auth, score_body, serving
from tests.support.tcp_proxy import TcpProxy

URL = f"/v2/{ENTITY}/{PROJECT}/scores"


async def _published_count(settings: Settings) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        assert queue.declaration_result.message_count is not None
        return queue.declaration_result.message_count


def _basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers.get("www-authenticate", "")
    assert "Basic" in challenge, challenge
    assert "Bearer" in challenge, challenge
    assert isinstance(response.json()["detail"], str)


async def _post(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await client.post(URL, json=score_body(), headers=headers)


async def test_basic_with_username_api(client: httpx.AsyncClient, api_key: str) -> None:
    response = await _post(client, basic_auth(api_key))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("username", ["", "someone", "user@example.com", "API"])
async def test_basic_takes_any_username(
    client: httpx.AsyncClient, api_key: str, username: str
) -> None:
    response = await _post(client, _basic(username, api_key))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_bearer(client: httpx.AsyncClient, api_key: str, scheme: str) -> None:
    response = await _post(client, {"Authorization": f"{scheme} {api_key}"})
    assert response.status_code == 200, response.text


def _wrong_secret(api_key: str) -> str:
    """The same key id with another secret of the right shape."""
    prefix, key_id, secret = api_key.split("_", 2)
    other = "A" * len(secret) if secret != "A" * len(secret) else "B" * len(secret)
    return f"{prefix}_{key_id}_{other}"


UNAUTHORIZED_HEADERS: dict[str, Callable[[str], dict[str, str]]] = {
    "missing header": lambda key: {},
    "unsupported scheme": lambda key: {"Authorization": f"Digest {key}"},
    "empty bearer": lambda key: {"Authorization": "Bearer "},
    "malformed key (basic)": lambda key: basic_auth("not-an-api-key"),
    "malformed key (bearer)": lambda key: bearer_auth("si_0123_short"),
    "key with trailing space": lambda key: basic_auth(key + " "),
    "key in the username": lambda key: _basic(key, ""),
    "unknown key": lambda key: bearer_auth(f"si_{'0' * 16}_{'A' * 43}"),
    "wrong secret for a real key id (basic)": lambda key: basic_auth(_wrong_secret(key)),
    "wrong secret for a real key id (bearer)": lambda key: bearer_auth(_wrong_secret(key)),
    "basic credentials not base64": lambda key: {"Authorization": "Basic !!!not-base64!!!"},
    "basic credentials without colon": lambda key: {
        "Authorization": "Basic " + base64.b64encode(key.encode()).decode()
    },
}


@pytest.mark.parametrize("case", UNAUTHORIZED_HEADERS)
async def test_missing_or_invalid_key_is_401_with_challenge(
    client: httpx.AsyncClient, api_key: str, settings: Settings, case: str
) -> None:
    response = await _post(client, UNAUTHORIZED_HEADERS[case](api_key))
    _assert_unauthorized(response)
    assert await _published_count(settings) == 0


async def test_revoked_key_is_401(settings: Settings, db: asyncpg.Connection) -> None:
    info, key = await create_key(db, ENTITY)
    assert await revoke_key(db, info.key_id)
    async with serving(settings.model_copy(update={"auth_cache_ttl_seconds": 0})) as client:
        _assert_unauthorized(await _post(client, basic_auth(key)))
        _assert_unauthorized(await _post(client, bearer_auth(key)))
    assert await _published_count(settings) == 0


async def test_revoking_a_used_key_takes_effect_after_the_cache_ttl(
    settings: Settings, db: asyncpg.Connection
) -> None:
    ttl = 0.3
    info, key = await create_key(db, ENTITY)
    async with serving(settings.model_copy(update={"auth_cache_ttl_seconds": ttl})) as client:
        assert (await _post(client, basic_auth(key))).status_code == 200
        assert await revoke_key(db, info.key_id)
        # Within the TTL the cached verdict may still stand; either answer is allowed.
        assert (await _post(client, basic_auth(key))).status_code in (200, 401)
        await asyncio.sleep(ttl + 0.2)
        _assert_unauthorized(await _post(client, basic_auth(key)))


async def test_key_of_another_entity_is_403(
    client: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    _, key = await create_key(db, "someone-else")
    for headers in (basic_auth(key), bearer_auth(key)):
        response = await _post(client, headers)
        assert response.status_code == 403, response.text
        assert isinstance(response.json()["detail"], str)
    assert await _published_count(settings) == 0


async def test_entity_match_is_exact(
    client: httpx.AsyncClient, api_key: str, settings: Settings
) -> None:
    for entity in (ENTITY.upper(), ENTITY + "x", ENTITY[:-1]):
        response = await client.post(
            f"/v2/{entity}/{PROJECT}/scores", json=score_body(), headers=basic_auth(api_key)
        )
        assert response.status_code == 403, f"{entity}: {response.text}"
    assert await _published_count(settings) == 0


async def test_project_scoped_key_writes_only_to_its_projects(
    client: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    _, key = await create_key(db, ENTITY, ["p1"])

    allowed = await client.post(
        f"/v2/{ENTITY}/p1/scores", json=score_body(), headers=basic_auth(key)
    )
    assert allowed.status_code == 200, allowed.text
    for project in ("p2", "P1", "p1-suffix"):
        refused = await client.post(
            f"/v2/{ENTITY}/{project}/scores", json=score_body(), headers=basic_auth(key)
        )
        assert refused.status_code == 403, f"{project}: {refused.text}"
        assert isinstance(refused.json()["detail"], str)
    assert await _published_count(settings) == 1


async def test_key_with_several_projects(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    _, key = await create_key(db, ENTITY, ["p1", "p2"])
    for project, status in (("p1", 200), ("p2", 200), ("p3", 403)):
        response = await client.post(
            f"/v2/{ENTITY}/{project}/scores", json=score_body(), headers=bearer_auth(key)
        )
        assert response.status_code == status, f"{project}: {response.text}"


async def test_only_a_hash_of_the_key_is_stored(db: asyncpg.Connection, api_key: str) -> None:
    _, _, secret = api_key.split("_", 2)
    rows = await db.fetch("SELECT t::text AS row_text, secret_hash FROM api_keys AS t")
    assert len(rows) == 1
    stored = rows[0]["row_text"]
    for leaked in (api_key, secret, api_key.encode().hex(), secret.encode().hex()):
        assert leaked not in stored
    assert len(rows[0]["secret_hash"]) == 32  # a SHA-256 digest, not the key itself


async def test_cached_key_survives_a_database_outage(
    settings: Settings, db: asyncpg.Connection
) -> None:
    ttl = 0.2
    _, cached_key = await create_key(db, ENTITY, name="cached")
    _, uncached_key = await create_key(db, ENTITY, name="uncached")
    async with TcpProxy.for_url(settings.database_url) as proxy:
        through_proxy = settings.model_copy(
            update={
                "database_url": proxy.url_through(settings.database_url),
                "auth_cache_ttl_seconds": ttl,
            }
        )
        async with serving(through_proxy) as client:
            assert (await _post(client, basic_auth(cached_key))).status_code == 200

            await proxy.cut()
            await asyncio.sleep(ttl + 0.2)
            cached = await _post(client, basic_auth(cached_key))
            assert cached.status_code == 200, cached.text
            uncached = await _post(client, basic_auth(uncached_key))
            assert uncached.status_code == 503, uncached.text
            assert int(uncached.headers["retry-after"]) >= 1
            assert isinstance(uncached.json()["detail"], str)
            unknown = await _post(client, bearer_auth(f"si_{'f' * 16}_{'A' * 43}"))
            assert unknown.status_code == 503, unknown.text

            await proxy.restore()
            recovered = await _post(client, basic_auth(uncached_key))
            assert recovered.status_code == 200, recovered.text
    assert await _published_count(settings) == 3

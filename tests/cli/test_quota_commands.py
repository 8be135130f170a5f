"""`score-ingest keys create|update --rate --burst` and `keys entity-quota`, as an operator
runs them, checked against the rows they leave and an api that reads them."""

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.settings import Settings
from tests.conftest import PROJECT, basic_auth, score_body, serving
from tests.support.processes import run_cli


@pytest.fixture
async def entity(db: asyncpg.Connection) -> AsyncIterator[str]:
    """An entity of the test's own; its quota row goes with the test."""
    name = f"quota-cli-{secrets.token_hex(4)}"
    yield name
    await db.execute("DELETE FROM entity_quotas WHERE entity = $1", name)


async def _key_quota(db: asyncpg.Connection, key_id: str) -> tuple[int | None, int | None]:
    row = await db.fetchrow(
        "SELECT quota_rate, quota_burst FROM api_keys WHERE key_id = $1", key_id
    )
    assert row is not None
    return row["quota_rate"], row["quota_burst"]


async def test_keys_create_and_update_set_and_clear_a_keys_quota(
    settings: Settings, db: asyncpg.Connection, entity: str
) -> None:
    created = run_cli(
        settings, "keys", "create", "--entity", entity, "--rate", "5", "--burst", "50"
    )
    assert created.returncode == 0, created.stderr
    assert "quota 5 scores/s, burst 50" in created.stdout
    secret = created.stdout.strip().splitlines()[-1]
    key_id = secret.split("_")[1]
    assert await _key_quota(db, key_id) == (5, 50)

    listed = run_cli(settings, "keys", "list", "--entity", entity)
    assert key_id in listed.stdout
    assert "5 scores/s, burst 50" in listed.stdout

    updated = run_cli(settings, "keys", "update", key_id, "--rate", "7")
    assert updated.returncode == 0, updated.stderr
    assert "AUTH_CACHE_TTL_SECONDS" in updated.stdout
    # The burst defaults to a full batch (1000) or a second of the rate, the larger.
    assert await _key_quota(db, key_id) == (7, 1000)

    cleared = run_cli(settings, "keys", "update", key_id, "--clear-quota")
    assert cleared.returncode == 0, cleared.stderr
    assert await _key_quota(db, key_id) == (None, None)
    assert "(default)" in run_cli(settings, "keys", "list", "--entity", entity).stdout


async def test_keys_quota_options_refuse_what_makes_no_quota(
    settings: Settings, db: asyncpg.Connection, entity: str
) -> None:
    created = run_cli(settings, "keys", "create", "--entity", entity)
    key_id = created.stdout.strip().splitlines()[-1].split("_")[1]
    for args in (
        ["keys", "create", "--entity", entity, "--burst", "10"],
        ["keys", "create", "--entity", entity, "--rate", "0"],
        ["keys", "update", key_id],
        ["keys", "update", key_id, "--rate", "5", "--clear-quota"],
        ["keys", "update", key_id, "--burst", "5"],
        ["keys", "entity-quota", entity, "--rate", "5", "--clear"],
    ):
        refused = run_cli(settings, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE entity = $1", entity) == 1
    assert await _key_quota(db, key_id) == (None, None)

    missing = run_cli(settings, "keys", "update", "0000000000000000", "--rate", "5")
    assert missing.returncode == 1
    assert "no key 0000000000000000" in missing.stderr


async def test_keys_entity_quota_shows_sets_and_clears_an_entitys_quota(
    settings: Settings, db: asyncpg.Connection, entity: str
) -> None:
    shown = run_cli(settings, "keys", "entity-quota", entity)
    assert shown.returncode == 0, shown.stderr
    assert f"entity {entity}: quota default (QUOTA_ENTITY_*)" in shown.stdout

    set_ = run_cli(settings, "keys", "entity-quota", entity, "--rate", "3", "--burst", "30")
    assert set_.returncode == 0, set_.stderr
    row = await db.fetchrow("SELECT rate, burst FROM entity_quotas WHERE entity = $1", entity)
    assert row is not None
    assert (row["rate"], row["burst"]) == (3, 30)
    shown = run_cli(settings, "keys", "entity-quota", entity)
    assert f"entity {entity}: quota 3 scores/s, burst 30" in shown.stdout

    cleared = run_cli(settings, "keys", "entity-quota", entity, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert await db.fetchval("SELECT count(*) FROM entity_quotas WHERE entity = $1", entity) == 0


async def test_an_api_holds_keys_to_the_quotas_the_commands_set(
    settings: Settings, entity: str
) -> None:
    created = run_cli(settings, "keys", "create", "--entity", entity, "--rate", "1", "--burst", "5")
    secret = created.stdout.strip().splitlines()[-1]
    other = run_cli(settings, "keys", "create", "--entity", entity).stdout.strip().splitlines()[-1]
    assert run_cli(settings, "keys", "entity-quota", entity, "--rate", "1").returncode == 0
    body = score_body(scorer=f"weave:///{entity}/{PROJECT}/op/exact_match:abc123")
    path = f"/v2/{entity}/{PROJECT}/scores/batch"

    async with serving(settings) as client:
        over_key = await client.post(path, json={"scores": [body] * 6}, headers=basic_auth(secret))
        assert over_key.status_code == 413, over_key.text
        # The entity's default burst is a full batch, and both keys draw on it.
        whole = await client.post(path, json={"scores": [body] * 1000}, headers=basic_auth(other))
        assert whole.status_code == 200, whole.text
        over_entity = await client.post(path, json={"scores": [body]}, headers=basic_auth(secret))
        assert over_entity.status_code == 429, over_entity.text
        assert "this entity" in over_entity.json()["detail"]

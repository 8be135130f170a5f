"""Migrations: creating the database, idempotence, and two processes migrating at once."""

import asyncio
import os
import subprocess
import sys

import asyncpg

from shared.db import load_migrations, migrate
from tests.support.services import scratch_database


def _migrate_in_subprocess(url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def _applied(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [row["version"] for row in rows]
    finally:
        await conn.close()


def test_two_processes_create_and_migrate_a_missing_database(postgres_server_url: str) -> None:
    with scratch_database(postgres_server_url) as url:
        first, second = _migrate_in_subprocess(url), _migrate_in_subprocess(url)
        outputs = [p.communicate(timeout=60)[0] for p in (first, second)]
        assert [first.returncode, second.returncode] == [0, 0], outputs
        expected = [m.version for m in load_migrations()]
        assert asyncio.run(_applied(url)) == expected
        # Exactly one of them applied the migrations; the other found nothing to do.
        assert sum("schema is up to date" in out for out in outputs) == 1, outputs


async def test_migrate_again_applies_nothing(database_url: str) -> None:
    assert await migrate(database_url) == []
    assert await _applied(database_url) == [m.version for m in load_migrations()]


async def test_the_message_signing_keys_table_is_gone(database_url: str) -> None:
    # Trust by exchange replaced signed messages (0006); the keys must not linger.
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('message_signing_keys')") is None
    finally:
        await conn.close()

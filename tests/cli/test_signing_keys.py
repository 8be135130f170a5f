"""`score-ingest signing-keys list | rotate`, as an operator runs them: the real command in a
subprocess, against a database of each test's own (rotating the session database's keys
would change what the other tests' apis sign with)."""

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from shared.db import create_database_if_missing, migrate
from tests.support.services import scratch_database

MIGRATE_FIRST = "no message_signing_keys table: run `score-ingest migrate` first"


@pytest.fixture
def database(postgres_server_url: str) -> Iterator[str]:
    """The URL of a database of this test's own, not created yet."""
    with scratch_database(postgres_server_url) as url:
        yield url


@pytest.fixture
def migrated(database: str) -> str:
    asyncio.run(migrate(database))
    return database


def signing_keys(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cli signing-keys <args>` with DATABASE_URL, as the deployment sets it."""
    return subprocess.run(
        [sys.executable, "-m", "cli", "signing-keys", *args],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def flat(text: str) -> str:
    """Output without rich's box drawing and line wrapping, for matching sentences."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


async def _keys(url: str) -> list[tuple[str, bytes]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT key_id, secret FROM message_signing_keys ORDER BY created_at DESC, key_id DESC"
        )
        return [(row["key_id"], bytes(row["secret"])) for row in rows]
    finally:
        await conn.close()


def keys_in(url: str) -> list[tuple[str, bytes]]:
    """(key_id, secret) of every key in the database, newest first."""
    return asyncio.run(_keys(url))


def assert_no_secret(output: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in (secret.hex(), secret.hex().upper(), secret.hex()[:16], repr(secret)[2:18]):
            assert form not in output, f"a secret is shown: {form!r}"


def test_list_shows_each_key_newest_first_and_never_a_secret(migrated: str) -> None:
    ((first_id, first_secret),) = keys_in(migrated)
    listed = signing_keys(migrated, "list")
    assert listed.returncode == 0, listed.stderr
    assert first_id in listed.stdout
    assert_no_secret(listed.stdout + listed.stderr, [first_secret])

    assert signing_keys(migrated, "rotate").returncode == 0
    (newer_id, newer_secret), (older_id, _) = keys_in(migrated)
    assert older_id == first_id
    listed = signing_keys(migrated, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.index(newer_id) < listed.stdout.index(older_id), listed.stdout
    # Each with when it was made.
    assert len(re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", listed.stdout)) == 2, listed.stdout
    assert_no_secret(listed.stdout + listed.stderr, [first_secret, newer_secret])


def test_rotate_adds_a_key_says_which_and_keeps_the_two_newest(migrated: str) -> None:
    ((original_id, original_secret),) = keys_in(migrated)
    secrets = [original_secret]
    for rotation in (1, 2):
        rotated = signing_keys(migrated, "rotate")
        assert rotated.returncode == 0, rotated.stderr
        keys = keys_in(migrated)
        assert len(keys) == 2
        newest_id, newest_secret = keys[0]
        secrets.append(newest_secret)
        assert f"added {newest_id}" in rotated.stdout
        assert_no_secret(rotated.stdout + rotated.stderr, secrets)
        assert (original_id in {key_id for key_id, _ in keys}) == (rotation == 1)

    listed = signing_keys(migrated, "list")
    assert original_id not in listed.stdout
    assert [key_id for key_id, _ in keys_in(migrated)] == [
        key_id for key_id in re.findall(r"msk_[0-9a-f]+", listed.stdout)
    ]


@pytest.mark.parametrize("command", ["list", "rotate"])
def test_on_an_unmigrated_database_the_commands_say_to_migrate_first(
    database: str, command: str
) -> None:
    asyncio.run(create_database_if_missing(database))

    result = signing_keys(database, command)

    assert result.returncode != 0
    assert MIGRATE_FIRST in flat(result.stderr), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # Nothing was created on the way.
    with pytest.raises(asyncpg.UndefinedTableError):
        keys_in(database)


@pytest.mark.parametrize("command", ["list", "rotate"])
def test_on_a_database_that_does_not_exist_the_commands_say_to_migrate_first(
    database: str, command: str
) -> None:
    result = signing_keys(database, command)

    assert result.returncode != 0
    assert "the database does not exist: run `score-ingest migrate` first" in flat(result.stderr)
    assert "Traceback" not in result.stdout + result.stderr

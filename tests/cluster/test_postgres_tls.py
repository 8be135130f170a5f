"""TLS to PostgreSQL: sslmode in DATABASE_URL works for the api, the worker and the CLI.

The servers are a PostgreSQL pair of the test's own with ssl on, whose pg_hba takes only
TLS connections (hostssl), and whose certificate a CA of the test's own signed. With
sslmode=verify-full (that CA as sslrootcert) and with sslmode=require, the CLI migrates and
creates a key, the api takes a score with an Idempotency-Key and reads it back, and the
worker stores it, every session encrypted; verify-full refuses a server its CA did not sign.
"""

import asyncio
import tempfile
from pathlib import Path

import asyncpg
import httpx
import pytest

from chaos.postgres import PostgresPair
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.processes import api_process, run_cli, worker_process
from tests.support.tls import CertificateAuthority

STORED_SECONDS = 20.0
SESSIONS_SSL = """
SELECT count(*) FILTER (WHERE s.ssl) AS encrypted, count(*) FILTER (WHERE NOT s.ssl) AS plain
FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
"""


def _url(pair: PostgresPair, sslmode: str, database: str) -> str:
    url = f"{pair.database_url(database)}&sslmode={sslmode}"
    return f"{url}&sslrootcert={pair.ca_file()}" if sslmode == "verify-full" else url


async def _wait_until_stored(conn: asyncpg.Connection, score_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STORED_SECONDS
    while not await conn.fetchval("SELECT count(*) FROM scores WHERE score_id = $1", score_id):
        assert loop.time() < deadline, f"score {score_id} not stored within {STORED_SECONDS}s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("sslmode", ["verify-full", "require"])
async def test_api_worker_and_cli_over_tls(
    pair: PostgresPair, settings: Settings, sslmode: str
) -> None:
    # A database per mode: each run starts from an empty schema the CLI creates.
    url = _url(pair, sslmode, f"score_ingest_{sslmode.replace('-', '_')}")
    settings = settings.model_copy(update={"database_url": url})
    migrated = run_cli(settings, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    created = run_cli(settings, "keys", "create", "--entity", ENTITY)
    assert created.returncode == 0, created.stderr
    headers = basic_auth(created.stdout.strip().splitlines()[-1]) | {"Idempotency-Key": sslmode}

    async with (
        api_process(settings) as api,
        worker_process(settings),
        httpx.AsyncClient(base_url=api.base_url, timeout=10) as http,
    ):
        scores = f"/v2/{ENTITY}/{PROJECT}/scores"
        posted = await http.post(scores, json=score_body(), headers=headers)
        assert posted.status_code == 200, posted.text
        score_id = posted.json()["score_id"]
        conn = await asyncpg.connect(url)
        try:
            await _wait_until_stored(conn, score_id)
            read = await http.get(f"{scores}/{score_id}", headers=headers)
            assert read.status_code == 200, read.text
            assert read.json()["score_id"] == score_id
            sessions = await conn.fetchrow(SESSIONS_SSL)
        finally:
            await conn.close()
    # The api's pools and the worker's: at least one session each, none in the clear.
    assert sessions is not None
    assert sessions["encrypted"] >= 2
    assert sessions["plain"] == 0


def test_verify_full_refuses_a_server_another_ca_signed(
    pair: PostgresPair, settings: Settings
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        stranger = CertificateAuthority(Path(directory), "stranger")
        url = f"{pair.database_url()}&sslmode=verify-full&sslrootcert={stranger.cert_file}"
        migrated = run_cli(settings.model_copy(update={"database_url": url}), "migrate")
    assert migrated.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in migrated.stderr

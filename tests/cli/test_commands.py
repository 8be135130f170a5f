"""The score-ingest command as an operator uses it: keys, topology, and `run` end to end."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body, wait_for_count
from tests.support.processes import run_cli


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "AMQP_URL": settings.amqp_url,
        **extra,
    }


def test_keys_create_list_revoke(settings: Settings) -> None:
    created = run_cli(settings, "keys", "create", "--entity", ENTITY, "--project", PROJECT)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("si_")
    key_id = secret.split("_")[1]

    listed = run_cli(settings, "keys", "list", "--entity", ENTITY)
    assert key_id in listed.stdout
    assert PROJECT in listed.stdout
    assert secret.split("_", 2)[2] not in listed.stdout

    assert run_cli(settings, "keys", "revoke", key_id).returncode == 0
    assert run_cli(settings, "keys", "revoke", "0000000000000000").returncode == 1


def test_topology_is_idempotent(settings: Settings) -> None:
    for _ in range(2):
        result = run_cli(settings, "topology")
        assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def running_service(settings: Settings) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`score-ingest run` as `make run` starts it, on a free port."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "run"],
        # The worker's health port too: a fixed default would clash with another test run's.
        env=_env(settings, API_PORT=str(port), WORKER_HEALTH_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1)
            break
        except httpx.TransportError:
            assert process.poll() is None, process.communicate()[0]
            time.sleep(0.2)
    yield process, port
    if process.poll() is None:
        process.kill()
        process.wait()


async def test_run_serves_stores_and_stops_cleanly(
    running_service: tuple[subprocess.Popen[str], int], api_key: str, db: asyncpg.Connection
) -> None:
    process, port = running_service
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        deadline = time.monotonic() + 15
        while True:  # the api answers before its publisher has connected: wait for a 200
            try:
                response = await client.post(
                    f"/v2/{ENTITY}/{PROJECT}/scores",
                    json=score_body(),
                    headers=basic_auth(api_key),
                )
            except httpx.TimeoutException:
                process.send_signal(signal.SIGINT)
                pytest.fail(
                    f"no answer in 5 s; `run` printed:\n{process.communicate(timeout=30)[0]}"
                )
            if response.status_code != 503 or time.monotonic() > deadline:
                break
    assert response.status_code == 200, response.text
    count = await wait_for_count(
        db, "SELECT count(*) FROM scores WHERE score_id = $1", 1, response.json()["score_id"]
    )
    assert count == 1
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output


@pytest.mark.fault
def test_run_takes_its_api_and_worker_down_when_it_is_killed(
    running_service: tuple[subprocess.Popen[str], int],
) -> None:
    process, _ = running_service
    children_file = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    children = [int(pid) for pid in children_file.read_text().split()]
    assert len(children) == 2, children

    process.kill()  # SIGKILL: `run` gets no chance to pass anything on
    process.wait()

    deadline = time.monotonic() + 15
    while (alive := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"left running: {alive}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"

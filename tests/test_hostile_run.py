"""A hostile run: every attack of issue 13 at once, while another tenant keeps posting.

A real api and worker run as subprocesses. Tenant `acme` posts single scores steadily
throughout; meanwhile another tenant and anonymous clients do everything they can to the
HTTP door and a direct publisher sends every kind of bad message to the queue. Afterwards:
every score answered 200 is stored exactly once, acme's requests were each answered 200
within a second, the worker never restarted, every dlq command works, the api stayed
under 200 MB and the worker within its byte budget plus 100 MB.
"""

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import asyncpg
import httpx

from api.keys import create_key
from shared.contract import CONTENT_TYPE, MESSAGE_TYPE
from shared.settings import MIB, Settings
from shared.topology import DEAD_LETTER_QUEUE, EXCHANGE, ROUTING_KEY
from tests.conftest import ENTITY, basic_auth, score_body
from tests.support.load import LoadGenerator, assert_stored_exactly_once
from tests.support.memory import rss_bytes
from tests.support.messages import to_amqp_message
from tests.support.processes import (
    CliProcess,
    api_process,
    connect_broker,
    score_message,
    worker_process,
)
from tests.support.raw_amqp import field_table, long_string, nested_table, publish_raw, raw_message

ATTACKER = "mallory"
WORKER_BUDGET_BYTES = 64 * MIB
API_RSS_LIMIT_BYTES = 200 * 1000 * 1000
WORKER_RSS_MARGIN_BYTES = 100 * 1000 * 1000
PROMPT_SECONDS = 1.0
ATTACK_SECONDS = 12.0


class PeakMemory:
    """Samples the RSS of some processes every 100 ms and keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self.peaks = dict.fromkeys(pids, 0)
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            for name, pid in self._pids.items():
                self.peaks[name] = max(self.peaks[name], rss_bytes(pid))
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator["PeakMemory"]:
        """Sample for the length of the block."""
        self._task = asyncio.create_task(self._sample())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _hold_connections(
    port: int, count: int, send: Callable[[asyncio.StreamWriter], Awaitable[None]]
) -> None:
    """Open count connections and run send on each until the attack ends or the server
    closes them; every connection is closed afterwards."""
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writers.append(writer)
        with contextlib.suppress(OSError, ConnectionError):
            await send(writer)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(one() for _ in range(count))), timeout=ATTACK_SECONDS
        )
    except TimeoutError:
        pass
    finally:
        for writer in writers:
            writer.close()


async def _idle(_: asyncio.StreamWriter) -> None:
    await asyncio.sleep(ATTACK_SECONDS)


async def _slowloris(writer: asyncio.StreamWriter) -> None:
    writer.write(b"POST /v2/acme/evals/scores HTTP/1.1\r\nHost: x\r\n")
    while True:
        writer.write(b"X-Slow: y\r\n")
        await writer.drain()
        await asyncio.sleep(1)


async def _endless_header(writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    chunk = b"a" * 65536
    for _ in range(160):  # 10 MiB, never ending the line
        writer.write(chunk)
        await writer.drain()


async def _unauthenticated_chunked_body(writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"POST /v2/acme/evals/scores/batch HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    for _ in range(256):  # 16 MiB
        writer.write(chunk)
        await writer.drain()


async def _stalled_list(port: int, key: str) -> None:
    async def never_read(writer: asyncio.StreamWriter) -> None:
        auth = basic_auth(key)["Authorization"]
        writer.write(
            f"GET /v2/{ATTACKER}/p/scores?limit=1000000 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {auth}\r\n\r\n".encode()
        )
        await writer.drain()
        await asyncio.sleep(ATTACK_SECONDS)

    await _hold_connections(port, 10, never_read)


async def _random_keys(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        for _ in range(20):
            await asyncio.gather(
                *(
                    client.post(
                        f"/v2/{ENTITY}/evals/scores",
                        json=score_body(),
                        headers={
                            "Authorization": f"Bearer si_{uuid.uuid4().hex}_{os.urandom(16).hex()}"
                        },
                    )
                    for _ in range(50)
                ),
                return_exceptions=True,
            )


async def _odd_requests(base_url: str, key: str) -> list[int]:
    auth = basic_auth(key)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        answers = [
            await client.get(f"/v2/{ATTACKER}/p/scores?offset=999999&limit=1", headers=auth),
            await client.post(f"/v2/{ATTACKER}/p/scores/", json=score_body(), headers=auth),
            await client.post(
                f"/v2/{ATTACKER}/p/scores",
                content=json.dumps(score_body()).encode("latin-1"),
                headers={**auth, "Content-Type": "application/json; charset=latin-1"},
            ),
            await client.post(f"/v2/{ATTACKER}/%ff%fe/scores", json=score_body(), headers=auth),
            await client.post(f"/v2/{ATTACKER}/a\u202eb/scores", json=score_body(), headers=auth),
        ]
    return [answer.status_code for answer in answers]


async def _big_scores(base_url: str, key: str) -> list[str]:
    """20 clients post near-1 MiB scores at once: legitimate, so each must be stored."""
    value = "x" * (MIB - 4096)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    f"/v2/{ATTACKER}/p/scores",
                    json=score_body(scorer=f"weave:///{ATTACKER}/p/op/big:1", value=value),
                    headers=basic_auth(key),
                )
                for _ in range(20)
            )
        )
    assert all(answer.status_code == 200 for answer in answers), [
        (answer.status_code, answer.text[:200]) for answer in answers
    ]
    return [answer.json()["score_id"] for answer in answers]


async def _bad_messages(settings: Settings) -> None:
    """A direct publisher's worst: undecodable headers and bodies, oversized and unknown."""
    async with connect_broker(settings) as broker:
        good = to_amqp_message(score_message())
        messages = [
            aio_pika.Message(
                body=b"[" * 100_000 + b"]" * 100_000,
                content_type=CONTENT_TYPE,
                type=MESSAGE_TYPE,
            ),
            aio_pika.Message(
                body=json.dumps({**json.loads(good.body), "value": "y" * (20 * MIB)}).encode(),
                content_type=CONTENT_TYPE,
                type=MESSAGE_TYPE,
            ),
            aio_pika.Message(
                body=json.dumps({**json.loads(good.body), "extra": 1}).encode(),
                content_type=CONTENT_TYPE,
                type=MESSAGE_TYPE,
            ),
        ]
        await broker.publish(messages)
    # Header tables aio-pika would not write: a string that is not UTF-8, 3000 levels deep.
    await publish_raw(
        settings.amqp_url,
        EXCHANGE,
        ROUTING_KEY,
        [
            raw_message(
                b"not json",
                headers=field_table([(b"x-raw", long_string(b"\xff\xfe"))]),
                message_type=MESSAGE_TYPE.encode(),
            ),
            raw_message(
                b"{}",
                headers=field_table([(b"k", nested_table(3000))]),
                message_type=MESSAGE_TYPE.encode(),
            ),
        ],
    )


async def test_a_hostile_run_harms_no_other_score_or_tenant(
    settings: Settings, db: asyncpg.Connection, api_key: str, tmp_path: Path
) -> None:
    _, attacker_key = await create_key(db, ATTACKER, name="mallory")
    hostile = settings.model_copy(update={"worker_prefetch_bytes": WORKER_BUDGET_BYTES})
    async with (
        api_process(hostile) as api,
        worker_process(hostile) as worker,
    ):
        port = int(api.base_url.rsplit(":", 1)[1])
        memory = PeakMemory({"api": api.process.pid, "worker": worker.pid})
        async with memory.watching(), LoadGenerator(api.base_url, api_key, clients=4) as load:
            odd = asyncio.create_task(_odd_requests(api.base_url, attacker_key))
            big = asyncio.create_task(_big_scores(api.base_url, attacker_key))
            await asyncio.gather(
                _hold_connections(port, 300, _idle),
                _hold_connections(port, 100, _slowloris),
                _hold_connections(port, 30, _endless_header),
                _hold_connections(port, 5, _unauthenticated_chunked_body),
                _stalled_list(port, attacker_key),
                _random_keys(api.base_url),
                _bad_messages(hostile),
                odd,
                big,
            )
            await load.stop()
        odd_statuses, big_ids = odd.result(), big.result()
        assert all(400 <= status < 500 for status in odd_statuses), odd_statuses

        slow = [o for o in load.outcomes if o.status != 200 or o.seconds > PROMPT_SECONDS]
        assert not slow, f"{len(slow)} of acme's {len(load.outcomes)} posts: {slow[:3]}"
        await assert_stored_exactly_once(db, load.accepted_ids() + big_ids)

        assert worker.returncode is None, worker.output
        assert "Traceback" not in worker.output, worker.output
        assert memory.peaks["api"] < API_RSS_LIMIT_BYTES, memory.peaks
        assert memory.peaks["worker"] < WORKER_BUDGET_BYTES + WORKER_RSS_MARGIN_BYTES, memory.peaks

        async with connect_broker(hostile) as broker:
            dead = await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 5, timeout=20)
            assert dead == 5, f"{dead} dead letters"
        await _every_dlq_command_works(hostile, tmp_path)


async def _dlq(settings: Settings, *args: str) -> str:
    async with CliProcess("dlq", ["dlq", *args], settings) as dlq:
        assert await dlq.wait(timeout=30) == 0, dlq.output
        return dlq.output


async def _every_dlq_command_works(settings: Settings, tmp_path: Path) -> None:
    """list, export and show every letter; replay one (it comes back, refused again); purge
    all of them into an export file."""
    await _dlq(settings, "list")
    exported = tmp_path / "letters.jsonl"
    await _dlq(settings, "export", str(exported))
    ids = [json.loads(line)["id"] for line in exported.read_text().splitlines()]
    assert len(ids) == 5, ids
    for letter_id in ids:
        await _dlq(settings, "show", letter_id)
    await _dlq(settings, "replay", "--id", ids[0])
    async with connect_broker(settings) as broker:
        assert await broker.wait_for_ready_count(DEAD_LETTER_QUEUE, 5, timeout=20) == 5
    purged = tmp_path / "purged.jsonl"
    await _dlq(settings, "purge", "--yes", "--export", str(purged))
    assert len(purged.read_text().splitlines()) == 5
    async with connect_broker(settings) as broker:
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0

"""The attackers of the hostile run (tests/test_hostile_run.py), as a process of their own.

Another tenant and anonymous clients do everything they can to the HTTP door while a direct
publisher sends every kind of bad message to the queue. They run apart from the test, as
real attackers run on other machines: the JSON they encode (tens of MiB) and the thousand
requests they send would otherwise stall the test's own event loop, and with it the clock
by which the test times the victim tenant's requests.

Run as `python -m tests.support.hostile_clients BASE_URL ATTACKER_KEY` with the settings in
the environment; the last line it prints is JSON: the statuses of the odd requests and the
ids of the big scores (legitimate, so each must be stored).
"""

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import httpx

from shared.contract import CONTENT_TYPE, MESSAGE_TYPE
from shared.settings import MIB, Settings
from shared.topology import EXCHANGE, ROUTING_KEY
from tests.conftest import ENTITY, basic_auth, score_body
from tests.support.messages import to_amqp_message
from tests.support.processes import connect_broker, score_message
from tests.support.raw_amqp import field_table, long_string, nested_table, publish_raw, raw_message

ATTACKER = "mallory"
ATTACK_SECONDS = 6.0


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


async def attack(base_url: str, key: str, settings: Settings) -> dict[str, list[int] | list[str]]:
    """Every attack at once; the odd requests' statuses and the big scores' ids."""
    port = int(base_url.rsplit(":", 1)[1])
    odd = asyncio.create_task(_odd_requests(base_url, key))
    big = asyncio.create_task(_big_scores(base_url, key))
    await asyncio.gather(
        _hold_connections(port, 300, _idle),
        _hold_connections(port, 100, _slowloris),
        _hold_connections(port, 30, _endless_header),
        _hold_connections(port, 5, _unauthenticated_chunked_body),
        _stalled_list(port, key),
        _random_keys(base_url),
        _bad_messages(settings),
        odd,
        big,
    )
    return {"odd": odd.result(), "big": big.result()}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(attack(sys.argv[1], sys.argv[2], Settings()))))
